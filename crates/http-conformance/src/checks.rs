//! The checks, one function each, and the [`Context`] they share: one coordinator for the whole
//! run and the example, restarted only when a check needs other flags.
//!
//! Every check uses fresh random keys and counts payments of its own keys only, so checks do not
//! depend on each other or on their order, and any one of them can run alone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::Target;
use crate::http::{self, HttpError, Request, Response};
use crate::process::{Coordinator, Example, ProcessError};

/// How long an ordinary request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the middleware may take to fail closed once the coordinator is gone.
const FAIL_CLOSED_WITHIN: Duration = Duration::from_secs(10);
/// How long a request may keep failing as unavailable after the coordinator came back.
const RECOVERY_WITHIN: Duration = Duration::from_secs(15);
/// How long a crashed example may take to exit.
const EXIT_WITHIN: Duration = Duration::from_secs(10);

const KEY_HEADER: &str = "Idempotency-Key";
const TENANT_HEADER: &str = "X-Tenant";
const REPLAYED_HEADER: &str = "Idempotent-Replayed";

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The implementation answered other than the interface requires.
    #[error("{0}")]
    Expectation(String),
    /// A request got no response where one was required.
    #[error("{what}: {source}")]
    Http {
        /// The request.
        what: String,
        /// Why it got no response.
        source: HttpError,
    },
    /// A process could not be started or did not behave as a process should.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// A process this check needs failed to start in an earlier check, and is not tried again.
    #[error("{0} (in an earlier check; not tried again)")]
    NotStarted(String),
    /// The check panicked (a bug of the suite).
    #[error("the check panicked: {0}")]
    Panicked(String),
    /// The check did not end in time.
    #[error("the check did not end within {0:?}")]
    TimedOut(Duration),
}

/// Fails the check with a formatted message unless `condition` holds.
macro_rules! ensure {
    ($condition:expr, $($message:tt)+) => {
        if !$condition {
            return Err(CheckError::Expectation(format!($($message)+)));
        }
    };
}

/// One named check of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Check {
    /// A first request: 201 with the payment, one payment listed, not marked as a replay.
    FirstRequest,
    /// A retry: the stored response byte for byte, marked as a replay; still one payment.
    Replay,
    /// The key reused with another amount: 422 `key-reused`; still one payment.
    KeyReused,
    /// Scope isolation: the same key from two tenants makes two payments, each replayed to its own.
    TenantScope,
    /// A 2 MiB body: 413 `body-too-large` before anything is claimed; the key then works.
    BodyTooLarge,
    /// Missing, empty, too long, unparsable and repeated keys: 400, no payment.
    InvalidKeys,
    /// `decline` is stored and replayed; `bank_timeout` releases the key and a retry runs again.
    StorePolicy,
    /// The coordinator down: 503 `unavailable`, the handler not run; back up: the request works.
    FailClosed,
    /// Two concurrent duplicates: 201 and 409 `in-progress`; with `--wait`, both 201.
    ConcurrentDuplicates,
    /// 32 concurrent duplicates with `--wait`: all 201 with the same body, one payment.
    ConcurrentWait,
    /// A crash mid-handler; after a restart and the lease, a retry takes over as attempt 2.
    CrashTakeover,
}

impl Check {
    /// Every check, in the order [`crate::run_all`] runs them (the order that needs the fewest
    /// restarts of the example).
    pub const ALL: [Check; 11] = [
        Check::FirstRequest,
        Check::Replay,
        Check::KeyReused,
        Check::TenantScope,
        Check::BodyTooLarge,
        Check::InvalidKeys,
        Check::StorePolicy,
        Check::FailClosed,
        Check::ConcurrentDuplicates,
        Check::ConcurrentWait,
        Check::CrashTakeover,
    ];

