#!/usr/bin/env bash
# The benchmark, all on this machine: release binaries, a fresh `billing_bench` database, then
#   1. Postgres' own ceiling: pgbench, one ~5 KB row per transaction, 64 clients
#   2. ingest, closed loop, 64 connections                (loadgen closed)
#   3. ingest, open loop at 1,000/s                       (loadgen open)
#   4. worker, drain of a 100,000-event backlog           (worker-bench preload + drain)
#   5. idle: ingest and worker with nothing to do, 10 s: the worker's CPU, Redis' CPU and commands
#   6. end-to-end lag at a steady 2,000/s through ingest (loadgen open --wait-applied)
#   7. steady state: closed loop, 64 connections, with the worker applying (loadgen closed
#      --follow-worker): accepted/s, decided/s, backlog at the end and time to drain it, p99,
#      CPU per process, and Postgres' work per event (WAL bytes, rows written, HOT updates)
#   8. the same with 20 % of the events from customers linked to no organization (deferred),
#      and the audit rows written per event
# and the peak resident memory (VmHWM) of ingest and worker in each phase. Prints a summary
# table; every raw result is kept as JSON in target/bench/<time>/.
#
# Quick run: BENCH_SECONDS=5 BACKLOG=10000 deploy/bench/run.sh
# Knobs: BENCH_SECONDS (30), BACKLOG (100000), BENCH_CONNECTIONS (64), BENCH_OPEN_RATE (1000),
# BENCH_LAG_RATE (2000), BENCH_LAG_RUNS (1: the lag phase's repetitions, each on an empty inbox),
# BENCH_FOREIGN_PERCENT (20), BENCH_PHASES (all: "closed open drain idle lag steady foreign";
# pgbench always runs), WORKER_CONCURRENCY (worker default), INGEST_DB_POOL (16),
# BENCH_DB_TRANSPORT (`unix`, the default: Postgres' Unix socket; or `tcp`: 127.0.0.1:5432),
# BENCH_SQL (SQL run after migrating, to try a schema change).
# Why unix by default: sqlx 0.9.0 does not set TCP_NODELAY (transact-rs/sqlx#4335, fixed after
# 0.9.0 by #4336), so a multi-row insert bigger than the socket's send buffer waits ~40 ms for a
# delayed ACK on TCP. See BENCHMARKS.md for both transports.
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/ensure-services.sh

seconds="${BENCH_SECONDS:-30}"
backlog="${BACKLOG:-100000}"
connections="${BENCH_CONNECTIONS:-64}"
open_rate="${BENCH_OPEN_RATE:-1000}"
lag_rate="${BENCH_LAG_RATE:-2000}"
lag_runs="${BENCH_LAG_RUNS:-1}"
foreign_percent="${BENCH_FOREIGN_PERCENT:-20}"
phases=" ${BENCH_PHASES:-closed open drain idle lag steady foreign} "
want() { [[ "$phases" == *" $1 "* ]]; }
admin_url="postgres://postgres@127.0.0.1:5432/postgres"
ingest_addr="127.0.0.1:18080"

case "${BENCH_DB_TRANSPORT:-unix}" in
  unix) export DATABASE_URL="postgres://postgres@localhost/billing_bench?host=/var/run/postgresql" ;;
  tcp) export DATABASE_URL="postgres://postgres@127.0.0.1:5432/billing_bench" ;;
  *) echo "BENCH_DB_TRANSPORT is unix or tcp" >&2; exit 2 ;;
esac
# shellcheck source=deploy/bench/env.sh
. deploy/bench/env.sh
export QUEUE_PREFIX="bench-$$"

out="target/bench/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
bin=target/release

