"""A tiny mttl expert library, written with the real torch.save, for xpm's mttl importer.

Run by crates/xpm-interop/tests/mttl.rs. It writes into OUT:

- base.safetensors: a tiny base (`layers.0.q.weight` [4, 6] with a bias, `layers.0.v.weight`
  [5, 6] without one, `head.weight`); mttl's module paths carry a `model.` prefix it lacks;
- lib/: an mttl library in mttl's layout (checked against mttl 1.0.2's ExpertLibrary):
  per expert `<name>.ckpt` = torch.save(dict[str, Tensor]) and `<name>.meta` = torch.save of
  the metadata dict (MetadataEntry.asdict(): expert_name, expert_task_name, parent_node,
  expert_config, training_config, expert_model, expert_deleted, class_name), plus files an
  importer must ignore (`<name>.sparse.bin`, README.md, a paper-era `<name>_mask.npz`):
  - `sparse`: masked sparse layers, on q with the names of the brief (`sparse_layer.weight`,
    float `weight_mask`, a `bias` stored as a view at a non-zero storage offset) and on v with
    mttl 1.0 MaskedLinear's names (`sparse_weights`, bool `binary_mask`); f32;
  - `lora`: `lora_a` [in, r], `lora_b` [r, out] on q and v, lora_rank 2, lora_alpha 16 in
    expert_config (mttl's LoRAConfig field names);
  - `lora-noalpha`: the same factors, metadata without lora_alpha;
  - `evil`: a .ckpt whose pickle calls os.system("touch OUT/lib/pwned") through a __reduce__,
    written without running it;
- expected_sparse.safetensors, expected_lora.safetensors: the dense deltas torch computes,
  by base tensor name (sparse: where(mask, weight, 0) and the bias, f32; LoRA:
  (lora_a @ lora_b).T * alpha / rank in f64).

    python tests/python/mttl_fixture.py OUT
"""

import os
import sys

import torch
from safetensors.torch import save_file


class Evil:
    """Pickles to a call of os.system; torch.save writes it without running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def meta(name, config, model="tiny/base"):
    return {
        "expert_name": name,
        "expert_task_name": name + "-task",
        "parent_node": None,
        "expert_config": config,
        "training_config": {"model": model, "learning_rate": 1e-3, "seed": 42,
                            "dataset": "sordonia/flan-10k-flat", "finetune_task_name": [name]},
        "expert_model": model,
        "expert_deleted": False,
        "class_name": "mttl.models.library.expert_library.MetadataEntry",
    }


def main():
    out = sys.argv[1]
    lib = os.path.join(out, "lib")
    os.makedirs(lib, exist_ok=True)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).contiguous()

    base = {
        "layers.0.q.weight": rnd(4, 6),
        "layers.0.q.bias": rnd(4),
        "layers.0.v.weight": rnd(5, 6),
        "head.weight": rnd(3, 5),
    }
    save_file(base, os.path.join(out, "base.safetensors"))

    # Sparse: q with the brief's names and a float mask, v with mttl 1.0's and a bool mask.
    qw, vw = rnd(4, 6), rnd(5, 6)
    qm = (torch.rand(4, 6, generator=g) < 0.4).float()
    vm = torch.rand(5, 6, generator=g) < 0.3
    backing = rnd(12)
    qb = backing[4:8].contiguous()  # contiguous already: a view at storage offset 4
    assert qb.storage_offset() == 4
    sparse = {
        "model.layers.0.q.sparse_layer.weight": qw,
        "model.layers.0.q.sparse_layer.weight_mask": qm,
        "model.layers.0.q.sparse_layer.bias": qb,
        "model.layers.0.v.sparse_layer.sparse_weights": vw,
        "model.layers.0.v.sparse_layer.binary_mask": vm,
    }
    torch.save(sparse, os.path.join(lib, "sparse.ckpt"))
    torch.save(meta("sparse", {"sps_type": "regular_sparse", "keep_ratio": 0.4,
                               "modifier_name": "mls_sparse_adapter",
                               "class_name": "mttl.models.modifiers.sparse_mask.MLSConfig"}),
               os.path.join(lib, "sparse.meta"))
    torch.save({"ignored": torch.zeros(1)}, os.path.join(lib, "sparse.sparse.bin"))
    with open(os.path.join(lib, "sparse_mask.npz"), "wb") as f:
        f.write(b"PK\x03\x04 not read")
    with open(os.path.join(lib, "README.md"), "w") as f:
        f.write("# tiny mttl library\n")
    expected = {
        "layers.0.q.weight": torch.where(qm != 0, qw, torch.zeros_like(qw)).contiguous(),
        "layers.0.q.bias": qb.clone().contiguous(),
        "layers.0.v.weight": torch.where(vm, vw, torch.zeros_like(vw)).contiguous(),
    }
    save_file(expected, os.path.join(out, "expected_sparse.safetensors"))

    # LoRA (mttl: x @ lora_a @ lora_b * alpha / rank).
    rank, alpha = 2, 16.0
    lora = {
        "model.layers.0.q.lora_a": rnd(6, rank),
        "model.layers.0.q.lora_b": rnd(rank, 4),
        "model.layers.0.v.lora_a": rnd(6, rank),
        "model.layers.0.v.lora_b": rnd(rank, 5),
    }
    torch.save(lora, os.path.join(lib, "lora.ckpt"))
    config = {"lora_rank": rank, "lora_alpha": alpha, "lora_dropout": 0.05,
              "lora_init_b_random": False, "modify_layers": "q|v",
              "class_name": "mttl.models.modifiers.lora.LoRAConfig"}
    torch.save(meta("lora", config), os.path.join(lib, "lora.meta"))
    torch.save(lora, os.path.join(lib, "lora-noalpha.ckpt"))
    noalpha = {k: v for k, v in config.items() if k != "lora_alpha"}
    torch.save(meta("lora-noalpha", noalpha), os.path.join(lib, "lora-noalpha.meta"))
    expected = {}
    for m in ["q", "v"]:
        a = lora[f"model.layers.0.{m}.lora_a"].double()
        b = lora[f"model.layers.0.{m}.lora_b"].double()
        expected[f"layers.0.{m}.weight"] = ((a @ b).T * (alpha / rank)).contiguous()
    save_file(expected, os.path.join(out, "expected_lora.safetensors"))

    # A hostile checkpoint: loading it with pickle would run `touch lib/pwned`.
    evil = {"model.layers.0.q.lora_a": Evil(os.path.join(lib, "pwned"))}
    torch.save(evil, os.path.join(lib, "evil.ckpt"))
    torch.save(meta("evil", config), os.path.join(lib, "evil.meta"))
    assert not os.path.exists(os.path.join(lib, "pwned"))
    print("ok")


if __name__ == "__main__":
    main()
