# Sourced by the comparison scripts. row NAME FLAGS…: runs idempotency-bench ("$bench") for
# $DURATION after 1 s of warm-up, writing its JSON report under "$scratch", and prints one
# markdown table row: name, rate, p50 and p99 (of the flow, or of the call), errors.
row() {
    local name=$1; shift
    "$bench" --duration "$DURATION" --warmup 1s --json "$@" > "$scratch/report.json"
    python3 - "$name" "$scratch/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
op = r["ops"].get("flow") or next(iter(r["ops"].values()))
errors = sum(sum(o["errors"].values()) for o in r["ops"].values())
print("| %s | %.0f | %.2f | %.2f | %d |" % (sys.argv[1], r["rate_per_s"], op["p50_ms"], op["p99_ms"], errors))
PY
}
