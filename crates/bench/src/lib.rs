//! The load generator behind `idempotency-bench`: scenarios, workers, latency histograms and the
//! report. It drives the coordinator, or hand-rolled PostgreSQL and Redis equivalents
//! ([`targets`]), with the same load shape, so that their figures compare. The coordinator is
//! driven through the client crate, as its users drive it.
//!
//! Invariant: `double_grants` counts every moment two workers held the same key at once; in the
//! `contention` scenario any non-zero value is a correctness failure of the target.

#![warn(missing_docs, unreachable_pub)]

pub mod cpu;
pub mod targets;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use parking_lot::Mutex;

use targets::{Claimed, Client};

/// What the generator does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Claim a fresh key, then Complete it with a response of `--response-bytes`.
    Flow,
    /// Claim keys that are completed: the stored response comes back.
    Replay,
    /// Look keys up.
    Lookup,
    /// Workers race over `--key-space` hot keys: claim, hold briefly, release; counts double grants.
    Contention,
    /// A blend of flow, replay and lookup (`--mix`).
    Mixed,
    /// gRPC health checks: the transport's own ceiling.
    Health,
}

/// The generator's flags.
#[derive(Debug, Clone, Args)]
pub struct Options {
    /// `http://host:port` (the coordinator; several replicas separated by commas),
    /// `postgres://user@host:port/db` or `redis://host:port`.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub target: String,
    /// What to run.
    #[arg(long, value_enum, default_value = "flow")]
    pub scenario: Scenario,
    /// Calls (or flows) in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Connections the workers share. By default what a competent user of the target opens: 4
    /// for the coordinator (HTTP/2 multiplexes calls) and Redis (multiplexed), and one per worker
    /// for PostgreSQL (a pool sized to the concurrency: a connection runs one statement at a time).
    #[arg(long)]
    pub connections: Option<usize>,
    /// How long to measure, after the warm-up.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Stop after this many units (flows, calls or claims) instead of after `--duration`.
    #[arg(long)]
    pub count: Option<u64>,
    /// Load run before measuring starts.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub warmup: Duration,
    /// Bytes of each stored response body.
    #[arg(long, default_value_t = 500)]
    pub response_bytes: usize,
    /// With this, each flow's body takes between `--response-bytes` and this many bytes, drawn
    /// evenly on a log scale: small and large bodies mixed, as real APIs store them.
    #[arg(long)]
    pub response_bytes_max: Option<usize>,
    /// Keys prepared for replay, lookup and mixed; hot keys for contention.
    #[arg(long, default_value_t = 10_000)]
    pub key_space: usize,
    /// Seed for key choice, so runs repeat.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Blend for `mixed`, as weights: flow,replay,lookup.
    #[arg(long, default_value = "20,70,10")]
    pub mix: String,
    /// For PostgreSQL targets: run with synchronous_commit on (durable) or off.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub synchronous_commit: bool,
    /// Hold the load to this many units per second in all (0: as fast as the target answers).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// With an `https://` coordinator: the CA that signed its certificate (PEM file).
    #[arg(long)]
    pub ca_file: Option<std::path::PathBuf>,
    /// A client certificate (PEM file) for a coordinator that requires one (mTLS).
    #[arg(long, requires = "key_file")]
    pub cert_file: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM file).
    #[arg(long, requires = "cert_file")]
    pub key_file: Option<std::path::PathBuf>,
    /// A file holding the bearer token to send to the coordinator (a token is never a flag: `ps`
    /// would show it).
    #[arg(long)]
    pub token_file: Option<std::path::PathBuf>,
    /// Whose CPU to report per unit beside the rate: `machine` (all CPU the machine spent while
    /// measuring, minus this generator's own), process ids separated by commas (the server's),
    /// or `name:NAME` (every process called NAME, such as `name:postgres`, found when measuring
    /// starts). Linux only (reads /proc).
    #[arg(long)]
    pub server_cpu: Option<cpu::Source>,
}

