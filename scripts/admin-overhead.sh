#!/usr/bin/env bash
# What the Admin API costs: how long `admin stats`, `admin export` and `admin import` take on a
# store of RECORDS records (completed, 500-byte bodies), and what an export or a census running in
# a loop does to Claim + Complete flows at CONCURRENCY in flight. The coordinator (embedded store,
# strict durability) is pinned to core 0; the load generator and the admin command line share
# core 1. Runs are interleaved ROUNDS times, the order rotated each round.
#   RECORDS=200000 DURATION=10s ROUNDS=3 CONCURRENCY=16 scripts/admin-overhead.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RECORDS=${RECORDS:-200000}
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
CONCURRENCY=${CONCURRENCY:-16}

cargo build --release -p idempotency-coordinator -p idempotency-bench
server=target/release/idempotency-coordinator
bench=target/release/idempotency-bench
tmp=$(mktemp -d -t admin-overhead-XXXXXX)
background=""
cleanup() {
    [[ -n $background ]] && kill "$background" 2>/dev/null || true
    kill -INT "${coordinator:-}" "${empty:-}" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

taskset -c 0 "$server" --data-dir "$tmp/data" --listen 127.0.0.1:50095 --records-census-interval 0s \
    2>"$tmp/coordinator.log" &
coordinator=$!
target=http://127.0.0.1:50095
sleep 1
echo "filling the store with about $RECORDS completed records"
while :; do
    count=$("$server" admin stats --target "$target" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["records"])')
    (( count >= RECORDS )) && break
    taskset -c 1 "$bench" --target "$target" --concurrency 64 --duration 10s --warmup 0s >/dev/null
done
echo "records: $count"

timed() {
    local start end
    start=$(date +%s.%N)
    "$@" >/dev/null 2>&1
    end=$(date +%s.%N)
    python3 -c "print('%.2f' % ($end - $start))"
}
echo "admin stats (a census of every record): $(timed taskset -c 1 "$server" admin stats --target "$target") s"
echo "admin list, one page of 1000: $(timed taskset -c 1 "$server" admin list --target "$target" --namespace bench --page-size 1000) s"
echo "admin export: $(timed taskset -c 1 "$server" admin export --target "$target" --output "$tmp/export.snapshot") s, $(stat -c %s "$tmp/export.snapshot") bytes"
taskset -c 0 "$server" --data-dir "$tmp/empty" --listen 127.0.0.1:50096 --records-census-interval 0s 2>"$tmp/empty.log" &
empty=$!
sleep 1
echo "admin import into an empty server: $(timed taskset -c 1 "$server" admin import --target http://127.0.0.1:50096 --input "$tmp/export.snapshot") s"
kill -INT "$empty"
wait "$empty" 2>/dev/null || true
empty=""

order=(none export stats)
for round in $(seq 1 "$ROUNDS"); do
    for load in "${order[@]}"; do
        background=""
        case $load in
            export) taskset -c 1 bash -c "while true; do $server admin export --target $target --output $tmp/loop.snapshot >/dev/null 2>&1; done" & background=$! ;;
            stats) taskset -c 1 bash -c "while true; do $server admin stats --target $target >/dev/null 2>&1; done" & background=$! ;;
        esac
        report=$(taskset -c 1 "$bench" --target "$target" --concurrency "$CONCURRENCY" \
            --duration "$DURATION" --warmup 1s --json --server-cpu "$coordinator")
        if [[ -n $background ]]; then
            kill "$background"
            wait "$background" 2>/dev/null || true
            background=""
        fi
        python3 -c 'import json, sys; r = json.loads(sys.argv[1]); op = r["ops"]["flow"]; print("round %s beside %-6s %8.0f flows/s  p50 %6.2f ms  p99 %6.2f ms  server CPU %.3f ms/flow" % (sys.argv[2], sys.argv[3], r["rate_per_s"], op["p50_ms"], op["p99_ms"], r["server_cpu_ms_per_unit"] or 0))' \
            "$report" "$round" "$load"
    done
    order=("${order[@]:1}" "${order[0]}")
done
