//! CPU spent while measuring, from `/proc`: the server's (by process ids, by process name, or the
//! whole machine's minus the generator's own) and the generator's, so that a report can say what
//! each unit cost the server beside how fast it went.

use std::str::FromStr;

use anyhow::{Context, bail};

/// Whose CPU counts as the server's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Everything the machine spent, minus this process.
    Machine,
    /// These processes (all their threads).
    Pids(Vec<u32>),
    /// Every process with this name (`/proc/PID/comm`), as found when measuring starts.
    Name(String),
}

impl FromStr for Source {
    type Err = String;

    fn from_str(text: &str) -> Result<Source, String> {
        if text == "machine" {
            return Ok(Source::Machine);
        }
        if let Some(name) = text.strip_prefix("name:") {
            if name.is_empty() {
                return Err("name: needs a process name, as in name:postgres".to_owned());
            }
            return Ok(Source::Name(name.to_owned()));
        }
        let pids: Result<Vec<u32>, _> = text.split(',').map(|pid| pid.trim().parse::<u32>()).collect();
        match pids {
            Ok(pids) if !pids.is_empty() => Ok(Source::Pids(pids)),
            _ => Err(format!("{text:?} is neither `machine`, `name:NAME` nor process ids separated by commas")),
        }
    }
}

/// CPU counters at one moment.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The server's CPU seconds so far (per process id, so that processes gone by the second
    /// sample do not count negative), or the machine's busy seconds.
    server: Option<ServerTime>,
    /// This process's CPU seconds so far.
    generator: f64,
}

#[derive(Debug, Clone)]
enum ServerTime {
    Machine(f64),
    Processes(Vec<(u32, f64)>),
}

/// CPU seconds spent between two samples.
#[derive(Debug, Clone, Copy, Default)]
pub struct Spent {
    /// The server's, if a source was given.
    pub server: Option<f64>,
    /// The generator's.
    pub generator: f64,
}

impl Sample {
    /// Reads the counters now. With `Source::Name`, the processes are the ones running now.
    pub fn take(source: Option<&Source>) -> anyhow::Result<Sample> {
        let generator = process_seconds(std::process::id()).context("reading this process's CPU time")?;
        let server = match source {
            None => None,
            Some(Source::Machine) => Some(ServerTime::Machine(machine_busy_seconds()?)),
            Some(Source::Pids(pids)) => {
                let mut times = Vec::with_capacity(pids.len());
                for pid in pids {
                    let seconds =
                        process_seconds(*pid).with_context(|| format!("reading the CPU time of process {pid}"))?;
                    times.push((*pid, seconds));
                }
                Some(ServerTime::Processes(times))
            }
            Some(Source::Name(name)) => {
                let pids = pids_named(name)?;
                if pids.is_empty() {
                    bail!("no process is called {name}");
                }
                // A process may end between the listing and the read: it is left out.
                Some(ServerTime::Processes(
                    pids.into_iter().filter_map(|pid| process_seconds(pid).ok().map(|s| (pid, s))).collect(),
                ))
            }
        };
        Ok(Sample { server, generator })
    }

    /// What was spent from `earlier` to this sample. Processes are matched by id: one that
    /// started in between counts from zero only if it is a named source (it was not there to be
    /// counted), so the processes of the first sample are the ones measured.
    pub fn since(&self, earlier: &Sample) -> Spent {
        let generator = self.generator - earlier.generator;
        let server = match (&earlier.server, &self.server) {
            (Some(ServerTime::Machine(before)), Some(ServerTime::Machine(after))) => {
                Some((after - before - generator).max(0.0))
            }
            (Some(ServerTime::Processes(before)), Some(ServerTime::Processes(after))) => Some(
                before
                    .iter()
                    .filter_map(|(pid, then)| {
                        after.iter().find(|(other, _)| other == pid).map(|(_, now)| (now - then).max(0.0))
                    })
                    .sum(),
            ),
            _ => None,
        };
        Spent { server, generator }
    }
}

/// The clock ticks per second that `/proc` counts in.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// User plus system CPU seconds of process `pid`, all its threads included.
fn process_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_process_stat(&stat).map(|ticks| ticks as f64 / ticks_per_second())
}

/// utime + stime from a `/proc/PID/stat` line (fields 14 and 15; the name in field 2 may hold
/// spaces and parentheses, so fields are counted from its closing parenthesis).
fn parse_process_stat(stat: &str) -> anyhow::Result<u64> {
    let after_name = stat.rfind(')').map(|at| &stat[at + 1..]).context("no ')' in /proc/PID/stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name: field 3 (state) is index 0, so utime (14) is index 11 and stime (15) 12.
    let field = |index: usize| -> anyhow::Result<u64> {
        fields.get(index).context("a short /proc/PID/stat")?.parse::<u64>().context("a bad /proc/PID/stat field")
    };
    Ok(field(11)? + field(12)?)
}

/// Busy CPU seconds of the whole machine (every CPU time but idle and iowait).
fn machine_busy_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_machine_stat(&stat).map(|ticks| ticks as f64 / ticks_per_second())
}

fn parse_machine_stat(stat: &str) -> anyhow::Result<u64> {
    let line = stat.lines().find(|line| line.starts_with("cpu ")).context("no cpu line in /proc/stat")?;
    let values: Vec<u64> = line.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user and nice).
    let busy = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| values.get(i)).sum();
    Ok(busy)
}

/// The ids of the processes whose name (`comm`) is `name`.
fn pids_named(name: &str) -> anyhow::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").context("listing /proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|text| text.parse::<u32>().ok()) else { continue };
        if std::fs::read_to_string(entry.path().join("comm")).is_ok_and(|comm| comm.trim_end() == name) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_and_refuse_what_they_should() {
        assert_eq!("machine".parse(), Ok(Source::Machine));
        assert_eq!("12, 34".parse(), Ok(Source::Pids(vec![12, 34])));
        assert_eq!("name:postgres".parse(), Ok(Source::Name("postgres".to_owned())));
        assert!("name:".parse::<Source>().is_err());
        assert!("12,x".parse::<Source>().is_err());
        assert!("".parse::<Source>().is_err());
    }

    #[test]
    fn a_process_stat_is_read_past_a_name_with_spaces_and_parentheses() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0 1000 0 0";
        assert_eq!(parse_process_stat(stat).unwrap(), 325);
    }

    #[test]
    fn machine_busy_time_leaves_idle_and_iowait_out() {
        let stat = "cpu  100 10 50 9000 400 5 6 7 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(parse_machine_stat(stat).unwrap(), 100 + 10 + 50 + 5 + 6 + 7);
    }

    #[test]
    fn this_process_burning_cpu_shows_in_its_own_sample() {
        let me = Source::Pids(vec![std::process::id()]);
        let before = Sample::take(Some(&me)).unwrap();
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(300) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let spent = Sample::take(Some(&me)).unwrap().since(&before);
        // The same process counted both ways: the same figure, give or take a clock tick.
        let server = spent.server.unwrap();
        assert!(server > 0.0, "{spent:?}");
        assert!((server - spent.generator).abs() < 0.03, "{spent:?}");
    }
}
