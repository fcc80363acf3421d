#!/usr/bin/env bash
# The whole test suite: C++ unit tests (CTest/GoogleTest), then the Python
# golden tests against the float64 reference and the tokenizer parity tests.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/deps.sh
bash scripts/build.sh
(cd build && ctest --output-on-failure -j"$(nproc)")
MONET_BIN="$PWD/build/monet" .venv/bin/python -W ignore::DeprecationWarning -m pytest -q tests/python "$@"
# CI: every libFuzzer target (ASan + UBSan) for a bounded time, 30 s each by default.
if [ "${CI:-}" = true ]; then FUZZ_SECONDS="${FUZZ_SECONDS:-30}" bash scripts/fuzz.sh; fi
