//! `idempotency-http-conformance`: runs the suite against an implementation of the payments
//! example and prints one line per check; exits 1 if any failed.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use idempotency_http_conformance::{Check, Target};

/// Runs the HTTP conformance checks against an implementation of the payments example.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The shell command that starts the example, with the placeholders {listen}, {coordinator}
    /// and {flags}, e.g. 'python -m idempotency_coordinator.examples.payments --listen {listen}
    /// --coordinator {coordinator} {flags}'.
    #[arg(long, required_unless_present = "list")]
    start: Option<String>,
    /// The idempotency-coordinator binary to run.
    #[arg(long, required_unless_present = "list")]
    coordinator_binary: Option<PathBuf>,
    /// Run only this check (repeatable); default: every check.
    #[arg(long = "check", value_name = "NAME")]
    checks: Vec<Check>,
    /// Print the names of the checks and exit.
    #[arg(long)]
    list: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.list {
        for check in Check::ALL {
            println!("{check}");
        }
        return ExitCode::SUCCESS;
    }
    let (Some(start), Some(coordinator_binary)) = (args.start, args.coordinator_binary) else {
        unreachable!("clap requires --start and --coordinator-binary without --list");
    };
    let target = Target { start, coordinator_binary };
    let checks = if args.checks.is_empty() { Check::ALL.to_vec() } else { args.checks };
    let run = idempotency_http_conformance::run(&target, &checks, |outcome| println!("{outcome}"));
    // The children live in process groups of their own, so Ctrl-C does not reach them: dropping
    // the run kills them.
    let report = tokio::select! {
        report = run => report,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted");
            return ExitCode::from(130);
        }
    };
    for failure in report.failures() {
        if let Err(error) = &failure.result {
            eprintln!("\n--- {}: {error}", failure.check);
        }
        eprint!("{}", failure.log);
    }
    let failed = report.failures().count();
    println!("{} passed, {failed} failed", report.outcomes.len() - failed);
    if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
