#!/usr/bin/env bash
# CI for the Python package: a fresh virtual environment, the package installed from this
# directory with its test and examples extras (at the versions in constraints.txt), the generated
# stubs checked against the proto, ruff, mypy, pytest against the real coordinator, and the HTTP
# conformance suite against the Python payments example. Exits non-zero on the first failure.
#
# The Rust binaries are the caller's to build (from the repository's root):
#   cargo build -p idempotency-coordinator --bin idempotency-coordinator
#   cargo build -p idempotency-http-conformance
#   cargo build -p idempotency-client --features http --example payments   # optional: interop tests
# Their paths, if not the defaults under <repo>/target/debug:
#   IDEMPOTENCY_COORDINATOR_BINARY, IDEMPOTENCY_HTTP_CONFORMANCE_BINARY,
#   IDEMPOTENCY_RUST_PAYMENTS_EXAMPLE (without it the interop tests are skipped).
# PYTHON picks the interpreter (default python3; 3.10 or later). VENV keeps the environment in a
# directory of your choice (it is emptied first); by default a temporary one, removed at the end.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python3}"
coordinator="${IDEMPOTENCY_COORDINATOR_BINARY:-$repo/target/debug/idempotency-coordinator}"
conformance="${IDEMPOTENCY_HTTP_CONFORMANCE_BINARY:-$repo/target/debug/idempotency-http-conformance}"
rust_example="${IDEMPOTENCY_RUST_PAYMENTS_EXAMPLE:-$repo/target/debug/examples/payments}"

for binary in "$coordinator" "$conformance"; do
    if [[ ! -x "$binary" ]]; then
        echo "missing $binary: build the Rust binaries first (see the top of $0)" >&2
        exit 1
    fi
done

if [[ -n "${VENV:-}" ]]; then
    venv="$VENV"
    rm -rf "$venv"
else
    venv="$(mktemp -d -t idempotency-python-ci-XXXXXX)"
    trap 'rm -rf "$venv"' EXIT
fi

echo "== a fresh virtual environment ($("$python" --version))"
"$python" -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
python -m pip install --quiet --disable-pip-version-check --upgrade pip
python -m pip install --quiet --disable-pip-version-check \
    -c "$here/constraints.txt" "$here[test,examples]"
python -c 'import idempotency_coordinator, sys; print("installed", idempotency_coordinator.__version__, "in", sys.prefix)'

cd "$here"

echo "== the generated stubs are up to date with the proto"
PYTHON=python scripts/check-generated.sh

echo "== ruff check"
ruff check .
echo "== ruff format --check"
ruff format --check .

echo "== mypy (strict)"
mypy

echo "== pytest"
export IDEMPOTENCY_COORDINATOR_BINARY="$coordinator"
if [[ -x "$rust_example" ]]; then
    export IDEMPOTENCY_RUST_PAYMENTS_EXAMPLE="$rust_example"
else
    echo "(no Rust payments example at $rust_example: the interop tests will be skipped)"
fi
# -p no:cacheprovider: nothing written into the tree. The coordinator binary is required here.
CI="${CI:-true}" python -m pytest -p no:cacheprovider -rs -q

echo "== the HTTP conformance suite against the Python payments example"
"$conformance" --coordinator-binary "$coordinator" \
    --start "python -m idempotency_coordinator.examples.payments --listen {listen} --coordinator {coordinator} {flags}"

echo "== the Python package passed"
