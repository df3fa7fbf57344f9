//! The processes the suite controls: the coordinator binary and the example under test.
//!
//! Every child runs in a process group of its own (the example is a `sh -c` command line that may
//! start an interpreter or `cargo`), and the whole group is killed when its handle drops — after a
//! passing check, a failing one, a panic or a timeout alike. Output is drained by a thread per
//! pipe into a bounded log, so a child never blocks on a full pipe and a failure can show the
//! last lines.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::http::{self, Request};

/// How long the coordinator may take to log that it serves.
const COORDINATOR_READY_WITHIN: Duration = Duration::from_secs(30);
/// How long an example may take to answer `GET /payments` (an interpreter may be slow to start).
const EXAMPLE_READY_WITHIN: Duration = Duration::from_secs(60);
/// How many output lines of each child are kept for failure messages.
const LOG_LINES: usize = 200;

/// Why a child process could not be started or stopped as expected.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The command template lacks a placeholder the suite must fill.
    #[error("the start command template must contain {0}")]
    Template(&'static str),
    /// The program could not be spawned.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// Which process.
        what: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The process exited before it was ready.
    #[error("{what} exited ({status}) before it was ready (its last output follows)")]
    ExitedEarly {
        /// Which process.
        what: String,
        /// How it exited.
        status: ExitStatus,
        /// Its last lines of output.
        log: String,
    },
    /// The process did not become ready in time.
    #[error("{what} was not ready within {within:?} (its last output follows)")]
    NotReady {
        /// Which process.
        what: String,
        /// The time it had.
        within: Duration,
        /// Its last lines of output.
        log: String,
    },
    /// No free local port could be found.
    #[error("cannot find a free port: {0}")]
    NoPort(std::io::Error),
    /// The temporary data directory could not be created.
    #[error("cannot create a data directory: {0}")]
    DataDir(std::io::Error),
}

impl ProcessError {
    /// The last output of the process that failed, for the errors that carry it.
    pub fn log(&self) -> Option<&str> {
        match self {
            ProcessError::ExitedEarly { log, .. } | ProcessError::NotReady { log, .. } => Some(log),
            _ => None,
        }
    }
}

/// The last lines a child wrote to stdout and stderr, interleaved as read.
#[derive(Debug, Clone, Default)]
pub(crate) struct Log(Arc<Mutex<VecDeque<String>>>);

impl Log {
    fn push(&self, line: String) {
        let mut lines = self.0.lock().expect("no thread panics while holding the log");
        if lines.len() == LOG_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// The last `n` lines, joined, each indented.
    pub(crate) fn tail(&self, n: usize) -> String {
        let lines = self.0.lock().expect("no thread panics while holding the log");
        let skip = lines.len().saturating_sub(n);
        lines.iter().skip(skip).map(|l| format!("    {l}\n")).collect()
    }

    fn any(&self, predicate: impl Fn(&str) -> bool) -> bool {
        self.0.lock().expect("no thread panics while holding the log").iter().any(|l| predicate(l))
    }

    /// Drains `pipe` into the log on a thread of its own. The thread ends when every writer of
    /// the pipe has exited, which the process-group kill guarantees.
    fn drain(&self, pipe: impl Read + Send + 'static) {
        let log = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).split(b'\n') {
                let Ok(line) = line else { break };
                log.push(String::from_utf8_lossy(&line).trim_end().to_owned());
            }
        });
    }
}

/// A child process in a process group of its own, killed with its group on drop.
#[derive(Debug)]
pub(crate) struct Process {
    what: String,
    child: Child,
    exited: Option<ExitStatus>,
    pub(crate) log: Log,
}

