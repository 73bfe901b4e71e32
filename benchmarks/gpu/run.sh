#!/usr/bin/env bash
# Builds vlmkit against the machine's own PyTorch (2.x with CUDA), runs the C++
# tests on it, then the CUDA checks (tests/gpu/cuda_checks.py). Used on the
# GPU machines, which have PyTorch, CMake, ninja and pybind11 but no Debian
# packages: nlohmann/json and Catch2 headers come from .gpu/ (made by
# `bash benchmarks/gpu/prepare.sh` on a Debian machine and carried along).
# Results go to $OUT (or ./gpu-results).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
log "$(date -u) $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null)"
log "torch $($PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())')"
TORCH_PREFIX=$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')
PYBIND_DIR=$($PY -c 'import pybind11; print(pybind11.get_cmake_dir())' 2>/dev/null || true)
start=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DVLMKIT_BUILD_TESTS=ON \
  -DVLMKIT_BUILD_PYTHON=ON -DVLMKIT_USE_CCACHE=OFF -DVLMKIT_WITH_OPENCV=OFF -DPython_EXECUTABLE="$(command -v $PY)" \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX;$PWD/.gpu;$PWD/.gpu/json" ${PYBIND_DIR:+-Dpybind11_DIR=$PYBIND_DIR} \
  > "$OUT/configure.log" 2>&1 || { log "configure FAILED"; tail -30 "$OUT/configure.log"; exit 1; }
cmake --build build-gpu --parallel 16 --target vlmkit vlmkit_tests example_encoder_decoder > "$OUT/build_cpp.log" 2>&1 \
  && log "C++ build OK in $(( $(date +%s) - start )) s" || { log "C++ build FAILED"; grep -m5 -A5 error "$OUT/build_cpp.log"; }
ctest --test-dir build-gpu -E consumer_project -j 8 --output-on-failure > "$OUT/ctest.log" 2>&1 \
  && log "ctest OK: $(grep -E 'tests passed' "$OUT/ctest.log")" || { log "ctest FAILED"; tail -40 "$OUT/ctest.log"; }
cmake --build build-gpu --parallel 16 --target _C > "$OUT/build_python.log" 2>&1 \
  && log "Python extension build OK" || { log "Python extension FAILED"; grep -m5 -A5 error "$OUT/build_python.log"; exit 1; }
PKG=$(mktemp -d)
cp -r python/vlmkit "$PKG/" && cp build-gpu/_C*.so "$PKG/vlmkit/"
PYTHONPATH="$PKG" $PY tests/gpu/cuda_checks.py 2>&1 | tee "$OUT/cuda_checks.log"
log "cuda checks exit ${PIPESTATUS[0]}"
