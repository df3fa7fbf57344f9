#!/usr/bin/env bash
# Runs the comparison tables of BENCHMARKS.md in one go: the coordinator (strict durability),
# hand-rolled PostgreSQL (synchronous_commit on and off) and hand-rolled Redis (appendfsync
# always, and no persistence), each at 1, 16 and 64 flows in flight, plus replay and lookup.
# Needs a release build, PostgreSQL on 127.0.0.1:5432 (user postgres) and Redis on 127.0.0.1:6379.
# Changes Redis's persistence settings while it runs and restores "appendonly no" at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5s}
server=target/release/idempotency-coordinator
bench=target/release/idempotency-bench
data=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$data"; redis-cli config set appendonly no >/dev/null' EXIT
psql -h 127.0.0.1 -U postgres -q -c "DROP DATABASE IF EXISTS idempotency_bench" -c "CREATE DATABASE idempotency_bench"
pg=postgres://postgres@127.0.0.1:5432/idempotency_bench

scratch=$data
# shellcheck source=scripts/row.sh
. scripts/row.sh

"$server" --data-dir "$data/coordinator" --listen 127.0.0.1:50071 2>/dev/null &
pid=$!
sleep 1
coordinator=http://127.0.0.1:50071
echo "| run | per s | p50 ms | p99 ms | errors |"
echo "|---|---|---|---|---|"
for c in 1 16 64; do row "coordinator flow c=$c" --target $coordinator --scenario flow --concurrency $c; done
row "coordinator replay c=64" --target $coordinator --scenario replay
row "coordinator lookup c=64" --target $coordinator --scenario lookup
row "coordinator health c=64" --target $coordinator --scenario health
for mode in true false; do
    for c in 1 16 64; do row "postgres sync_commit=$mode flow c=$c" --target $pg --scenario flow --concurrency $c --connections $c --synchronous-commit $mode; done
done
row "postgres replay c=64" --target $pg --scenario replay --connections 16
row "postgres lookup c=64" --target $pg --scenario lookup --connections 16
redis-cli config set appendonly yes >/dev/null
redis-cli config set appendfsync always >/dev/null
sleep 1
for c in 1 16 64; do row "redis appendfsync=always flow c=$c" --target redis://127.0.0.1:6379 --scenario flow --concurrency $c; done
redis-cli config set appendonly no >/dev/null
for c in 1 16 64; do row "redis no persistence flow c=$c" --target redis://127.0.0.1:6379 --scenario flow --concurrency $c; done
row "redis replay c=64" --target redis://127.0.0.1:6379 --scenario replay
row "redis lookup c=64" --target redis://127.0.0.1:6379 --scenario lookup
