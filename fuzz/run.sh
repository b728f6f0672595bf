#!/usr/bin/env bash
# Builds every fuzz target once (release, address sanitizer, debug
# assertions) and runs each for SECONDS (default 30), starting from its
# committed seeds in corpus/<target>/ and replaying any reproducers in
# regressions/<target>/ first. New inputs libFuzzer finds go to a scratch
# directory, so the committed corpus stays as it is. Exits non-zero if any
# target crashed, hung (-timeout) or ran out of memory; the input that did
# it is in artifacts/<target>/.
#
#   fuzz/run.sh            # every target, 30 s each
#   fuzz/run.sh 60 dns_query config
#
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP=1 lets the stable
# toolchain provide them.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-30}"
shift || true

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi
if [ ${#targets[@]} -eq 0 ]; then
  echo "ERROR: no fuzz targets (cargo fuzz list gave none)" >&2
  exit 1
fi

start=$(date +%s)
cargo fuzz build -O
echo "fuzz: built ${#targets[@]} targets in $(($(date +%s) - start)) s"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in "${targets[@]}"; do
  if [ -d "regressions/$t" ] && [ -n "$(ls -A "regressions/$t")" ]; then
    echo "--- fuzz: $t: replaying regressions/$t"
    if ! cargo fuzz run -O "$t" "regressions/$t"/* -- -runs=1 >"$scratch/$t.replay.log" 2>&1; then
      tail -n 40 "$scratch/$t.replay.log"
      failed+=("$t (regression)")
      continue
    fi
  fi
  echo "--- fuzz: $t for ${secs} s"
  mkdir -p "$scratch/$t"
  if cargo fuzz run -O "$t" "$scratch/$t" "corpus/$t" -- \
      -max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 \
      -print_final_stats=1 >"$scratch/$t.log" 2>&1; then
    grep -E "^stat::number_of_executed_units|^stat::new_units_added|^stat::peak_rss_mb" "$scratch/$t.log" |
      sed "s/^/fuzz: $t: /"
  else
    tail -n 60 "$scratch/$t.log"
    failed+=("$t")
  fi
done

echo "fuzz: done in $(($(date +%s) - start)) s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "ERROR: fuzz targets failed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
