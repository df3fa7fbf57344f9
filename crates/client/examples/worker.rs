//! An API instance's side of one idempotent mutation, as a small program on the client crate:
//! the work is the business logic, and `run` does the rest (claim, renew, complete or release,
//! replay).
//!
//! ```sh
//! cargo run --release &                                  # the coordinator
//! cargo run -p idempotency-client --example worker -- --key order-42 --work 2s
//! ```
//!
//! It prints one line per step (`acquired fencing_token=…`, `completed`, `replayed …`,
//! `in_progress …`, `refused REASON`) and exits 0 when the key ends completed, 3 when the lease
//! was lost (another worker took the key over, and whatever this one did must not be committed),
//! 2 on other failures.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use idempotency_client::{Client, Error, Failure, Reason, Stored};

#[derive(Debug, Parser)]
struct Args {
    /// The coordinator.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// The idempotency key.
    #[arg(long)]
    key: String,
    /// The namespace.
    #[arg(long, default_value = "payments")]
    namespace: String,
    /// The request body, whose bytes stand in for the request fingerprint here.
    #[arg(long, default_value = "{\"amount\":100}")]
    body: String,
    /// How long the lease lasts (renewed every third of it while the work runs).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    lease: Duration,
    /// How long the mutation takes.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    work: Duration,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let client = match Client::connect(args.target.clone()).await {
        Ok(client) => client,
        Err(error) => {
            println!("unreachable {error}");
            return ExitCode::from(2);
        }
    };
    let work = args.work;
    let outcome = client
        .idempotent(args.namespace, args.key)
        .fingerprint(args.body.into_bytes())
        .lease_ttl(args.lease)
        .owner(format!("worker-{}", std::process::id()))
        .run(|lease| async move {
            println!("acquired fencing_token={}", lease.fencing_token());
            // The mutation. A real worker passes the fencing token to its own storage here, which
            // refuses writes carrying a token lower than one it has seen.
            tokio::time::sleep(work).await;
            let body = format!("done by fencing token {}", lease.fencing_token());
            Ok::<_, Failure>(Stored::new(body).metadata("status", "201"))
        })
        .await;
    match outcome {
        Ok(outcome) if outcome.replayed() => {
            println!("replayed {}", String::from_utf8_lossy(&outcome.response().body));
            ExitCode::SUCCESS
        }
        Ok(_) => {
            println!("completed");
            ExitCode::SUCCESS
        }
        Err(Error::InProgress { attempt, .. }) => {
            println!("in_progress attempt={attempt}");
            ExitCode::from(2)
        }
        Err(Error::Rejected(Reason::LeaseLost, _)) => {
            println!("refused {}", Reason::LeaseLost);
            ExitCode::from(3)
        }
        Err(error) => {
            println!("refused {}", error.reason().map_or_else(|| error.to_string(), |reason| reason.to_string()));
            ExitCode::from(2)
        }
    }
}
