#!/usr/bin/env bash
# Copies the header-only dependencies the GPU machines lack (nlohmann/json,
# Catch2 v2) from this Debian machine into .gpu/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/../.."
# Separate prefixes: a test that finds Catch2 must not also find a second
# copy of nlohmann/json (PyTorch 2.x bundles its own, which wins when present).
rm -rf .gpu && mkdir -p .gpu/include .gpu/json/include
cp -r /usr/include/catch2 .gpu/include/
cp -r /usr/include/nlohmann .gpu/json/include/
du -sh .gpu
