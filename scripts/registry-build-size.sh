#!/usr/bin/env bash
# Clean release builds of the registry server at two revisions, side by side: build time, crates
# compiled, binary size, dependency count, and ML crates in its dependency tree.
# Usage: scripts/registry-build-size.sh BEFORE AFTER   (git revisions; figures in docs/benchmarks.md)
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'git worktree remove --force "$work/before" 2>/dev/null; git worktree remove --force "$work/after" 2>/dev/null; rm -rf "$work"' EXIT
for side in before after; do
  rev="$1"; [ "$side" = after ] && rev="$2"
  git worktree add -q "$work/$side" "$rev"
  ( cd "$work/$side"
    start=$(date +%s.%N)
    CARGO_TARGET_DIR="$work/target-$side" cargo build --release --locked -p xpm-registry >"$work/$side.log" 2>&1
    end=$(date +%s.%N)
    crates=$(grep -c Compiling "$work/$side.log")
    size=$(stat -c %s "$work/target-$side/release/xpm-registry")
    deps=$(cargo tree --locked -p xpm-registry -e normal --prefix none | sort -u | wc -l)
    ml=$(cargo tree --locked -p xpm-registry | grep -cE "candle|tokenizers|hf-hub|plotters" || true)
    echo "$side ($rev): build $(echo "$end - $start" | bc) s, $crates crates compiled, binary $size bytes, $deps normal deps, ML-crate lines: $ml" )
done
