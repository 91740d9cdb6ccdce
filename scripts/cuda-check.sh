#!/usr/bin/env bash
# The GPU check for `xpm train --device cuda` (docs/training.md, "Devices"): trains a few steps of
# each method (sparse 2 %, LoRA r8, full) on MiniLM, batch 32, seq 64, on the GPU and then on the
# CPU with the same seed, and prints per method the median step time on each device and the
# largest difference between the two devices' losses over the steps.
#
# Usage: scripts/cuda-check.sh [STEPS]   (default 10)
# Environment:
#   XPM_BIN   a prebuilt `xpm` with the `cuda` feature (see scripts/cuda-build.sh); without it the
#             script builds one with `cargo build --release --features cuda` (needs nvcc).
#   MINILM    the model directory (default $XPM_ASSETS/minilm). If it has config.json and
#             tokenizer.json but no model.safetensors, the script writes weights initialised at
#             random (torch, seed 0) from config.json: step times depend only on the shapes.
#   DATA      train JSONL (default: imported from the assets' reuters-r8-train.tab).
#   OUTDIR    where the logs and summary.txt go (default: a temporary directory).
set -uo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-10}"
ASSETS="${XPM_ASSETS:-$HOME/.cache/xpm-assets}"
MINILM="${MINILM:-$ASSETS/minilm}"
WORK="${OUTDIR:-$(mktemp -d)}"
mkdir -p "$WORK"
SUMMARY="$WORK/summary.txt"
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$SUMMARY"
if [ -n "${XPM_BIN:-}" ]; then
  XPM="$XPM_BIN"
else
  OFFLINE=()
  if [ -d vendor ]; then
    mkdir -p .cargo
    printf '[source.crates-io]\nreplace-with = "vendored-sources"\n[source.vendored-sources]\ndirectory = "vendor"\n' >.cargo/config.toml
    OFFLINE=(--offline)
  fi
  cargo build --release --features cuda "${OFFLINE[@]}" || exit 1
  XPM=target/release/xpm
fi

if [ ! -f "$MINILM/model.safetensors" ]; then
  say "note: $MINILM has no weights; writing MiniLM-shaped weights initialised at random (seed 0)"
  python3 - "$MINILM" <<'PY' || exit 1
import sys, torch
from transformers import BertConfig, BertModel
torch.manual_seed(0)
d = sys.argv[1]
m = BertModel(BertConfig.from_json_file(f"{d}/config.json"), add_pooling_layer=False)
from safetensors.torch import save_file
save_file({k: v.contiguous() for k, v in m.state_dict().items()}, f"{d}/model.safetensors")
PY
fi

DATA="${DATA:-$WORK/train.jsonl}"
if [ ! -f "$DATA" ]; then
  "$XPM" data import "$ASSETS/orange/reuters-r8-train.tab" -o "$DATA" --limit $((32 * (STEPS + 6))) --seed 0 || exit 1
fi

status=0
for method in sparse lora full; do
  for device in cuda cpu; do
    if ! "$XPM" --home "$WORK/home" -q train --base "$MINILM" --data "$DATA" \
      --method "$method" --keep-ratio 0.02 --name "check-$method" -o "$WORK/$device-$method.xpm" \
      --batch-size 32 --max-seq-len 64 --max-steps $((STEPS + 2)) --device "$device" --seed 0 \
      --json-log "$WORK/$device-$method.jsonl" >"$WORK/$device-$method.out" 2>&1; then
      say "$device $method: FAILED"
      tail -20 "$WORK/$device-$method.out" | tee -a "$SUMMARY"
      status=1
    fi
  done
  python3 - "$WORK" "$method" <<'PY' | tee -a "$SUMMARY"
import json, os, statistics, sys
work, method = sys.argv[1], sys.argv[2]
logs = {}
for dev in ("cuda", "cpu"):
    p = f"{work}/{dev}-{method}.jsonl"
    rows = [json.loads(l) for l in open(p)] if os.path.exists(p) else []
    logs[dev] = [r for r in rows if "step_time_s" in r]
for dev, rows in logs.items():
    t = [r["step_time_s"] for r in rows][2:]
    if t:
        print(f"{dev:>5} {method:>6}: median {statistics.median(t):.4f} s/step over {len(t)} steps "
              f"(first 2 left out); losses {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}")
a, b = logs["cuda"], logs["cpu"]
if a and b:
    d = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
    print(f"      {method:>6}: max |loss(cuda) - loss(cpu)| over {min(len(a), len(b))} steps = {d:.2e}")
PY
done
echo "logs in $WORK"
exit $status
