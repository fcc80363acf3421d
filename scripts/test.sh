#!/usr/bin/env bash
# The whole test suite:
#  1. the native build (build/): C++ unit and per-op tests (CTest/GoogleTest),
#     then the Python tests (golden tests against the float64 reference,
#     tokenizer parity, training vs PyTorch, the viewer in Chromium, the
#     Python package (built by scripts/build_python.sh), ...);
#  2. the portable build (build-portable/, -DMONET_NATIVE=OFF, kernels chosen
#     at run time): C++ tests and the golden tests;
#  3. the AddressSanitizer + UndefinedBehaviorSanitizer build (build-asan/):
#     C++ tests and the golden tests;
#  4. the libFuzzer targets (tests/fuzz, scripts/fuzz.sh) for FUZZ_SECONDS each.
# MONET_TEST_QUICK=1 runs only the first stage. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && [ -x .venv-hf444/bin/python ] && .venv/bin/python -c "import nanobind, scikit_build_core" 2>/dev/null ||
  bash scripts/deps.sh
JOBS="$(nproc)"
PYTEST=(.venv/bin/python -W ignore::DeprecationWarning -m pytest -q)

bash scripts/build.sh
bash scripts/build_python.sh   # the Python package, installed into .venv
(cd build && ctest --output-on-failure -j"$JOBS")
MONET_BIN="$PWD/build/monet" "${PYTEST[@]}" tests/python "$@"
[ "${MONET_TEST_QUICK:-0}" = 1 ] && exit 0

echo "--- portable build (MONET_NATIVE=OFF) ---"
cmake -S . -B build-portable -DCMAKE_BUILD_TYPE=Release -DMONET_NATIVE=OFF >/dev/null
cmake --build build-portable -j"$JOBS" --target monet monet_tests
(cd build-portable && ctest --output-on-failure -j"$JOBS")
MONET_BIN="$PWD/build-portable/monet" "${PYTEST[@]}" tests/python/test_golden.py

echo "--- AddressSanitizer + UndefinedBehaviorSanitizer build ---"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMONET_SANITIZE=address,undefined >/dev/null
cmake --build build-asan -j"$JOBS" --target monet monet_tests
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  LSAN_OPTIONS="suppressions=$PWD/tests/lsan.supp"
(cd build-asan && ctest --output-on-failure -j"$JOBS")
MONET_BIN="$PWD/build-asan/monet" "${PYTEST[@]}" tests/python/test_golden.py

echo "--- libFuzzer targets (ASan + UBSan), FUZZ_SECONDS each (default 30) ---"
FUZZ_SECONDS="${FUZZ_SECONDS:-30}" bash scripts/fuzz.sh
