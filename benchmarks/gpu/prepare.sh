#!/usr/bin/env bash
# Copies the header-only dependencies the GPU machines lack (nlohmann/json,
# Catch2 v2) from this Debian machine into .gpu/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .gpu && mkdir -p .gpu/include
cp -r /usr/include/nlohmann .gpu/include/
cp -r /usr/include/catch2 .gpu/include/
du -sh .gpu
