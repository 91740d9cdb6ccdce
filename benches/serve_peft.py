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
p.add_argument("--serve", metavar="MINILM", help="serve /v1/classify over HTTP with 8 LoRA adapters")
p.add_argument("--density", type=float, default=0.05)
p.add_argument("--swaps", type=int, default=40)
p.add_argument("--rounds", type=int, default=3)
a = p.parse_args()
torch.set_num_threads(2)

BERT_TARGETS = ["query", "key", "value", "dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def measure(load, path, targets):
    model = load(path).eval()
    cfg = lora_config(model, targets)
    rank = cfg.r
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


def serve(path):
    """The PEFT side of the mixed workload as a server: POST /v1/classify with
    {"expert": "eK", "inputs": [...]}, one request at a time (a lock around the model), the
    adapter set per request, as a PEFT deployment that switches adapters does."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    cfg = lora_config(model, BERT_TARGETS)
    pm = get_peft_model(model, cfg, adapter_name="e0")
    for k in range(1, 8):
        pm.add_adapter(f"e{k}", cfg)
    torch.manual_seed(0)
    heads = {f"e{k}": torch.nn.Linear(model.config.hidden_size, 3) for k in range(8)}
    lock = threading.Lock()

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            e = body["expert"]
            with lock, torch.inference_mode():
                pm.set_adapter(e)
                enc = tok(body["inputs"], padding=True, truncation=True, max_length=128, return_tensors="pt")
                h = pm(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).float()
                p = torch.softmax(heads[e]((h * m).sum(1) / m.sum(1)), -1)
            out = json.dumps({"results": [{"probabilities": r} for r in p.tolist()]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    print(f"listening on http://127.0.0.1:{srv.server_address[1]}", flush=True)
    srv.serve_forever()


if a.serve:
    serve(a.serve)
    raise SystemExit(0)

out = {
    "minilm": measure(lambda d: AutoModel.from_pretrained(d, torch_dtype=torch.float32), a.minilm, BERT_TARGETS),
    "llama": measure(
        lambda d: AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32), a.llama, LLAMA_TARGETS
    ),
}
print(json.dumps(out))
