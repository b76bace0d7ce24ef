#!/usr/bin/env bash
# Starts or stops a local Kafka-protocol broker (noida-db, from PyPI) for tests
# and trials on 127.0.0.1.
#
#   deploy/broker.sh start [PORT] [DATA_DIR]   # prints the bootstrap address
#   deploy/broker.sh stop  [DATA_DIR]
#
# The same tests run against Apache Kafka or Redpanda: point IDEM_TEST_BROKERS
# at them instead.
set -euo pipefail

NOIDA_VERSION=0.2.3
cmd=${1:-}
port=${2:-19092}
data=${3:-${IDEM_BROKER_DIR:-/tmp/idem-broker}}
if [ "$cmd" = stop ]; then data=${2:-${IDEM_BROKER_DIR:-/tmp/idem-broker}}; fi
pidfile="$data/broker.pid"

noida() {
  local installed
  installed=$(python3 -m pip show noida-db 2>/dev/null | sed -n 's/^Version: //p' || true)
  if ! command -v noida-db >/dev/null 2>&1 || [ "$installed" != "$NOIDA_VERSION" ]; then
    python3 -m pip install --quiet --disable-pip-version-check "noida-db==$NOIDA_VERSION" >&2
  fi
  command -v noida-db
}

port_open() {
  python3 - "$1" <<'PY'
import socket, sys
s = socket.socket()
s.settimeout(0.5)
sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
PY
}

case "$cmd" in
  start)
    bin=$(noida)
    mkdir -p "$data"
    if [ -f "$pidfile" ] && kill -0 -- "-$(cat "$pidfile")" 2>/dev/null; then
      echo "127.0.0.1:$port"; exit 0
    fi
    # Its own process group (setsid): the command on PATH is a wrapper whose
    # child is the server, and `stop` must end both.
    setsid nohup "$bin" start --only kafka --host 127.0.0.1 --kafka-port "$port" --data-dir "$data" \
      >"$data/broker.log" 2>&1 < /dev/null &
    echo $! >"$pidfile"
    for _ in $(seq 1 120); do
      if port_open "$port"; then echo "127.0.0.1:$port"; exit 0; fi
      if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        echo "broker exited at start-up; its log:" >&2; cat "$data/broker.log" >&2; exit 1
      fi
      sleep 0.5
    done
    echo "broker did not open port $port within 60 s; its log:" >&2
    cat "$data/broker.log" >&2
    exit 1
    ;;
  stop)
    [ -f "$pidfile" ] || exit 0
    pid=$(cat "$pidfile")
    # SIGTERM to the whole group (wrapper and server), then wait for every
    # member to exit so its data is flushed; SIGKILL only after 30 s.
    if kill -0 -- "-$pid" 2>/dev/null; then
      kill -TERM -- "-$pid" 2>/dev/null || true
      for _ in $(seq 1 60); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
      kill -0 -- "-$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    ;;
  *)
    echo "usage: $0 start [PORT] [DATA_DIR] | stop [DATA_DIR]" >&2; exit 2 ;;
esac
