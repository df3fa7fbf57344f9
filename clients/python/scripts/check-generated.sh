#!/usr/bin/env bash
# Checks that the committed stubs in src/idempotency_coordinator/_generated are what
# scripts/generate.sh makes from the proto now: regenerates them into a temporary directory and
# diffs. Exits 1 on any difference (run scripts/generate.sh and commit the result), 2 when the
# pinned grpcio-tools is not installed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
committed="$here/src/idempotency_coordinator/_generated"
fresh="$(mktemp -d)"
trap 'rm -rf "$fresh"' EXIT

"$here/scripts/generate.sh" "$fresh/_generated" >/dev/null
if ! diff -r -u -x __pycache__ "$committed" "$fresh/_generated"; then
    echo "the generated stubs are out of date with proto/idempotency/v1/coordinator.proto:" >&2
    echo "  run clients/python/scripts/generate.sh and commit the result" >&2
    exit 1
fi
echo "the generated stubs are up to date"