ingest_pid=""
worker_pid=""
cleanup() {
  for pid in $ingest_pid $worker_pid; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in $ingest_pid $worker_pid; do
    wait "$pid" 2>/dev/null || true
  done
  clear_queue
}
clear_queue() {
  local keys
  keys=$(redis-cli -h 127.0.0.1 --scan --pattern "$QUEUE_PREFIX*" || true)
  if [ -n "$keys" ]; then
    echo "$keys" | xargs redis-cli -h 127.0.0.1 DEL >/dev/null
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '\n== %s\n' "$*"; }
# Peak resident memory in MB since the last reset (VmHWM), then reset it for the next phase.
peak_rss_mb() {
  local kb
  kb=$(awk '/VmHWM/ { print $2 }' "/proc/$1/status")
  echo 5 > "/proc/$1/clear_refs" 2>/dev/null || true
  echo $(( (kb + 1023) / 1024 ))
}
wait_ready() {
  for _ in $(seq 1 100); do
    curl -fs "http://$ingest_addr/readyz" >/dev/null && return 0
    kill -0 "$ingest_pid" 2>/dev/null || { cat "$out/ingest.log"; exit 1; }
    sleep 0.1
  done
  echo "ingest not ready" >&2
  exit 1
}
# An empty inbox and queue between phases, and a checkpoint so no phase pays for the last.
reset_inbox() {
  # CASCADE: subscriptions and payments refer to organizations. Without it (and without
  # ON_ERROR_STOP) the truncate failed silently and every phase inherited the last one's rows.
  psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -qc "TRUNCATE webhook_events, billing_audit, organizations, foreign_customers CASCADE" -c "CHECKPOINT"
  clear_queue
}

