#!/usr/bin/env bash
# The comparative benchmark in one command: installs Redis (Debian's
# redis-server) and the build dependencies, starts a local broker on a free
# port (unless IDEM_TEST_BROKERS points at one), and runs
#   cargo bench --bench compare -- "$@"
# e.g. scripts/bench.sh --events 1000000 --rounds 3. See BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh redis-server
scripts/with-broker.sh cargo bench --bench compare -- "$@"
