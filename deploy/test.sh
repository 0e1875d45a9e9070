#!/usr/bin/env bash
# Runs every test: unit tests and the end-to-end tests of the real binaries, against this
# machine's PostgreSQL and Redis (each test makes its own database and queue names).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/ensure-services.sh
# stripe-python, the official verdict for the signature parity test (tests/parity/verify.py),
# kept in target/ so nothing is installed system-wide.
if ! PYTHONPATH=target/parity-python python3 -c 'import stripe' >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    --upgrade --target target/parity-python stripe==16.1.0
fi
# The end-to-end tests start target/debug/{ingest,worker}: build them first.
cargo build --workspace --bins
cargo test --workspace
