//! `xpm serve`'s swap latency (docs/benchmarks.md, "Serving").
//!
//! ```sh
//! scripts/fetch-assets.sh                                            # MiniLM, once
//! cargo bench --bench serve                                          # xpm only
//! TORCH_PYTHON=/path/to/venv/bin/python cargo bench --bench serve    # and PEFT / transformers
//! cargo bench --bench serve -- --swaps 100 --rounds 5
//! ```
//!
//! Two bases: MiniLM (22.7 M parameters) and a small random Llama written here (hidden 512,
//! 8 layers, 8 000 tokens; 42 M parameters). On each, two synthetic sparse experts at 5 % of
//! every linear weight (random positions and values) are swapped in and out of the resident
//! weights with the code of `xpm serve` (`Resident::switch_to`: write back the previous
//! expert's saved base values, save the new one's and write `W0 + Δ`). One swap is one such
//! switch; the figure is the median over `--swaps` switches, per round, and the median over
//! `--rounds` rounds.
//!
//! With `TORCH_PYTHON` set, `benches/serve_peft.py` measures on the same two bases, in the same
//! run: PEFT's `set_adapter` between two LoRA adapters with the same number of parameters as
//! the sparse experts (rank chosen per layer), and loading the model from disk with
//! transformers' `from_pretrained` (what serving a merge without in-place swaps costs).

mod common;
use common::{flag, median};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use std::sync::Arc;
use xpm::rng::SplitMix64;
use xpm::serve::resident::{Delta, DeltaTensor, Resident};
use xpm::train::model::ModelDir;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DENSITY: f64 = 0.05;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let swaps: usize = flag(&args, "--swaps", 40);
    let rounds: usize = flag(&args, "--rounds", 3);
    let assets = std::env::var_os("XPM_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/xpm-assets"));
    let minilm = assets.join("minilm");
    assert!(
        minilm.join("model.safetensors").is_file(),
        "no MiniLM in {}: run scripts/fetch-assets.sh",
        assets.display()
    );
    let work = common::target_dir().join("bench-serve");
    let llama = work.join("llama");
    if !llama.join("model.safetensors").is_file() {
        write_small_llama(&llama);
    }
    let mut rows = Vec::new();
    for (label, dir) in [("MiniLM", minilm.clone()), ("Llama 42M", llama.clone())] {
        let md = ModelDir::open(&dir).unwrap();
        let resident = Resident::load(
            md,
            label.into(),
            "sha256:bench".into(),
            candle_core::Device::Cpu,
        )
        .unwrap();
        let (a, b, k, params) = two_experts(&dir);
        let mut resident = resident;
        let digest = resident.weights_digest().unwrap();
        let mut per_round = Vec::new();
        for _ in 0..rounds {
            let mut times = Vec::new();
            for i in 0..swaps {
                let (key, d) = if i % 2 == 0 { ("a", &a) } else { ("b", &b) };
                let t = Instant::now();
                resident.switch_to(Some(key), Some(d)).unwrap();
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            per_round.push(median(times));
        }
        resident.switch_to(None, None).unwrap();
        assert_eq!(
            resident.weights_digest().unwrap(),
            digest,
            "restored bit for bit"
        );
        let ms = median(per_round.clone());
        eprintln!(
            "{label}: {k} sparse entries ({params} parameters in linear weights): swap {ms:.2} ms (rounds {per_round:.2?})"
        );
        rows.push((label, dir, k, params, ms));
    }

    let torch = std::env::var_os("TORCH_PYTHON").map(|py| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/serve_peft.py");
        let o = Command::new(py)
            .arg(script)
            .args(["--minilm", minilm.to_str().unwrap()])
            .args(["--llama", llama.to_str().unwrap()])
            .args(["--density", &DENSITY.to_string()])
            .args([
                "--swaps",
                &swaps.to_string(),
                "--rounds",
                &rounds.to_string(),
            ])
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_VERBOSITY", "error")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let out = String::from_utf8_lossy(&o.stdout);
        serde_json::from_str::<serde_json::Value>(out.lines().last().unwrap()).unwrap()
    });

    let mut md = String::from(
        "| base | sparse 5 % expert | xpm swap (in place) | PEFT `set_adapter` (LoRA, same parameters) | transformers `from_pretrained` |\n|---|---:|---:|---:|---:|\n",
    );
    for (label, _, k, _, ms) in &rows {
        let key = if label.starts_with("MiniLM") {
            "minilm"
        } else {
            "llama"
        };
        let (peft, load) = match &torch {
            Some(t) => (
                format!(
                    "{:.3} ms (rank {})",
                    t[key]["set_adapter_ms"].as_f64().unwrap(),
                    t[key]["lora_rank"]
                ),
                format!(
                    "{:.0} ms ({:.0}× xpm's swap)",
                    t[key]["from_pretrained_ms"].as_f64().unwrap(),
                    t[key]["from_pretrained_ms"].as_f64().unwrap() / ms
                ),
            ),
            None => ("(set TORCH_PYTHON)".into(), "(set TORCH_PYTHON)".into()),
        };
        md.push_str(&format!(
            "| {label} | {k} entries | {ms:.2} ms | {peft} | {load} |\n"
        ));
    }
    print!("{md}");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(common::target_dir().join("bench-serve.md"), md).unwrap();
}