start_worker() {
  METRICS_ADDR=127.0.0.1:19101 $bin/worker run 2>> "$out/worker.log" &
  worker_pid=$!
  for _ in $(seq 1 100); do
    curl -fs http://127.0.0.1:19101/metrics >/dev/null && return 0
    sleep 0.1
  done
  echo "worker metrics not up" >&2; exit 1
}
stop_worker() {
  if [ -n "$worker_pid" ]; then kill -TERM "$worker_pid"; wait "$worker_pid" || true; worker_pid=""; fi
}
# Postgres' counters: WAL (pg_stat_wal, for the whole server: other databases' writes count
# too), rows written per table of billing_bench (pg_stat_user_tables), audit rows, statuses.
pg_snapshot() {
  psql "$DATABASE_URL" -tAc "SELECT json_build_object(
    'wal_bytes', (SELECT wal_bytes FROM pg_stat_wal), 'wal_records', (SELECT wal_records FROM pg_stat_wal),
    'wal_fpi', (SELECT wal_fpi FROM pg_stat_wal),
    'tables', (SELECT json_object_agg(relname, json_build_object('ins', n_tup_ins, 'upd', n_tup_upd,
               'hot', n_tup_hot_upd, 'del', n_tup_del)) FROM pg_stat_user_tables),
    'audit', (SELECT count(*) FROM billing_audit),
    'audit_deferred', (SELECT count(*) FROM billing_audit WHERE decision = 'deferred'),
    'statuses', (SELECT json_object_agg(status, n) FROM
                 (SELECT status, count(*) AS n FROM webhook_events GROUP BY status) s))"
}
# Postgres' work per accepted event between two snapshots, as a Markdown table.
pg_per_event() {
  python3 - "$1" "$2" "$3" <<'PY'
import json, sys
before, after, run = (json.load(open(f)) for f in sys.argv[1:4])
n = max(run["ok"], 1)
print(f"| per accepted event ({n} events) | inserts | updates | of which HOT | deletes |")
print("|---|---|---|---|---|")
tot = [0, 0, 0, 0]
for table in sorted(after["tables"]):
    a, b = after["tables"][table], (before.get("tables") or {}).get(table, {})
    d = [a[k] - b.get(k, 0) for k in ("ins", "upd", "hot", "del")]
    if any(d):
        tot = [x + y for x, y in zip(tot, d)]
        print(f"| {table} | " + " | ".join(f"{x / n:.2f}" for x in d) + " |")
print("| **all tables** | " + " | ".join(f"**{x / n:.2f}**" for x in tot) + " |")
wal = after["wal_bytes"] - before["wal_bytes"]
rec = after["wal_records"] - before["wal_records"]
fpi = after["wal_fpi"] - before["wal_fpi"]
print(f"\nWAL (whole server): {wal / n:,.0f} bytes, {rec / n:.1f} records, {fpi / n:.2f} full-page images per event; "
      f"audit rows per event {after['audit'] / n:.3f} (deferred {after['audit_deferred'] / n:.3f}); "
      f"statuses {json.dumps(after['statuses'])}")
PY
}
# pg_stat_statements, when the server preloads it (shared_preload_libraries): statements of
# billing_bench by total execution time, per accepted event. Without it, says so and goes on.
statements_available() {
  [[ "$(psql "$DATABASE_URL" -tAc "SHOW shared_preload_libraries")" == *pg_stat_statements* ]]
}
statements_reset() {
  if statements_available; then
    psql "$DATABASE_URL" -qc "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" -c "SELECT pg_stat_statements_reset()" >/dev/null
  fi
}
statements_report() {
  local events=$1
  if ! statements_available; then
    echo "pg_stat_statements: not in shared_preload_libraries; no per-statement numbers"
    return 0
  fi
  psql "$DATABASE_URL" -v events="$events" -P footer=off --csv <<'SQL' | python3 -c '
import csv, sys
rows = list(csv.reader(sys.stdin))
print("| statement | calls per event | rows per call | ms per call | share of time | WAL bytes per event |")
print("|---|---|---|---|---|---|")
for r in rows[1:]:
    print("| `" + r[0] + "` | " + " | ".join(r[1:]) + " |")
'
SELECT left(regexp_replace(query, '\s+', ' ', 'g'), 90) AS statement,
       round(calls::numeric / :events, 3) AS calls_per_event,
       round(rows::numeric / greatest(calls, 1), 1) AS rows_per_call,
       round((total_exec_time / greatest(calls, 1))::numeric, 3) AS ms_per_call,
       round((100 * total_exec_time / sum(total_exec_time) OVER ())::numeric, 1) || ' %' AS share,
       round(wal_bytes / :events) AS wal_per_event
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY total_exec_time DESC
LIMIT 15
SQL
}
steady_phase() {
  local n=$1 name=$2 foreign=$3
  want "$name" || return 0
  say "$n. steady state ($name): closed loop, ${connections} connections, ${seconds} s, worker applying, ${foreign} % of customers of no organization"
  stop_worker
  reset_inbox
  start_worker
  pg_snapshot > "$out/$name.pg-before.json"
  statements_reset
  peak_rss_mb "$ingest_pid" >/dev/null; peak_rss_mb "$worker_pid" >/dev/null
  $bin/loadgen --url "http://$ingest_addr" --database-url "$DATABASE_URL" --json \
    --seconds "$seconds" --foreign-percent "$foreign" \
    --follow-worker http://127.0.0.1:19101/metrics \
    --cpu ingest="$ingest_pid" --cpu worker="$worker_pid" \
    --cpu-comm postgres=postgres --cpu-comm redis=redis-server \
    closed --connections "$connections" > "$out/$name.json"
  # Idle backends flush their table statistics within 10 s.
  sleep 11
  pg_snapshot > "$out/$name.pg-after.json"
  jq . "$out/$name.json"
  {
    pg_per_event "$out/$name.pg-before.json" "$out/$name.pg-after.json" "$out/$name.json"
    echo
    statements_report "$(jq .ok "$out/$name.json")"
  } | tee "$out/$name.pg.md"
}

say "build (release)"
cargo build --release --workspace --bins

say "database billing_bench"
psql "$admin_url" -qc "DROP DATABASE IF EXISTS billing_bench WITH (FORCE)" -c "CREATE DATABASE billing_bench"
$bin/worker migrate
# BENCH_SQL: statements run after the migrations, to measure a schema change before writing it.
if [ -n "${BENCH_SQL:-}" ]; then psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -qc "$BENCH_SQL"; fi

