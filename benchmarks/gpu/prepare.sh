#!/usr/bin/env bash
# Copies the header-only dependencies the GPU machines lack (nlohmann/json,
# Catch2 v2, OpenSSL's headers) from this Debian machine into .gpu/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/../.."
# Separate prefixes: a test that finds Catch2 must not also find a second
# copy of nlohmann/json (PyTorch 2.x bundles its own, which wins when present).
rm -rf .gpu && mkdir -p .gpu/include .gpu/json/include .gpu/ssl/include
cp -r /usr/include/catch2 .gpu/include/
cp -r /usr/include/nlohmann .gpu/json/include/
# libcrypto's headers (OpenSSL 3), for a machine that has libcrypto.so.3 but no
# -dev package; run.sh links them to that machine's own library.
cp -r /usr/include/openssl .gpu/ssl/include/
cp /usr/include/x86_64-linux-gnu/openssl/*.h .gpu/ssl/include/openssl/ 2>/dev/null || true
du -sh .gpu
