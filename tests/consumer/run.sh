#!/usr/bin/env bash
# Installs the built vlmkit into a scratch prefix, then configures, builds and
# runs tests/consumer against it. Args: <vlmkit build dir> <scratch dir>.
set -euo pipefail
build=$1; scratch=$2
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$scratch/prefix" "$scratch/build"
cmake --install "$build" --prefix "$scratch/prefix" >/dev/null
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S "$here" -B "$scratch/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$scratch/prefix" "${launcher[@]}" >/dev/null
cmake --build "$scratch/build"
"$scratch/build/consumer"
