#!/usr/bin/env bash
# Reconciliation at scale, on this machine: a fresh `billing_bench_reconcile` database whose
# organizations are linked to RECONCILE_SUBSCRIPTIONS (10,000) customers, a fake Stripe API
# (tests' fake-stripe, loopback) serving their subscriptions, then two `worker reconcile now`
# runs: the first finds every subscription missing and heals each one, the second finds no
# drift. Prints each run's wall time, requests/s and counts. STRIPE_API_RATE_LIMIT (default
# 100, Stripe's live-mode allowance) is the client's limit.
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/ensure-services.sh

count="${RECONCILE_SUBSCRIPTIONS:-10000}"
export STRIPE_API_RATE_LIMIT="${STRIPE_API_RATE_LIMIT:-100}"
admin_url="postgres://postgres@127.0.0.1:5432/postgres"
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/billing_bench_reconcile"
# shellcheck source=deploy/bench/env.sh
. deploy/bench/env.sh
export QUEUE_PREFIX="bench-reconcile-$$"
export STRIPE_SECRET_KEY="sk_test_bench_only"

cargo build --release --bin worker --bin fake-stripe
psql "$admin_url" -qc "DROP DATABASE IF EXISTS billing_bench_reconcile"
psql "$admin_url" -qc "CREATE DATABASE billing_bench_reconcile"
target/release/worker migrate >/dev/null

fifo="$(mktemp -u)"
mkfifo "$fifo"
target/release/fake-stripe --subscriptions "$count" --database-url "$DATABASE_URL" >"$fifo" &
fake=$!
trap 'kill $fake 2>/dev/null || true; rm -f "$fifo"' EXIT
read -r STRIPE_API_BASE <"$fifo"
export STRIPE_API_BASE

for run in first second; do
  started=$(date +%s.%N)
  target/release/worker reconcile now --json >"target/reconcile-$run.json"
  ended=$(date +%s.%N)
  python3 - "$run" "$started" "$ended" "target/reconcile-$run.json" <<'PY'
import json, sys
run, started, ended, path = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
report = json.load(open(path))
seconds = ended - started
pages = -(-report["subscriptions_listed"] // 100)
print(f"{run} run: {report['status']}, {seconds:.1f} s wall, "
      f"{report['subscriptions_listed']} subscriptions listed ({pages} pages, "
      f"{pages / seconds:.1f} list requests/s), drifted {report['drifted']}, "
      f"healed {report['healed']}, errors {report['errors']}")
PY
done
