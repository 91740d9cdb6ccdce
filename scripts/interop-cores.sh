#!/usr/bin/env bash
# Import/export throughput against the number of cores (docs/benchmarks.md, "Import and export"):
# the interop bench (benches/interop.rs) pinned with taskset to each core count given (default:
# 1, 2, 4, 8, … up to the machine's), one table per count in $OUT and a summary on stdout.
#
# Here: `scripts/interop-cores.sh [N…]` builds the bench (release) and runs it.
# On a machine without the build tree (the lent GPU machine: 16 cores, no Rust toolchain):
# `scripts/interop-cores.sh --stage` here packs the stripped bench and `xpm` binaries into
# .devcarry-interop/ (~15 MB, carried by the device tool), and there
# `bash scripts/interop-cores.sh [N…]` finds and unpacks them (where there is no cargo).
# Env: QUICK=1 (the bench's --quick: 64 modules), XPM_BENCH_DIR (default /dev/shm: the files
# in memory), OUT (the tables go to $OUT/interop-cores where it is set, as the device tool
# does; else to target/interop-cores).
set -euo pipefail
cd "$(dirname "$0")/.."
D=.devcarry-interop
bench_path() {
  cargo bench --bench interop --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "interop" and m.get("executable"):
        print(m["executable"])'
}
if [ "${1:-}" = "--stage" ]; then
  grep -qx "/$D/" .git/info/exclude 2>/dev/null || echo "/$D/" >>.git/info/exclude
  cargo build --release -q --bin xpm
  B=$(bench_path)
  mkdir -p "$D"
  objcopy --strip-all "$B" "$D/interop" && xz -T0 -6 -f "$D/interop"
  objcopy --strip-all target/release/xpm "$D/xpm" && xz -T0 -6 -f "$D/xpm"
  du -sh "$D"
  exit 0
fi
if ! command -v cargo >/dev/null && [ -f "$D/interop.xz" ]; then
  T=$(mktemp -d)
  trap 'rm -rf "$T"' EXIT
  xz -dc "$D/interop.xz" >"$T/interop" && xz -dc "$D/xpm.xz" >"$T/xpm" && chmod +x "$T/interop" "$T/xpm"
  BENCH="$T/interop"
  export XPM_BENCH_XPM="$T/xpm"
else
  BENCH=$(bench_path)
fi
NPROC=$(nproc)
if [ $# -gt 0 ]; then COUNTS="$*"; else
  COUNTS=""; for n in 1 2 4 8 16 32 64; do [ "$n" -le "$NPROC" ] && COUNTS="$COUNTS $n"; done
fi
OUTDIR="${OUT:+$OUT/interop-cores}"; OUTDIR="${OUTDIR:-target/interop-cores}"
mkdir -p "$OUTDIR"
export XPM_BENCH_DIR="${XPM_BENCH_DIR:-/dev/shm}"
grep -m1 "model name" /proc/cpuinfo | tee "$OUTDIR/cpu.txt"
for n in $COUNTS; do
  echo "== $n cores (taskset -c 0-$((n - 1)))"
  XPM_BENCH_OUT="$OUTDIR/cores-$n.md" taskset -c "0-$((n - 1))" "$BENCH" --bench ${QUICK:+--quick} \
    2>"$OUTDIR/cores-$n.log" | grep -E "^\| (plain|xpm|sha256)|release"
done
