#!/usr/bin/env bash
# Installs what monet.cpp needs on Debian 12 (apt) and the Python test
# environment (.venv, sees Debian's numpy/torch through system site packages).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential cmake pkg-config git
  nlohmann-json3-dev libcli11-dev libgtest-dev libopenblas-openmp-dev libdnnl-dev libsqlite3-dev libcpp-httplib-dev libcairo2-dev
  libjpeg62-turbo-dev libpng-dev libwebp-dev
  python3 python3-dev python3-venv python3-numpy python3-pytest python3-torch python3-pil
  chromium chromium-driver
  clang-14 libclang-rt-14-dev
  openmpi-bin libopenmpi-dev
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r python/requirements.txt

# Hugging Face's CLIPVisionModel for the vision tests, apart from the main
# environment (python/requirements-hf-peer.txt says why).
if ! cmp -s python/requirements-hf-peer.txt .venv/hf-peer/requirements.txt; then
  rm -rf .venv/hf-peer
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --target .venv/hf-peer \
    -r python/requirements-hf-peer.txt
  cp python/requirements-hf-peer.txt .venv/hf-peer/requirements.txt
fi

# transformers 4.44 (the released Monet code's version) for the Hugging Face interop tests
if [ ! -x .venv-hf444/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv-hf444
fi
.venv-hf444/bin/python -m pip install -q --disable-pip-version-check -r python/requirements-hf444.txt
