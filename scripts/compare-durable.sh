#!/usr/bin/env bash
# The durable path against its peers, as BENCHMARKS.md shows it: the coordinator (embedded
# store, strict durability), hand-rolled PostgreSQL (synchronous_commit on, one connection per
# worker, prepared statements) and hand-rolled Redis (appendonly with appendfsync always, a
# multiplexed connection), each doing Claim + Complete flows with 500-byte bodies at 1, 4, 16
# and 64 flows in flight, interleaved (every round runs every target at every concurrency),
# ROUNDS times, in two layouts:
#   pinned: each server on core 0, the load generator on core 1 (a per-core comparison);
#   free:   the servers on every core, the load generator on core 1.
# Then replay, lookup and health checks on the coordinator (pinned), for the cost of a replay
# against the transport's own. Every run reports the server's CPU per flow beside throughput
# and latency (PostgreSQL's: all its processes; the coordinator's and Redis's: their process).
#
# Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust) and redis-server on PATH; starts its
# own coordinator and Redis, and pins PostgreSQL's processes while it runs (restored at the end).
# Writes every run as a JSON line to $OUT/runs.jsonl, then the tables ($OUT/summary.md) and the
# plots (docs/bench/durable-*.svg) with scripts/summarize-durable.py.
#   DURATION=5s ROUNDS=3 CONCURRENCY="1 4 16 64" LAYOUTS="pinned free" scripts/compare-durable.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-3}
CONCURRENCY=${CONCURRENCY:-"1 4 16 64"}
LAYOUTS=${LAYOUTS:-"pinned free"}
cores=$(nproc)
if [[ $cores -lt 2 ]]; then
    echo "needs at least 2 cores (one for the servers, one for the load generator)" >&2
    exit 1
fi

cargo build --release -p idempotency-coordinator -p idempotency-bench
server=target/release/idempotency-coordinator
bench=target/release/idempotency-bench
out=${OUT:-$(mktemp -d -t compare-durable-XXXXXX)}
mkdir -p "$out"
tmp=$(mktemp -d -t compare-durable-data-XXXXXX)
pids=()
pin_postgres() {
    for pid in $(pgrep -x postgres); do taskset -apc "$1" "$pid" >/dev/null 2>&1 || true; done
}
cleanup() {
    for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pin_postgres "0-$((cores - 1))"
    rm -rf "$tmp"
}
trap cleanup EXIT

psql -h 127.0.0.1 -U postgres -q -c "DROP DATABASE IF EXISTS idempotency_bench" -c "CREATE DATABASE idempotency_bench"
pg=postgres://postgres@127.0.0.1:5432/idempotency_bench
runs="$out/runs.jsonl"
: > "$runs"

# run LAYOUT ROUND TARGET_NAME CPU_SOURCE FLAGS…: one measurement, appended to $runs.
run() {
    local layout=$1 round=$2 name=$3 cpu=$4
    shift 4
    local report
    report=$(taskset -c 1 "$bench" --duration "$DURATION" --warmup 1s --json --server-cpu "$cpu" "$@")
    python3 -c 'import json, sys; r = json.loads(sys.argv[1]); r.update(layout=sys.argv[2], round=int(sys.argv[3]), name=sys.argv[4]); print(json.dumps(r))' \
        "$report" "$layout" "$round" "$name" >> "$runs"
    python3 -c 'import json, sys; r = json.loads(sys.argv[1]); op = r["ops"].get("flow") or next(iter(r["ops"].values())); print("  %-12s c=%-3d %8.0f/s  p50 %6.2f ms  p99 %6.2f ms  server CPU %.3f ms/unit" % (sys.argv[2], r["concurrency"], r["rate_per_s"], op["p50_ms"], op["p99_ms"], r["server_cpu_ms_per_unit"] or 0))' \
        "$report" "$name"
}

for layout in $LAYOUTS; do
    case $layout in
        pinned) pin="taskset -c 0"; pin_postgres 0 ;;
        free) pin=""; pin_postgres "0-$((cores - 1))" ;;
        *) echo "unknown layout $layout" >&2; exit 1 ;;
    esac
    echo "== $layout"
    $pin "$server" --data-dir "$tmp/coordinator-$layout" --listen 127.0.0.1:50091 2>"$out/coordinator-$layout.log" &
    coordinator=$!
    pids+=("$coordinator")
    mkdir -p "$tmp/redis-$layout"
    $pin redis-server --port 6391 --bind 127.0.0.1 --save "" --appendonly yes --appendfsync always \
        --dir "$tmp/redis-$layout" --logfile "$out/redis-$layout.log" &
    redis=$!
    pids+=("$redis")
    sleep 1
    for round in $(seq 1 "$ROUNDS"); do
        echo "round $round"
        for c in $CONCURRENCY; do
            run "$layout" "$round" coordinator "$coordinator" --target http://127.0.0.1:50091 --concurrency "$c"
            run "$layout" "$round" postgres name:postgres --target "$pg" --concurrency "$c"
            run "$layout" "$round" redis "$redis" --target redis://127.0.0.1:6391 --concurrency "$c"
        done
    done
    if [[ $layout == pinned ]]; then
        for round in $(seq 1 "$ROUNDS"); do
            for c in 16 64; do
                for scenario in health replay lookup; do
                    run "$layout" "$round" "coordinator-$scenario" "$coordinator" --target http://127.0.0.1:50091 \
                        --scenario "$scenario" --concurrency "$c" --key-space 2000
                done
            done
        done
    fi
    kill -INT "$coordinator" "$redis"
    wait "$coordinator" "$redis" 2>/dev/null || true
    pids=()
done

python3 scripts/summarize-durable.py "$runs" docs/bench | tee "$out/summary.md"
echo "runs: $runs"
