#!/usr/bin/env bash
# Usage at scale, on this machine (release binaries, a fresh `billing_bench_usage` database):
#   1. ingest's usage route, closed loop: USAGE_CONNECTIONS (64) callers posting batches of
#      USAGE_BATCH (100) records for BENCH_SECONDS (30) -> records/s accepted, p99, and a
#      check that every accepted record is stored (tests' usage-load);
#   2. the reporter: a worker reports everything stored in phase 1 to a fake Stripe API
#      (tests' fake-stripe) whose meter events take METER_LATENCY_MS (50) to answer ->
#      meter events/s and records/s reported, until nothing is pending.
# The USAGE_ORGANIZATIONS (1,000) organizations are linked to customers first, so every
# record can be reported.
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/ensure-services.sh

seconds="${BENCH_SECONDS:-30}"
organizations="${USAGE_ORGANIZATIONS:-1000}"
admin_url="postgres://postgres@127.0.0.1:5432/postgres"
ingest_addr="127.0.0.1:18081"
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/billing_bench_usage"
# shellcheck source=deploy/bench/env.sh
. deploy/bench/env.sh
export QUEUE_PREFIX="bench-usage-$$"
export USAGE_METERS="api_calls"

cargo build --release --bin ingest --bin worker --bin usage-load --bin fake-stripe
psql "$admin_url" -qc "DROP DATABASE IF EXISTS billing_bench_usage WITH (FORCE)"
psql "$admin_url" -qc "CREATE DATABASE billing_bench_usage"
target/release/worker migrate >/dev/null

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

fifo="$(mktemp -u)"
mkfifo "$fifo"
target/release/fake-stripe --subscriptions "$organizations" --database-url "$DATABASE_URL" \
  --meter-latency-ms "${METER_LATENCY_MS:-50}" >"$fifo" &
pids+=($!)
read -r STRIPE_API_BASE <"$fifo"
rm -f "$fifo"
export STRIPE_API_BASE STRIPE_SECRET_KEY="sk_test_bench_only"

INGEST_ADDR="$ingest_addr" METRICS_ADDR="127.0.0.1:19181" target/release/ingest &
pids+=($!)
for _ in $(seq 1 100); do curl -sf "http://$ingest_addr/readyz" >/dev/null && break; sleep 0.1; done

echo "--- 1. usage route, closed loop"
target/release/usage-load --url "http://$ingest_addr" --token "$INTERNAL_API_TOKEN" \
  --meter api_calls --connections "${USAGE_CONNECTIONS:-64}" --batch "${USAGE_BATCH:-100}" \
  --organizations "$organizations" --org-prefix org_bench_ --seconds "$seconds" \
  --database-url "$DATABASE_URL"

echo "--- 2. reporter, Stripe answering in ${METER_LATENCY_MS:-50} ms"
pending() { psql "$DATABASE_URL" -tAc "SELECT count(*) FROM usage_records r LEFT JOIN usage_reports p ON p.id = r.report_id WHERE r.report_id IS NULL OR p.status = 'sending'"; }
records=$(pending)
started=$(date +%s.%N)
USAGE_REPORT_INTERVAL=1s METRICS_ADDR="127.0.0.1:19191" target/release/worker run &
pids+=($!)
while [ "$(pending)" != "0" ]; do sleep 0.5; done
ended=$(date +%s.%N)
events=$(psql "$DATABASE_URL" -tAc "SELECT count(*) FROM usage_reports WHERE status = 'sent'")
python3 -c "
s = $ended - $started
print(f'{$records} records in {$events} meter events reported in {s:.1f} s: '
      f'{$events / s:.1f} meter events/s, {$records / s:.0f} records/s')"
