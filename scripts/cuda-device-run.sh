#!/bin/bash
# Runs on the GPU machine from the repository root, after scripts/cuda-stage.sh (see there).
# Device run: GPU check on the real MiniLM weights (f16-rounded, carried compressed), PyTorch on
# the same GPU, and CPU thread scaling of xpm vs PyTorch.
set -o pipefail; export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/xpm-gpu-check}"; mkdir -p "$OUT"
D=.devcarry
LIBS=$(for n in libcublas.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13 libcublasLt.so.13; do find /opt /usr/local /usr/lib -name "$n" 2>/dev/null | head -1; done | xargs -r -n1 dirname | sort -u | paste -sd:)
export LD_LIBRARY_PATH=$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
xz -dc $D/xpm.xz > /tmp/xpm && chmod +x /tmp/xpm
cp -r $D/minilm /tmp/minilm && xz -dc $D/model.f16.safetensors.xz > /tmp/f16.st
python3 -c "
from safetensors.torch import load_file, save_file
save_file({k: v.float().contiguous() for k, v in load_file('/tmp/f16.st').items()}, '/tmp/minilm/model.safetensors', metadata={'format': 'pt'})"
XPM_BIN=/tmp/xpm MINILM=/tmp/minilm DATA=$D/train.jsonl OUTDIR=/tmp/check timeout 300 bash scripts/cuda-check.sh 20 2>&1 | tee $OUT/check.log
timeout 120 python3 benches/torch_train.py --mode all --steps 20 --model /tmp/minilm --data $D/train.jsonl --device cuda 2>&1 | grep median | tee $OUT/torch-cuda.log
for T in 2 4 8 16; do
  RAYON_NUM_THREADS=$T CANDLE_NUM_THREADS=$T /tmp/xpm --home /tmp/h -q train --base /tmp/minilm --data $D/train.jsonl --method sparse --keep-ratio 0.02 --name s -o /tmp/s$T.xpm --batch-size 32 --max-seq-len 64 --max-steps 12 --json-log /tmp/t$T.jsonl >/dev/null 2>&1
  python3 -c "
import json, statistics
t = [json.loads(l)['step_time_s'] for l in open('/tmp/t$T.jsonl') if 'step_time_s' in l][2:]
print('xpm sparse 2 %% cpu threads $T: median %.4f s' % statistics.median(t))" | tee -a $OUT/scale.log
  timeout 120 python3 benches/torch_train.py --mode masked-dense --steps 10 --model /tmp/minilm --data $D/train.jsonl --threads $T 2>&1 | grep median | tee -a $OUT/scale.log
done
tar czf $OUT/logs.tgz -C /tmp/check --exclude home --exclude '*.xpm' .
