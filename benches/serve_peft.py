"""PEFT and transformers beside `cargo bench --bench serve` (benches/serve.rs).

For each base: two LoRA adapters on every linear weight with, in all, as many parameters as a
sparse expert at `--density` of those weights (one rank r = density * sum(in*out) / sum(in+out),
rounded), `set_adapter` between them timed (median over --swaps switches, median over rounds),
and `from_pretrained` of the base from disk (median of --rounds loads). Prints one JSON line.
"""

import argparse
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--minilm")
p.add_argument("--llama")
p.add_argument("--throughput", metavar="MINILM", help="run the mixed workload on this model instead")
p.add_argument("--requests", type=int, default=96)
p.add_argument("--texts", default="[]")
p.add_argument("--density", type=float, default=0.05)
p.add_argument("--swaps", type=int, default=40)
p.add_argument("--rounds", type=int, default=3)
a = p.parse_args()
torch.set_num_threads(2)

BERT_TARGETS = ["query", "key", "value", "dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def measure(load, path, targets):
    model = load(path).eval()
    lins = [
        m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in targets
    ]
    sparse = sum(a.density * m.in_features * m.out_features for m in lins)
    rank = max(1, round(sparse / sum(m.in_features + m.out_features for m in lins)))
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    pm = get_peft_model(model, cfg, adapter_name="a")
    pm.add_adapter("b", cfg)
    rounds = []
    for _ in range(a.rounds):
        times = []
        for i in range(a.swaps):
            t = time.perf_counter()
            pm.set_adapter("a" if i % 2 == 0 else "b")
            times.append((time.perf_counter() - t) * 1e3)
        rounds.append(statistics.median(times))
    loads = []
    for _ in range(a.rounds):
        t = time.perf_counter()
        load(path)
        loads.append((time.perf_counter() - t) * 1e3)
    return {
        "lora_rank": rank,
        "set_adapter_ms": statistics.median(rounds),
        "from_pretrained_ms": statistics.median(loads),
    }


def lora_config(model, targets):
    lins = [
        m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in targets
    ]
    sparse = sum(a.density * m.in_features * m.out_features for m in lins)
    rank = max(1, round(sparse / sum(m.in_features + m.out_features for m in lins)))
    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)


def throughput(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    cfg = lora_config(model, BERT_TARGETS)
    pm = get_peft_model(model, cfg, adapter_name="e0")
    for k in range(1, 8):
        pm.add_adapter(f"e{k}", cfg)
    torch.manual_seed(0)
    heads = [torch.nn.Linear(model.config.hidden_size, 3) for _ in range(8)]
    texts = json.loads(a.texts)

    def run(j):
        pm.set_adapter(f"e{j % 8}")
        batch = [texts[(j * 8 + i) % len(texts)] for i in range(8)]
        enc = tok(batch, padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = pm(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1)
        return torch.softmax(heads[j % 8](pooled), -1)

    with torch.inference_mode():
        for j in range(8):
            run(j)
        t = time.perf_counter()
        for j in range(a.requests):
            run(j)
        return time.perf_counter() - t


if a.throughput:
    print(json.dumps({"seconds": throughput(a.throughput)}))
    raise SystemExit(0)

out = {
    "minilm": measure(lambda d: AutoModel.from_pretrained(d, torch_dtype=torch.float32), a.minilm, BERT_TARGETS),
    "llama": measure(
        lambda d: AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32), a.llama, LLAMA_TARGETS
    ),
}
print(json.dumps(out))
