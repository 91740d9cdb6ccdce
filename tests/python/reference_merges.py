"""xpm's `--preset mergekit` and `--preset peft` against the real libraries.

Run by tests/reference_libs.rs (CI installs torch, transformers, peft and mergekit with
scripts/python-env.sh). For each case it:

1. builds a tiny Llama with transformers (the base) and three fine-tuned copies (the base plus
   Gaussian noise of both signs, so TIES has sign conflicts to resolve), all f32 safetensors;
2. turns each fine-tuned copy into a dense expert with the real binary (`xpm extract`);
3. merges them with `xpm merge --preset P --strategy S --apply-to BASE` and the case's
   weights and parameters;
4. merges the same checkpoints with the real library: mergekit's `run_merge` on the model
   directories, or peft's `peft.utils.merge_utils` functions on the task vectors (what
   `add_weighted_adapter` calls);
5. compares every tensor. The tolerance is f32 rounding: |xpm − lib| ≤ 1e-6 · max|lib| per
   tensor (the arithmetic is the same up to summation order).

Only deterministic methods are compared here: DARE and DELLA draw random masks, and xpm's
counter-based stream (independent of thread count) is not torch's generator, so those are
checked at d = 1, where nothing is dropped and the result must agree exactly.

    python tests/python/reference_merges.py --xpm target/debug/xpm [--only mergekit|peft] [--json]

Exit status 1 when any case disagrees; one line per case either way.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

TOL = 1e-6

# (name, strategy, weights, xpm params, mergekit method, mergekit global params, per-model)
MERGEKIT_CASES = [
    ("ties d=0.5, normalize (default)", "ties", [1.0, 0.6, 0.3], {"density": "0.5"},
     "ties", {}, {"density": 0.5}),
    ("ties d=0.5, normalize=false", "ties", [1.0, 0.6, 0.3],
     {"density": "0.5", "normalize": "false"}, "ties", {"normalize": False}, {"density": 0.5}),
    ("ties d=0.3, lambda=0.7", "ties", [1.0, 1.0, 1.0], {"density": "0.3", "lambda": "0.7"},
     "ties", {"lambda": 0.7}, {"density": 0.3}),
    ("ties d=0.5, rescale (l1)", "ties", [0.5, 1.0, 0.8], {"density": "0.5", "rescale": "l1"},
     "ties", {"rescale": True}, {"density": 0.5}),
    ("task_arithmetic", "task-arithmetic", [1.0, 0.5, -0.25], {}, "task_arithmetic", {}, {}),
    ("task_arithmetic, normalize", "task-arithmetic", [1.0, 0.5, 0.25],
     {"normalize": "true"}, "task_arithmetic", {"normalize": True}, {}),
    ("breadcrumbs d=0.6 gamma=0.05", "breadcrumbs", [1.0, 0.7, 0.4],
     {"density": "0.6", "gamma": "0.05"}, "breadcrumbs", {}, {"density": 0.6, "gamma": 0.05}),
    ("breadcrumbs_ties d=0.6 gamma=0.05", "breadcrumbs-ties", [1.0, 0.7, 0.4],
     {"density": "0.6", "gamma": "0.05"}, "breadcrumbs_ties", {},
     {"density": 0.6, "gamma": 0.05}),
    ("breadcrumbs_ties, normalize", "breadcrumbs-ties", [1.0, 0.7, 0.4],
     {"density": "0.6", "gamma": "0.05", "normalize": "true"}, "breadcrumbs_ties",
     {"normalize": True}, {"density": 0.6, "gamma": 0.05}),
    ("dare_ties d=1", "dare-ties", [1.0, 0.6, 0.3], {"density": "1"}, "dare_ties", {},
     {"density": 1.0}),
    ("dare_linear d=1, normalize", "dare-linear", [1.0, 0.6, 0.3],
     {"density": "1", "normalize": "true"}, "dare_linear", {"normalize": True},
     {"density": 1.0}),
]

# (name, strategy, weights, xpm params, peft function, its keyword arguments)
PEFT_CASES = [
    ("ties d=0.5, total", "ties", [1.0, 2.0, 0.5], {"density": "0.5"}, "ties",
     {"density": 0.5, "majority_sign_method": "total"}),
    ("ties d=0.29, frequency", "ties", [1.0, -1.0, 1.0],
     {"density": "0.29", "sign": "frequency"}, "ties",
     {"density": 0.29, "majority_sign_method": "frequency"}),
    ("magnitude_prune d=0.4", "magnitude-prune", [0.5, 1.0, 1.5], {"density": "0.4"},
     "magnitude_prune", {"density": 0.4}),
    ("task_arithmetic", "task-arithmetic", [1.0, 0.5, -0.25], {}, "task_arithmetic", {}),
]


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return p


def build_models(root, n_tuned, seed):
    """A tiny Llama (the base) and `n_tuned` noisy copies, each a model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg)
    dirs = [os.path.join(root, "base")]
    base.save_pretrained(dirs[0], safe_serialization=True)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(n_tuned):
        model = LlamaForCausalLM(cfg)
        tuned = {k: v + torch.randn(v.shape, generator=g) * 0.02 for k, v in state.items()}
        model.load_state_dict(tuned)
        d = os.path.join(root, f"tuned{i}")
        model.save_pretrained(d, safe_serialization=True)
        dirs.append(d)
    return dirs


