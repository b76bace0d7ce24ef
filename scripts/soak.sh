#!/usr/bin/env bash
# Crash soak, large: EVENTS payment events (10 % re-sends, 1 % conflicts) on
# 8 partitions while `idem run` (release build) is SIGKILLed KILLS times at
# random moments and the broker is restarted every RESTART_EVERY kills (3).
# Prints one line: events, kills, broker restarts, lost, doubled, ...
#
#   scripts/soak.sh 1000000 20
set -euo pipefail
cd "$(dirname "$0")/.."
events=${1:?usage: scripts/soak.sh EVENTS KILLS [RESTART_EVERY]}
kills=${2:?usage: scripts/soak.sh EVENTS KILLS [RESTART_EVERY]}
scripts/setup.sh kcat
IDEM_TEST_SOAK_EVENTS=$events IDEM_TEST_SOAK_KILLS=$kills IDEM_TEST_SOAK_RESTART_EVERY=${3:-3} \
  cargo test --release --test soak -- --nocapture 2>&1 | grep -E '^soak:|panicked|FAILED|test result'
