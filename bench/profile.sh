#!/usr/bin/env bash
# The W2 profile in docs/benchmarks.md: one checkout run with the commits
# and SQL statements per paid order, the CPU each process used, and a
# system-wide perf profile. Against the system `bench/run.sh serve` starts:
#
#   bench/run.sh serve &            # wait for "running"
#   bench/profile.sh [seconds=20]
#
# Statements need pg_stat_statements loaded (shared_preload_libraries, a
# server restart); without it they are skipped. perf, when installed, samples
# cpu-clock (no hardware counters in most VMs).
set -eu
SECONDS_RUN=${1:-20}
DB=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/souk_bench}
BIN=${CARGO_TARGET_DIR:-target}/release/souk-bench
TARGET=(--api http://127.0.0.1:18080 --stripe http://127.0.0.1:18420 --database "$DB")
sql() { psql "$DB" -qAtc "$1"; }
curl -fsS -o /dev/null http://127.0.0.1:18080/health/ready ||
  { echo "no API on 127.0.0.1:18080: start bench/run.sh serve first" >&2; exit 1; }

statements=false
if [ "$(sql "SHOW shared_preload_libraries")" = pg_stat_statements ] || \
   sql "SHOW shared_preload_libraries" | grep -q pg_stat_statements; then
  sql "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" && statements=true
else
  echo "(pg_stat_statements is not loaded: statements per order skipped)"
fi

# CPU ticks (user + system) of the processes whose command line matches.
ticks() {
  local total=0 p f
  for p in $(pgrep -f "$1"); do
    read -r -a f < "/proc/$p/stat" 2>/dev/null || continue
    total=$((total + f[13] + f[14]))
  done
  echo "$total"
}
machine() { awk '/^cpu /{print $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }
names=(postgres beam.smp souk-api outbox-relay order-splitter stock-reserver release/payments "souk-bench stripe")

echo "warm-up (10 s), then ANALYZE"
"$BIN" checkout "${TARGET[@]}" --runs 1 --seconds 10 --out /dev/null >/dev/null
sql "ANALYZE"
$statements && sql "SELECT pg_stat_statements_reset()" >/dev/null
commits0=$(sql "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
paid0=$(sql "SELECT count(*) FROM orders WHERE status = 'paid'")
declare -A before; for n in "${names[@]}"; do before[$n]=$(ticks "$n"); done
all0=$(machine)
if command -v perf >/dev/null; then
  perf record -q -e cpu-clock -F 299 -a -g -o /tmp/souk-profile.data -- sleep $((SECONDS_RUN - 2)) >/dev/null 2>&1 &
fi
"$BIN" checkout "${TARGET[@]}" --runs 1 --seconds "$SECONDS_RUN" --out /dev/null
all1=$(machine)
commits1=$(sql "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
paid=$(( $(sql "SELECT count(*) FROM orders WHERE status = 'paid'") - paid0 ))
wait || true

echo "paid orders: $paid, commits per paid order: $(( (commits1 - commits0) / paid ))"
echo "CPU by process, % of the machine:"
for n in "${names[@]}"; do
  printf '  %-18s %s\n' "$n" "$(( 100 * ($(ticks "$n") - before[$n]) / (all1 - all0) ))"
done
if $statements; then
  sql "SELECT 'statements per paid order: ' || round(sum(calls)::numeric / $paid, 1) FROM pg_stat_statements"
  psql "$DB" -c "SELECT round(calls::numeric / $paid, 2) AS per_order,
                        round(total_exec_time::numeric / $paid, 3) AS ms_per_order,
                        left(regexp_replace(query, '\s+', ' ', 'g'), 100) AS statement
                   FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 15"
  psql "$DB" -c "SELECT round(calls::numeric / $paid, 2) AS per_order,
                        left(regexp_replace(query, '\s+', ' ', 'g'), 100) AS statement
                   FROM pg_stat_statements ORDER BY calls DESC LIMIT 15"
fi
if [ -f /tmp/souk-profile.data ]; then
  for key in comm dso dso,sym; do
    perf report -i /tmp/souk-profile.data --no-children --sort "$key" --stdio -g none 2>/dev/null \
      | grep -E '^\s+[0-9.]+%' | head -15
    echo
  done
fi