impl Options {
    /// The connections to open: `--connections`, or the target's default.
    pub fn connection_count(&self) -> usize {
        self.connections.unwrap_or_else(|| {
            if self.target.starts_with("postgres://") || self.target.starts_with("postgresql://") {
                self.concurrency
            } else {
                4
            }
        })
    }
}

/// Latencies and errors of one kind of operation.
#[derive(Debug, Clone)]
pub struct OpStats {
    /// Latency in microseconds of successful operations.
    pub latency: Histogram<u64>,
    /// Failed operations by status code.
    pub errors: BTreeMap<String, u64>,
}

impl Default for OpStats {
    fn default() -> Self {
        OpStats {
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
            errors: BTreeMap::new(),
        }
    }
}

impl OpStats {
    fn record(&mut self, took: Duration, result: &Result<(), String>) {
        match result {
            Ok(()) => {
                let micros = took.as_micros().max(1) as u64;
                self.latency.saturating_record(micros);
            }
            Err(code) => *self.errors.entry(code.clone()).or_default() += 1,
        }
    }

    fn merge(&mut self, other: &OpStats) {
        self.latency.add(&other.latency).expect("histograms with equal bounds merge");
        for (code, count) in &other.errors {
            *self.errors.entry(code.clone()).or_default() += count;
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// The scenario run.
    pub scenario: Scenario,
    /// The target measured.
    pub target: String,
    /// Calls in flight.
    pub concurrency: usize,
    /// Measured wall time.
    pub elapsed: Duration,
    /// Units completed while measuring (flows, calls or claims).
    pub units: u64,
    /// Per operation ("flow", "claim", "complete", …).
    pub ops: BTreeMap<String, OpStats>,
    /// Times a key was granted while another worker held it. Must be 0.
    pub double_grants: u64,
    /// Claims that found the key in progress (contention).
    pub in_progress: u64,
    /// Replies that did not match what was stored (wrong outcome or body size).
    pub wrong_answers: u64,
    /// CPU seconds the server (as `--server-cpu` says) spent while measuring, if asked.
    pub server_cpu: Option<f64>,
    /// CPU seconds this generator spent while measuring.
    pub generator_cpu: f64,
}

impl Report {
    /// Units per second.
    pub fn rate(&self) -> f64 {
        self.units as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Server CPU per unit, in milliseconds, if measured.
    pub fn server_cpu_ms_per_unit(&self) -> Option<f64> {
        self.server_cpu.map(|seconds| seconds * 1000.0 / self.units.max(1) as f64)
    }

    /// Failed operations, all kinds.
    pub fn error_count(&self) -> u64 {
        self.ops.values().flat_map(|op| op.errors.values()).sum()
    }

    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let ops: serde_json::Map<String, serde_json::Value> = self
            .ops
            .iter()
            .map(|(name, op)| {
                let h = &op.latency;
                let q = |quantile: f64| h.value_at_quantile(quantile) as f64 / 1000.0;
                (
                    name.clone(),
                    serde_json::json!({
                        "count": h.len(),
                        "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99), "p999_ms": q(0.999),
                        "max_ms": h.max() as f64 / 1000.0,
                        "errors": op.errors,
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "scenario": format!("{:?}", self.scenario).to_lowercase(),
            "target": self.target,
            "concurrency": self.concurrency,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "units": self.units,
            "rate_per_s": self.rate(),
            "double_grants": self.double_grants,
            "in_progress": self.in_progress,
            "wrong_answers": self.wrong_answers,
            "server_cpu_s": self.server_cpu,
            "server_cpu_ms_per_unit": self.server_cpu_ms_per_unit(),
            "generator_cpu_s": self.generator_cpu,
            "ops": ops,
        })
    }

    /// The report as a readable table.
    pub fn to_table(&self) -> String {
        let mut out = format!(
            "scenario {:?}  target {}  concurrency {}  measured {:.1}s\nrate: {:.0} {}/s   errors: {}   double grants: {}   wrong answers: {}\n",
            self.scenario,
            self.target,
            self.concurrency,
            self.elapsed.as_secs_f64(),
            self.rate(),
            match self.scenario {
                Scenario::Flow => "flows",
                Scenario::Contention => "claims",
                _ => "calls",
            },
            self.error_count(),
            self.double_grants,
            self.wrong_answers,
        );
        if let Some(per_unit) = self.server_cpu_ms_per_unit() {
            out.push_str(&format!(
                "server CPU: {:.3} ms per unit ({:.2} cores busy)   generator CPU: {:.2} cores\n",
                per_unit,
                self.server_cpu.unwrap_or(0.0) / self.elapsed.as_secs_f64().max(1e-9),
                self.generator_cpu / self.elapsed.as_secs_f64().max(1e-9),
            ));
        }
        if self.scenario == Scenario::Contention {
            out.push_str(&format!("claims finding the key in progress: {}\n", self.in_progress));
        }
        out.push_str(&format!(
            "{:<10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}  errors\n",
            "op", "count", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        ));
        for (name, op) in &self.ops {
            let h = &op.latency;
            let q = |quantile: f64| h.value_at_quantile(quantile) as f64 / 1000.0;
            out.push_str(&format!(
                "{:<10} {:>10} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}  {:?}\n",
                name,
                h.len(),
                q(0.5),
                q(0.9),
                q(0.99),
                q(0.999),
                h.max() as f64 / 1000.0,
                op.errors
            ));
        }
        out
    }
}

/// Per-worker state shared across workers.
struct Shared {
    measuring: AtomicBool,
    stop: AtomicBool,
    units: AtomicU64,
    limit: Option<u64>,
    double_grants: AtomicU64,
    in_progress: AtomicU64,
    wrong_answers: AtomicU64,
    holders: Mutex<HashMap<String, usize>>,
    run_id: String,
    body: Vec<u8>,
    options: Options,
    mix: [u32; 3],
}

/// A small deterministic generator (splitmix64), so key choice repeats with `--seed`.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// A body size between `min` and `max` (when given), evenly distributed on a log scale.
pub fn body_size(rng: &mut Rng, min: usize, max: Option<usize>) -> usize {
    let Some(max) = max.filter(|max| *max > min) else { return min };
    let (low, high) = ((min.max(1) as f64).ln(), (max as f64).ln());
    let fraction = rng.below(1 << 20) as f64 / f64::from(1u32 << 20);
    ((low + (high - low) * fraction).exp() as usize).clamp(min, max)
}

const FINGERPRINT: [u8; 32] = [42; 32];
const LEASE: Duration = Duration::from_secs(30);

fn prepared_key(run_id: &str, i: usize) -> String {
    format!("{run_id}-prepared-{i}")
}

fn parse_mix(mix: &str) -> anyhow::Result<[u32; 3]> {
    let weights: Vec<u32> = mix
        .split(',')
        .map(|w| w.trim().parse())
        .collect::<Result<_, _>>()
        .context("--mix takes three whole numbers")?;
    match weights.as_slice() {
        [flow, replay, lookup] if flow + replay + lookup > 0 => Ok([*flow, *replay, *lookup]),
        _ => bail!("--mix takes three weights (flow,replay,lookup) with a positive sum"),
    }
}

/// Runs `options` and returns what it measured.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    if options.concurrency == 0 || options.connection_count() == 0 {
        bail!("--concurrency and --connections must be at least 1");
    }
    let mix = parse_mix(&options.mix)?;
    let clients = Client::connect_all(&options).await?;
    if options.scenario == Scenario::Health && !clients[0].has_health() {
        bail!("the health scenario needs the coordinator as target");
    }
    let run_id = format!("{:x}", uuid::Uuid::new_v4().as_u128() as u64);
    let shared = Arc::new(Shared {
        measuring: AtomicBool::new(options.warmup.is_zero()),
        stop: AtomicBool::new(false),
        units: AtomicU64::new(0),
        limit: options.count,
        double_grants: AtomicU64::new(0),
        in_progress: AtomicU64::new(0),
        wrong_answers: AtomicU64::new(0),
        holders: Mutex::new(HashMap::new()),
        run_id,
        body: vec![b'x'; options.response_bytes.max(options.response_bytes_max.unwrap_or(0))],
        options: options.clone(),
        mix,
    });
    if matches!(options.scenario, Scenario::Replay | Scenario::Lookup | Scenario::Mixed) {
        prepare(&clients, &shared).await?;
    }

    let workers: Vec<_> = (0..options.concurrency)
        .map(|index| {
            let client = clients[index % clients.len()].clone();
            let shared = Arc::clone(&shared);
            tokio::spawn(worker(index, client, shared))
        })
        .collect();
    if !options.warmup.is_zero() {
        tokio::time::sleep(options.warmup).await;
        shared.units.store(0, Ordering::SeqCst);
        shared.measuring.store(true, Ordering::SeqCst);
    }
    let started = Instant::now();
    let cpu_before = cpu::Sample::take(options.server_cpu.as_ref())?;
    if options.count.is_none() {
        tokio::time::sleep(options.duration).await;
        shared.stop.store(true, Ordering::SeqCst);
    }
    let mut ops: BTreeMap<String, OpStats> = BTreeMap::new();
    for worker in workers {
        for (name, stats) in worker.await.context("a worker panicked")? {
            ops.entry(name).or_default().merge(&stats);
        }
    }
    let elapsed = started.elapsed();
    let cpu_spent = cpu::Sample::take(options.server_cpu.as_ref())?.since(&cpu_before);
    Ok(Report {
        scenario: options.scenario,
        target: options.target.clone(),
        concurrency: options.concurrency,
        elapsed,
        units: shared.units.load(Ordering::SeqCst),
        ops,
        double_grants: shared.double_grants.load(Ordering::SeqCst),
        in_progress: shared.in_progress.load(Ordering::SeqCst),
        wrong_answers: shared.wrong_answers.load(Ordering::SeqCst),
        server_cpu: cpu_spent.server,
        generator_cpu: cpu_spent.generator,
    })
}

/// Completes `--key-space` keys for replay and lookup.
async fn prepare(clients: &[Client], shared: &Arc<Shared>) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..clients.len() * 8)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            let shared = Arc::clone(shared);
            let next = Arc::clone(&next);
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst) as usize;
                    if i >= shared.options.key_space {
                        return Ok::<(), anyhow::Error>(());
                    }
                    let key = prepared_key(&shared.run_id, i);
                    match client.claim(&key, &FINGERPRINT, LEASE).await {
                        Ok(Claimed::Acquired(token)) => client
                            .complete(&key, &token, &shared.body[..shared.options.response_bytes])
                            .await
                            .map_err(|e| anyhow::anyhow!("{e}"))?,
                        other => bail!("preparing {key}: {other:?}"),
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// One worker: runs units until told to stop; returns its statistics.
async fn worker(index: usize, mut client: Client, shared: Arc<Shared>) -> BTreeMap<String, OpStats> {
    let mut stats: BTreeMap<String, OpStats> = BTreeMap::new();
    let mut rng = Rng(shared.options.seed.wrapping_mul(1_000_003).wrapping_add(index as u64));
    let mut sequence = 0u64;
    // With --rate, each worker takes its share of the rate on a fixed schedule.
    let mut pace = (shared.options.rate > 0).then(|| {
        let period = Duration::from_secs_f64(shared.options.concurrency as f64 / shared.options.rate as f64);
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    });
    loop {
        if let Some(pace) = pace.as_mut() {
            pace.tick().await;
        }
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        if let Some(limit) = shared.limit
            && shared.measuring.load(Ordering::Relaxed)
            && shared.units.fetch_add(1, Ordering::SeqCst) >= limit
        {
            shared.units.fetch_sub(1, Ordering::SeqCst);
            break;
        }
        let measuring = shared.measuring.load(Ordering::Relaxed);
        let mut local: Vec<(&'static str, Duration, Result<(), String>)> = Vec::with_capacity(3);
        let scenario = match shared.options.scenario {
            Scenario::Mixed => {
                let [flow, replay, lookup] = shared.mix;
                let pick = (rng.next_u64() % u64::from(flow + replay + lookup)) as u32;
                if pick < flow {
                    Scenario::Flow
                } else if pick < flow + replay {
                    Scenario::Replay
                } else {
                    Scenario::Lookup
                }
            }
            other => other,
        };
        match scenario {
            Scenario::Flow => {
                sequence += 1;
                let key = format!("{}-{index}-{sequence}", shared.run_id);
                let flow_started = Instant::now();
                let started = Instant::now();
                let claimed = client.claim(&key, &FINGERPRINT, LEASE).await;
                let flow_result = match claimed {
                    Ok(Claimed::Acquired(token)) => {
                        local.push(("claim", started.elapsed(), Ok(())));
                        let started = Instant::now();
                        let size =
                            body_size(&mut rng, shared.options.response_bytes, shared.options.response_bytes_max);
                        let completed = client.complete(&key, &token, &shared.body[..size]).await;
                        local.push(("complete", started.elapsed(), completed.clone()));
                        completed
                    }
                    Ok(other) => {
                        shared.wrong_answers.fetch_add(1, Ordering::Relaxed);
                        Err(format!("claim:{other:?}"))
                    }
                    Err(code) => {
                        local.push(("claim", started.elapsed(), Err(code.clone())));
                        Err(code)
                    }
                };
                local.push(("flow", flow_started.elapsed(), flow_result));
            }
            Scenario::Replay => {
                let key = prepared_key(&shared.run_id, rng.below(shared.options.key_space as u64) as usize);
                let started = Instant::now();
                let result = match client.claim(&key, &FINGERPRINT, LEASE).await {
                    Ok(Claimed::Completed(size)) if size == shared.options.response_bytes => Ok(()),
                    Ok(other) => {
                        shared.wrong_answers.fetch_add(1, Ordering::Relaxed);
                        Err(format!("claim:{other:?}"))
                    }
                    Err(code) => Err(code),
                };
                local.push(("replay", started.elapsed(), result));
            }
            Scenario::Lookup => {
                let key = prepared_key(&shared.run_id, rng.below(shared.options.key_space as u64) as usize);
                let started = Instant::now();
                let result = client.lookup(&key).await;
                local.push(("lookup", started.elapsed(), result));
            }
            Scenario::Health => {
                let started = Instant::now();
                let result = client.health().await;
                local.push(("health", started.elapsed(), result));
            }
            Scenario::Contention => {
                let key = format!("{}-hot-{}", shared.run_id, rng.below(shared.options.key_space as u64) as usize);
                let started = Instant::now();
                match client.claim(&key, &FINGERPRINT, LEASE).await {
                    Ok(Claimed::Acquired(token)) => {
                        local.push(("claim", started.elapsed(), Ok(())));
                        if let Some(other) = shared.holders.lock().insert(key.clone(), index) {
                            shared.double_grants.fetch_add(1, Ordering::SeqCst);
                            eprintln!("double grant: {key} granted to worker {index} while worker {other} held it");
                        }
                        tokio::task::yield_now().await;
                        shared.holders.lock().remove(&key);
                        let started = Instant::now();
                        let result = client.release(&key, &token).await;
                        local.push(("release", started.elapsed(), result));
                    }
                    Ok(Claimed::InProgress) => {
                        shared.in_progress.fetch_add(1, Ordering::Relaxed);
                        local.push(("claim", started.elapsed(), Ok(())));
                    }
                    Ok(other) => {
                        shared.wrong_answers.fetch_add(1, Ordering::Relaxed);
                        local.push(("claim", started.elapsed(), Err(format!("claim:{other:?}"))));
                    }
                    Err(code) => local.push(("claim", started.elapsed(), Err(code))),
                }
            }
            Scenario::Mixed => unreachable!("mixed picks one of the others above"),
        }
        if measuring {
            for (name, took, result) in &local {
                stats.entry((*name).to_owned()).or_default().record(*took, result);
            }
            if shared.limit.is_none() {
                shared.units.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    stats
}