def read_dir(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def extract_experts(xpm, home, root, dirs):
    experts = []
    for i, d in enumerate(dirs[1:]):
        out = os.path.join(root, f"e{i}.xpm")
        run([xpm, "--home", home, "-q", "extract", "--base",
             os.path.join(dirs[0], "model.safetensors"), "--tuned",
             os.path.join(d, "model.safetensors"), "--kind", "dense", "--targets", "*",
             "--name", f"e{i}",
             "--version", "1.0.0", "-o", out])
        experts.append(out)
    return experts


def xpm_merge(xpm, home, root, base_dir, experts, preset, strategy, weights, params, tag):
    out = os.path.join(root, f"xpm-{tag}")
    cmd = [xpm, "--home", home, "-q", "merge", "--strategy", strategy,
           "--weights=" + ",".join(str(w) for w in weights), "--apply-to",
           os.path.join(base_dir, "model.safetensors"), "-o", out, *experts]
    if preset is not None:
        cmd += ["--preset", preset]
    for k, v in params.items():
        cmd += ["--param", f"{k}={v}"]
    run(cmd)
    return read_dir(out)


def mergekit_merge(root, dirs, method, global_params, per_model, weights, tag):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    cfg = {
        "merge_method": method,
        "base_model": dirs[0],
        "models": [{"model": d, "parameters": {"weight": w, **per_model}}
                   for d, w in zip(dirs[1:], weights)],
        "dtype": "float32",
    }
    if global_params:
        cfg["parameters"] = global_params
    out = os.path.join(root, f"mergekit-{tag}")
    run_merge(MergeConfiguration.model_validate(cfg), out,
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                                   random_seed=0))
    return read_dir(out)


def peft_merge(base, tuned, function, kwargs, weights):
    from peft.utils import merge_utils

    fn = getattr(merge_utils, function)
    w = torch.tensor(weights, dtype=torch.float32)
    out = {}
    for name, b in base.items():
        tvs = [t[name] - b for t in tuned]
        out[name] = b + fn(tvs, w, **kwargs)
    return out


def compare(got, want):
    """The worst |got − want| / max|want| over the tensors, and names missing on either side."""
    missing = sorted(set(want) ^ set(got))
    worst, where = 0.0, None
    for name in sorted(set(want) & set(got)):
        a, b = got[name].double(), want[name].double()
        if a.shape != b.shape:
            return float("inf"), name, missing
        scale = max(float(b.abs().max()), 1e-30)
        d = float((a - b).abs().max()) / scale
        if d > worst:
            worst, where = d, name
    return worst, where, missing


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--xpm", required=True)
    ap.add_argument("--only", choices=["mergekit", "peft"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    failed = 0
    with tempfile.TemporaryDirectory() as root:
        home = os.path.join(root, "home")
        dirs = build_models(root, 3, args.seed)
        experts = extract_experts(args.xpm, home, root, dirs)
        base = read_dir(dirs[0])
        tuned = [read_dir(d) for d in dirs[1:]]
        jobs = []
        if args.only in (None, "mergekit"):
            for i, (name, strategy, w, params, method, gp, pm) in enumerate(MERGEKIT_CASES):
                jobs.append(("mergekit", name, strategy, w, params, lambda i=i, method=method,
                             gp=gp, pm=pm, w=w: mergekit_merge(root, dirs, method, gp, pm, w,
                                                               f"mk{i}")))
        if args.only in (None, "peft"):
            for name, strategy, w, params, fn, kw in PEFT_CASES:
                jobs.append(("peft", name, strategy, w, params,
                             lambda fn=fn, kw=kw, w=w: peft_merge(base, tuned, fn, kw, w)))
        if args.only in (None, "mergekit"):
            # The control: xpm's own TIES (no preset: the vote on unweighted deltas, the
            # divisor a count) must NOT pass for mergekit's, or the comparison proves nothing.
            w = [1.0, 0.6, 0.3]
            jobs.append(("mergekit", "control: ties without the preset differs", "ties", w,
                         {"density": "0.5"},
                         lambda w=w: mergekit_merge(root, dirs, "ties", {}, {"density": 0.5}, w,
                                                    "control")))
        for k, (lib, name, strategy, w, params, reference) in enumerate(jobs):
            control = name.startswith("control")
            got = xpm_merge(args.xpm, home, root, dirs[0], experts, None if control else lib,
                            strategy, w, params, f"{k}")
            want = reference()
            worst, where, missing = compare(got, want)
            ok = (worst > 1e-3 if control else worst <= TOL) and not missing
            failed += not ok
            row = {"library": lib, "case": name, "strategy": strategy, "weights": w,
                   "params": params, "max_rel_diff": worst, "tensor": where,
                   "missing": missing, "ok": ok}
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{'ok  ' if ok else 'FAIL'} {lib:8} {name:38} max rel diff {worst:.2e}"
                      f"{' at ' + where if where and not ok else ''}"
                      f"{' missing ' + ', '.join(missing) if missing else ''}", flush=True)
    versions = {"torch": torch.__version__}
    for mod in ("mergekit", "peft", "transformers"):
        try:
            from importlib.metadata import version
            versions[mod] = version(mod)
        except Exception:  # noqa: BLE001 - only for the report line
            pass
    print(f"{len(jobs) - failed}/{len(jobs)} cases pass ({versions})", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
