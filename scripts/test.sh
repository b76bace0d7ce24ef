#!/usr/bin/env bash
# The test command: installs build dependencies, starts a local broker on a
# free port (unless IDEM_TEST_BROKERS points at one), runs every test, and
# stops the broker it started.
set -euo pipefail
cd "$(dirname "$0")/.."
# kcat: the replay tests read its `-J` dumps; redis-server: the comparative
# benchmark's quick run.
scripts/setup.sh kcat redis-server
scripts/with-broker.sh cargo test --all-targets "$@"
