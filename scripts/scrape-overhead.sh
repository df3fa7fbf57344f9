#!/usr/bin/env bash
# What scraping /metrics costs under load: Claim + Complete flows (500-byte bodies) at 64 in
# flight against one coordinator (embedded store, strict durability) pinned to core 0, the load
# generator on core 1, with no scraper, a scraper every second and one every 100 ms (ten times
# what a Prometheus configured at 1 s does), interleaved, ROUNDS times, the order rotated each
# round (the store grows as flows add records, so a fixed order would favour the first), after a
# warm-up run. The scraper (curl in a loop) shares core 1 with the load generator. Counting is
# always on; the scrape itself reads counters and walks the data directory.
#   DURATION=10s ROUNDS=4 INTERVALS="none 1 0.1" CONCURRENCY=64 scripts/scrape-overhead.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-4}
INTERVALS=${INTERVALS:-"none 1 0.1"}
CONCURRENCY=${CONCURRENCY:-64}

cargo build --release -p idempotency-coordinator -p idempotency-bench
server=target/release/idempotency-coordinator
bench=target/release/idempotency-bench
tmp=$(mktemp -d -t scrape-overhead-XXXXXX)
scraper=""
cleanup() {
    [[ -n $scraper ]] && kill "$scraper" 2>/dev/null || true
    kill -INT "${coordinator:-}" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

taskset -c 0 "$server" --data-dir "$tmp/data" --listen 127.0.0.1:50093 --metrics-listen 127.0.0.1:9493 \
    2>"$tmp/coordinator.log" &
coordinator=$!
sleep 1
scrape_size=$(curl -s http://127.0.0.1:9493/metrics | wc -c)
echo "a scrape is $scrape_size bytes"

echo "warm-up"
taskset -c 1 "$bench" --target http://127.0.0.1:50093 --concurrency "$CONCURRENCY" --duration 20s --warmup 0s >/dev/null
read -r -a order <<< "$INTERVALS"
for round in $(seq 1 "$ROUNDS"); do
    for interval in "${order[@]}"; do
        scraper=""
        if [[ $interval != none ]]; then
            # On core 1 with the load generator, as Prometheus would run elsewhere.
            taskset -c 1 bash -c "while true; do curl -s -o /dev/null http://127.0.0.1:9493/metrics; sleep $interval; done" &
            scraper=$!
        fi
        report=$(taskset -c 1 "$bench" --target http://127.0.0.1:50093 --concurrency "$CONCURRENCY" \
            --duration "$DURATION" --warmup 1s --json --server-cpu "$coordinator")
        if [[ -n $scraper ]]; then
            kill "$scraper"
            wait "$scraper" 2>/dev/null || true
            scraper=""
        fi
        python3 -c 'import json, sys; r = json.loads(sys.argv[1]); op = r["ops"]["flow"]; print("round %s scrape every %-5s %8.0f flows/s  p50 %6.2f ms  p99 %6.2f ms  server CPU %.3f ms/flow" % (sys.argv[2], sys.argv[3], r["rate_per_s"], op["p50_ms"], op["p99_ms"], r["server_cpu_ms_per_unit"] or 0))' \
            "$report" "$round" "$interval"
    done
    order=("${order[@]:1}" "${order[0]}")
done
