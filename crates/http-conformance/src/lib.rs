//! A black-box conformance suite for the `Idempotency-Key` payments example: one set of checks
//! that every implementation (the Rust tower layer, the Python ASGI middleware, any other) must
//! pass unchanged. The suite talks HTTP/1.1 to a running example, counts executions through
//! `GET /payments`, and starts, kills and restarts the processes itself.
//!
//! Modules, in reading order: `checks` (each [`Check`] and the context they share: one
//! coordinator, the example restarted only when a check needs other flags), `process` (the
//! coordinator and the example as child processes, killed with their process group on drop),
//! `http` (a small HTTP/1.1 client with byte-level control). [`run_all`], [`run`] and
//! [`run_check`] run them. This page is the reference for implementations in other languages.
//!
//! # The interface under test
//!
//! ## Starting the example
//!
//! The example is started by a command line with these flags:
//!
//! ```text
//! --listen HOST:PORT --coordinator http://HOST:PORT [--work DURATION] [--wait DURATION] [--lease-ttl DURATION]
//! ```
//!
//! Durations are written like `300ms`, `1s`, `5s`. Defaults: `--work 0s`, `--wait 0s`,
//! `--lease-ttl 30s`. `--work` is how long the payment handler sleeps before answering; `--wait`
//! how long a request for a key that is in progress waits for the first one's response (0: it is
//! answered 409 at once); `--lease-ttl` the lease the middleware asks the coordinator for. The
//! example is ready when `GET /payments` answers 200; the suite polls for up to 60 s.
//!
//! ## `POST /payments`
//!
//! Body: `{"amount": 100.00, "currency": "USD", "destination": "merchant-id-xyz"}`, optionally
//! with `"simulate": "decline" | "bank_timeout" | "crash"`. Headers: `Idempotency-Key`
//! (required), `X-Tenant` (optional: the scope of the key; the same key from two tenants makes
//! two payments; without the header, every request shares one scope). The key `"abc"` (an RFC
//! 8941 String) and the bare token `abc` are the same key.
//!
//! - Success: `201`, `content-type: application/json`, body
//!   `{"payment_id": "pay_…", "amount": 100.00, "currency": "USD", "destination": "merchant-id-xyz", "status": "PENDING", "attempt": N}`,
//!   answered after sleeping `--work`. `attempt` is the coordinator's attempt number of the key
//!   (1 for the first grant).
//! - `"simulate": "decline"`: `402`, JSON `{"error": "card_declined", …}`. A final failure: it is
//!   stored and replayed to retries; no payment is created.
//! - `"simulate": "bank_timeout"`: on the key's first attempt, `503` with a `Retry-After` header
//!   and nothing created; the key is released, so the same request retried runs again as
//!   attempt 2 and succeeds (`201`, `"attempt": 2`).
//! - `"simulate": "crash"`: on the key's first attempt the process aborts in the middle of the
//!   handler (the client sees the connection close or reset without a response). Once the
//!   example is restarted, the same request retried after the lease (`--lease-ttl`) takes the key
//!   over as attempt 2 and succeeds (`201`, `"attempt": 2`).
//! - Replays: a retry of a completed request gets the stored response byte for byte (same
//!   status, same `content-type`, same body) plus the header `Idempotent-Replayed: true`, which
//!   first responses never carry.
//!
//! ## `GET /payments`
//!
//! `200`, `application/json`:
//! `{"payments": [{"payment_id": "pay_…", "key": "…", "tenant": "…" or null, "amount": 100.00, "currency": "USD", "fencing_token": N, "attempt": N}, …]}`,
//! every payment this process created (they need not survive a restart). `key` is the key
//! itself (`abc` for the field value `"abc"`; the suite also accepts the field value as sent).
//! `GET` requests never pass through the middleware.
//!
//! ## Errors of the middleware
//!
//! `application/problem+json` (RFC 9457) with the members `type`, `title` (a string), `status` (a
//! number equal to the HTTP status) and `detail` (a string):
//!
//! | Status | `type` | When |
//! |---|---|---|
//! | 400 | `urn:idempotency:key-missing` | `POST` without `Idempotency-Key` |
//! | 400 | `urn:idempotency:key-invalid` | the key is empty (`""`), over 255 bytes, not a valid RFC 8941 String (`"abc"`) nor a bare token (`abc`) — e.g. `"abc`, `"a"b"`, `a b` — or the header is sent twice |
//! | 413 | `urn:idempotency:body-too-large` | the body is over the middleware's limit (1 MiB by default); refused before anything is claimed, so the key stays unused |
//! | 422 | `urn:idempotency:key-reused` | the key was first used with another request (another amount) |
//! | 409 | `urn:idempotency:in-progress` | the first request with the key still runs (and `--wait` ran out); with `Retry-After` in whole seconds, at least 1 |
//! | 503 | `urn:idempotency:unavailable` | the coordinator cannot be reached; with `Retry-After`; the handler does not run |
//!
//! A field line with an empty value (`Idempotency-Key:` followed by nothing) may be answered as
//! missing or as invalid. Every `Retry-After` the suite reads must be whole seconds.
//!
//! # What the suite controls
//!
//! The [`Target`]'s command template is run with `sh -c` in a process group of its own, with
//! `{listen}` replaced by `127.0.0.1:<free port>`, `{coordinator}` by the coordinator's URL and
//! `{flags}` by the check's extra flags (empty, `--work 1s`, `--work 1s --wait 5s`,
//! `--work 300ms --wait 10s` or `--lease-ttl 1s`). The coordinator is the real binary, started
//! as `<binary> --listen 127.0.0.1:<port> --data-dir <temporary directory> --drain-delay 0s` and
//! ready when it logs the line with `serving` and `listen=`; one serves the whole run, and the
//! `fail-closed` check kills it (SIGKILL) and starts it again on the same port and data. Every
//! child is killed with its group when the run ends, a check fails, panics or times out.

