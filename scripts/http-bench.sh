#!/usr/bin/env bash
# What the Idempotency-Key layer costs an HTTP API: requests/s of the payments example with the
# layer (first requests: a Claim and a durable Complete each; replays: a Claim that finds the
# stored response) and without it (the handler alone), at 1, 16 and 64 connections, interleaved.
# The coordinator and the example share core 0; wrk runs on core 1. Server CPU per request is the
# CPU the two server processes used during the run, divided by the requests.
# Usage: scripts/http-bench.sh [seconds per row] [rounds]   (needs wrk; builds release binaries)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
rounds=${2:-2}
cargo build --release -q -p idempotency-coordinator
cargo build --release -q -p idempotency-client --features http --example payments
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

cat > "$work/first.lua" <<'LUA'
local counter = 0
local run = "run"
init = function(args) run = args[1] end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"amount": 100.00, "currency": "USD", "destination": "merchant-id-xyz"}'
request = function()
  counter = counter + 1
  wrk.headers["Idempotency-Key"] = run .. "-" .. counter
  return wrk.format()
end
LUA
cat > "$work/replay.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Idempotency-Key"] = "replayed-key"
wrk.body = '{"amount": 100.00, "currency": "USD", "destination": "merchant-id-xyz"}'
LUA

taskset -c 0 target/release/idempotency-coordinator --listen 127.0.0.1:50151 --data-dir "$work/data" 2>"$work/coordinator.log" &
coordinator=$!
taskset -c 0 target/release/examples/payments --listen 127.0.0.1:8151 --coordinator http://127.0.0.1:50151 2>"$work/with.log" &
with=$!
taskset -c 0 target/release/examples/payments --listen 127.0.0.1:8152 --coordinator http://127.0.0.1:50151 --without-layer 2>"$work/without.log" &
without=$!
sleep 2
# The replayed key, stored once.
curl -s -o /dev/null -X POST http://127.0.0.1:8151/payments -H 'Idempotency-Key: replayed-key' \
    -H 'Content-Type: application/json' -d '{"amount": 100.00, "currency": "USD", "destination": "merchant-id-xyz"}'

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
row() { # name port script connections pids…
    local name=$1 port=$2 script=$3 connections=$4; shift 4
    local before=0 after=0 pid
    for pid in "$@"; do before=$((before + $(ticks "$pid"))); done
    local out
    # Every row uses keys of its own: a fresh prefix (first requests never meet an earlier key).
    out=$(taskset -c 1 wrk -t1 -c"$connections" -d"${seconds}s" --latency -s "$script" "http://127.0.0.1:$port/payments" \
        -- "r$connections-$RANDOM$RANDOM")
    for pid in "$@"; do after=$((after + $(ticks "$pid"))); done
    local requests rps p50 p99
    requests=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p50=$(echo "$out" | awk '$1 == "50%" {print $2}')
    p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
    local hz; hz=$(getconf CLK_TCK)
    local cpu_us; cpu_us=$(awk -v t=$((after - before)) -v hz="$hz" -v n="$requests" 'BEGIN {printf "%.0f", t / hz * 1e6 / n}')
    local non2xx; non2xx=$(echo "$out" | awk '/Non-2xx/ {print $5}')
    printf '| %-22s | %3s | %9s | %8s | %8s | %6s | %s |\n' "$name" "$connections" "$rps" "$p50" "$p99" "$cpu_us" "${non2xx:-0}"
}
echo "| target | conns | requests/s | p50 | p99 | server CPU µs/request | non-2xx |"
echo "|---|---|---|---|---|---|---|"
for round in $(seq 1 "$rounds"); do
    for connections in 1 16 64; do
        row "without the layer" 8152 "$work/first.lua" "$connections" "$without"
        row "layer, first requests" 8151 "$work/first.lua" "$connections" "$with" "$coordinator"
        row "layer, replays" 8151 "$work/replay.lua" "$connections" "$with" "$coordinator"
    done
done
