#!/usr/bin/env bash
# Builds the Python package (wheel in build-python/dist; CMake build kept in
# build-python/ so that a rebuild only recompiles what changed) and installs
# it into .venv: `import monet` there. A user's equivalent: pip install .
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f build-python/dist/monet_cpp-*.whl
# build isolation off: scikit-build-core and nanobind are pinned in python/requirements.txt
.venv/bin/python -m pip wheel . -q --no-deps --no-build-isolation -w build-python/dist
.venv/bin/python -m pip install -q --no-deps --force-reinstall build-python/dist/monet_cpp-*.whl