#![warn(missing_docs, unreachable_pub)]

mod checks;
mod http;
mod process;

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use checks::{Check, CheckError, UnknownCheck};
pub use http::HttpError;
pub use process::ProcessError;

use checks::Context;

/// How long one check may take, restarts included, before it is failed and its processes killed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(90);

/// The implementation under test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The shell command line that starts the example, with the placeholders `{listen}`,
    /// `{coordinator}` and `{flags}`, e.g.
    /// `python -m idempotency_coordinator.examples.payments --listen {listen} --coordinator {coordinator} {flags}`.
    pub start: String,
    /// The `idempotency-coordinator` binary the suite runs.
    pub coordinator_binary: PathBuf,
}

/// How one check went.
#[derive(Debug)]
pub struct CheckOutcome {
    /// Which check.
    pub check: Check,
    /// How long it took, process restarts included.
    pub elapsed: Duration,
    /// `Ok` when it passed.
    pub result: Result<(), CheckError>,
    /// For a failure, the last output of the processes involved (empty when none is known).
    pub log: String,
}

impl CheckOutcome {
    /// True when the check passed.
    pub fn passed(&self) -> bool {
        self.result.is_ok()
    }
}

impl fmt::Display for CheckOutcome {
    /// One line: `ok   name (1.2 s)` or `FAIL name: reason` (the reason's first line).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.result {
            Ok(()) => write!(f, "ok   {} ({:.1} s)", self.check, self.elapsed.as_secs_f64()),
            Err(error) => {
                let reason = error.to_string();
                write!(f, "FAIL {}: {}", self.check, reason.lines().next().unwrap_or_default())
            }
        }
    }
}

/// The outcomes of a run, in the order the checks ran.
#[derive(Debug, Default)]
pub struct Report {
    /// One per check run.
    pub outcomes: Vec<CheckOutcome>,
}

impl Report {
    /// True when every check passed.
    pub fn passed(&self) -> bool {
        self.outcomes.iter().all(CheckOutcome::passed)
    }

    /// The checks that failed.
    pub fn failures(&self) -> impl Iterator<Item = &CheckOutcome> {
        self.outcomes.iter().filter(|o| !o.passed())
    }
}

impl fmt::Display for Report {
    /// One line per check, then for each failure its full reason and the processes' last output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for outcome in &self.outcomes {
            writeln!(f, "{outcome}")?;
        }
        for outcome in self.failures() {
            if let Err(error) = &outcome.result {
                writeln!(f, "\n--- {}: {error}", outcome.check)?;
            }
            f.write_str(&outcome.log)?;
        }
        let passed = self.outcomes.iter().filter(|o| o.passed()).count();
        write!(f, "{} passed, {} failed", passed, self.outcomes.len() - passed)
    }
}

/// Runs every check ([`Check::ALL`]) against `target`.
pub async fn run_all(target: &Target) -> Report {
    run(target, &Check::ALL, |_| {}).await
}

/// Runs the check named `name` (see [`Check::name`]) alone against `target`.
pub async fn run_check(target: &Target, name: &str) -> Result<CheckOutcome, UnknownCheck> {
    let check: Check = name.parse()?;
    let mut report = run(target, &[check], |_| {}).await;
    Ok(report.outcomes.pop().expect("one outcome per check run"))
}

/// Runs `checks` in the order given against `target`, sharing one coordinator, and calls
/// `progress` after each one.
///
/// Each check runs in a task of its own with a timeout, holding the processes: a check that
/// panics or times out takes them down with it, and the next one starts them again.
pub async fn run(target: &Target, checks: &[Check], mut progress: impl FnMut(&CheckOutcome)) -> Report {
    let mut report = Report::default();
    let mut context = Some(Context::new(target.clone()));
    for &check in checks {
        let started = Instant::now();
        let mut owned = context.take().unwrap_or_else(|| Context::new(target.clone()));
        let task = AbortOnDrop(tokio::spawn(async move {
            let result = check.run(&mut owned).await;
            (owned, result)
        }));
        let (result, log) = match tokio::time::timeout(CHECK_TIMEOUT, task.join()).await {
            Ok(Ok((owned, result))) => {
                let log = match &result {
                    Err(CheckError::Process(error)) => error.log().map(str::to_owned).unwrap_or_default(),
                    Err(CheckError::NotStarted(_)) => String::new(),
                    Err(_) => owned.log_tail(),
                    Ok(()) => String::new(),
                };
                context = Some(owned);
                (result, log)
            }
            Ok(Err(join_error)) => (Err(CheckError::Panicked(panic_message(join_error))), String::new()),
            Err(_) => (Err(CheckError::TimedOut(CHECK_TIMEOUT)), String::new()),
        };
        let outcome = CheckOutcome { check, elapsed: started.elapsed(), result, log };
        progress(&outcome);
        report.outcomes.push(outcome);
    }
    report
}

/// A task aborted when its handle drops, so that a run that is itself dropped (a timeout, Ctrl-C)
/// drops the check's context and with it the processes.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    async fn join(mut self) -> Result<T, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn panic_message(error: tokio::task::JoinError) -> String {
    match error.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned()),
        Err(error) => error.to_string(),
    }
}
