#!/usr/bin/env bash
# Installs vlmkit's Debian 12 dependencies, skipping what is already there, and
# makes sure OpenBLAS serves LibTorch's BLAS calls. Idempotent; run as root or
# with sudo available.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build ccache git
  libtorch-dev python3-torch libopenblas0-pthread
  libopencv-dev libjpeg-dev pybind11-dev python3-pybind11 libfmt-dev catch2
  libsentencepiece-dev nlohmann-json3-dev libbenchmark-dev libssl-dev clang
  python3-dev python3-venv python3-pip python3-setuptools python3-wheel
  python3-pytest python3-nbclient python3-nbformat python3-ipykernel
  python3-matplotlib python3-tqdm python3-numpy python3-pil python3-torchvision
  python3-onnx python3-sklearn
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${#missing[@]} Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup: all ${#PACKAGES[@]} Debian packages present"
fi

# LibTorch links libblas.so.3; make that OpenBLAS (about 30x the GEMM speed of
# the reference BLAS, measured).
alt=libblas.so.3-x86_64-linux-gnu
openblas=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
if [ -e "$openblas" ] && [ "$(readlink -f /etc/alternatives/$alt 2>/dev/null)" != "$openblas" ]; then
  echo "setup: pointing $alt at OpenBLAS"
  $SUDO update-alternatives --set "$alt" "$openblas"
fi

# ONNX Runtime for the export tests, run by Node (docs/deploy.md): the npm
# package carries its Linux x64 CPU binary; --ignore-scripts skips the install
# script, which only fetches GPU extras from a host that may be unreachable.
ORT_DIR="$(cd "$(dirname "$0")/.." && pwd)/.cache/onnxruntime-node"
if ! command -v npm >/dev/null 2>&1; then
  echo "setup: installing nodejs and npm"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nodejs npm
fi
if [ ! -f "$ORT_DIR/node_modules/onnxruntime-node/package.json" ]; then
  echo "setup: npm install onnxruntime-node into $ORT_DIR"
  mkdir -p "$ORT_DIR"
  if ! (cd "$ORT_DIR" && npm install --silent --no-audit --no-fund --ignore-scripts onnxruntime-node@1.20.1 >/dev/null); then
    echo "setup: npm could not install onnxruntime-node; the ONNX Runtime export tests will be skipped" >&2
  fi
fi
