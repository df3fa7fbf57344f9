//! The thread that sweeps run on, at a lower CPU priority than serving, and the hand-back of
//! memory freed by large sweeps.

use std::path::Path;

use parking_lot::Mutex;

use crate::store::OpenError;

/// After a sweep pass that deleted at least this many records, freed heap memory is handed
/// back to the system.
pub(crate) const TRIM_AFTER_SWEEPING: u64 = 50_000;

/// Hands free heap pages back to the system. Deleting many records frees much memory in
/// scattered chunks that glibc's allocator otherwise keeps (figures in BENCHMARKS.md).
pub(crate) fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks and trims the allocator's own free lists.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// A sweep batch handed to the sweep thread.
pub(crate) type SweepJob = Box<dyn FnOnce() + Send>;

/// The thread that runs sweeps, at a lower CPU priority than serving (nice 10), so that deleting
/// a large batch of expired records takes the CPU that calls leave idle rather than competing
/// with them for it. Sweeping is only reclamation (expired records are already absent), so
/// it can wait.
pub(crate) struct SweepThread {
    jobs: Mutex<Option<std::sync::mpsc::Sender<SweepJob>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl SweepThread {
    pub(crate) fn start(path: &Path) -> Result<SweepThread, OpenError> {
        let (jobs, queue) = std::sync::mpsc::channel::<SweepJob>();
        let thread = std::thread::Builder::new()
            .name("sled-sweeper".to_owned())
            .spawn(move || {
                lower_this_threads_priority();
                for job in queue {
                    job();
                }
            })
            .map_err(|source| OpenError::Io { path: path.to_owned(), source })?;
        Ok(SweepThread { jobs: Mutex::new(Some(jobs)), thread: Mutex::new(Some(thread)) })
    }

    /// Runs `job` on the sweep thread; `None` once the store is closed.
    pub(crate) async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let sent = self.jobs.lock().as_ref()?.send(Box::new(move || {
            let _ = reply.send(job());
        }));
        sent.ok()?;
        answer.await.ok()
    }

    /// Lets the thread finish its queue and end. Blocks.
    pub(crate) fn stop(&self) {
        self.jobs.lock().take();
        if let Some(thread) = self.thread.lock().take() {
            // A panicking sweep already reported itself; closing goes on.
            let _ = thread.join();
        }
    }
}

/// Gives the calling thread nice 10 (Linux applies `setpriority` to the calling thread only).
/// Best effort: where it fails, sweeps run at normal priority.
pub(crate) fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority takes plain integers and touches no memory of ours.
        let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
        if result != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "sweeps run at normal priority");
        }
    }
}
