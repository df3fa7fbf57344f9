//! The payments API of the idempotency-keys article, on axum with the `Idempotency-Key` layer:
//! `POST /payments` runs once per key (and tenant), every retry gets the stored response.
//!
//! ```sh
//! cargo run --release                                    # the coordinator, on 127.0.0.1:50051
//! cargo run --release -p idempotency-client --features http --example payments -- \
//!     --listen 127.0.0.1:8080 --coordinator http://127.0.0.1:50051 [--work 200ms] [--wait 0s] [--lease-ttl 30s]
//! ```
//!
//! - `POST /payments` with `Idempotency-Key` and JSON `{"amount": 100.00, "currency": "USD",
//!   "destination": "merchant-id-xyz"}` → 201 with the payment after `--work`. The tenant is the
//!   `X-Tenant` header (absent: one shared tenant): two tenants using one key get two payments.
//!   `"simulate"` drives the failure cases: `"decline"` → 402 (a final failure, stored);
//!   `"bank_timeout"` → 503 with `Retry-After` on the key's first attempt (released: the retry
//!   runs again as attempt 2); `"crash"` → on the key's first attempt the process aborts in the
//!   middle of the handler (the retry after the lease takes over as attempt 2).
//! - `GET /payments` → every payment this process created, with the fencing token and attempt it
//!   was created under, so that anyone can count executions.
//!
//! Payments are kept in memory, and every write is fenced: a write carrying a fencing token lower
//! than the highest one seen for its key is refused, as a database shared by several API
//! instances would refuse a stale holder's late write.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use clap::Parser;
use idempotency_client::Lease;
use idempotency_client::http::{IdempotencyKey, IdempotencyLayer};
use serde::{Deserialize, Serialize};

#[derive(Debug, Parser)]
#[command(about = "The payments example API behind the Idempotency-Key layer")]
struct Args {
    /// Where to serve HTTP.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The idempotency coordinator.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    coordinator: String,
    /// How long creating a payment takes.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    work: Duration,
    /// How long a request that finds its key in progress waits for the first one (0: 409 at once).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    wait: Duration,
    /// The lease of a running request (renewed while it runs).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    lease_ttl: Duration,
    /// Serve without the idempotency layer (to measure what the layer costs).
    #[arg(long, hide = true)]
    without_layer: bool,
}

#[derive(Debug, Deserialize)]
struct NewPayment {
    amount: f64,
    currency: String,
    destination: String,
    #[serde(default)]
    simulate: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
struct Payment {
    payment_id: String,
    key: String,
    tenant: Option<String>,
    amount: f64,
    currency: String,
    destination: String,
    fencing_token: u64,
    attempt: u32,
}

#[derive(Default)]
struct Ledger {
    payments: Vec<Payment>,
    /// The highest fencing token seen per tenant and key.
    fences: HashMap<(Option<String>, String), u64>,
}

struct App {
    work: Duration,
    ledger: Mutex<Ledger>,
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|value| value.to_str().ok()).map(str::to_owned)
}

fn json(status: StatusCode, value: serde_json::Value) -> Response {
    (status, Json(value)).into_response()
}

async fn create_payment(
    State(app): State<Arc<App>>,
    lease: Option<Extension<Lease>>,
    key: Option<Extension<IdempotencyKey>>,
    headers: HeaderMap,
    Json(new): Json<NewPayment>,
) -> Response {
    // Without the layer (a measurement run) there is no lease: one attempt, no fencing.
    let (fencing_token, attempt) = lease.map_or((0, 1), |Extension(lease)| (lease.fencing_token(), lease.attempt()));
    let first_attempt = attempt == 1;
    match new.simulate.as_deref() {
        Some("decline") => {
            return json(
                StatusCode::PAYMENT_REQUIRED,
                serde_json::json!({"error": "card_declined", "message": "the card was declined"}),
            );
        }
        Some("bank_timeout") if first_attempt => {
            let mut response = json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"error": "bank_timeout", "message": "the bank did not answer; retry"}),
            );
            response.headers_mut().insert(header::RETRY_AFTER, 1.into());
            return response;
        }
        Some("crash") if first_attempt => {
            tokio::time::sleep(app.work / 2).await;
            eprintln!("crashing in the middle of the payment, as asked");
            std::process::abort();
        }
        _ => {}
    }
    if !app.work.is_zero() {
        tokio::time::sleep(app.work).await;
    }
    // The key as the layer parsed it (a Structured Header String loses its quotes).
    let key = key.map(|Extension(IdempotencyKey(key))| key).unwrap_or_default();
    let tenant = header_text(&headers, "x-tenant");
    let mut ledger = app.ledger.lock().expect("no panic while the ledger is held");
    // The fence: a holder whose lease was taken over must not write after the new holder.
    let fence = ledger.fences.entry((tenant.clone(), key.clone())).or_insert(0);
    if fencing_token < *fence {
        return json(
            StatusCode::CONFLICT,
            serde_json::json!({"error": "stale_attempt", "message": "a later attempt owns this payment"}),
        );
    }
    *fence = fencing_token;
    let payment = Payment {
        payment_id: format!("pay_{}", uuid::Uuid::new_v4().simple()),
        key,
        tenant,
        amount: new.amount,
        currency: new.currency,
        destination: new.destination,
        fencing_token,
        attempt,
    };
    ledger.payments.push(payment.clone());
    json(
        StatusCode::CREATED,
        serde_json::json!({
            "payment_id": payment.payment_id,
            "amount": payment.amount,
            "currency": payment.currency,
            "destination": payment.destination,
            "status": "PENDING",
            "attempt": payment.attempt,
        }),
    )
}

async fn list_payments(State(app): State<Arc<App>>) -> Response {
    let ledger = app.ledger.lock().expect("no panic while the ledger is held");
    json(StatusCode::OK, serde_json::json!({"payments": ledger.payments}))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    // The coordinator is connected lazily, so that this API starts (and answers 503) while the
    // coordinator is down, and reconnects by itself when it is back.
    let channel = tonic::transport::Endpoint::from_shared(args.coordinator.clone())?
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy();
    let client = idempotency_client::Client::new(channel).with_call_timeout(Duration::from_secs(5));
    let layer = IdempotencyLayer::new(client, "payments")
        .scope(|request| request.headers.get("x-tenant")?.to_str().ok().map(str::to_owned))
        .lease_ttl(args.lease_ttl)
        .wait(args.wait)
        .owner(format!("payments-example-{}", std::process::id()));
    let app = Arc::new(App { work: args.work, ledger: Mutex::default() });
    let routes = Router::new().route("/payments", post(create_payment).get(list_payments));
    let router = if args.without_layer { routes } else { routes.layer(layer) }.with_state(app);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("payments example listening on http://{} (coordinator {})", listener.local_addr()?, args.coordinator);
    axum::serve(listener, router).await?;
    Ok(())
}
