#!/usr/bin/env bash
# The GPU check for `xpm train --device cuda` (docs/training.md, "Devices"): builds xpm with the
# `cuda` feature and trains a few steps of each method on MiniLM, on the GPU and on the CPU,
# printing the median step times. Needs the CUDA toolkit (nvcc) and a GPU.
#
# Offline machines: run `cargo vendor vendor > .cargo-vendor.toml` on a networked machine first
# and carry `vendor/`, the assets directory (XPM_ASSETS) and this repository along; the script
# uses vendored crates when `vendor/` exists.
# Usage: scripts/cuda-check.sh [STEPS]   (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-10}"
ASSETS="${XPM_ASSETS:-$HOME/.cache/xpm-assets}"
OFFLINE=()
if [ -d vendor ]; then
  mkdir -p .cargo
  cat > .cargo/config.toml <<'TOML'
[source.crates-io]
replace-with = "vendored-sources"
[source.vendored-sources]
directory = "vendor"
TOML
  OFFLINE=(--offline)
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
cargo build --release --features cuda "${OFFLINE[@]}"
XPM=target/release/xpm
WORK="$(mktemp -d)"
"$XPM" data import "$ASSETS/orange/reuters-r8-train.tab" -o "$WORK/train.jsonl" --limit $((32 * (STEPS + 6))) --seed 0
for device in cuda cpu; do
  for method in sparse lora full; do
    "$XPM" --home "$WORK/home" -q train --base "$ASSETS/minilm" --data "$WORK/train.jsonl" \
      --method "$method" --keep-ratio 0.02 --name "check-$method" -o "$WORK/$method.xpm" \
      --batch-size 32 --max-seq-len 64 --max-steps $((STEPS + 2)) --device "$device" \
      --json-log "$WORK/$device-$method.jsonl" >/dev/null
    python3 - "$WORK/$device-$method.jsonl" "$device" "$method" <<'PY'
import json, statistics, sys
t = [json.loads(l)["step_time_s"] for l in open(sys.argv[1]) if "step_time_s" in l][2:]
print(f"{sys.argv[2]:>5} {sys.argv[3]:>6}: median {statistics.median(t):.3f} s/step over {len(t)} steps")
PY
  done
done
