#!/usr/bin/env bash
# What TLS and the auth file cost per call: the same scenarios against four servers (plaintext,
# plaintext with an auth file and a bearer token, TLS, TLS with the auth file), interleaved in
# one run. Servers share core 0, the load generator runs on core 1. Server CPU per call is the
# CPU the server used during the row, divided by the calls.
# Usage: scripts/security-bench.sh [seconds per row]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-5}
cargo build --release -q -p idempotency-coordinator -p idempotency-bench
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
server=target/release/idempotency-coordinator
bench=target/release/idempotency-bench

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
    -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial -days 2 \
    -copy_extensions copy -out "$work/server.pem" 2>/dev/null
printf %s "bench-token-$RANDOM$RANDOM" > "$work/token"
printf '[[token]]\nname = "bench"\nsha256 = "%s"\nnamespaces = ["bench"]\nrole = "write"\n' \
    "$(sha256sum < "$work/token" | cut -d' ' -f1)" > "$work/auth.toml"

start() { # name port flags…
    local name=$1 port=$2; shift 2
    taskset -c 0 "$server" --listen "127.0.0.1:$port" --data-dir "$work/$name" "$@" 2>"$work/$name.log" &
    echo $! > "$work/$name.pid"
}
start plain 50201
start plain-auth 50202 --auth-file "$work/auth.toml"
start tls 50203 --tls-cert "$work/server.pem" --tls-key "$work/server.key"
start tls-auth 50204 --tls-cert "$work/server.pem" --tls-key "$work/server.key" --auth-file "$work/auth.toml"
sleep 2

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
row() { # variant scenario concurrency
    local variant=$1 scenario=$2 concurrency=$3 target flags=()
    case $variant in
        plain) target=http://127.0.0.1:50201 ;;
        plain-auth) target=http://127.0.0.1:50202; flags=(--token-file "$work/token") ;;
        tls) target=https://127.0.0.1:50203; flags=(--ca-file "$work/ca.pem") ;;
        tls-auth) target=https://127.0.0.1:50204; flags=(--ca-file "$work/ca.pem" --token-file "$work/token") ;;
    esac
    local pid; pid=$(cat "$work/$variant.pid")
    local before; before=$(ticks "$pid")
    local out
    out=$(taskset -c 1 "$bench" --target "$target" "${flags[@]}" --scenario "$scenario" --concurrency "$concurrency" \
        --connections 4 --duration "${seconds}s" --warmup 1s --key-space 1000 --json)
    local after; after=$(ticks "$pid")
    echo "$out" | python3 -c "
import json, sys
report = json.load(sys.stdin)
units = report['units']
rate = report['rate_per_s']
op = report['ops'].get('$scenario') or report['ops'].get('flow') or next(iter(report['ops'].values()))
cpu = ($after - $before) / $(getconf CLK_TCK) * 1e6 / max(units, 1)
errors = sum(sum(o.get('errors', {}).values()) for o in report['ops'].values())
print(f\"| $variant | $scenario | $concurrency | {rate:,.0f} | {op['p50_ms']:.3f} | {op['p99_ms']:.3f} | {cpu:.0f} | {errors} |\")
"
}
echo "| server | scenario | in flight | per second | p50 ms | p99 ms | server CPU µs per unit | errors |"
echo "|---|---|---|---|---|---|---|---|"
for scenario in health replay flow; do
    for concurrency in 1 16 64; do
        for variant in plain plain-auth tls tls-auth; do
            row "$variant" "$scenario" "$concurrency"
        done
    done
done