    /// The check's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Check::FirstRequest => "first-request",
            Check::Replay => "replay",
            Check::KeyReused => "key-reused",
            Check::TenantScope => "tenant-scope",
            Check::BodyTooLarge => "body-too-large",
            Check::InvalidKeys => "invalid-keys",
            Check::StorePolicy => "store-policy",
            Check::FailClosed => "fail-closed",
            Check::ConcurrentDuplicates => "concurrent-duplicates",
            Check::ConcurrentWait => "concurrent-wait",
            Check::CrashTakeover => "crash-takeover",
        }
    }

    pub(crate) async fn run(self, context: &mut Context) -> Result<(), CheckError> {
        match self {
            Check::FirstRequest => first_request(context).await,
            Check::Replay => replay(context).await,
            Check::KeyReused => key_reused(context).await,
            Check::TenantScope => tenant_scope(context).await,
            Check::BodyTooLarge => body_too_large(context).await,
            Check::InvalidKeys => invalid_keys(context).await,
            Check::StorePolicy => store_policy(context).await,
            Check::FailClosed => fail_closed(context).await,
            Check::ConcurrentDuplicates => concurrent_duplicates(context).await,
            Check::ConcurrentWait => concurrent_wait(context).await,
            Check::CrashTakeover => crash_takeover(context).await,
        }
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A check name that is not one of [`Check::ALL`].
#[derive(Debug, Clone, thiserror::Error)]
#[error("no check is named {name:?} (the checks: {known})")]
pub struct UnknownCheck {
    name: String,
    known: String,
}

impl FromStr for Check {
    type Err = UnknownCheck;

    fn from_str(name: &str) -> Result<Check, UnknownCheck> {
        Check::ALL
            .into_iter()
            .find(|check| check.name() == name)
            .ok_or_else(|| UnknownCheck { name: name.to_owned(), known: Check::ALL.map(Check::name).join(", ") })
    }
}

/// What the checks share: the target, the coordinator and the current example.
#[derive(Debug)]
pub(crate) struct Context {
    target: Target,
    coordinator: Option<Coordinator>,
    example: Option<Example>,
    /// Why a start failed, by what was started (the coordinator, or the example with some flags):
    /// the checks after the first that needed it fail at once instead of waiting out the start
    /// timeout again.
    failed_starts: HashMap<String, String>,
}

impl Context {
    pub(crate) fn new(target: Target) -> Context {
        Context { target, coordinator: None, example: None, failed_starts: HashMap::new() }
    }

    /// The coordinator, started (or started again, after a check stopped it) if need be.
    async fn coordinator(&mut self) -> Result<&mut Coordinator, CheckError> {
        const WHAT: &str = "the coordinator";
        if let Some(reason) = self.failed_starts.get(WHAT) {
            return Err(CheckError::NotStarted(reason.clone()));
        }
        let started = match &mut self.coordinator {
            Some(coordinator) if coordinator.process().is_some() => Ok(()),
            Some(coordinator) => coordinator.restart().await,
            None => Coordinator::start(&self.target.coordinator_binary).await.map(|c| {
                self.coordinator = Some(c);
            }),
        };
        if let Err(error) = started {
            self.failed_starts.insert(WHAT.to_owned(), error.to_string());
            return Err(error.into());
        }
        Ok(self.coordinator.as_mut().expect("started above"))
    }

    /// The address of a running example started with `flags`: the current one if it has the same
    /// flags and still runs, else a new one.
    async fn example(&mut self, flags: &str) -> Result<SocketAddr, CheckError> {
        let url = self.coordinator().await?.url();
        if let Some(example) = &mut self.example
            && example.flags == flags
            && example.process.try_exited().is_none()
        {
            return Ok(example.addr);
        }
        let what = format!("the example with flags {flags:?}");
        if let Some(reason) = self.failed_starts.get(&what) {
            return Err(CheckError::NotStarted(reason.clone()));
        }
        // Stop the old one first: two examples need not fit in memory at once.
        self.example = None;
        match Example::start(&self.target.start, &url, flags).await {
            Ok(example) => Ok(self.example.insert(example).addr),
            Err(error) => {
                self.failed_starts.insert(what, error.to_string());
                Err(error.into())
            }
        }
    }

    fn current_example(&mut self) -> &mut Example {
        self.example.as_mut().expect("a check asks for its example before using it")
    }

    /// The last lines of output of the example and the coordinator, for a failure report.
    pub(crate) fn log_tail(&self) -> String {
        let mut tail = String::new();
        if let Some(example) = &self.example {
            tail.push_str(&format!("  the example's last output:\n{}", example.process.log.tail(20)));
        }
        if let Some(process) = self.coordinator.as_ref().and_then(Coordinator::process) {
            tail.push_str(&format!("  the coordinator's last output:\n{}", process.log.tail(5)));
        }
        tail
    }
}

// ---------------------------------------------------------------------------------------------
// Requests and expectations
// ---------------------------------------------------------------------------------------------

/// A key no earlier run used: `conf-<check>-<uuid>`, a valid token and string alike.
fn fresh_key(check: &str) -> String {
    format!("conf-{check}-{}", uuid::Uuid::new_v4().simple())
}

/// The key as a Structured Header String, the usual form of the field.
fn quoted(key: &str) -> String {
    format!("\"{key}\"")
}

/// The example's payment request body, with `amount` written as given (e.g. `100.00`).
fn payment_body(amount: &str, simulate: Option<&str>) -> String {
    let simulate = simulate.map(|s| format!(", \"simulate\": \"{s}\"")).unwrap_or_default();
    format!("{{\"amount\": {amount}, \"currency\": \"USD\", \"destination\": \"merchant-id-xyz\"{simulate}}}")
}

/// `POST /payments` with a body, the key header value as given and an optional tenant.
fn payment_request(key_header: &str, tenant: Option<&str>, body: &str) -> Request {
    let request = Request::post_json("/payments", body).header(KEY_HEADER, key_header);
    match tenant {
        Some(tenant) => request.header(TENANT_HEADER, tenant),
        None => request,
    }
}

/// The ordinary payment of 100.00 USD with `key` (quoted), no tenant.
fn payment(key: &str) -> Request {
    payment_request(&quoted(key), None, &payment_body("100.00", None))
}

async fn send(addr: SocketAddr, request: &Request, what: &str) -> Result<Response, CheckError> {
    send_within(addr, request, what, REQUEST_TIMEOUT).await
}

async fn send_within(
    addr: SocketAddr,
    request: &Request,
    what: &str,
    within: Duration,
) -> Result<Response, CheckError> {
    http::send(addr, request, within).await.map_err(|source| CheckError::Http { what: what.to_owned(), source })
}

/// Sends `count` copies of `request` at once; the responses in no particular order.
async fn send_concurrently(
    addr: SocketAddr,
    request: &Request,
    count: usize,
    what: &str,
) -> Result<Vec<Response>, CheckError> {
    let tasks: Vec<_> = (0..count)
        .map(|_| {
            let request = request.clone();
            tokio::spawn(async move { http::send(addr, &request, REQUEST_TIMEOUT).await })
        })
        .collect();
    let mut responses = Vec::with_capacity(count);
    for task in tasks {
        let response = task.await.map_err(|error| CheckError::Panicked(error.to_string()))?;
        responses.push(response.map_err(|source| CheckError::Http { what: what.to_owned(), source })?);
    }
    Ok(responses)
}

/// The parsed JSON body of `response`, which must be `application/json`.
fn json_body(response: &Response, what: &str) -> Result<Value, CheckError> {
    ensure!(
        response.media_type().as_deref() == Some("application/json"),
        "{what}: content-type {:?}, expected application/json",
        response.header("content-type")
    );
    serde_json::from_slice(&response.body).map_err(|error| {
        CheckError::Expectation(format!("{what}: the body is not JSON ({error}): {}", response.body_text()))
    })
}

/// `response` is not marked as a replay.
fn expect_first(response: &Response, what: &str) -> Result<(), CheckError> {
    ensure!(
        response.header_count(REPLAYED_HEADER) == 0,
        "{what}: a first response carries {REPLAYED_HEADER}: {:?}",
        response.header(REPLAYED_HEADER)
    );
    Ok(())
}

/// `response` is a first `201` creating the payment of 100.00 USD, as attempt `attempt`; returns
/// its JSON body.
fn expect_created(response: &Response, attempt: u64, what: &str) -> Result<Value, CheckError> {
    ensure!(response.status == 201, "{what}: status {}, expected 201; body: {}", response.status, response.body_text());
    expect_first(response, what)?;
    let payment = json_body(response, what)?;
    let field = |name: &str| payment.get(name).cloned().unwrap_or(Value::Null);
    ensure!(
        field("payment_id").as_str().is_some_and(|id| id.starts_with("pay_")),
        "{what}: payment_id {} does not start with pay_",
        field("payment_id")
    );
    ensure!(field("amount").as_f64() == Some(100.0), "{what}: amount {}, expected 100.00", field("amount"));
    ensure!(field("currency") == "USD", "{what}: currency {}, expected \"USD\"", field("currency"));
    ensure!(
        field("destination") == "merchant-id-xyz",
        "{what}: destination {}, expected \"merchant-id-xyz\"",
        field("destination")
    );
    ensure!(field("status") == "PENDING", "{what}: status {}, expected \"PENDING\"", field("status"));
    ensure!(field("attempt").as_u64() == Some(attempt), "{what}: attempt {}, expected {attempt}", field("attempt"));
    Ok(payment)
}

/// `replay` is `original` byte for byte (status, content-type, body), marked as a replay.
fn expect_replay_of(replay: &Response, original: &Response, what: &str) -> Result<(), CheckError> {
    ensure!(
        replay.status == original.status,
        "{what}: status {}, expected the stored {}; body: {}",
        replay.status,
        original.status,
        replay.body_text()
    );
    ensure!(
        replay.header("content-type") == original.header("content-type"),
        "{what}: content-type {:?}, expected the stored {:?}",
        replay.header("content-type"),
        original.header("content-type")
    );
    ensure!(
        replay.body == original.body,
        "{what}: the body differs from the stored one:\n    stored:   {}\n    replayed: {}",
        original.body_text(),
        replay.body_text()
    );
    ensure!(
        replay.header(REPLAYED_HEADER) == Some("true") && replay.header_count(REPLAYED_HEADER) == 1,
        "{what}: {REPLAYED_HEADER} is {:?}, expected one header \"true\"",
        replay.header(REPLAYED_HEADER)
    );
    Ok(())
}

/// `response` is an RFC 9457 problem of `status` and one of the `types` (`urn:idempotency:…`).
fn expect_problem(response: &Response, status: u16, types: &[&str], what: &str) -> Result<(), CheckError> {
    let expected = types.join(" or ");
    ensure!(
        response.status == status,
        "{what}: status {}, expected {status} ({expected}); body: {}",
        response.status,
        response.body_text()
    );
    ensure!(
        response.media_type().as_deref() == Some("application/problem+json"),
        "{what}: content-type {:?}, expected application/problem+json",
        response.header("content-type")
    );
    let problem: Value = serde_json::from_slice(&response.body).map_err(|error| {
        CheckError::Expectation(format!("{what}: the problem is not JSON ({error}): {}", response.body_text()))
    })?;
    let member = |name: &str| problem.get(name).cloned().unwrap_or(Value::Null);
    ensure!(
        member("type").as_str().is_some_and(|t| types.contains(&t)),
        "{what}: type {}, expected {expected}",
        member("type")
    );
    ensure!(member("title").is_string(), "{what}: title {}, expected a string", member("title"));
    ensure!(
        member("status").as_u64() == Some(u64::from(status)),
        "{what}: status member {}, expected the number {status}",
        member("status")
    );
    ensure!(member("detail").is_string(), "{what}: detail {}, expected a string", member("detail"));
    Ok(())
}

/// `response` has one `Retry-After` in whole seconds, at least `minimum`; returns it.
fn expect_retry_after(response: &Response, minimum: u64, what: &str) -> Result<u64, CheckError> {
    let value = response.header("retry-after");
    let seconds = value.and_then(|v| v.parse::<u64>().ok());
    ensure!(
        seconds.is_some_and(|s| s >= minimum) && response.header_count("retry-after") == 1,
        "{what}: Retry-After {value:?}, expected whole seconds, at least {minimum}"
    );
    Ok(seconds.unwrap_or_default())
}

/// Every payment the example lists.
async fn payments(addr: SocketAddr) -> Result<Vec<Value>, CheckError> {
    let what = "GET /payments";
    let response = send(addr, &Request::get("/payments"), what).await?;
    ensure!(response.status == 200, "{what}: status {}, expected 200", response.status);
    let list = json_body(&response, what)?;
    match list.get("payments") {
        Some(Value::Array(payments)) => Ok(payments.clone()),
        _ => Err(CheckError::Expectation(format!("{what}: no \"payments\" array in {}", response.body_text()))),
    }
}

/// The payments listed for `key` in the scope of `tenant` (`None`: no tenant). The key may be
/// listed as sent inside the quotes or as the raw field value with them.
async fn payments_for(addr: SocketAddr, key: &str, tenant: Option<&str>) -> Result<Vec<Value>, CheckError> {
    let quoted_key = quoted(key);
    let tenant = tenant.map_or(Value::Null, Value::from);
    Ok(payments(addr)
        .await?
        .into_iter()
        .filter(|p| {
            let listed = p.get("key").and_then(Value::as_str);
            (listed == Some(key) || listed == Some(quoted_key.as_str()))
                && p.get("tenant").cloned().unwrap_or(Value::Null) == tenant
        })
        .collect())
}

/// Exactly `count` payments are listed for `key` in `tenant`'s scope; returns them.
async fn expect_payments(
    addr: SocketAddr,
    key: &str,
    tenant: Option<&str>,
    count: usize,
    what: &str,
) -> Result<Vec<Value>, CheckError> {
    let found = payments_for(addr, key, tenant).await?;
    ensure!(
        found.len() == count,
        "{what}: GET /payments lists {} payments for key {key} (tenant {tenant:?}), expected {count}: {}",
        found.len(),
        Value::Array(found.clone())
    );
    Ok(found)
}

/// The listed payment matches the created one: id, key, tenant, amount, currency, attempt, and a
/// fencing token.
fn expect_listed(listed: &Value, created: &Value, key: &str, attempt: u64, what: &str) -> Result<(), CheckError> {
    let field = |name: &str| listed.get(name).cloned().unwrap_or(Value::Null);
    ensure!(
        field("payment_id") == created["payment_id"],
        "{what}: listed payment_id {}, the response said {}",
        field("payment_id"),
        created["payment_id"]
    );
    let listed_key = field("key");
    ensure!(listed_key == key || listed_key == quoted(key).as_str(), "{what}: listed key {listed_key}, expected {key}");
    ensure!(field("amount").as_f64() == Some(100.0), "{what}: listed amount {}, expected 100.00", field("amount"));
    ensure!(field("currency") == "USD", "{what}: listed currency {}, expected \"USD\"", field("currency"));
    ensure!(
        field("fencing_token").as_u64().is_some_and(|token| token >= 1),
        "{what}: listed fencing_token {}, expected a positive integer",
        field("fencing_token")
    );
    ensure!(
        field("attempt").as_u64() == Some(attempt),
        "{what}: listed attempt {}, expected {attempt}",
        field("attempt")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------------

async fn first_request(context: &mut Context) -> Result<(), CheckError> {
    let addr = context.example("").await?;
    let key = fresh_key("first");
    let response = send(addr, &payment(&key), "the first request").await?;
    let created = expect_created(&response, 1, "the first request")?;
    let listed = expect_payments(addr, &key, None, 1, "after the first request").await?;
    expect_listed(&listed[0], &created, &key, 1, "GET /payments")?;
    ensure!(
        listed[0]["tenant"].is_null(),
        "GET /payments: tenant {}, expected null without X-Tenant",
        listed[0]["tenant"]
    );
    Ok(())
}

async fn replay(context: &mut Context) -> Result<(), CheckError> {
    let addr = context.example("").await?;
    let key = fresh_key("replay");
    let first = send(addr, &payment(&key), "the first request").await?;
    expect_created(&first, 1, "the first request")?;
    let retry = send(addr, &payment(&key), "the retry").await?;
    expect_replay_of(&retry, &first, "the retry")?;
    // The same key written as a bare token is the same key.
    let bare = payment_request(&key, None, &payment_body("100.00", None));
    let retry = send(addr, &bare, "the retry with the key as a bare token").await?;
    expect_replay_of(&retry, &first, "the retry with the key as a bare token")?;
    expect_payments(addr, &key, None, 1, "after the retries").await?;
    Ok(())
}

async fn key_reused(context: &mut Context) -> Result<(), CheckError> {
    let addr = context.example("").await?;
    let key = fresh_key("reused");
    let first = send(addr, &payment(&key), "the first request").await?;
    let created = expect_created(&first, 1, "the first request")?;
    let other = payment_request(&quoted(&key), None, &payment_body("250.00", None));
    let reused = send(addr, &other, "the key with another amount").await?;
    expect_problem(&reused, 422, &["urn:idempotency:key-reused"], "the key with another amount")?;
    let listed = expect_payments(addr, &key, None, 1, "after the reuse").await?;
    expect_listed(&listed[0], &created, &key, 1, "GET /payments after the reuse")?;
    let retry = send(addr, &payment(&key), "the original request again").await?;
    expect_replay_of(&retry, &first, "the original request again")?;
    Ok(())
}

async fn tenant_scope(context: &mut Context) -> Result<(), CheckError> {
    let addr = context.example("").await?;
    let key = fresh_key("tenant");
    let body = payment_body("100.00", None);
    let request_a = payment_request(&quoted(&key), Some("tenant-a"), &body);
    let request_b = payment_request(&quoted(&key), Some("tenant-b"), &body);
    let first_a = send(addr, &request_a, "tenant A's request").await?;
    let created_a = expect_created(&first_a, 1, "tenant A's request")?;
    let first_b = send(addr, &request_b, "tenant B's request with the same key").await?;
    let created_b = expect_created(&first_b, 1, "tenant B's request with the same key")?;
    ensure!(
        created_a["payment_id"] != created_b["payment_id"],
        "tenants A and B got the same payment {}",
        created_a["payment_id"]
    );
    let retry_a = send(addr, &request_a, "tenant A's retry").await?;
    expect_replay_of(&retry_a, &first_a, "tenant A's retry")?;
    let retry_b = send(addr, &request_b, "tenant B's retry").await?;
    expect_replay_of(&retry_b, &first_b, "tenant B's retry")?;
    let listed_a = expect_payments(addr, &key, Some("tenant-a"), 1, "tenant A").await?;
    expect_listed(&listed_a[0], &created_a, &key, 1, "tenant A's listed payment")?;
    let listed_b = expect_payments(addr, &key, Some("tenant-b"), 1, "tenant B").await?;
    expect_listed(&listed_b[0], &created_b, &key, 1, "tenant B's listed payment")?;
    Ok(())
}

async fn body_too_large(context: &mut Context) -> Result<(), CheckError> {
    let addr = context.example("").await?;
    let key = fresh_key("large");
    // Valid JSON of 2 MiB, so that only its size can be the reason to refuse it.
    let padding = "x".repeat(2 * 1024 * 1024);
    let large = format!("{{\"amount\": 100.00, \"currency\": \"USD\", \"destination\": \"{padding}\"}}");
    let response = send(addr, &payment_request(&quoted(&key), None, &large), "a 2 MiB body").await?;
    expect_problem(&response, 413, &["urn:idempotency:body-too-large"], "a 2 MiB body")?;
    expect_payments(addr, &key, None, 0, "after the 2 MiB body").await?;
    let normal = send(addr, &payment(&key), "the same key with a normal body").await?;
    expect_created(&normal, 1, "the same key with a normal body (nothing was claimed before)")?;
    expect_payments(addr, &key, None, 1, "after the normal body").await?;
    Ok(())
}

async fn invalid_keys(context: &mut Context) -> Result<(), CheckError> {
    const MISSING: &str = "urn:idempotency:key-missing";
    const INVALID: &str = "urn:idempotency:key-invalid";
    let addr = context.example("").await?;
    let before = payments(addr).await?.len();
    let key = fresh_key("invalid");
    let long = format!("\"{key}{}\"", "x".repeat(256 - key.len()));
    let body = payment_body("100.00", None);
    let variants: [(&str, Vec<String>, &[&str]); 8] = [
        ("a missing key", vec![], &[MISSING]),
        ("an empty key (\"\")", vec!["\"\"".into()], &[INVALID]),
        // A field line with nothing after the colon: missing or invalid, both are fair.
        ("a blank field value", vec![String::new()], &[MISSING, INVALID]),
        ("a key of 256 bytes", vec![long], &[INVALID]),
        ("an unterminated string (\"abc)", vec!["\"abc".into()], &[INVALID]),
        ("a string with a bare quote (\"a\"b\")", vec!["\"a\"b\"".into()], &[INVALID]),
        ("a value with a space (a b)", vec!["a b".into()], &[INVALID]),
        ("the header sent twice", vec![quoted(&key), quoted(&key)], &[INVALID]),
    ];
    for (what, values, types) in variants {
        let mut request = Request::post_json("/payments", body.as_str());
        for value in &values {
            request = request.header(KEY_HEADER, value);
        }
        let response = send(addr, &request, what).await?;
        expect_problem(&response, 400, types, what)?;
    }
    let after = payments(addr).await?.len();
    ensure!(after == before, "the invalid keys created {} payments", after.saturating_sub(before));
    Ok(())
}

async fn store_policy(context: &mut Context) -> Result<(), CheckError> {
    let addr = context.example("").await?;

    // A decline is final: stored and replayed, and no payment is made.
    let key = fresh_key("decline");
    let declined = payment_request(&quoted(&key), None, &payment_body("100.00", Some("decline")));
    let first = send(addr, &declined, "a declined payment").await?;
    ensure!(
        first.status == 402,
        "a declined payment: status {}, expected 402; body: {}",
        first.status,
        first.body_text()
    );
    expect_first(&first, "a declined payment")?;
    let error = json_body(&first, "a declined payment")?;
    ensure!(
        error["error"] == "card_declined",
        "a declined payment: error {}, expected \"card_declined\"",
        error["error"]
    );
    let retry = send(addr, &declined, "the declined payment's retry").await?;
    expect_replay_of(&retry, &first, "the declined payment's retry")?;
    expect_payments(addr, &key, None, 0, "after the decline").await?;

    // A bank timeout is retryable: nothing is stored, and the retry runs again as attempt 2.
    let key = fresh_key("timeout");
    let timed_out = payment_request(&quoted(&key), None, &payment_body("100.00", Some("bank_timeout")));
    let first = send(addr, &timed_out, "a bank timeout").await?;
    ensure!(first.status == 503, "a bank timeout: status {}, expected 503; body: {}", first.status, first.body_text());
    expect_first(&first, "a bank timeout")?;
    expect_retry_after(&first, 0, "a bank timeout")?;
    expect_payments(addr, &key, None, 0, "after the bank timeout").await?;
    let retry = send(addr, &timed_out, "the bank timeout's retry").await?;
    let created = expect_created(&retry, 2, "the bank timeout's retry (the key was released)")?;
    let listed = expect_payments(addr, &key, None, 1, "after the bank timeout's retry").await?;
    expect_listed(&listed[0], &created, &key, 2, "the retried payment")?;
    Ok(())
}

async fn fail_closed(context: &mut Context) -> Result<(), CheckError> {
    let addr = context.example("").await?;
    let key = fresh_key("closed");
    context.coordinator().await?.kill();
    let what = "a request while the coordinator is down";
    let response = send_within(addr, &payment(&key), what, FAIL_CLOSED_WITHIN).await?;
    expect_problem(&response, 503, &["urn:idempotency:unavailable"], what)?;
    expect_retry_after(&response, 0, what)?;
    expect_payments(addr, &key, None, 0, "while the coordinator is down (the handler must not run)").await?;

    context.coordinator().await?;
    // The example may take a moment to reconnect: it may answer unavailable for a while.
    let until = Instant::now() + RECOVERY_WITHIN;
    let what = "the same request once the coordinator is back";
    let response = loop {
        let response = send(addr, &payment(&key), what).await?;
        if response.status != 503 || Instant::now() >= until {
            break response;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let created = expect_created(&response, 1, what)?;
    let listed = expect_payments(addr, &key, None, 1, "once the coordinator is back").await?;
    expect_listed(&listed[0], &created, &key, 1, "the payment made once the coordinator is back")?;
    Ok(())
}

async fn concurrent_duplicates(context: &mut Context) -> Result<(), CheckError> {
    // Without waiting: one runs, the other is told it is in progress.
    let addr = context.example("--work 1s").await?;
    let key = fresh_key("inprogress");
    let mut responses = send_concurrently(addr, &payment(&key), 2, "two concurrent requests").await?;
    responses.sort_by_key(|r| r.status);
    let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
    ensure!(
        statuses == [201, 409],
        "two concurrent requests (--work 1s): statuses {statuses:?}, expected one 201 and one 409; bodies: {} / {}",
        responses[0].body_text(),
        responses[1].body_text()
    );
    expect_created(&responses[0], 1, "the request that ran")?;
    let what = "the concurrent duplicate";
    expect_problem(&responses[1], 409, &["urn:idempotency:in-progress"], what)?;
    expect_retry_after(&responses[1], 1, what)?;
    expect_payments(addr, &key, None, 1, "after two concurrent requests").await?;

    // With --wait, the duplicate waits for the first and gets its response.
    let addr = context.example("--work 1s --wait 5s").await?;
    let key = fresh_key("waiting");
    let responses = send_concurrently(addr, &payment(&key), 2, "two concurrent requests with --wait").await?;
    let (first, second) = match (responses[0].header_count(REPLAYED_HEADER), responses[1].header_count(REPLAYED_HEADER))
    {
        (0, _) => (&responses[0], &responses[1]),
        _ => (&responses[1], &responses[0]),
    };
    expect_created(first, 1, "the request that ran (--wait 5s)")?;
    expect_replay_of(second, first, "the request that waited (--wait 5s)")?;
    expect_payments(addr, &key, None, 1, "after two concurrent requests with --wait").await?;
    Ok(())
}

async fn concurrent_wait(context: &mut Context) -> Result<(), CheckError> {
    const COUNT: usize = 32;
    let addr = context.example("--work 300ms --wait 10s").await?;
    let key = fresh_key("thundering");
    let responses = send_concurrently(addr, &payment(&key), COUNT, "32 concurrent requests").await?;
    let firsts: Vec<&Response> = responses.iter().filter(|r| r.header_count(REPLAYED_HEADER) == 0).collect();
    ensure!(
        firsts.len() == 1,
        "32 concurrent requests (--wait 10s): {} responses not marked as replays, expected exactly 1; statuses {:?}",
        firsts.len(),
        responses.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    let first = firsts[0];
    expect_created(first, 1, "the request that ran")?;
    for (index, response) in responses.iter().enumerate().filter(|(_, r)| !std::ptr::eq(*r, first)) {
        expect_replay_of(response, first, &format!("concurrent request {index}"))?;
    }
    expect_payments(addr, &key, None, 1, "after 32 concurrent requests").await?;
    Ok(())
}

async fn crash_takeover(context: &mut Context) -> Result<(), CheckError> {
    const LEASE: Duration = Duration::from_secs(1);
    let addr = context.example("--lease-ttl 1s").await?;
    let key = fresh_key("crash");
    let crashing = payment_request(&quoted(&key), None, &payment_body("100.00", Some("crash")));
    match http::send(addr, &crashing, REQUEST_TIMEOUT).await {
        Err(error) if error.is_connection_lost() => {}
        Err(error) => return Err(CheckError::Http { what: "the crashing request".into(), source: error }),
        Ok(response) => {
            return Err(CheckError::Expectation(format!(
                "the crashing request: got status {} ({}), expected the connection to drop",
                response.status,
                response.body_text()
            )));
        }
    }
    let crashed_at = Instant::now();
    let example = context.current_example();
    ensure!(
        example.process.exited_within(EXIT_WITHIN).await.is_some(),
        "the example still runs {EXIT_WITHIN:?} after the crashing request"
    );
    example.restart().await?;
    // A little over the lease, counted from when the crash was seen (the lease began earlier).
    tokio::time::sleep_until((crashed_at + LEASE + LEASE / 2).into()).await;
    let what = "the retry after the crash and the lease";
    let retry = send(addr, &payment_request(&quoted(&key), None, &payment_body("100.00", Some("crash"))), what).await?;
    let created = expect_created(&retry, 2, what)?;
    let listed = expect_payments(addr, &key, None, 1, "after the takeover").await?;
    expect_listed(&listed[0], &created, &key, 2, "the payment made by the takeover")?;
    Ok(())
}
