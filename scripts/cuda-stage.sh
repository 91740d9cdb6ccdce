#!/usr/bin/env bash
# Stages the GPU check for a GPU machine that has no Rust toolchain and no network, under the
# ignored folder .devcarry/ (about 55 MB): the `cuda` binary (scripts/cuda-build.sh, xz), MiniLM's
# tokenizer and config, its weights rounded to f16 (xz; the f32 checkpoint does not fit a 64 MiB
# transfer), Reuters-8 training rows, and scripts/cuda-device-run.sh as .devcarry/run.sh.
# There: `bash .devcarry/run.sh` (with $OUT set to a folder for the logs).
# Needs: scripts/fetch-assets.sh done, and a Python with torch + safetensors in TORCH_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS="${XPM_ASSETS:-$HOME/.cache/xpm-assets}"
PY="${TORCH_PYTHON:-python3}"
D=.devcarry
grep -qx "/$D/" .git/info/exclude 2>/dev/null || echo "/$D/" >>.git/info/exclude
mkdir -p "$D/minilm"
scripts/cuda-build.sh target/release/xpm-cuda
xz -T0 -6 -c target/release/xpm-cuda >"$D/xpm.xz"
for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
  cp "$ASSETS/minilm/$f" "$D/minilm/"
done
"$PY" - "$ASSETS/minilm/model.safetensors" "$D/model.f16.safetensors" <<'PYEOF'
import sys
from safetensors.torch import load_file, save_file
save_file({k: v.half().contiguous() for k, v in load_file(sys.argv[1]).items()}, sys.argv[2],
          metadata={"format": "pt"})
PYEOF
xz -T0 -6 -f "$D/model.f16.safetensors"
LD_LIBRARY_PATH= cargo run --release -q -- data import "$ASSETS/orange/reuters-r8-train.tab" \
  -o "$D/train.jsonl" --limit 960 --seed 0
cp scripts/cuda-device-run.sh "$D/run.sh"
du -sh "$D"
