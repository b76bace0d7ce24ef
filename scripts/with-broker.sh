#!/usr/bin/env bash
# Runs a command with IDEM_TEST_BROKERS pointing at a Kafka-protocol broker:
# the one it already names, else a local noida-db started on a free port for
# the command and stopped after it (deploy/broker.sh).
#   scripts/with-broker.sh cargo test --all-targets
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${IDEM_TEST_BROKERS:-}" ]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  export IDEM_BROKER_DIR=$(mktemp -d /tmp/idem-broker.XXXXXX)
  trap 'deploy/broker.sh stop "$IDEM_BROKER_DIR"; rm -rf "$IDEM_BROKER_DIR"' EXIT
  export IDEM_TEST_BROKERS=$(deploy/broker.sh start "$port" "$IDEM_BROKER_DIR")
fi
echo "using the broker at $IDEM_TEST_BROKERS" >&2
"$@"
