//! Progress of long work (`migrate`, `backup`, `restore`): a bar on a terminal (indicatif:
//! records done, rate, ETA), and on anything else (a log file, a pipe, CI) a plain line every
//! few seconds, so that an operator can tell a slow run from a stuck one.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the plain lines come.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// Counts records done and shows it.
pub struct Progress {
    what: &'static str,
    total: Option<u64>,
    done: u64,
    started: Instant,
    shown: Shown,
}

enum Shown {
    Bar(ProgressBar),
    Lines { last: Instant },
}

impl Progress {
    /// Progress of `what` (`backup`, …) over `total` records if known, on standard error.
    pub fn new(what: &'static str, total: Option<u64>) -> Progress {
        let shown = if std::io::stderr().is_terminal() {
            let bar = match total {
                Some(total) => ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()),
                None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
            };
            let template = if total.is_some() {
                "{prefix} [{bar:30}] {human_pos}/{human_len} records, {per_sec}, ETA {eta}"
            } else {
                "{prefix} {spinner} {human_pos} records, {per_sec}"
            };
            bar.set_style(ProgressStyle::with_template(template).expect("the template is valid").progress_chars("=> "));
            bar.set_prefix(what);
            Shown::Bar(bar)
        } else {
            Shown::Lines { last: Instant::now() }
        };
        Progress { what, total, done: 0, started: Instant::now(), shown }
    }

    /// One more record done.
    pub fn inc(&mut self) {
        self.done += 1;
        match &mut self.shown {
            Shown::Bar(bar) => bar.inc(1),
            Shown::Lines { last } => {
                if last.elapsed() >= LINE_EVERY {
                    *last = Instant::now();
                    eprintln!("{}", self.line());
                }
            }
        }
    }

    /// Records done so far.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// Ends the bar (or writes the last line).
    pub fn finish(self) {
        match &self.shown {
            Shown::Bar(bar) => bar.finish(),
            Shown::Lines { .. } => eprintln!("{}", self.line()),
        }
    }

    fn line(&self) -> String {
        let elapsed = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = self.done as f64 / elapsed;
        match self.total {
            Some(total) => {
                format!("{}: {} of {} records ({:.0}/s, {:.0} s so far)", self.what, self.done, total, rate, elapsed)
            }
            None => format!("{}: {} records ({:.0}/s, {:.0} s so far)", self.what, self.done, rate, elapsed),
        }
    }
}
