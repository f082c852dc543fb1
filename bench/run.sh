#!/usr/bin/env bash
# Every figure in docs/benchmarks.md, from one command. Builds release
# binaries, starts the whole checkout system on this machine against a fresh
# database (the API, the outbox relay, the order-splitter, the stock-reserver,
# the payments worker, and the harness's fast Stripe stand-in), then:
#
#   1. souk-bench all: seeds 1,000 products; W1, W1s, W2 and B, each twice
#   2. W1 and W1s with the API's answer cache off (PUBLIC_CACHE_MS=0)
#   3. W2 with two processes of each worker
#   4. W1 and W1s with 100,000 products, cache on and off
#
# and prints the table (medians of the runs). Every run is appended to
# bench/results/<date>.jsonl; `souk-bench report FILE` prints it again.
#
#   bench/run.sh                      # the whole set (about 20 minutes)
#   SECONDS_PER_RUN=10 RUNS=1 bench/run.sh   # a quick look
#   PHASES=4 bench/run.sh             # only some phases (their runs are
#                                     # added to the day's file)
#   bench/run.sh serve                # only start the system (seeded), for
#                                     # one workload at a time or a profiler
#
# The mailer does not run: receipts and seller mails (3 per order) wait in
# its queue, as behind a slow SMTP relay; relaying them is measured.
# Needs PostgreSQL, RabbitMQ and Redis (installed and started if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/services.sh
ensure_build_tools
ensure_postgres
ensure_rabbitmq
ensure_redis

SECONDS_PER_RUN=${SECONDS_PER_RUN:-30}
CHECKOUT_SECONDS=${CHECKOUT_SECONDS:-60}
RUNS=${RUNS:-2}
PHASES=${PHASES:-1234}
DB=souk_bench
PG=postgres://postgres@127.0.0.1:5432
TARGET=${CARGO_TARGET_DIR:-target}
BIN=$TARGET/release
API_PORT=18080
STRIPE_PORT=18420
SECRET=whsec_souk_bench_signing_secret
OUT=${OUT:-bench/results/$(date -u +%F).jsonl}
LOGS=${SOUK_RUN_DIR:-/tmp/souk-bench}
mkdir -p "$LOGS" "$(dirname "$OUT")"
# The whole set starts the day's file afresh; `serve` writes nothing to it.
[ "$PHASES" = 1234 ] && [ "${1:-}" != serve ] && rm -f "$OUT"
phase() { [[ $PHASES == *$1* ]]; }

log "building (release)"
cargo build --release -q -p souk-api -p souk-workers -p souk-bench

log "a fresh database $DB"
psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"

export DATABASE_URL="$PG/$DB" AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f AMQP_PREFIX=souk-bench
export LOG_FORMAT=json RUST_LOG=warn JWT_SECRET=bench-secret-bench-secret-bench-secret
export STRIPE_WEBHOOK_SECRET=$SECRET STRIPE_SECRET_KEY=sk_test_bench STRIPE_API_BASE="http://127.0.0.1:$STRIPE_PORT/"
export PAYOUT_DETAILS_KEY=c291ay1iZW5jaC1wYXlvdXQta2V5LTMyLWJ5dGVzISE=
# No rate limit in the way of many sign-ins and requests from one address.
export LIMIT_SIGN_IN_PER_IP_MINUTE=1000000
"$BIN/souk-admin" migrate

# WORKER_THREADS=n: each worker's tokio runtime gets n threads (tokio's
# TOKIO_WORKER_THREADS; the default is one per core).
WORKER_ENV=()
[ -n "${WORKER_THREADS:-}" ] && WORKER_ENV=(TOKIO_WORKER_THREADS="$WORKER_THREADS")
declare -A pids
start() { # name binary args...
  local name=$1; shift
  "$@" >"$LOGS/$name.log" 2>&1 &
  pids[$name]=$!
}
halt() { # names...
  local name
  for name in "$@"; do
    [ -n "${pids[$name]:-}" ] || continue
    kill "${pids[$name]}" 2>/dev/null || true
    wait "${pids[$name]}" 2>/dev/null || true
    unset "pids[$name]"
  done
}
trap 'halt "${!pids[@]}"' EXIT

api() { # PUBLIC_CACHE_MS
  halt api
  start api env HTTP_ADDR="127.0.0.1:$API_PORT" PUBLIC_CACHE_MS="$1" "$BIN/souk-api"
  wait_port $API_PORT souk-api
}
workers() { # processes of each
  local n i port=19100
  for name in "${!pids[@]}"; do case $name in relay*|splitter*|reserver*|payments*) halt "$name";; esac; done
  for ((i = 1; i <= $1; i++)); do
    for n in relay:outbox-relay splitter:order-splitter reserver:stock-reserver payments:payments; do
      port=$((port + 1))
      start "${n%%:*}$i" env "${WORKER_ENV[@]}" OPS_ADDR="127.0.0.1:$port" "$BIN/${n#*:}"
    done
  done
  sleep 1
}

start stripe "$BIN/souk-bench" stripe --port $STRIPE_PORT \
  --webhook "http://127.0.0.1:$API_PORT/api/v1/stripe/webhook" --secret $SECRET
wait_port $STRIPE_PORT "the Stripe stand-in"
api 1000
workers 1

bench() { "$BIN/souk-bench" "$@" --runs "$RUNS" --out "$OUT"; }
target=(--api "http://127.0.0.1:$API_PORT" --stripe "http://127.0.0.1:$STRIPE_PORT" --database "$DATABASE_URL")

if [ "${1:-}" = serve ]; then
  "$BIN/souk-bench" seed --database "$DATABASE_URL" --products "${PRODUCTS:-1000}"
  echo "running; try: $BIN/souk-bench checkout ${target[*]} --runs 1 --seconds 20   (Ctrl-C stops)"
  wait
  exit 0
fi

"$BIN/souk-bench" seed --database "$DATABASE_URL" --products 1000
if phase 1; then
  log "1. the whole set, 1,000 products"
  bench all "${target[@]}" --products 1000 --seconds "$SECONDS_PER_RUN" --checkout-seconds "$CHECKOUT_SECONDS" \
    --label "1,000 products"
fi

if phase 2; then
  log "2. the catalog without the answer cache"
  api 0
  bench catalog "${target[@]}" --seconds "$SECONDS_PER_RUN" --label "1,000 products, no answer cache"
  bench catalog "${target[@]}" --seconds "$SECONDS_PER_RUN" --query walnut --label "1,000 products, no answer cache"
  api 1000
fi

if phase 3; then
  log "3. checkout with two processes of each worker"
  workers 2
  bench checkout "${target[@]}" --seconds "$CHECKOUT_SECONDS" --label "two processes of each worker"
  workers 1
fi

if phase 4; then
  log "4. the catalog with 100,000 products"
  "$BIN/souk-bench" seed --database "$DATABASE_URL" --products 100000
  for cache in 1000 0; do
    api $cache
    label="100,000 products"; [ $cache = 0 ] && label="$label, no answer cache"
    bench catalog "${target[@]}" --seconds "$SECONDS_PER_RUN" --label "$label"
    bench catalog "${target[@]}" --seconds "$SECONDS_PER_RUN" --query walnut --label "$label"
  done
fi

echo
"$BIN/souk-bench" report "$OUT"
echo "(every run: $OUT; process logs: $LOGS)"
