#!/usr/bin/env bash
# Checks deploy/openapi.yaml against a running ingest with schemathesis: it generates requests
# for the internal and health operations (bearer auth, billing query, Enterprise requests,
# probes) and fails on a 5xx or any answer the spec does not describe. Builds ingest and worker,
# starts ingest on a database and queue prefix of its own (dropped afterwards). About a minute.
#
#   deploy/schemathesis.sh                  ST_MAX_EXAMPLES=200 deploy/schemathesis.sh
#
# Needs schemathesis (deploy/install-validators.sh installs it; SCHEMATHESIS overrides the
# command). negative_data_rejection is left out: the spec's request schemas describe a safe
# subset of what ingest accepts (it trims whitespace, accepts any Unicode letter in names),
# so a request outside them may rightly be accepted.
set -euo pipefail
cd "$(dirname "$0")/.."
schemathesis="${SCHEMATHESIS:-schemathesis}"
max_examples="${ST_MAX_EXAMPLES:-60}"
deploy/ensure-services.sh
cargo build -q -p ingest -p worker --bins

tag="st_$(date +%s)_$$"
db="billing_${tag}"
admin="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
database_url="${admin%/*}/${db}"
redis_url="${TEST_REDIS_URL:-redis://127.0.0.1:6379}"
token="schemathesis-token"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
metrics_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
log="target/schemathesis-ingest.log"
ingest_pid=""

cleanup() {
  [ -n "$ingest_pid" ] && kill "$ingest_pid" 2>/dev/null && wait "$ingest_pid" 2>/dev/null
  psql -q "$admin" -c "DROP DATABASE IF EXISTS ${db} WITH (FORCE)" >/dev/null 2>&1 || true
  redis-cli -u "$redis_url" --scan --pattern "${tag}*" | xargs -r redis-cli -u "$redis_url" del >/dev/null || true
}
trap cleanup EXIT

psql -q "$admin" -c "CREATE DATABASE ${db}" >/dev/null
DATABASE_URL="$database_url" target/debug/worker migrate >/dev/null
# One known organization, so the billing query answers 200 as well as 404.
psql -q "$database_url" -c "INSERT INTO organizations (id) VALUES ('org_schemathesis')" >/dev/null

env -i PATH="$PATH" RUST_LOG=warn DATABASE_URL="$database_url" REDIS_URL="$redis_url" \
  QUEUE_PREFIX="$tag" STRIPE_WEBHOOK_SECRET=whsec_schemathesis INTERNAL_API_TOKEN="$token" \
  USAGE_METERS=api_calls \
  INGEST_ADDR="127.0.0.1:${port}" METRICS_ADDR="127.0.0.1:${metrics_port}" \
  target/debug/ingest >"$log" 2>&1 &
ingest_pid=$!
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:${port}/readyz" >/dev/null && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:${port}/readyz" >/dev/null || { cat "$log"; echo "ingest did not start" >&2; exit 1; }

# A usage record's timestamp is valid within Stripe's moving window (the past 35 days, 5
# minutes ahead), which a file cannot state: a copy of the spec gets today's bounds.
spec="$(mktemp --suffix=.yaml)"
python3 - "$spec" <<'PY'
import sys, time, yaml
spec = yaml.safe_load(open("deploy/openapi.yaml"))
now = int(time.time())
stamp = spec["components"]["schemas"]["UsageRecord"]["properties"]["timestamp"]
stamp["minimum"], stamp["maximum"] = now - 34 * 86400, now
yaml.safe_dump(spec, open(sys.argv[1], "w"), sort_keys=False)
PY
"$schemathesis" run "$spec" \
  --url "http://127.0.0.1:${port}" \
  -H "Authorization: Bearer ${token}" \
  --include-tag internal --include-tag health \
  --checks all --exclude-checks negative_data_rejection \
  --max-examples "$max_examples" --seed 16 \
  --no-color
