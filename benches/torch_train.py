"""PyTorch CPU baseline for xpm's training step.

Measures the wall time of one training step (forward + backward + AdamW step,
zero_grad included) for sentence-transformers/all-MiniLM-L6-v2 with mean
pooling over the attention mask and a linear head nn.Linear(384, C)
(init normal std 0.02, bias 0), encoder dropout off, as xpm trains it.

Modes (--mode, or --mode all to run each in turn in one process):
  head          only the head trains; encoder frozen
  masked-dense  attention q/k/v/o weights get a dense trainable delta (zeros)
                under a fixed random binary mask keeping --keep-ratio of the
                entries; forward uses W0 + M * dW (+ head)
  lora          hand-written LoRA r=8, alpha=16, dropout 0 on q/k/v/o (+ head)
  full          every encoder parameter + head
  full-attn     the attention q/k/v/o weights + head: what xpm's `--method full`
                trains (the same weights; biases and the rest frozen)

Batches: the first steps*batch examples of --data (JSONL {"text","label"}),
in file order, cycling; truncated to --max-seq-len, each batch padded to its
longest sequence; tokenized before timing. Labels map to ints by sorted label
set. Warmup steps are not timed; median_s is the median of the timed steps.
peak_rss_mb is getrusage's ru_maxrss, the process-wide peak so far: with
--mode all it is cumulative over the modes run before it.
trainable_params counts every trainable element (dense deltas in full);
effective_trainable_params counts only mask-selected delta entries.

Install (CPU torch; the PyTorch wheel index may be unreachable, plain PyPI works):
  python3 -m venv /work/.venv-torch
  /work/.venv-torch/bin/pip install torch transformers
Run (add `--device cuda` for the GPU check, `scripts/cuda-check.sh`):
  /work/.venv-torch/bin/python benches/torch_train.py --mode all --threads 2 --json \\
      --model ~/.cache/xpm-assets/minilm --data /tmp/r8/train.jsonl
"""
import argparse
import json
import os
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

MODES = ["head", "masked-dense", "lora", "full", "full-attn"]
ATTN_SUFFIXES = ("attention.self.query", "attention.self.key",
                 "attention.self.value", "attention.output.dense")


class MaskedDelta(nn.Module):
    """F.linear(x, W0 + M * dW, b) with W0, b frozen and dW trainable."""

    def __init__(self, lin: nn.Linear, keep_ratio: float):
        super().__init__()
        w = lin.weight.detach()
        self.register_buffer("w0", w.clone())
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach().clone())
        n = w.numel()
        k = max(1, round(keep_ratio * n))
        mask = torch.zeros(n)
        mask[torch.randperm(n)[:k]] = 1.0
        self.register_buffer("mask", mask.view_as(w))
        self.delta = nn.Parameter(torch.zeros_like(w))

    def forward(self, x):
        return F.linear(x, self.w0 + self.mask * self.delta, self.bias)


class LoRALinear(nn.Module):
    """base(x) + (alpha/r) * x A^T B^T; A kaiming-uniform, B zeros, dropout 0."""

    def __init__(self, lin: nn.Linear, r: int = 8, alpha: float = 16.0):
        super().__init__()
        self.base = lin
        self.a = nn.Parameter(torch.empty(r, lin.in_features))
        self.b = nn.Parameter(torch.zeros(lin.out_features, r))
        nn.init.kaiming_uniform_(self.a, a=5 ** 0.5)
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.a), self.b) * self.scale


class Classifier(nn.Module):
    def __init__(self, encoder, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1e-9))


def replace_attn_linears(encoder, make):
    for name, mod in list(encoder.named_modules()):
        if name.endswith(ATTN_SUFFIXES):
            parent_name, child = name.rsplit(".", 1)
            setattr(encoder.get_submodule(parent_name), child, make(mod))


def build(mode, args, num_classes):
    torch.manual_seed(0)
    enc = AutoModel.from_pretrained(args.model, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    model = Classifier(enc, num_classes)
    if mode != "full":
        enc.requires_grad_(False)
    if mode == "masked-dense":
        replace_attn_linears(enc, lambda m: MaskedDelta(m, args.keep_ratio))
    elif mode == "lora":
        replace_attn_linears(enc, lambda m: LoRALinear(m))
    elif mode == "full-attn":
        for name, mod in enc.named_modules():
            if name.endswith(ATTN_SUFFIXES):
                mod.weight.requires_grad_(True)
    model.train()
    return model.to(args.device)


def load_batches(args, tok):
    rows = [json.loads(l) for l in open(args.data) if l.strip()]
    labels = {lab: i for i, lab in enumerate(sorted({r["label"] for r in rows}))}
    n_total = (args.warmup_steps + args.steps) * args.batch_size
    picked = [rows[i % len(rows)] for i in range(n_total)]
    batches = []
    for s in range(0, n_total, args.batch_size):
        chunk = picked[s:s + args.batch_size]
        enc = tok([r["text"] for r in chunk], truncation=True, max_length=args.max_seq_len,
                  padding="longest", return_tensors="pt")
        enc["labels"] = torch.tensor([labels[r["label"]] for r in chunk])
        batches.append(dict(enc))
    return batches, len(labels)


def sync(device):
    """Wait for queued GPU work, so that a step's time includes it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_mode(mode, args, batches, num_classes):
    model = build(mode, args, num_classes)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    n_train = sum(p.numel() for p in params)
    n_eff = n_train
    if mode == "masked-dense":
        n_eff = sum(int(m.mask.sum()) for m in model.modules() if isinstance(m, MaskedDelta))
        n_eff += sum(p.numel() for p in model.head.parameters())
    times = []
    for i, b in enumerate(batches):
        b = {k: v.to(args.device) for k, v in b.items()}
        y = b.pop("labels")
        sync(args.device)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(**b), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args.device)
        dt = time.perf_counter() - t0
        if i >= args.warmup_steps:
            times.append(dt)
    return {
        "mode": mode,
        "steps": len(times),
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "trainable_params": n_train,
        "effective_trainable_params": n_eff,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "final_loss": loss.item(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", default="all", choices=MODES + ["all"])
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/xpm-assets/minilm"))
    ap.add_argument("--data", default="/tmp/r8/train.jsonl")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-seq-len", type=int, default=64)
    ap.add_argument("--keep-ratio", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU check)")
    ap.add_argument("--json", action="store_true", help="one JSON object per mode")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    batches, num_classes = load_batches(args, tok)
    for mode in MODES if args.mode == "all" else [args.mode]:
        r = run_mode(mode, args, batches, num_classes)
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            print(f"{r['mode']:>13}: median {r['median_s'] * 1e3:8.1f} ms  "
                  f"mean {r['mean_s'] * 1e3:8.1f} ms  steps {r['steps']}  "
                  f"trainable {r['trainable_params']:>9} (effective "
                  f"{r['effective_trainable_params']})  peak RSS {r['peak_rss_mb']:.0f} MB  "
                  f"torch {r['torch_version']}  threads {r['threads']}  {r['device']}", flush=True)


if __name__ == "__main__":
    main()
