"""`xpm import peft` and `xpm export --format peft` against the real peft, transformers and torch.

Run by tests/interop.rs (CI installs peft 0.21.2, transformers and torch with
scripts/python-env.sh). Tiny models built from configs (BERT for classification with its head
in `modules_to_save`, GPT-2 with Conv1D and a tied embedding, Llama), all f32:

import  PEFT writes LoRA adapters with non-default `rank_pattern`, `alpha_pattern`, rslora and
        `lora_bias` (random factors, so every delta is non-zero); `xpm import peft` + `xpm apply`
        must give the weights of PEFT's `merge_and_unload` (max relative difference ≤ 1e-6).
export  `xpm export` of the imported LoRA experts, of sparse and dense experts (`xpm extract`)
        and of a 6-expert `ties` merge must load with `PeftModel.from_pretrained`; its merged
        weights must equal `xpm apply`'s (bit for bit for the exact forms: SHiRA, selection
        LoRA, modules_to_save) and its unmerged outputs on a batch must agree.
round   `xpm import` of an export gives the expert back bit for bit (sparse via SHiRA, LoRA).

    python tests/python/peft_interop.py --xpm target/debug/xpm

One line per check; exit status 1 when any fails.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

FAILED = []


def check(ok, what, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {what}{(' — ' + detail) if detail else ''}", flush=True)
    if not ok:
        FAILED.append(what)


def run(cmd):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{p.stdout}\n{p.stderr}")
    return p.stdout


def read_dir(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def rel_diff(got, want, names=None):
    worst, where = 0.0, None
    for n in names or sorted(want):
        a, b = got[n].double(), want[n].double()
        scale = max(float(b.abs().max()), 1e-30)
        d = float((a - b).abs().max()) / scale
        if d > worst:
            worst, where = d, n
    return worst, where


def bit_equal(got, want, names):
    bad = [n for n in names if not torch.equal(got[n], want[n])]
    return bad


# ---------------------------------------------------------------- models

def bert(seed):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def gpt2(seed):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(cfg).eval()


def llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


MODELS = {"bert": bert, "gpt2": gpt2, "llama": llama}

LORA = {
    # BERT: rank and alpha patterns, lora_bias, the classifier head in modules_to_save (SEQ_CLS).
    "bert": dict(task_type="SEQ_CLS", r=4, lora_alpha=8,
                 target_modules=["query", "value", "dense"],
                 rank_pattern={"layer.1.attention.self.query": 2},
                 alpha_pattern={"value": 3.0}, lora_bias=True),
    # GPT-2: Conv1D (fan_in_fan_out), rslora, and the token embedding (transposed). PEFT
    # refuses lora_bias on an embedding, so lora_bias is BERT's.
    "gpt2": dict(task_type="CAUSAL_LM", r=4, lora_alpha=16, use_rslora=True,
                 target_modules=["c_attn", "c_fc", "wte"], fan_in_fan_out=True),
    # Llama: patterns and rslora, a norm in modules_to_save.
    "llama": dict(task_type="CAUSAL_LM", r=8, lora_alpha=16, use_rslora=True,
                  target_modules=["q_proj", "v_proj", "down_proj"],
                  rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 4.0},
                  modules_to_save=["model.norm"]),
}


def batch(kind):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def outputs(model, kind):
    with torch.no_grad():
        return model(**batch(kind)).logits


def load_base(kind, d):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    cls = AutoModelForSequenceClassification if kind == "bert" else AutoModelForCausalLM
    return cls.from_pretrained(d).eval()


# ---------------------------------------------------------------- the checks

def import_check(xpm, home, root, kind):
    """PEFT LoRA → xpm import → xpm apply equals merge_and_unload."""
    from peft import LoraConfig, get_peft_model
    base_dir = os.path.join(root, f"{kind}-base")
    MODELS[kind](1).save_pretrained(base_dir, safe_serialization=True)
    model = get_peft_model(MODELS[kind](1), LoraConfig(**LORA[kind]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (p if "modules_to_save" in n else 0))
    adapter = os.path.join(root, f"{kind}-adapter")
    model.save_pretrained(adapter, safe_serialization=True)
    merged = {k: v.contiguous() for k, v in model.merge_and_unload().state_dict().items()}
    out = os.path.join(root, f"{kind}-lora.xpm")
    run([xpm, "--home", home, "-q", "import", "peft", adapter, "--base", base_dir,
         "--name", f"{kind}-lora", "--version", "1.0.0", "-o", out])
    applied = os.path.join(root, f"{kind}-applied")
    run([xpm, "--home", home, "-q", "apply", out, "--base", base_dir, "--out", applied])
    got = read_dir(applied)
    names = sorted(set(got) & set(merged))
    worst, where = rel_diff(got, merged, names)
    changed = sum(not torch.equal(got[n], read_dir(base_dir)[n]) for n in names)
    check(worst <= 1e-6 and changed > 0,
          f"{kind}: xpm import + apply = PEFT merge_and_unload",
          f"{changed} tensors changed, max rel diff {worst:.1e}" + (f" at {where}" if worst > 1e-6 else ""))
    return base_dir, out, got


def export_check(xpm, home, root, kind, base_dir, expert, applied, exact, label, extra=()):
    """xpm export → PeftModel.from_pretrained: merged weights and outputs equal xpm apply's."""
    from peft import PeftModel
    exp = os.path.join(root, f"{label}-peft")
    info = json.loads(run([xpm, "--home", home, "-q", "export", expert, "--base", base_dir,
                           "-o", exp, "--json", *extra]))
    peft_model = PeftModel.from_pretrained(load_base(kind, base_dir), exp).eval()
    # GPT-2 ties lm_head to wte: unmerged, PEFT's embedding LoRA changes the lookup but not the
    # tied head, so only the merged model is the applied one there (docs/interop.md, hazards).
    tied_embedding = kind == "gpt2" and any("wte" in m for m in info["target_modules"])
    out_peft = None if tied_embedding else outputs(peft_model, kind)
    merged_model = peft_model.merge_and_unload()
    if tied_embedding:
        out_peft = outputs(merged_model, kind)
    merged = {k: v.contiguous() for k, v in merged_model.state_dict().items()}
    names = sorted(set(applied) & set(merged))
    if exact:
        bad = bit_equal(merged, applied, names)
        check(not bad, f"{label}: PEFT ({info['peft_type']}) merge of the export = xpm apply, bit for bit",
              f"{len(names)} tensors" + (f"; differ: {bad[:4]}" if bad else ""))
    else:
        worst, where = rel_diff(merged, applied, names)
        check(worst <= 1e-6, f"{label}: PEFT ({info['peft_type']}) merge of the export = xpm apply",
              f"max rel diff {worst:.1e}")
    # The unmerged forward on a batch agrees with the xpm-applied model's.
    applied_dir = os.path.join(root, f"{label}-applied-model")
    os.makedirs(applied_dir, exist_ok=True)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in applied.items()}, os.path.join(applied_dir, "model.safetensors"))
    with open(os.path.join(base_dir, "config.json")) as f:
        cfg = f.read()
    with open(os.path.join(applied_dir, "config.json"), "w") as f:
        f.write(cfg)
    out_xpm = outputs(load_base(kind, applied_dir), kind)
    d = float((out_peft - out_xpm).abs().max()) / max(float(out_xpm.abs().max()), 1e-30)
    check(d <= 1e-4, f"{label}: outputs of the PEFT-loaded export = outputs of xpm apply",
          f"max rel diff {d:.1e}")
    return exp, info


