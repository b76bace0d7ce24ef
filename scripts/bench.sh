#!/usr/bin/env bash
# The comparative benchmark in one command: installs Redis (Debian's
# redis-server) and the build dependencies, starts a local broker on a free
# port (unless IDEM_TEST_BROKERS points at one), and runs
#   cargo bench --bench compare -- "$@"
# e.g. scripts/bench.sh --events 1000000 --rounds 3. See BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh redis-server
if [ -z "${IDEM_TEST_BROKERS:-}" ]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  export IDEM_BROKER_DIR=$(mktemp -d /tmp/idem-bench-broker.XXXXXX)
  trap 'deploy/broker.sh stop "$IDEM_BROKER_DIR"; rm -rf "$IDEM_BROKER_DIR"' EXIT
  export IDEM_TEST_BROKERS=$(deploy/broker.sh start "$port" "$IDEM_BROKER_DIR")
fi
echo "benchmark uses the broker at $IDEM_TEST_BROKERS" >&2
cargo bench --bench compare -- "$@"