say "1. Postgres ceiling: pgbench, one ~5 KB row per transaction, 64 clients, ${seconds} s"
$bin/worker-bench sample-body > "$out/body.json"
psql "$DATABASE_URL" -q -v body="$(cat "$out/body.json")" <<'SQL'
-- The payload stored as the inbox stores it (lz4, migration 000004), so the ceiling is fair.
CREATE TABLE bench_inbox (id text PRIMARY KEY, payload bytea NOT NULL,
                          received_at timestamptz NOT NULL DEFAULT now());
ALTER TABLE bench_inbox ALTER COLUMN payload SET COMPRESSION lz4;
CREATE TABLE bench_body AS SELECT convert_to(:'body', 'UTF8') AS payload;
SQL
cat > "$out/insert.sql" <<'SQL'
INSERT INTO bench_inbox (id, payload) SELECT 'evt_pg_' || gen_random_uuid(), payload FROM bench_body;
SQL
psql "$DATABASE_URL" -qc "CHECKPOINT"
pgbench_target=(-U postgres -h /var/run/postgresql billing_bench)
if [ "${BENCH_DB_TRANSPORT:-unix}" = tcp ]; then pgbench_target=(-U postgres -h 127.0.0.1 billing_bench); fi
pgbench -n -c 64 -j 2 -T "$seconds" -f "$out/insert.sql" "${pgbench_target[@]}" > "$out/pgbench.txt" 2>&1
cat "$out/pgbench.txt"
pg_tps=$(awk '/^tps = / { printf "%.0f", $3 }' "$out/pgbench.txt")
pg_latency=$(awk '/^latency average/ { print $4 }' "$out/pgbench.txt")
psql "$DATABASE_URL" -qc "DROP TABLE bench_inbox, bench_body" -c "CHECKPOINT"

say "start ingest"
INGEST_ADDR="$ingest_addr" METRICS_ADDR=127.0.0.1:19100 \
  DATABASE_MAX_CONNECTIONS="${INGEST_DB_POOL:-16}" $bin/ingest 2> "$out/ingest.log" &
ingest_pid=$!
wait_ready
peak_rss_mb "$ingest_pid" >/dev/null

ingest_rss_closed=-; ingest_rss_open=-; ingest_rss_lag=-; worker_rss_drain=-; worker_rss_lag=-
if want closed; then
say "2. ingest closed loop: ${connections} connections, ${seconds} s"
$bin/loadgen --url "http://$ingest_addr" --database-url "$DATABASE_URL" --json \
  --seconds "$seconds" closed --connections "$connections" > "$out/closed.json"
ingest_rss_closed=$(peak_rss_mb "$ingest_pid")
jq . "$out/closed.json"
reset_inbox

fi
if want open; then
say "3. ingest open loop: ${open_rate}/s, ${seconds} s"
$bin/loadgen --url "http://$ingest_addr" --database-url "$DATABASE_URL" --json \
  --seconds "$seconds" open --rate "$open_rate" > "$out/open.json"
ingest_rss_open=$(peak_rss_mb "$ingest_pid")
jq . "$out/open.json"
reset_inbox

fi
if want drain; then
say "4. worker drain: ${backlog}-event backlog"
$bin/worker-bench preload --events "$backlog"
psql "$DATABASE_URL" -qc "VACUUM ANALYZE webhook_events" -c "CHECKPOINT"
METRICS_ADDR=127.0.0.1:19101 $bin/worker run 2> "$out/worker.log" &
worker_pid=$!
$bin/worker-bench drain --metrics-url http://127.0.0.1:19101/metrics --events "$backlog" --json > "$out/drain.json"
worker_rss_drain=$(peak_rss_mb "$worker_pid")
jq . "$out/drain.json"
# The worker stops before the reset: deleting its queue's keys would unregister it.
kill -TERM "$worker_pid"; wait "$worker_pid" || true; worker_pid=""
reset_inbox
fi
start_worker
if want idle; then
say "5. idle: ingest and worker running, nothing to do, 10 s"
sleep 2
redis_pid=$(pgrep -x redis-server | head -1)
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
redis_commands() { redis-cli -h 127.0.0.1 info stats | awk -F: '/^total_commands_processed/ { print $2 + 0 }'; }
w0=$(ticks "$worker_pid"); r0=$(ticks "$redis_pid"); c0=$(redis_commands)
sleep 10
w1=$(ticks "$worker_pid"); r1=$(ticks "$redis_pid"); c1=$(redis_commands)
jq -n --argjson w $((w1 - w0)) --argjson r $((r1 - r0)) --argjson c $((c1 - c0)) \
  '{seconds: 10, worker_cores: ($w / 1000), redis_cores: ($r / 1000), redis_commands_per_second: ($c / 10 | round)}' \
  | tee "$out/idle.json"
