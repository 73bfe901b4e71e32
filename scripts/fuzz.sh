#!/usr/bin/env bash
# Runs each libFuzzer target for a time budget and fails loudly.
#
#   scripts/fuzz.sh [--bin-dir DIR] [--corpus DIR] [--work DIR] [--seconds N]
#                   [--seed N] [--rss-mb N] [--merge] [TARGET ...]
#
# The targets are the folders of the committed seed corpus (tests/fuzz/corpus/<target>)
# unless named. Each target must exist as <bin-dir>/<target>; a run fails when
#   - the binary is missing or not executable,
#   - it exits with a non-zero status (a crash, a sanitizer report, an exit before
#     libFuzzer starts),
#   - it leaves any artifact (crash-, leak-, timeout-, oom-, slow-unit-, ...),
#   - or its log does not show libFuzzer running it ("Done N runs").
# Every target runs even after one fails; the status is non-zero if any failed.
#
# Corpus: libFuzzer writes the inputs that add coverage into the work corpus
# (<work>/<target>, kept between runs on one machine and seeded from the committed
# corpus), so long runs build on each other. `--merge` instead folds the work corpus
# into the committed one, keeping only inputs that add coverage (libFuzzer -merge=1);
# commit what it adds.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin_dir=$root/build-asan/tests/fuzz
corpus=$root/tests/fuzz/corpus
work=$root/build-asan/fuzz-corpus
seconds=30
seed=1
rss_mb=4096
merge=0
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir=$2; shift 2 ;;
    --corpus) corpus=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --rss-mb) rss_mb=$2; shift 2 ;;
    --merge) merge=1; shift ;;
    -h|--help) sed -n 2,21p "$0"; exit 0 ;;
    -*) echo "fuzz: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
case "$seconds" in ''|*[!0-9]*) echo "fuzz: --seconds expects a whole number, got '$seconds'" >&2; exit 2 ;; esac
if [ ${#targets[@]} -eq 0 ]; then
  for d in "$corpus"/*/; do [ -d "$d" ] && targets+=("$(basename "$d")"); done
fi
if [ ${#targets[@]} -eq 0 ]; then
  echo "fuzz: no targets: $corpus has no corpus folders" >&2
  exit 1
fi

failed=()
for t in "${targets[@]}"; do
  bin=$bin_dir/$t
  if [ ! -x "$bin" ]; then
    echo "fuzz: $t: FAILED: no executable $bin (target not built?)"
    failed+=("$t"); continue
  fi
  if [ ! -d "$corpus/$t" ]; then
    echo "fuzz: $t: FAILED: no seed corpus $corpus/$t"
    failed+=("$t"); continue
  fi
  mkdir -p "$work/$t"
  art=$work/$t.artifacts
  rm -rf "$art"; mkdir -p "$art"
  log=$work/$t.log
  if [ "$merge" = 1 ]; then
    before=$(ls "$corpus/$t" | wc -l)
    "$bin" -merge=1 -rss_limit_mb="$rss_mb" -artifact_prefix="$art/" "$corpus/$t" "$work/$t" >"$log" 2>&1
    rc=$?
    echo "fuzz: $t: merge added $(( $(ls "$corpus/$t" | wc -l) - before )) inputs to $corpus/$t (exit $rc)"
    [ $rc -eq 0 ] || { tail -20 "$log"; failed+=("$t"); }
    continue
  fi
  echo "fuzz: $t for $seconds s (seed $seed, work corpus $work/$t)"
  # A hard wall-clock bound on top of libFuzzer's own, for a target that hangs
  # before libFuzzer's timers start.
  timeout --kill-after=10 $((seconds * 2 + 60)) \
    "$bin" -max_total_time="$seconds" -seed="$seed" -rss_limit_mb="$rss_mb" -timeout=20 \
      -print_final_stats=1 -artifact_prefix="$art/" "$work/$t" "$corpus/$t" >"$log" 2>&1
  rc=$?
  grep -E "^(stat::number_of_executed_units|stat::new_units_added|SUMMARY|INFO: Seed)" "$log" | sed "s/^/  /"
  why=()
  [ $rc -eq 0 ] || why+=("exit status $rc")
  artifacts=$(ls -A "$art")
  [ -z "$artifacts" ] || why+=("artifacts: $(echo $artifacts)")
  grep -qE "^Done [0-9]+ runs" "$log" || why+=("libFuzzer did not run it to the end (no 'Done N runs' in its log)")
  if [ ${#why[@]} -gt 0 ]; then
    echo "fuzz: $t: FAILED: $(IFS=';'; echo "${why[*]}")"
    echo "  last lines of $log:"; tail -25 "$log" | sed "s/^/    /"
    [ -z "$artifacts" ] || echo "  reproduce: $bin $art/<artifact>"
    failed+=("$t")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: ${#failed[@]} of ${#targets[@]} targets failed: ${failed[*]}"
  exit 1
fi
echo "fuzz: all ${#targets[@]} targets ran clean"
