"""How far xpm's merge of bf16/f16 models is from mergekit's arithmetic in that dtype.

docs/merging-presets-review.md, item P3.11. mergekit runs every operation of a merge in the
tensor dtype (with `dtype: bfloat16`, each subtraction, product, sum, division and the final
addition rounds to bf16). xpm decodes values to f32, merges in f32 and rounds once when it
stores the merged delta and once when `--apply-to` adds it to the base. So `--preset mergekit`
cannot match mergekit bit for bit in a 16-bit dtype; this script measures by how much.

It writes a random base and N fine-tuned checkpoints (safetensors, DTYPE), builds the experts
with the real binary (`xpm extract --kind dense`), merges them (`xpm merge --preset mergekit
--strategy STRATEGY --apply-to`), and computes the same merge from the same checkpoints in
torch twice: in DTYPE arithmetic, op by op as mergekit's generalized task arithmetic does
(mergekit/merge_methods/generalized_task_arithmetic.py, mergekit/sparsify.py), and in f64
(the exact answer, rounded once to DTYPE). It prints, for xpm and for the DTYPE-arithmetic
merge, the distance to the exact answer in units in the last place of DTYPE (ulp, of the larger
of the result and the base entry: where base + Δ nearly cancels, the result's own ulp is
meaningless), the share of entries that differ at all, and the distance between the two. One
JSON object with --json.

    /path/to/venv/bin/python scripts/dtype-tolerance.py --xpm target/release/xpm \\
        [--dtype bf16|f16] [--strategy ties|task-arithmetic] [--experts 4] [--json]

Needs torch and safetensors (the PyTorch venv of the benchmarks).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


MANTISSA = {torch.bfloat16: 7, torch.float16: 10}


def ulps(a, b, scale, dt):
    """|a − b| in units in the last place of `scale` in dtype `dt`.

    The unit is that of max(|result|, |base entry|): where base + Δ nearly cancels, the result's
    own ulp is tiny and any rounding of Δ would count as thousands of ulp."""
    m = scale.double().abs().clamp(min=torch.finfo(dt).tiny)
    unit = torch.exp2(torch.floor(torch.log2(m)) - MANTISSA[dt])
    return ((a.double() - b.double()).abs() / unit)


def mergekit(base, tuned, strategy, density, dt, low):
    """mergekit's generalized task arithmetic in dtype `dt`, one tensor (weights 1, λ 1).

    The task vectors are rounded to `low` (the checkpoints' dtype) whatever `dt` is: mergekit's
    subtraction in that dtype and xpm's stored delta both round them once, so the reference
    starts from the same inputs and differs only in the arithmetic after that."""
    base = base.to(dt)
    tvs = [(t.double() - base.double()).to(low).to(dt) for t in tuned]
    if strategy == "ties":
        kept = []
        for tv in tvs:
            k = int(density * tv.numel())
            mask = torch.zeros_like(tv, dtype=torch.bool).view(-1)
            mask[torch.topk(tv.abs().view(-1), k=k, largest=True).indices] = True
            kept.append(tv * mask.view(tv.shape))
        tvs = kept
    deltas = torch.stack(tvs, dim=0)
    weights = torch.ones(len(tvs), dtype=dt).view(-1, *([1] * base.dim()))
    weighted = deltas * weights
    if strategy == "ties":
        sign = weighted.sum(dim=0)
        majority = (sign >= 0).to(dt) * 2 - 1
        mask = weighted.sign() == majority
        mixed = (weighted * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
    else:
        mixed = weighted.sum(dim=0)
    return (base + mixed).to(dt)


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--xpm", default="target/release/xpm")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--strategy", default="ties", choices=["ties", "task-arithmetic"])
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--tensors", type=int, default=4)
    ap.add_argument("--size", type=int, default=256, help="tensors are SIZE × SIZE")
    ap.add_argument("--density", type=float, default=0.2, help="ties: kept fraction")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    dt = DTYPES[args.dtype]
    g = torch.Generator().manual_seed(args.seed)
    names = [f"layers.{i}.weight" for i in range(args.tensors)]
    base = {n: (torch.randn(args.size, args.size, generator=g) * 0.05).to(dt) for n in names}
    # Fine-tuning deltas about 2 % of the weights' scale, as full fine-tuning gives.
    tuned = [
        {n: (base[n].double() + torch.randn(args.size, args.size, generator=g).double() * 1e-3)
         .to(dt) for n in names}
        for _ in range(args.experts)
    ]
    with tempfile.TemporaryDirectory() as d:
        home = os.path.join(d, "home")
        save_file(base, os.path.join(d, "base.safetensors"))
        experts = []
        for i, t in enumerate(tuned):
            path = os.path.join(d, f"tuned{i}.safetensors")
            save_file(t, path)
            out = os.path.join(d, f"e{i}.xpm")
            run([args.xpm, "--home", home, "-q", "extract", "--base",
                 os.path.join(d, "base.safetensors"), "--tuned", path, "--kind", "dense",
                 "--name", f"e{i}", "--version", "1.0.0", "-o", out])
            experts.append(out)
        merged_dir = os.path.join(d, "merged")
        cmd = [args.xpm, "--home", home, "-q", "merge", "--preset", "mergekit", "--strategy",
               args.strategy, "--apply-to", os.path.join(d, "base.safetensors"), "-o",
               merged_dir, *experts]
        if args.strategy == "ties":
            cmd += ["--param", f"density={args.density}"]
        run(cmd)
        files = [f for f in os.listdir(merged_dir) if f.endswith(".safetensors")]
        xpm = {}
        for f in files:
            xpm.update(load_file(os.path.join(merged_dir, f)))
    rows = {"xpm_vs_exact": [], "mergekit_dtype_vs_exact": [], "xpm_vs_mergekit_dtype": []}
    # Entries whose magnitude equals the k-th largest: which of them top-k keeps is a matter of
    # tie order (torch.topk's is unspecified), and 16-bit deltas tie often.
    threshold_ties = 0
    if args.strategy == "ties" and args.density < 1:
        for n in names:
            for t in tuned:
                tv = (t[n].double() - base[n].double()).to(dt).double().abs().view(-1)
                k = int(args.density * tv.numel())
                threshold_ties += int((tv == torch.topk(tv, k).values[-1]).sum())
    differ = {k: 0 for k in rows}
    n_total = 0
    for n in names:
        exact = mergekit(base[n], [t[n] for t in tuned], args.strategy, args.density,
                         torch.float64, dt).to(dt)
        low = mergekit(base[n], [t[n] for t in tuned], args.strategy, args.density, dt, dt)
        got = xpm[n].to(dt)
        scale = torch.maximum(exact.double().abs(), base[n].double().abs())
        for key, (a, b) in {"xpm_vs_exact": (got, exact),
                            "mergekit_dtype_vs_exact": (low, exact),
                            "xpm_vs_mergekit_dtype": (got, low)}.items():
            u = ulps(a, b, scale, dt)
            rows[key].append(float(u.max()))
            differ[key] += int((u > 0).sum())
        n_total += exact.numel()
    result = {
        "dtype": args.dtype, "strategy": args.strategy, "experts": args.experts,
        "entries": n_total, "torch": torch.__version__, "density": args.density,
        "threshold_ties": threshold_ties,
        **{f"{k}_max_ulp": max(v) for k, v in rows.items()},
        **{f"{k}_differing": differ[k] / n_total for k in rows},
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.strategy}, {args.experts} experts, {args.dtype}, {n_total} entries:")
        if threshold_ties:
            print(f"  {threshold_ties} task-vector entries tie with the top-k threshold "
                  f"(density {args.density}): tie order decides which are kept")
        for k in rows:
            print(f"  {k:26} max {result[k + '_max_ulp']:.2f} ulp, "
                  f"{100 * result[k + '_differing']:.2f} % of entries differ")


if __name__ == "__main__":
    main()
