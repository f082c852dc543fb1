#!/usr/bin/env bash
# W2 (checkout to paid) against release builds of the API and the checkout
# workers, every process on this machine, each run twice; then the peak RSS
# of every process.
#
#   bench/checkout/run.sh [seconds=60] [customers=32]
#
# With pg_stat_statements loaded (shared_preload_libraries), each run also
# lists the statements that took the database's time, per paid order.
#
# Stripe is the harness's own stand-in (`souk-bench stripe`: same endpoints,
# webhooks signed as Stripe signs them), because localstripe, which the tests
# use, bounds the throughput long before Souk does. The mailer does not run:
# mails wait in their queue (sent after the measurement), as they would
# behind a slow SMTP relay; relaying them is included.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/services.sh
ensure_postgres
ensure_rabbitmq
ensure_redis

SECONDS_PER_RUN=${1:-60}
CUSTOMERS=${2:-32}
DB=souk_bench_checkout
PG=postgres://postgres@127.0.0.1:5432
TARGET=${CARGO_TARGET_DIR:-target}
API_PORT=18080
STRIPE_PORT=18420
SECRET=whsec_souk_bench_signing_secret
PREFIX=souk-bench-w2

log "building (release)"
cargo build --release -q -p souk-api -p souk-workers -p souk-bench

log "seeding $DB"
psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB" >/dev/null
DATABASE_URL="$PG/$DB" AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
  "$TARGET/release/souk-admin" migrate >/dev/null
psql "$PG/$DB" -q -v ON_ERROR_STOP=1 -f bench/catalog/seed.sql >/dev/null

export DATABASE_URL="$PG/$DB" AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f AMQP_PREFIX=$PREFIX
export LOG_FORMAT=json RUST_LOG=warn JWT_SECRET=bench-secret-bench-secret-bench-secret
export STRIPE_WEBHOOK_SECRET=$SECRET STRIPE_SECRET_KEY=sk_test_bench STRIPE_API_BASE="http://127.0.0.1:$STRIPE_PORT/"
export DATABASE_MAX_CONNECTIONS=${DATABASE_MAX_CONNECTIONS:-20} CONSUMER_PREFETCH=64 CONSUMER_CONCURRENCY=16
# No rate limits in the way of 32 sign-ins from one address.
export LIMIT_SIGN_IN_PER_IP_MINUTE=100000

declare -A pids
start() { # name binary args...
  local name=$1; shift
  "$@" >"/tmp/souk-bench-$name.log" 2>&1 &
  pids[$name]=$!
}
stop() { kill "${pids[@]}" 2>/dev/null || true; }
trap stop EXIT

start stripe "$TARGET/release/souk-bench" stripe --port $STRIPE_PORT \
  --webhook "http://127.0.0.1:$API_PORT/api/v1/stripe/webhook" --secret $SECRET
start api env HTTP_ADDR="127.0.0.1:$API_PORT" "$TARGET/release/souk-api"
start relay env OPS_ADDR=127.0.0.1:19101 "$TARGET/release/outbox-relay"
start splitter env OPS_ADDR=127.0.0.1:19103 "$TARGET/release/order-splitter"
start reserver env OPS_ADDR=127.0.0.1:19104 "$TARGET/release/stock-reserver"
start payments env OPS_ADDR=127.0.0.1:19105 "$TARGET/release/payments"
wait_port $API_PORT souk-api
wait_port $STRIPE_PORT "the Stripe stand-in"
sleep 1

# CPU time (clock ticks) of processes, to say where each run's CPU went.
ticks() { local t=0 p; for p in "$@"; do [ -r "/proc/$p/stat" ] && t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo $t; }
commits() { psql "$PG/$DB" -Atc "SELECT xact_commit FROM pg_stat_database WHERE datname = '$DB'"; }
declare -A before
# A warm-up, then fresh statistics: a database in service has both (the
# tables start empty here, and plans cached for empty tables would scan).
"$TARGET/release/souk-bench" checkout --api "http://127.0.0.1:$API_PORT" \
  --stripe "http://127.0.0.1:$STRIPE_PORT" --database "$DATABASE_URL" \
  --customers "$CUSTOMERS" --seconds 10 >/dev/null
psql "$PG/$DB" -qc "ANALYZE"
for i in 1 2; do
  echo "== W2 run $i ($CUSTOMERS customers, ${SECONDS_PER_RUN}s)"
  for name in "${!pids[@]}"; do before[$name]=$(ticks "${pids[$name]}"); done
  before[postgres]=$(ticks $(pgrep -x postgres)); before[rabbitmq]=$(ticks $(pgrep -f beam.smp))
  statements=$(psql "$PG/$DB" -Atc "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT pg_stat_statements_reset()" 2>/dev/null && echo yes || true)
  c0=$(commits); t0=$(date +%s)
  "$TARGET/release/souk-bench" checkout --api "http://127.0.0.1:$API_PORT" \
    --stripe "http://127.0.0.1:$STRIPE_PORT" --database "$DATABASE_URL" \
    --customers "$CUSTOMERS" --seconds "$SECONDS_PER_RUN" | tee /tmp/souk-bench-w2.out &
  gen=$!; gen_ticks=0
  while kill -0 $gen 2>/dev/null; do gen_ticks=$(ticks $(pgrep -f "souk-bench checkout") ) ; sleep 1; done
  wait $gen
  elapsed=$(( $(date +%s) - t0 )); [ "$elapsed" -gt 0 ] || elapsed=1
  paid=$(awk '/^paid orders/ {print $3}' /tmp/souk-bench-w2.out)
  hz=$(getconf CLK_TCK)
  echo "   commits per paid order: $(( ($(commits) - c0) / (paid > 0 ? paid : 1) ))"
  printf '   CPU over the run (%% of one core):'
  for name in "${!pids[@]}"; do printf ' %s %d' "$name" "$(( ($(ticks "${pids[$name]}") - before[$name]) * 100 / hz / elapsed ))"; done
  printf ' postgres %d' "$(( ($(ticks $(pgrep -x postgres)) - before[postgres]) * 100 / hz / elapsed ))"
  printf ' rabbitmq %d' "$(( ($(ticks $(pgrep -f beam.smp)) - before[rabbitmq]) * 100 / hz / elapsed ))"
  printf ' load-generator %d\n' "$(( gen_ticks * 100 / hz / elapsed ))"
  if [ -n "$statements" ]; then
    echo "   statements by database time (calls and ms per paid order):"
    psql "$PG/$DB" -At -F' | ' -c "SELECT round(calls::numeric / $paid, 1), round((total_exec_time / $paid)::numeric, 2),
        left(regexp_replace(query, '\s+', ' ', 'g'), 110)
        FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = '$DB')
        ORDER BY total_exec_time DESC LIMIT 15" | sed 's/^/     /'
  fi
done
echo "== peak RSS"
for name in api relay splitter reserver payments stripe; do
  printf '   %-9s %s\n' "$name" "$(awk '/VmHWM/ {print $2, $3}' /proc/${pids[$name]}/status)"
done
echo "== left in queues (mails wait for the mailer, which did not run)"
as_root rabbitmqctl -q list_queues name messages 2>/dev/null | grep "^$PREFIX\." | grep -v "\.retry\." || true
