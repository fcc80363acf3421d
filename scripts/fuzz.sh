#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz (clang, ASan + UBSan, in
# build-fuzz/) and runs each for FUZZ_SECONDS (default 60) from its seed
# corpus. Prints the executions per target; fails on any crash, leak,
# timeout, out-of-memory or sanitizer report (the input that caused it is
# left in build-fuzz/ as crash-*, leak-*, timeout-* or oom-*).
#   bash scripts/fuzz.sh                        # every target, 60 s each
#   FUZZ_SECONDS=10 bash scripts/fuzz.sh config  # some targets
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-60}"
build=build-fuzz
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
mkdir -p "$build"
if ! { cmake -S . -B "$build" -DMONET_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
         -DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14 "${launcher[@]}" &&
       cmake --build "$build" -j"$(nproc)" --target fuzz_all; } >"$build/build.log" 2>&1; then
  tail -n 50 "$build/build.log"
  echo "fuzz: the build failed (clang-14 and libclang-rt-14-dev: bash scripts/deps.sh)"
  exit 1
fi

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors config tokenizer_json tokenizer_model chat mask index http_viewer http_openai)
export ASAN_OPTIONS="detect_leaks=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
failed=()
for t in "${targets[@]}"; do
  work=$(mktemp -d)  # new inputs go here; the committed seeds are only read
  log="$build/fuzz_$t.log"
  rc=0
  "$build/tests/fuzz/fuzz_$t" -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2048 -max_len=65536 \
    -dict=tests/fuzz/json.dict -print_final_stats=1 -artifact_prefix="$build/" \
    "$work" "tests/fuzz/corpus/$t" >"$log" 2>&1 || rc=$?
  rm -rf "$work"
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  if [ "$rc" -ne 0 ] || grep -qE "ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:" "$log"; then
    failed+=("$t")
    echo "fuzz $t: FAILED (exit $rc); the end of $log:"
    tail -n 40 "$log"
  else
    printf 'fuzz %-16s %10s executions in %s s, no findings\n' "$t" "${execs:-?}" "$seconds"
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: findings in ${failed[*]}"
  exit 1
fi
