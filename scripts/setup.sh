#!/usr/bin/env bash
# Installs what building idem needs on a fresh Debian machine that has only
# the Rust toolchain, gcc and python3: libclang for RocksDB's bindgen (without
# libclang-common-14-dev bindgen fails on stdbool.h) and OpenSSL for
# librdkafka (TLS and SASL/SCRAM to the brokers). Extra Debian packages
# named as arguments are installed too (scripts/test.sh asks for kcat). Does
# nothing when everything is present.
set -euo pipefail
need=()
for pkg in libclang1-14 libclang-common-14-dev libssl-dev pkg-config "$@"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing ${need[*]} with apt-get" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