fi
if want lag; then
peak_rss_mb "$ingest_pid" >/dev/null
for run in $(seq 1 "$lag_runs"); do
  say "6. end-to-end lag at ${lag_rate}/s for ${seconds} s (ingest + worker), run $run of $lag_runs"
  # Each run's file is lag-N.json; lag.json is the first (the summary's main row). The worker
  # stops for the reset: deleting its queue's keys would unregister it.
  if [ "$run" != 1 ]; then stop_worker; reset_inbox; start_worker; fi
  $bin/loadgen --url "http://$ingest_addr" --database-url "$DATABASE_URL" --json \
    --seconds "$seconds" --wait-applied 120 \
    --cpu ingest="$ingest_pid" --cpu worker="$worker_pid" \
    --cpu-comm postgres=postgres --cpu-comm redis=redis-server \
    open --rate "$lag_rate" > "$out/lag-$run.json"
  jq -c '{p99: .latency_ms.p99, lag_p99: .lag.inbox_to_applied_ms.p99, cpu_cores, p99_by_second: [.per_second[].p99_ms]}' "$out/lag-$run.json"
done
cp "$out/lag-1.json" "$out/lag.json"
ingest_rss_lag=$(peak_rss_mb "$ingest_pid")
worker_rss_lag=$(peak_rss_mb "$worker_pid")
jq . "$out/lag.json"

fi

steady_phase 7 steady 0
steady_phase 8 foreign "$foreign_percent"

