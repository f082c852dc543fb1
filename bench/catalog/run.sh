#!/usr/bin/env bash
# W1 (catalog page, random and first) and W1s (search page) against a release build of the
# API with the benchmark data, each run twice; then the API's peak RSS.
#
#   bench/catalog/run.sh [seconds] [connections]
#
# Needs PostgreSQL (scripts/dev or scripts/test starts it), Redis, wrk.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/services.sh
ensure_postgres
ensure_redis
command -v wrk >/dev/null || { log "installing wrk"; apt_install wrk; }

SECONDS_PER_RUN=${1:-30}
CONNECTIONS=${2:-64}
DB=souk_bench_catalog
PG=postgres://postgres@127.0.0.1:5432
TARGET=${CARGO_TARGET_DIR:-target}
PORT=18080
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}

log "building the API (release)"
cargo build --release -q -p souk-api -p souk-workers --bin souk-api --bin souk-admin

log "seeding $DB"
psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null
DATABASE_URL="$PG/$DB" "$TARGET/release/souk-admin" migrate >/dev/null
psql "$PG/$DB" -q -v ON_ERROR_STOP=1 -f bench/catalog/seed.sql >/dev/null

log "starting the API on :$PORT"
DATABASE_URL="$PG/$DB" HTTP_ADDR="127.0.0.1:$PORT" JWT_SECRET=bench-secret-bench-secret-bench-secret \
  LOG_FORMAT=json RUST_LOG=warn \
  "$TARGET/release/souk-api" >/tmp/souk-bench-api.log 2>&1 &
API=$!
trap 'kill $API 2>/dev/null || true' EXIT
wait_port $PORT souk-api

run() { # name query pages
  local name=$1 query=$2 pages=$3 i
  for i in 1 2; do
    echo "== $name run $i (q=${query:-none}, pages 1..$pages, ${CONNECTIONS} connections, ${SECONDS_PER_RUN}s)"
    WRK_QUERY=$query WRK_PAGES=$pages wrk -t2 -c"$CONNECTIONS" -d"${SECONDS_PER_RUN}s" --latency \
      -s bench/catalog/random-page.lua "http://127.0.0.1:$PORT" |
      grep -E 'Requests/sec|^ +(50|99)%|Non-2xx|Socket errors'
    echo "   API RSS now: $(awk '/VmRSS/ {print $2, $3}' /proc/$API/status)"
  done
}
# Warm up once so the first run is not the cold one.
wrk -t2 -c8 -d3s -s bench/catalog/random-page.lua "http://127.0.0.1:$PORT" >/dev/null
run W1 "" 50        # a random page of the catalog, as ../shared/BENCHMARKS.md
run W1-first "" 1   # the storefront's first page
run W1s walnut 10   # a one-word search (matches 200 products)
echo "== API peak RSS: $(awk '/VmHWM/ {print $2, $3}' /proc/$API/status)"
