#!/usr/bin/env bash
# The scale-out table of BENCHMARKS.md: the coordinator on PostgreSQL (one replica, its pool sized
# to the concurrency) against the same flows hand-rolled on the same database (one connection per
# worker, prepared statements, synchronous_commit on), at 1, 16 and 64 flows in flight, and
# replays against a hand-rolled SELECT of the stored response, interleaved, ROUNDS times. With
# LAYOUT=pinned (the default) PostgreSQL and the replica share core 0 and the load generator has
# core 1; with LAYOUT=free they use every core. Reports, beside throughput and latency, the CPU
# that PostgreSQL's processes spent per flow or call, and the replica's own.
#   DURATION=5s ROUNDS=3 LAYOUT=pinned scripts/compare-postgres.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-3}
LAYOUT=${LAYOUT:-pinned}
cores=$(nproc)
cargo build --release -p idempotency-coordinator -p idempotency-bench
server=target/release/idempotency-coordinator
bench=target/release/idempotency-bench
tmp=$(mktemp -d)
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
case $LAYOUT in
    pinned) pin="taskset -c 0"; pin_postgres 0 ;;
    free) pin="" ;;
    *) echo "LAYOUT is pinned or free" >&2; exit 1 ;;
esac

$pin "$server" --store "$pg" --postgres-pool-size 32 --listen 127.0.0.1:50081 --data-dir "$tmp/unused" \
    2>"$tmp/replica.log" &
replica=$!
pids+=("$replica")
sleep 2

# row NAME FLAGS…: one run; prints a markdown row with PostgreSQL's CPU per unit and the replica's.
row() {
    local name=$1
    shift
    local before after report
    before=$(awk '{print $14 + $15}' "/proc/$replica/stat")
    report=$(taskset -c 1 "$bench" --duration "$DURATION" --warmup 1s --json --server-cpu name:postgres "$@")
    after=$(awk '{print $14 + $15}' "/proc/$replica/stat")
    python3 - "$name" "$report" "$before" "$after" "$(getconf CLK_TCK)" <<'PY'
import json, sys
name, report, before, after, ticks = sys.argv[1], json.loads(sys.argv[2]), *map(float, sys.argv[3:])
op = report["ops"].get("flow") or next(iter(report["ops"].values()))
errors = sum(sum(o["errors"].values()) for o in report["ops"].values())
units = max(report["units"], 1)
replica_ms = (after - before) / ticks * 1000 / units if "http" in report["target"] else 0.0
print("| %s | %.0f | %.2f | %.2f | %.3f | %.3f | %d |" % (
    name, report["rate_per_s"], op["p50_ms"], op["p99_ms"], report["server_cpu_ms_per_unit"], replica_ms, errors))
PY
}

echo "| run ($LAYOUT) | per s | p50 ms | p99 ms | PostgreSQL CPU ms per unit | replica CPU ms per unit | errors |"
echo "|---|---|---|---|---|---|---|"
for round in $(seq 1 "$ROUNDS"); do
    for c in 1 16 64; do
        row "hand-rolled flow c=$c (round $round)" --target "$pg" --scenario flow --concurrency "$c"
        row "coordinator on PostgreSQL flow c=$c (round $round)" --target http://127.0.0.1:50081 --scenario flow --concurrency "$c"
    done
    row "hand-rolled SELECT of the stored response c=16 (round $round)" --target "$pg" --scenario lookup --concurrency 16 --key-space 2000
    row "coordinator on PostgreSQL replay c=16 (round $round)" --target http://127.0.0.1:50081 --scenario replay --concurrency 16 --key-space 2000
done
