"""PyTorch dense baseline for `cargo bench --bench merge` (docs/benchmarks.md, "Merge").

What a user without xpm does today: densify every expert's delta and merge the dense tensors
with mergekit's formulas in torch, one tensor name at a time.

Inputs are the experts as `xpm unpack` writes them (DIR/tensors.safetensors with `W.indices`
(i64) and `W.values` per sparse tensor, or `W.delta` per dense one). For each tensor name the
script scatters every expert's entries into a dense f32 tensor, stacks them [E, ...] and merges:

  ties         mergekit's TIES: per expert keep the top int(d·n) magnitudes (torch.topk),
               elect the sign of the sum (sign_weight >= 0 → +1), average the agreeing
               entries (weights 1, divisor clamped to 1 where it is 0)
  sparse-mean  the mean over the experts whose delta is non-zero at the entry

and writes the merged dense tensors with safetensors.torch.save_file. Prints one JSON line:
seconds (wall, from the first read to the written file), peak_rss_mb (ru_maxrss),
rss_after_import_mb (ru_maxrss once torch is imported), tensors,
and max_abs_diff against --check (an unpacked xpm merge of the same experts) when given.

Run (the bench does this when TORCH_PYTHON is set):
  $TORCH_PYTHON benches/torch_merge.py --strategy ties --density 0.2 --threads 2 \\
      --out /tmp/m.safetensors [--check DIR] DIR1 DIR2 …
"""

import argparse
import json
import resource
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def load_dense(f, name, shape):
    keys = set(f.keys())
    if name + ".delta" in keys:
        return f.get_tensor(name + ".delta").to(torch.float32).reshape(shape)
    out = torch.zeros(int(torch.tensor(shape).prod()), dtype=torch.float32)
    if name + ".indices" in keys:
        out[f.get_tensor(name + ".indices")] = f.get_tensor(name + ".values").to(torch.float32)
    return out.reshape(shape)


def ties(stack, density):
    n = stack[0].numel()
    k = int(density * n)
    flat = stack.reshape(stack.shape[0], -1)
    trimmed = torch.zeros_like(flat)
    for i in range(flat.shape[0]):
        if k > 0:
            idx = torch.topk(flat[i].abs(), k, sorted=False).indices
            trimmed[i, idx] = flat[i, idx]
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    mask = (trimmed != 0) & (trimmed.sign() == sign)
    num = (trimmed * mask).sum(0)
    den = mask.sum(0).to(torch.float32)
    den[den == 0] = 1.0
    return (num / den).reshape(stack.shape[1:])


def sparse_mean(stack):
    nz = (stack != 0).sum(0).to(torch.float32)
    nz[nz == 0] = 1.0
    return stack.sum(0) / nz


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=["ties", "sparse-mean"], required=True)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--check")
    ap.add_argument("experts", nargs="+")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    files = [safe_open(d + "/tensors.safetensors", framework="pt") for d in a.experts]
    manifest = json.load(open(a.experts[0] + "/manifest.json"))
    merged = {}
    for t in manifest["tensors"]:
        name, shape = t["name"], t["shape"]
        stack = torch.stack([load_dense(f, name, shape) for f in files])
        if a.strategy == "ties":
            merged[name] = ties(stack, a.density)
        else:
            merged[name] = sparse_mean(stack)
        del stack
    save_file(merged, a.out)
    seconds = time.perf_counter() - t0
    diff = None
    if a.check:
        ref = safe_open(a.check + "/tensors.safetensors", framework="pt")
        diff = 0.0
        for name, v in merged.items():
            r = load_dense(ref, name, list(v.shape))
            diff = max(diff, float((r - v).abs().max()))
    print(
        json.dumps(
            {
                "strategy": a.strategy,
                "seconds": seconds,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "rss_after_import_mb": rss_import,
                "tensors": len(merged),
                "max_abs_diff": diff,
            }
        )
    )


if __name__ == "__main__":
    main()
