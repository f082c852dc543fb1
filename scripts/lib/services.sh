# Shared by scripts/dev, scripts/test and .ci/run: make sure the services
# Souk needs are installed and running, installing them where missing.
# Sourced, not executed.

log() { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }

# Is something listening on 127.0.0.1:$1?
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port name [seconds]
  local i
  for ((i = 0; i < ${3:-60} * 4; i++)); do port_open "$1" && return 0; sleep 0.25; done
  echo "error: $2 did not come up on port $1" >&2
  return 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

ensure_build_tools() {
  command -v mold >/dev/null || { log "installing mold (fast linker)"; apt_install mold; }
  command -v cc >/dev/null || { log "installing a C toolchain"; apt_install build-essential; }
  if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install --locked cargo-nextest
  fi
}

ensure_postgres() {
  if ! command -v pg_ctlcluster >/dev/null && ! command -v postgres >/dev/null; then
    log "installing PostgreSQL"
    apt_install postgresql
    # A fresh install asks for passwords over TCP; this is a development
    # machine, so trust local TCP connections as the CI machine does.
    local hba
    hba=$(ls /etc/postgresql/*/main/pg_hba.conf | head -n1)
    as_root sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
  fi
  if ! port_open 5432; then
    log "starting PostgreSQL"
    local v
    v=$(ls /etc/postgresql | sort -V | tail -n1)
    as_root pg_ctlcluster --skip-systemctl-redirect "$v" main start </dev/null >/dev/null 2>&1
    wait_port 5432 PostgreSQL
  fi
}

ensure_rabbitmq() {
  if ! command -v rabbitmq-server >/dev/null; then
    log "installing RabbitMQ"
    apt_install rabbitmq-server
  fi
  if ! port_open 5672; then
    log "starting RabbitMQ"
    # Detached from our descriptors so a CI runner reading our output is
    # not held open by the broker after this script ends.
    as_root rabbitmq-server -detached </dev/null >/dev/null 2>&1
    wait_port 5672 RabbitMQ 120
    as_root rabbitmqctl -q await_startup >/dev/null 2>&1 || true
  fi
}

# Redis holds the API's rate-limit counters (shared by every API replica).
ensure_redis() {
  command -v redis-server >/dev/null || { log "installing Redis"; apt_install redis-server; }
  if ! port_open 6379; then
    log "starting Redis"
    as_root redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
      </dev/null >/dev/null 2>&1
    wait_port 6379 Redis
  fi
}

# maildev: the SMTP sink (port 1025) with a web UI and REST API (port 1080).
ensure_maildev() {
  if ! command -v maildev >/dev/null; then
    command -v npm >/dev/null || { log "installing Node.js"; apt_install nodejs npm; }
    log "installing maildev (SMTP sink)"
    as_root npm install -g --silent maildev@3 >/dev/null
  fi
  if ! port_open 1025; then
    log "starting maildev"
    mkdir -p "${SOUK_RUN_DIR:-/tmp/souk}"
    nohup maildev --smtp 1025 --web 1080 --ip 127.0.0.1 </dev/null \
      >"${SOUK_RUN_DIR:-/tmp/souk}/maildev.log" 2>&1 &
    wait_port 1025 maildev
    wait_port 1080 maildev
  fi
}

# localstripe (PyPI): Stripe's API and signed webhooks on localhost, for the
# tests and for scripts/dev.
LOCALSTRIPE_VERSION=1.15.10
ensure_localstripe() {
  if ! python3 -c 'import localstripe' 2>/dev/null; then
    command -v pip3 >/dev/null || python3 -m pip --version >/dev/null 2>&1 ||
      { log "installing pip"; apt_install python3-pip; }
    log "installing localstripe (Stripe stand-in)"
    python3 -m pip install --quiet "localstripe==$LOCALSTRIPE_VERSION" 2>/dev/null ||
      python3 -m pip install --quiet --break-system-packages "localstripe==$LOCALSTRIPE_VERSION"
  fi
}

ensure_services() {
  ensure_postgres
  ensure_rabbitmq
  ensure_redis
  ensure_maildev
  ensure_localstripe
}

psql_admin() { psql -h 127.0.0.1 -U postgres -d postgres -v ON_ERROR_STOP=1 -qAt "$@"; }
