#!/usr/bin/env bash
# Runs the whole pipeline locally: prepares the database, builds, starts ingest and worker,
# sends a signed demo subscription lifecycle and prints the organization's state after each
# event, then keeps the pipeline running until Ctrl-C (DEMO_EXIT=1 stops after the demo).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/ensure-services.sh

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/billing_local}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
export QUEUE_PREFIX="${QUEUE_PREFIX:-billing-local}"
export STRIPE_WEBHOOK_SECRET="${STRIPE_WEBHOOK_SECRET:-whsec_local_demo_secret}"
export INTERNAL_API_TOKEN="${INTERNAL_API_TOKEN:-local-internal-token}"
export STRIPE_BASIC_PRICE_KEY="${STRIPE_BASIC_PRICE_KEY:-price_basic_monthly}"
export STRIPE_PREMIUM_PRICE_KEY="${STRIPE_PREMIUM_PRICE_KEY:-price_premium_monthly}"
export STRIPE_ENTERPRISE_PRODUCT_KEY="${STRIPE_ENTERPRISE_PRODUCT_KEY:-prod_enterprise}"
# Emails: by default Resend is a loopback address nothing listens on, so a local Enterprise
# request ends as a pending/dead outbox row instead of a real email. To really send, set
# RESEND_BASE_URL=https://api.resend.com and a real RESEND_API_KEY and EMAIL_FROM.
export RESEND_API_KEY="${RESEND_API_KEY:-re_local_placeholder}"
export RESEND_BASE_URL="${RESEND_BASE_URL:-http://127.0.0.1:9}"
export EMAIL_FROM="${EMAIL_FROM:-Billing <billing@example.com>}"
export ENTERPRISE_SALES_EMAIL="${ENTERPRISE_SALES_EMAIL:-sales@example.com}"
ingest_addr="${INGEST_ADDR:-127.0.0.1:8080}"

db_name="${DATABASE_URL##*/}"
if ! psql "${DATABASE_URL%/*}/postgres" -tAc "SELECT 1 FROM pg_database WHERE datname = '$db_name'" | grep -q 1; then
  psql "${DATABASE_URL%/*}/postgres" -qc "CREATE DATABASE \"$db_name\""
fi

cargo build --workspace --bins
target/debug/worker migrate

mkdir -p target/local-logs
INGEST_ADDR="$ingest_addr" METRICS_ADDR=127.0.0.1:9100 target/debug/ingest 2> target/local-logs/ingest.log &
ingest_pid=$!
METRICS_ADDR=127.0.0.1:9101 target/debug/worker run 2> target/local-logs/worker.log &
worker_pid=$!
trap 'kill -TERM $ingest_pid $worker_pid 2>/dev/null; wait $ingest_pid $worker_pid 2>/dev/null' EXIT

for _ in $(seq 1 100); do
  curl -fs "http://$ingest_addr/readyz" >/dev/null && break
  kill -0 $ingest_pid 2>/dev/null || { cat target/local-logs/ingest.log; exit 1; }
  sleep 0.1
done
echo "ingest on http://$ingest_addr (metrics :9100), worker running (metrics :9101); logs in target/local-logs/"

target/debug/stripe-demo "http://$ingest_addr"

if [ "${DEMO_EXIT:-0}" = "1" ]; then
  exit 0
fi
echo "pipeline running; point 'stripe listen --forward-to $ingest_addr/v1/webhooks/stripe' at it. Ctrl-C stops."
wait $ingest_pid $worker_pid
