#!/usr/bin/env bash
# The test command: installs build dependencies, starts a local broker on a
# free port (unless IDEM_TEST_BROKERS points at one), runs every test, and
# stops the broker it started.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh kcat redis-server   # kcat: the replay tests read its `-J` dumps; redis-server: the comparative benchmark's quick run
if [ -z "${IDEM_TEST_BROKERS:-}" ]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  export IDEM_BROKER_DIR=$(mktemp -d /tmp/idem-test-broker.XXXXXX)
  trap 'deploy/broker.sh stop "$IDEM_BROKER_DIR"; rm -rf "$IDEM_BROKER_DIR"' EXIT
  export IDEM_TEST_BROKERS=$(deploy/broker.sh start "$port" "$IDEM_BROKER_DIR")
fi
echo "tests use the broker at $IDEM_TEST_BROKERS" >&2
cargo test --all-targets "$@"