say "summary (Postgres over ${BENCH_DB_TRANSPORT:-unix}; $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GB", $2 / 1048576 }' /proc/meminfo), $(psql "$admin_url" -tAc 'SHOW server_version'); generator, Postgres, Redis, ingest and worker share the cores)"
j() { if [ -f "$out/$1.json" ]; then jq -r "$2" "$out/$1.json"; else echo -; fi; }
steady_row() {
  [ -f "$out/$1.json" ] || return 0
  printf '| steady state, %s: closed loop %s connections %s s, worker applying, %s %% foreign | accepted %s/s (%s of pgbench), decided %s/s during the load; backlog at the end %s, drained in %s s; p50 %s ms, p99 %s ms; errors %s; CPU cores %s | ≥ 5,000/s both, drain ≤ 5 s, ≥ 0.5 × pgbench, p99 ≤ 50 ms |\n' \
    "$1" "$connections" "$seconds" "$(j "$1" .foreign_percent)" "$(j "$1" .throughput)" \
    "$(jq -r --argjson pg "${pg_tps:-0}" 'if $pg > 0 then (.throughput / $pg * 100 | round / 100 | tostring) + " ×" else "-" end' "$out/$1.json")" \
    "$(j "$1" .steady.decided_per_second)" "$(j "$1" .steady.backlog_at_end)" "$(j "$1" .steady.drain_seconds)" \
    "$(j "$1" .latency_ms.p50)" "$(j "$1" .latency_ms.p99)" "$(j "$1" .errors_total)" "$(j "$1" '.cpu_cores | to_entries | map("\(.key) \(.value)") | join(", ")')"
}
{
  printf '| measurement | result | target |\n|---|---|---|\n'
  printf '| Postgres ceiling: pgbench 64 clients, one ~5 KB row per commit | %s tx/s (latency avg %s ms) | — |\n' "$pg_tps" "$pg_latency"
  printf '| ingest closed loop, %s connections, %s s | %s webhooks/s, p50 %s ms, p99 %s ms, max %s ms; errors %s; stored %s/%s | ≥ 6,000/s, 0 errors, all stored |\n' \
    "$connections" "$seconds" "$(j closed .throughput)" "$(j closed .latency_ms.p50)" "$(j closed .latency_ms.p99)" \
    "$(j closed .latency_ms.max)" "$(j closed .errors_total)" "$(j closed .verify.stored)" "$(j closed .verify.accepted)"
  printf '| ingest open loop, %s/s, %s s | p50 %s ms, p99 %s ms, max %s ms; errors %s; stored %s/%s | p99 ≤ 20 ms |\n' \
    "$open_rate" "$seconds" "$(j open .latency_ms.p50)" "$(j open .latency_ms.p99)" "$(j open .latency_ms.max)" \
    "$(j open .errors_total)" "$(j open .verify.stored)" "$(j open .verify.accepted)"
  printf '| worker drain, %s-event backlog | %s events/s (%s s) | ≥ 3,000/s |\n' \
    "$backlog" "$(j drain .events_per_second)" "$(j drain .seconds)"
  printf '| idle, 10 s: ingest and worker running, nothing to do | worker %s cores; Redis %s cores, %s commands/s | — |\n' \
    "$(j idle .worker_cores)" "$(j idle .redis_cores)" "$(j idle .redis_commands_per_second)"
  printf '| end-to-end lag at %s/s, %s s: ingest commit → worker commit | p50 %s ms, p99 %s ms, max %s ms (%s decided, %s not) | p99 ≤ 500 ms |\n' \
    "$lag_rate" "$seconds" "$(j lag .lag.inbox_to_applied_ms.p50)" "$(j lag .lag.inbox_to_applied_ms.p99)" \
    "$(j lag .lag.inbox_to_applied_ms.max)" "$(j lag .lag.decided)" "$(j lag .lag.undecided)"
  printf '| end-to-end lag at %s/s: scheduled send → worker commit | p50 %s ms, p99 %s ms, max %s ms | |\n' \
    "$lag_rate" "$(j lag .lag.due_to_applied_ms.p50)" "$(j lag .lag.due_to_applied_ms.p99)" "$(j lag .lag.due_to_applied_ms.max)"
  printf '| ingest latency at %s/s with the worker applying (lag phase) | p50 %s ms, p99 %s ms | p99 ≤ 20 ms |\n' \
    "$lag_rate" "$(j lag .latency_ms.p50)" "$(j lag .latency_ms.p99)"
  if [ "$lag_runs" -gt 1 ] && [ -f "$out/lag-$lag_runs.json" ]; then
    printf '| the lag phase, runs 1 to %s: ingest p99 / lag p99 | %s | p99 ≤ 20 ms / ≤ 500 ms |\n' "$lag_runs" \
      "$(for f in $(seq 1 "$lag_runs"); do jq -r '"\(.latency_ms.p99) / \(.lag.inbox_to_applied_ms.p99) ms"' "$out/lag-$f.json"; done | paste -sd ';' | sed 's/;/; /g')"
  fi
  steady_row steady
  steady_row foreign
  printf '| peak RSS ingest (closed / open / lag phase) | %s / %s / %s MB | ≤ 64 MB |\n' "$ingest_rss_closed" "$ingest_rss_open" "$ingest_rss_lag"
  printf '| peak RSS worker (drain / lag phase) | %s / %s MB | ≤ 128 MB |\n' "$worker_rss_drain" "$worker_rss_lag"
  for phase in steady foreign; do
    if [ -f "$out/$phase.pg.md" ]; then printf '\nPostgres work, %s phase:\n\n' "$phase"; cat "$out/$phase.pg.md"; fi
  done
} | tee "$out/summary.md"
echo "raw results in $out/"