/// Two random sparse experts at [`DENSITY`] of every linear weight (2-D, not an embedding):
/// their deltas, the entries each holds, and the parameters of those weights.
fn two_experts(dir: &Path) -> (Arc<Delta>, Arc<Delta>, usize, usize) {
    let md = ModelDir::open(dir).unwrap();
    let mut names: Vec<(String, usize)> = md
        .checkpoint
        .names()
        .filter_map(|n| {
            let info = md.checkpoint.info(n)?;
            let linear = info.shape.len() == 2
                && n.ends_with(".weight")
                && !n.contains("embed")
                && !n.contains("lm_head");
            linear.then(|| (n.to_string(), info.shape.iter().product()))
        })
        .collect();
    names.sort();
    let params = names.iter().map(|n| n.1).sum();
    let mut rng = SplitMix64(7);
    let mut make = || {
        let mut tensors = Vec::new();
        let mut k_all = 0;
        for (n, numel) in &names {
            let k = (*numel as f64 * DENSITY) as usize;
            let mut idx: Vec<u32> = (0..*numel as u32).collect();
            rng.shuffle(&mut idx);
            idx.truncate(k);
            idx.sort_unstable();
            let vals: Vec<f32> = (0..k).map(|_| rng.normal() * 0.01).collect();
            k_all += k;
            tensors.push((
                n.clone(),
                DeltaTensor::Sparse {
                    indices: idx,
                    values: vals,
                },
            ));
        }
        (
            Delta {
                tensors,
                bytes: k_all * 8,
            },
            k_all,
        )
    };
    let (a, k) = make();
    let (b, _) = make();
    (Arc::new(a), Arc::new(b), k, params)
}

/// A Llama with random weights: hidden 512, 8 layers, 8 heads (4 KV heads), MLP 1376,
/// 8 000 tokens of a word-level tokenizer.
fn write_small_llama(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let (h, i, v, layers) = (512usize, 1376usize, 8000usize, 8usize);
    std::fs::write(
        dir.join("config.json"),
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": v,
            "hidden_size": h, "intermediate_size": i, "num_hidden_layers": layers,
            "num_attention_heads": 8, "num_key_value_heads": 4, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 512, "bos_token_id": 1,
            "eos_token_id": 2, "tie_word_embeddings": false, "torch_dtype": "float32"
        })
        .to_string(),
    )
    .unwrap();
    let words: Vec<String> = ["[UNK]", "<s>", "</s>"]
        .iter()
        .map(|s| s.to_string())
        .chain((3..v).map(|k| format!("w{k}")))
        .collect();
    let refs: Vec<&str> = words.iter().map(String::as_str).collect();
    std::fs::write(
        dir.join("tokenizer.json"),
        xpm::train::toy::tokenizer_json(&refs),
    )
    .unwrap();
    let mut rng = SplitMix64(11);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut put = |name: String, shape: Vec<usize>, ones: bool| {
        let n: usize = shape.iter().product();
        let data = if ones {
            vec![1.0; n]
        } else {
            (0..n).map(|_| rng.normal() * 0.02).collect()
        };
        tensors.push((name, shape, data));
    };
    put("model.embed_tokens.weight".into(), vec![v, h], false);
    for l in 0..layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        put(p("input_layernorm.weight"), vec![h], true);
        put(p("post_attention_layernorm.weight"), vec![h], true);
        put(p("self_attn.q_proj.weight"), vec![h, h], false);
        put(p("self_attn.k_proj.weight"), vec![h / 2, h], false);
        put(p("self_attn.v_proj.weight"), vec![h / 2, h], false);
        put(p("self_attn.o_proj.weight"), vec![h, h], false);
        put(p("mlp.gate_proj.weight"), vec![i, h], false);
        put(p("mlp.up_proj.weight"), vec![i, h], false);
        put(p("mlp.down_proj.weight"), vec![h, i], false);
    }
    put("model.norm.weight".into(), vec![h], true);
    put("lm_head.weight".into(), vec![v, h], false);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, d)| (n, s, d.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}
