#!/usr/bin/env bash
# Builds vlmkit against the machine's own PyTorch (2.x with CUDA), runs the CUDA
# checks (tests/gpu/cuda_checks.py), the benchmark suite on the GPU beside the
# plain-PyTorch peer (`vlmkit bench --device cuda`), then the C++ tests. Used on
# the GPU machines, which have PyTorch, CMake, ninja and pybind11 but no Debian
# packages: nlohmann/json, Catch2 and OpenSSL headers come from .gpu/ (made by
# `bash benchmarks/gpu/prepare.sh` on a Debian machine and carried along).
# Results go to $OUT (or ./gpu-results): summary.txt, cuda_checks.log,
# suite.log, results.md, results.json, ctest.log; build logs stay in $LOGS.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-results}
LOGS=${LOGS:-$(mktemp -d)}
QUICK=${QUICK:---quick}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
fail_tail() { log "$1"; tail -n "${3:-40}" "$2" | tee -a "$OUT/summary.txt"; }
log "$(date -u) $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
log "torch $($PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())'); $(${CXX:-c++} --version | head -1)"
TORCH_PREFIX=$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')
PYBIND_DIR=$($PY -c 'import pybind11; print(pybind11.get_cmake_dir())' 2>/dev/null || true)
SSL=()
if [ ! -f /usr/include/openssl/evp.h ] && [ -d .gpu/ssl/include ]; then
  # No OpenSSL -dev package: the carried headers, the machine's own libcrypto.so.3.
  lib=$(ldconfig -p | awk '/libcrypto\.so\.3 .*x86-64/ {print $NF; exit}')
  mkdir -p .gpu/ssl/lib && ln -sf "$lib" .gpu/ssl/lib/libcrypto.so
  SSL=(-DOPENSSL_ROOT_DIR="$PWD/.gpu/ssl" -DOPENSSL_INCLUDE_DIR="$PWD/.gpu/ssl/include"
       -DOPENSSL_CRYPTO_LIBRARY="$PWD/.gpu/ssl/lib/libcrypto.so")
  log "OpenSSL: carried headers, $lib"
fi
start=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DVLMKIT_BUILD_TESTS=ON \
  -DVLMKIT_BUILD_PYTHON=ON -DVLMKIT_USE_CCACHE=OFF -DVLMKIT_WITH_OPENCV=OFF -DPython_EXECUTABLE="$(command -v $PY)" \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX;$PWD/.gpu;$PWD/.gpu/json" ${PYBIND_DIR:+-Dpybind11_DIR=$PYBIND_DIR} "${SSL[@]}" \
  > "$LOGS/configure.log" 2>&1 || { fail_tail "configure FAILED" "$LOGS/configure.log"; exit 1; }
cmake --build build-gpu --parallel "$(nproc)" --target vlmkit _C > "$LOGS/build.log" 2>&1 \
  || { log "build FAILED"; grep -m8 -B2 -A8 "error" "$LOGS/build.log" | tee -a "$OUT/summary.txt"; exit 1; }
log "library and Python extension built in $(( $(date +%s) - start )) s"
PKG=$(mktemp -d)
cp -r python/vlmkit "$PKG/" && cp build-gpu/_C*.so "$PKG/vlmkit/"
export PYTHONPATH="$PKG" PYTHONUNBUFFERED=1
timeout 240 $PY tests/gpu/cuda_checks.py > "$OUT/cuda_checks.log" 2>&1
log "cuda checks exit $?: $(grep -c ': PASS' "$OUT/cuda_checks.log") pass, $(grep -c ': FAIL' "$OUT/cuda_checks.log") fail"
grep -E "FAIL|Error|TIMING" "$OUT/cuda_checks.log" | head -20 | tee -a "$OUT/summary.txt"
start=$(date +%s)
timeout "${SUITE_TIMEOUT:-300}" $PY -m vlmkit.bench.suite --device cuda $QUICK --out "$LOGS/bench" > "$OUT/suite.log" 2>&1
log "suite exit $? in $(( $(date +%s) - start )) s"
cp "$LOGS/bench/results.md" "$LOGS/bench/results.json" "$OUT/" 2>/dev/null || tail -30 "$OUT/suite.log" | tee -a "$OUT/summary.txt"
start=$(date +%s)
cmake --build build-gpu --parallel "$(nproc)" --target vlmkit_tests > "$LOGS/build_tests.log" 2>&1 \
  || { log "test build FAILED"; grep -m8 -B2 -A8 "error" "$LOGS/build_tests.log" | tee -a "$OUT/summary.txt"; exit 1; }
timeout "${CTEST_TIMEOUT:-150}" ctest --test-dir build-gpu -E consumer_project -j "$(nproc)" --output-on-failure \
  > "$OUT/ctest.log" 2>&1
log "ctest exit $? in $(( $(date +%s) - start )) s: $(grep -E 'tests passed|tests failed' "$OUT/ctest.log")"
