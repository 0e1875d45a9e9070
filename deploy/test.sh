#!/usr/bin/env bash
# Runs every test: unit tests and the end-to-end tests of the real binaries, against this
# machine's PostgreSQL and Redis (each test makes its own database and queue names).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/ensure-services.sh
# The end-to-end tests start target/debug/{ingest,worker}: build them first.
cargo build --workspace --bins
cargo test --workspace
