#!/usr/bin/env bash
# The scale-out table of BENCHMARKS.md: the coordinator on PostgreSQL through 1, 2 and 3
# replicas against hand-rolled PostgreSQL (synchronous_commit on) on the same database, at 1, 16
# and 64 flows in flight, plus replay and lookup. Needs a release build and PostgreSQL on
# 127.0.0.1:5432 (user postgres). Replicas, database and load generator share the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5s}
server=target/release/idempotency-coordinator
bench=target/release/idempotency-bench
tmp=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$tmp"' EXIT
psql -h 127.0.0.1 -U postgres -q -c "DROP DATABASE IF EXISTS idempotency_bench" -c "CREATE DATABASE idempotency_bench"
pg=postgres://postgres@127.0.0.1:5432/idempotency_bench

scratch=$tmp
# shellcheck source=scripts/row.sh
. scripts/row.sh

for port in 50081 50082 50083; do
    "$server" --store "$pg" --listen 127.0.0.1:$port --data-dir "$tmp/unused" 2>"$tmp/replica-$port.log" &
    pids+=($!)
done
sleep 2
one=http://127.0.0.1:50081
two=$one,http://127.0.0.1:50082
three=$two,http://127.0.0.1:50083
echo "| run | flows/s (calls/s) | p50 ms | p99 ms | errors |"
echo "|---|---|---|---|---|"
for c in 1 16 64; do
    row "hand-rolled postgres flow c=$c" --target "$pg" --scenario flow --concurrency $c --connections $c
    row "coordinator on postgres, 1 replica, flow c=$c" --target $one --scenario flow --concurrency $c
done
row "coordinator on postgres, 2 replicas, flow c=64" --target $two --scenario flow --concurrency 64 --connections 4
row "coordinator on postgres, 3 replicas, flow c=64" --target $three --scenario flow --concurrency 64 --connections 6
row "hand-rolled postgres replay c=64" --target "$pg" --scenario replay --connections 16
row "coordinator on postgres, 1 replica, replay c=64" --target $one --scenario replay
row "hand-rolled postgres lookup c=64" --target "$pg" --scenario lookup --connections 16
row "coordinator on postgres, 1 replica, lookup c=64" --target $one --scenario lookup
row "coordinator on postgres, 3 replicas, replay c=64" --target $three --scenario replay --connections 6
