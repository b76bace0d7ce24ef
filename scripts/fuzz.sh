#!/usr/bin/env bash
# Runs the cargo-fuzz targets under fuzz/ one after the other, each for a
# given time, and prints per target: seconds run, executions, corpus size and
# crashes found. Exits non-zero when any target found a crash.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Defaults: 60 seconds, every target (payload_decode key_derive record_decode).
# Needs the nightly toolchain (rustup); installs cargo-fuzz when missing.
#
# Corpora live in fuzz/corpus/<target> and grow from run to run (only the
# seed-* files are in git). A crash stops its target: libFuzzer writes the
# input to fuzz/artifacts/<target>/crash-*; reproduce it with
#   cargo +nightly fuzz run -a <target> fuzz/artifacts/<target>/crash-...
# shrink it with `cargo +nightly fuzz tmin -a <target> <file>`, and make it a
# regression test in tests/fuzz_regressions.rs.
#
# Environment:
#   IDEM_FUZZ_TARGET_DIR  build directory (default /var/tmp/idem-fuzz-target;
#                         never the main crate's: the fuzz build is nightly
#                         with sanitizer flags)
#   IDEM_FUZZ_NICE        niceness of the build and the fuzzers (default 19)
#   IDEM_FUZZ_ARGS        extra libFuzzer arguments, e.g. "-max_len=8192"
#   ROCKSDB_LIB_DIR, ROCKSDB_STATIC=1
#                         link a librocksdb.a built before (librocksdb-sys
#                         reads them), e.g. the main crate's, instead of
#                         compiling RocksDB's C++ again (20-40 minutes on two
#                         cores). That library is not built with AddressSanitizer
#                         (a from-source fuzz build is: cargo-fuzz passes
#                         -fsanitize=address to the cc crate), which only loses
#                         the detection of memory errors inside RocksDB itself.
#                         librdkafka is built without it either way.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

seconds=${1:-60}
if ! [[ $seconds =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
  echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]" >&2
  exit 2
fi
shift || true
all_targets=(payload_decode key_derive record_decode)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")
for t in "${targets[@]}"; do
  [ -f "fuzz/fuzz_targets/$t.rs" ] || { echo "no fuzz target $t (have: ${all_targets[*]})" >&2; exit 2; }
done

target_dir=${IDEM_FUZZ_TARGET_DIR:-/var/tmp/idem-fuzz-target}
nice_level=${IDEM_FUZZ_NICE:-19}
run_nice() { nice -n "$nice_level" "$@"; }

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "the nightly toolchain is needed: rustup toolchain install nightly" >&2
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  run_nice cargo install cargo-fuzz
fi

# The same flags for build and run, so that `cargo fuzz run` does not rebuild.
fuzz_flags=(-a --target-dir "$target_dir")
echo "building the fuzz targets in $target_dir (a cold build compiles RocksDB and librdkafka)" >&2
(cd fuzz && run_nice cargo +nightly fuzz build "${fuzz_flags[@]}")

# record_decode opens a RocksDB store under $TMPDIR: one per run, removed after.
scratch=$(mktemp -d "${TMPDIR:-/tmp}/idem-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

count_files() { find "$1" -maxdepth 1 -type f 2>/dev/null | wc -l; }
# The inputs libFuzzer writes when it stops on a finding.
findings() {
  find "$1" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' \
    -o -name 'oom-*' \) -printf '%f\n' | sort
}
dict_args() {
  case $1 in
    payload_decode | key_derive) echo "-dict=$root/fuzz/dict/payment.dict" ;;
  esac
}

summary=()
failed=0
for t in "${targets[@]}"; do
  corpus=fuzz/corpus/$t
  artifacts=fuzz/artifacts/$t
  mkdir -p "$corpus" "$artifacts"
  before=$(findings "$artifacts")
  log=$scratch/$t.log
  echo "== $t: ${seconds}s, corpus $corpus ($(count_files "$corpus") inputs)" >&2
  start=$(date +%s)
  set +e
  # shellcheck disable=SC2046,SC2086
  (cd fuzz && TMPDIR=$scratch LSAN_OPTIONS=suppressions=$root/fuzz/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS} run_nice cargo +nightly fuzz run "${fuzz_flags[@]}" "$t" \
    "corpus/$t" -- -max_total_time="$seconds" -print_final_stats=1 \
    -artifact_prefix="$root/$artifacts/" $(dict_args "$t") ${IDEM_FUZZ_ARGS:-}) >"$log" 2>&1
  rc=$?
  set -e
  elapsed=$(( $(date +%s) - start ))
  tail -n 30 "$log" >&2
  cp "$log" "$artifacts/last-run.log"
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  fuzz_secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)
  new=$(comm -13 <(echo "$before") <(findings "$artifacts") | grep -v '^$' || true)
  crashes=$(echo -n "$new" | grep -c . || true)
  if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then
    crashes=1 # libFuzzer (or the build) failed without writing an input
    new="(exit $rc without an artifact: see $artifacts/last-run.log)"
  fi
  [ "$crashes" -eq 0 ] || failed=1
  summary+=("$(printf '%-15s %6ss wall %6ss fuzzed %12s execs %8s exec/s %6s corpus  %s crashes %s' \
    "$t" "$elapsed" "${fuzz_secs:--}" "${execs:--}" "${rate:--}" "$(count_files "$corpus")" \
    "$crashes" "$(echo $new)")")
done

echo
echo "fuzz summary (${seconds}s per target):"
printf '  %s\n' "${summary[@]}"
exit "$failed"