impl Process {
    fn spawn(what: String, mut command: Command) -> Result<Process, ProcessError> {
        use std::os::unix::process::CommandExt;
        command.process_group(0).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|source| ProcessError::Spawn { what: what.clone(), source })?;
        let log = Log::default();
        if let Some(stdout) = child.stdout.take() {
            log.drain(stdout);
        }
        if let Some(stderr) = child.stderr.take() {
            log.drain(stderr);
        }
        Ok(Process { what, child, exited: None, log })
    }

    /// The exit status, if the direct child has exited.
    pub(crate) fn try_exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Waits up to `within` for the direct child to exit.
    pub(crate) async fn exited_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + within;
        loop {
            if let Some(status) = self.try_exited() {
                return Some(status);
            }
            if Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the group with SIGKILL and reaps the direct child.
    pub(crate) fn kill(&mut self) {
        // Even when the direct child has exited, the rest of its group may live on.
        let group = libc::pid_t::try_from(self.child.id()).expect("pids fit in pid_t");
        // SAFETY: kill(2) with a negative pid signals the group we created with process_group(0),
        // whose id is the child's pid; it touches no memory of ours, and a group that no longer
        // exists makes it fail harmlessly.
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
        if self.exited.is_none() {
            self.exited = self.child.wait().ok();
        }
    }

    fn exited_early(&mut self) -> Option<ProcessError> {
        let status = self.try_exited()?;
        Some(ProcessError::ExitedEarly { what: self.what.clone(), status, log: self.log.tail(30) })
    }

    fn not_ready(&self, within: Duration) -> ProcessError {
        ProcessError::NotReady { what: self.what.clone(), within, log: self.log.tail(30) }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A local port that was free a moment ago.
pub(crate) fn free_port() -> Result<u16, ProcessError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(ProcessError::NoPort)?;
    Ok(listener.local_addr().map_err(ProcessError::NoPort)?.port())
}

/// The coordinator binary, serving on a fixed port from a temporary data directory that outlives
/// restarts.
#[derive(Debug)]
pub(crate) struct Coordinator {
    binary: PathBuf,
    data_dir: tempfile::TempDir,
    port: u16,
    process: Option<Process>,
}

impl Coordinator {
    /// Starts the binary on a free port and a new data directory.
    pub(crate) async fn start(binary: &Path) -> Result<Coordinator, ProcessError> {
        let data_dir = tempfile::Builder::new()
            .prefix("idempotency-http-conformance-")
            .tempdir()
            .map_err(ProcessError::DataDir)?;
        let mut coordinator = Coordinator { binary: binary.to_owned(), data_dir, port: free_port()?, process: None };
        coordinator.restart().await?;
        Ok(coordinator)
    }

    /// `http://127.0.0.1:<port>`.
    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The process, while it runs.
    pub(crate) fn process(&self) -> Option<&Process> {
        self.process.as_ref()
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub(crate) fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Starts the server (again) on the same port and data directory, once it is not running.
    /// Ready when it logs the line containing `serving` and `listen=`.
    pub(crate) async fn restart(&mut self) -> Result<(), ProcessError> {
        self.kill();
        let mut command = Command::new(&self.binary);
        command
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(self.data_dir.path().join("data"))
            .args(["--drain-delay", "0s"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        let mut process = Process::spawn(format!("the coordinator ({})", self.binary.display()), command)?;
        let until = Instant::now() + COORDINATOR_READY_WITHIN;
        while !process.log.any(|line| line.contains("serving") && line.contains("listen=")) {
            if let Some(error) = process.exited_early() {
                return Err(error);
            }
            if Instant::now() >= until {
                return Err(process.not_ready(COORDINATOR_READY_WITHIN));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.process = Some(process);
        Ok(())
    }
}

/// The example under test, started from the command template with a set of extra flags.
#[derive(Debug)]
pub(crate) struct Example {
    template: String,
    coordinator_url: String,
    /// The extra flags it was started with (`--work 1s …`).
    pub(crate) flags: String,
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    /// The running process (or the one that exited, until the next start).
    pub(crate) process: Process,
}

impl Example {
    /// Starts `template` with `flags` on a free port and waits until it answers `GET /payments`.
    pub(crate) async fn start(template: &str, coordinator_url: &str, flags: &str) -> Result<Example, ProcessError> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let process = Self::spawn(template, coordinator_url, flags, addr).await?;
        Ok(Example {
            template: template.to_owned(),
            coordinator_url: coordinator_url.to_owned(),
            flags: flags.to_owned(),
            addr,
            process,
        })
    }

    /// Starts it again with the same flags on the same port, after killing what is left of it.
    pub(crate) async fn restart(&mut self) -> Result<(), ProcessError> {
        self.process.kill();
        self.process = Self::spawn(&self.template, &self.coordinator_url, &self.flags, self.addr).await?;
        Ok(())
    }

    async fn spawn(
        template: &str,
        coordinator_url: &str,
        flags: &str,
        addr: SocketAddr,
    ) -> Result<Process, ProcessError> {
        let line = command_line(template, &addr.to_string(), coordinator_url, flags)?;
        let mut command = Command::new("sh");
        command.arg("-c").arg(&line).env("PYTHONUNBUFFERED", "1");
        let mut process = Process::spawn(format!("the example `{line}`"), command)?;
        let until = Instant::now() + EXAMPLE_READY_WITHIN;
        loop {
            if let Some(error) = process.exited_early() {
                return Err(error);
            }
            let probe = http::send(addr, &Request::get("/payments"), Duration::from_secs(2)).await;
            if matches!(probe, Ok(ref response) if response.status == 200) {
                return Ok(process);
            }
            if Instant::now() >= until {
                return Err(process.not_ready(EXAMPLE_READY_WITHIN));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Fills the placeholders of the command template.
pub(crate) fn command_line(
    template: &str,
    listen: &str,
    coordinator: &str,
    flags: &str,
) -> Result<String, ProcessError> {
    for placeholder in ["{listen}", "{coordinator}", "{flags}"] {
        if !template.contains(placeholder) {
            return Err(ProcessError::Template(placeholder));
        }
    }
    Ok(template.replace("{listen}", listen).replace("{coordinator}", coordinator).replace("{flags}", flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_gets_every_placeholder() {
        let line = command_line(
            "run --listen {listen} --coordinator {coordinator} {flags}",
            "127.0.0.1:1",
            "http://c",
            "--work 1s",
        )
        .unwrap();
        assert_eq!(line, "run --listen 127.0.0.1:1 --coordinator http://c --work 1s");
        assert!(matches!(
            command_line("run {listen} {coordinator}", "a", "b", ""),
            Err(ProcessError::Template("{flags}"))
        ));
    }

    #[tokio::test]
    async fn a_dropped_process_takes_its_whole_group_with_it() {
        let mut command = Command::new("sh");
        command.arg("-c").arg("sleep 30 & echo $!; wait");
        let process = Process::spawn("sleepers".into(), command).unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while !process.log.any(|l| !l.is_empty()) {
            assert!(Instant::now() < until, "the shell printed the pid");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let grandchild: libc::pid_t = process.log.tail(1).trim().parse().unwrap();
        drop(process);
        // The grandchild was killed; whoever reaps it (init, or nobody in some containers), it is
        // gone or a zombie.
        let until = Instant::now() + Duration::from_secs(5);
        let alive = || {
            std::fs::read_to_string(format!("/proc/{grandchild}/stat"))
                .is_ok_and(|stat| stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
        };
        while alive() {
            assert!(Instant::now() < until, "the grandchild outlived the drop");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
