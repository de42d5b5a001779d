#!/usr/bin/env bash
# Builds the parser fuzz targets with libFuzzer coverage instrumentation (the flags cargo-fuzz
# passes, on the nightly toolchain, AddressSanitizer included) and runs each for SECONDS.
#   protocols/fuzz/run.sh [SECONDS] [TARGET...]      (default: 180 s, every target)
# Crashes land in protocols/fuzz/artifacts/<target>/; the corpus grows in corpus/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-180}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(http1 http2 postgres)

export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks \
-Zsanitizer=address"
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
cargo +nightly build --release --target x86_64-unknown-linux-gnu --target-dir "$target_dir" \
  $(printf -- '--bin %s ' "${targets[@]}")

for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  echo "== $t: ${seconds}s"
  "$target_dir/x86_64-unknown-linux-gnu/release/$t" "corpus/$t" \
    -artifact_prefix="artifacts/$t/" -max_total_time="$seconds" -max_len=16384 \
    -rss_limit_mb=2048 -print_final_stats=1 2>&1 | grep -E "^(stat::|==|Done|SUMMARY)" || true
  if ls "artifacts/$t"/crash-* >/dev/null 2>&1; then
    echo "$t: crashes found in artifacts/$t" >&2
    exit 1
  fi
done
