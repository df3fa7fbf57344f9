//! An API instance's side of one idempotent mutation, as a small program: claim the key, do the
//! work, store the response, or replay the stored one.
//!
//! ```sh
//! cargo run --release &                                  # the coordinator
//! cargo run --example worker -- --key order-42 --work 2s
//! ```
//!
//! It prints one line per step (`acquired fencing_token=…`, `completed`, `replayed …`,
//! `in_progress …`, `refused REASON`) and exits 0 when the key ends completed, 3 when the
//! coordinator refused the Complete (the lease was lost: another worker took the key over, and
//! whatever this one did must not be committed), 2 on other failures.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use idempotency_coordinator::pb;
use idempotency_coordinator::pb::coordinator_client::CoordinatorClient;
use tonic_types::StatusExt;

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
    /// How long the lease lasts.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    lease: Duration,
    /// How long the mutation takes.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    work: Duration,
}

fn duration(value: Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: value.as_secs() as i64, nanos: value.subsec_nanos() as i32 }
}

fn reason(status: &tonic::Status) -> String {
    status.get_details_error_info().map_or_else(|| format!("{:?}", status.code()), |info| info.reason)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mut client = match CoordinatorClient::connect(args.target.clone()).await {
        Ok(client) => client,
        Err(error) => {
            println!("unreachable {error}");
            return ExitCode::from(2);
        }
    };
    let claim = pb::ClaimRequest {
        namespace: args.namespace.clone(),
        key: args.key.clone(),
        fingerprint: args.body.as_bytes().to_vec(),
        owner: format!("worker-{}", std::process::id()),
        lease_ttl: Some(duration(args.lease)),
        ..Default::default()
    };
    let outcome = match client.claim(claim).await {
        Ok(reply) => reply.into_inner().outcome,
        Err(status) => {
            println!("refused {}", reason(&status));
            return ExitCode::from(2);
        }
    };
    let grant = match outcome {
        Some(pb::claim_response::Outcome::Acquired(grant)) => grant,
        Some(pb::claim_response::Outcome::Completed(done)) => {
            let body = done.response.unwrap_or_default().body;
            println!("replayed {}", String::from_utf8_lossy(&body));
            return ExitCode::SUCCESS;
        }
        Some(pb::claim_response::Outcome::InProgress(busy)) => {
            println!("in_progress attempt={}", busy.attempt);
            return ExitCode::from(2);
        }
        None => return ExitCode::from(2),
    };
    println!("acquired fencing_token={}", grant.fencing_token);

    // The mutation. A real worker passes the fencing token to its own storage here, which refuses
    // writes carrying a token lower than one it has seen.
    tokio::time::sleep(args.work).await;

    let complete = pb::CompleteRequest {
        namespace: args.namespace,
        key: args.key,
        lease_token: grant.lease_token,
        response: Some(pb::Response {
            body: format!("done by fencing token {}", grant.fencing_token).into_bytes(),
            metadata: [("status".to_owned(), "201".to_owned())].into(),
        }),
        retention: None,
    };
    match client.complete(complete).await {
        Ok(_) => {
            println!("completed");
            ExitCode::SUCCESS
        }
        Err(status) => {
            println!("refused {}", reason(&status));
            ExitCode::from(3)
        }
    }
}