def roundtrip_check(xpm, home, root, base_dir, expert, exp_dir, label):
    """import(export(E)) == E, bit for bit (tensors and their descriptions)."""
    back = os.path.join(root, f"{label}-back.xpm")
    run([xpm, "--home", home, "-q", "import", "peft", exp_dir, "--base", base_dir,
         "--name", "back", "--version", "1.0.0", "-o", back])
    a_dir, b_dir = os.path.join(root, f"{label}-ua"), os.path.join(root, f"{label}-ub")
    run([xpm, "--home", home, "-q", "unpack", expert, "-o", a_dir])
    run([xpm, "--home", home, "-q", "unpack", back, "-o", b_dir])
    ta, tb = read_dir(a_dir), read_dir(b_dir)
    ma = json.load(open(os.path.join(a_dir, "manifest.json")))["tensors"]
    mb = json.load(open(os.path.join(b_dir, "manifest.json")))["tensors"]
    same = sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta) and \
        [(t["name"], t["delta"]) for t in ma] == [(t["name"], t["delta"]) for t in mb]
    check(same, f"{label}: import(export(E)) = E bit for bit", f"{len(ta)} stored tensors")


def make_tuned(base_dir, out_dir, seed, scale=0.02):
    t = read_dir(base_dir)
    g = torch.Generator().manual_seed(seed)
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: (v + torch.randn(v.shape, generator=g) * scale).contiguous() for k, v in t.items()},
              os.path.join(out_dir, "model.safetensors"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--xpm", required=True)
    args = ap.parse_args()
    xpm = args.xpm
    with tempfile.TemporaryDirectory() as root:
        home = os.path.join(root, "home")
        bases = {}
        for kind in ("bert", "gpt2", "llama"):
            base_dir, expert, applied = import_check(xpm, home, root, kind)
            bases[kind] = base_dir
            exp, _ = export_check(xpm, home, root, kind, base_dir, expert, applied, False,
                                  f"{kind}-lora")
            if kind != "gpt2":  # rslora's α/√r is stored as α' = (α/√r)·r: round trip for plain LoRA below
                pass
        # Plain LoRA round trip: BERT's adapter has no rslora.
        roundtrip_check(xpm, home, root, bases["bert"], os.path.join(root, "bert-lora.xpm"),
                        os.path.join(root, "bert-lora-peft"), "bert-lora")

        # Sparse and dense experts from `xpm extract`, on Llama and GPT-2.
        for kind in ("llama", "gpt2"):
            base_dir = bases[kind]
            base_file = os.path.join(base_dir, "model.safetensors")
            experts = []
            for i in range(6):
                tuned = os.path.join(root, f"{kind}-tuned{i}")
                make_tuned(base_dir, tuned, 10 + i)
                e = os.path.join(root, f"{kind}-sparse{i}.xpm")
                # Llama: linear layers only (→ SHiRA); GPT-2: the default targets, Conv1D and
                # both embeddings included (→ selection LoRA).
                targets = ["--targets", "*_proj.weight"] if kind == "llama" else []
                run([xpm, "--home", home, "-q", "extract", "--base", base_file, "--tuned",
                     os.path.join(tuned, "model.safetensors"), "--density", "0.05",
                     *targets, "--name", f"{kind}-s{i}", "--version", "1.0.0", "-o", e])
                experts.append(e)
            dense = os.path.join(root, f"{kind}-dense.xpm")
            run([xpm, "--home", home, "-q", "extract", "--base", base_file, "--tuned",
                 os.path.join(root, f"{kind}-tuned0", "model.safetensors"), "--kind", "dense",
                 "--targets", "*" if kind == "llama" else "transformer.h.*",
                 "--name", f"{kind}-dense", "--version", "1.0.0", "-o", dense])
            merged = os.path.join(root, f"{kind}-ties.xpm")
            run([xpm, "--home", home, "-q", "merge", "--strategy", "ties", "--param",
                 "density=0.5", "--name", f"{kind}-ties", "--version", "1.0.0", "-o", merged,
                 *experts])
            for label, e in (("sparse", experts[0]), ("dense", dense), ("ties6", merged)):
                applied_dir = os.path.join(root, f"{kind}-{label}-applied")
                run([xpm, "--home", home, "-q", "apply", e, "--base", base_dir, "--out", applied_dir])
                applied = read_dir(applied_dir)
                exp, info = export_check(xpm, home, root, kind, base_dir, e, applied, True,
                                         f"{kind}-{label}")
                if label == "sparse" and kind == "llama":
                    check(info["peft_type"] == "SHIRA", "llama-sparse: exported as SHiRA",
                          info["peft_type"])
                    roundtrip_check(xpm, home, root, base_dir, e, exp, f"{kind}-{label}")
    print(f"{'FAILED: ' + ', '.join(FAILED) if FAILED else 'all checks pass'}")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
