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
//! the sparse experts (one rank for all layers), and loading the model from disk with
//! transformers' `from_pretrained` (what serving a merge without in-place swaps costs).
//!
//! Then the mixed workload: 8 sparse experts (5 %, with a 3-label head each) on MiniLM,
//! `--requests` requests of 8 texts each, expert `j % 8` for request `j`, sent by 8 concurrent
//! clients over HTTP on 127.0.0.1 to the release `xpm serve`, and by the same clients to a
//! Python HTTP server (`serve_peft.py --serve`) running PyTorch + PEFT: `set_adapter` to the
//! request's LoRA adapter (same parameter count), the forward pass, the adapter's head.

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
    let requests: usize = flag(&args, "--requests", 96);
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
    // The mixed workload.
    let experts = work.join("experts");
    let paths = write_experts(&minilm, &experts, 8);
    let texts = texts();
    let xpm_s = xpm_throughput(&minilm, &paths, &texts, requests);
    let torch_s = std::env::var_os("TORCH_PYTHON").map(|py| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/serve_peft.py");
        let mut cmd = Command::new(py);
        cmd.arg(script)
            .args(["--serve", minilm.to_str().unwrap()])
            .args(["--density", &DENSITY.to_string()])
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_VERBOSITY", "error");
        let (mut child, url) = start_server(cmd);
        let secs = drive(&url, paths.len(), &texts, requests);
        let _ = child.kill();
        let _ = child.wait();
        secs
    });
    let n_inputs = requests * BATCH;
    md.push_str(&format!(
        "\n| mixed workload, MiniLM, 8 experts round-robin, {requests} requests × {BATCH} texts | time | texts/s |\n|---|---:|---:|\n| `xpm serve` (HTTP, 8 clients) | {xpm_s:.2} s | {:.0} |\n",
        n_inputs as f64 / xpm_s
    ));
    match torch_s {
        Some(t) => md.push_str(&format!(
            "| PyTorch + PEFT, `set_adapter` per request (Python HTTP server, same clients) | {t:.2} s | {:.0} |\n\nxpm / PyTorch throughput: **{:.2}×**\n",
            n_inputs as f64 / t,
            t / xpm_s
        )),
        None => md.push_str("| PyTorch + PEFT | (set TORCH_PYTHON) | |\n"),
    }
    print!("{md}");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(common::target_dir().join("bench-serve.md"), md).unwrap();
}

/// Two random sparse experts at [`DENSITY`] of every linear weight (2-D, not an embedding):
/// their deltas, the entries each holds, and the parameters of those weights.
fn two_experts(dir: &Path) -> (Arc<Delta>, Arc<Delta>, usize, usize) {
    two_experts_seeded(dir, 7)
}

fn two_experts_seeded(dir: &Path, seed: u64) -> (Arc<Delta>, Arc<Delta>, usize, usize) {
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
    let mut rng = SplitMix64(seed);
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

/// Texts per request in the mixed workload.
const BATCH: usize = 8;

/// 32 sentences of 20 to 30 words.
fn texts() -> Vec<String> {
    let words = [
        "the", "film", "was", "a", "quiet", "and", "moving", "story", "about", "two", "friends",
        "who", "travel", "across", "the", "country", "in", "an", "old", "car", "while", "the",
        "music", "plays", "and", "nothing", "much", "happens", "until", "the", "end",
    ];
    let mut rng = SplitMix64(5);
    (0..32)
        .map(|_| {
            let n = 20 + (rng.next_u64() % 11) as usize;
            (0..n)
                .map(|_| words[(rng.next_u64() % words.len() as u64) as usize])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// `n` sparse experts at [`DENSITY`] of MiniLM's linear weights, each with a random 3-label
/// head, written as artifacts (kept between runs).
fn write_experts(base: &Path, dir: &Path, n: usize) -> Vec<PathBuf> {
    use xpm::format::manifest::{BaseModel, ClassificationHead, ExpertKind, Manifest, Training};
    use xpm::format::{ArtifactWriter, Content, Dtype, TensorData, encode_tensor};
    std::fs::create_dir_all(dir).unwrap();
    let paths: Vec<PathBuf> = (0..n).map(|k| dir.join(format!("e{k}.xpm"))).collect();
    if paths.iter().all(|p| p.is_file()) {
        return paths;
    }
    let md = ModelDir::open(base).unwrap();
    let digest = md.checkpoint.digest(None).unwrap();
    for (k, path) in paths.iter().enumerate() {
        let (a, _, _, _) = two_experts_seeded(base, 100 + k as u64);
        let mut w = ArtifactWriter::create(path, 3).unwrap();
        let mut rng = SplitMix64(k as u64);
        for (name, d) in &a.tensors {
            let DeltaTensor::Sparse { indices, values } = d else {
                unreachable!()
            };
            let info = md.checkpoint.info(name).unwrap();
            let t = TensorData {
                name: name.clone(),
                shape: info.shape.iter().map(|&d| d as u64).collect(),
                dtype: Dtype::F32,
                content: Content::Sparse {
                    indices: indices.iter().map(|&i| i as u64).collect(),
                    values: Dtype::F32.from_f32(values),
                    block_size: None,
                },
            };
            w.push(encode_tensor(&t, 3).unwrap()).unwrap();
        }
        let hidden = 384u64;
        for (name, shape) in [
            ("classifier.weight", vec![3, hidden]),
            ("classifier.bias", vec![3]),
        ] {
            let n: u64 = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.normal() * 0.1).collect();
            let t = TensorData {
                name: name.into(),
                shape,
                dtype: Dtype::F32,
                content: Content::Dense {
                    delta: Dtype::F32.from_f32(&v),
                },
            };
            w.push(encode_tensor(&t, 3).unwrap().mark_new().unwrap())
                .unwrap();
        }
        let mut m = Manifest::new(
            &format!("e{k}"),
            semver::Version::new(1, 0, 0),
            BaseModel {
                id: "minilm".into(),
                digest: digest.clone(),
            },
            ExpertKind::Sparse,
        );
        m.training = Some(Training {
            hyperparameters: [("max_seq_len".to_string(), serde_json::json!(128))].into(),
            head: Some(ClassificationHead {
                labels: vec!["a".into(), "b".into(), "c".into()],
                pooling: "mean".into(),
                tensors: vec!["classifier.weight".into(), "classifier.bias".into()],
            }),
            ..Training::default()
        });
        w.finish(m).unwrap();
    }
    paths
}

/// Seconds for `requests` requests through the release `xpm serve` (after one warm-up request
/// per expert, which loads its delta).
fn xpm_throughput(base: &Path, experts: &[PathBuf], texts: &[String], requests: usize) -> f64 {
    let bin = common::build_release("xpm-cli", "xpm");
    let home = common::target_dir().join("bench-serve/home");
    let mut cmd = Command::new(bin);
    cmd.env("XPM_HOME", &home)
        .args([
            "serve",
            "--base",
            base.to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
        ])
        .args(["--queue", "1024", "--cache", "4GiB"]);
    for e in experts {
        cmd.arg("--expert").arg(e);
    }
    let (mut child, url) = start_server(cmd);
    let secs = drive(&url, experts.len(), texts, requests);
    let _ = child.kill();
    let _ = child.wait();
    secs
}

/// Start a server that prints `listening on URL` first on stdout.
fn start_server(mut cmd: Command) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (child, url)
}

/// Send the mixed workload to `url`/v1/classify from 8 concurrent clients: one warm-up request
/// per expert, then `requests` timed ones; returns the seconds they took.
fn drive(url: &str, experts: usize, texts: &[String], requests: usize) -> f64 {
    let url = format!("{url}/v1/classify");
    let client = reqwest::blocking::Client::new();
    let body = |j: usize| {
        let inputs: Vec<&String> = (0..BATCH)
            .map(|i| &texts[(j * BATCH + i) % texts.len()])
            .collect();
        serde_json::json!({"expert": format!("e{}", j % experts), "inputs": inputs})
    };
    for j in 0..experts {
        let r = client.post(&url).json(&body(j)).send().unwrap();
        assert!(r.status().is_success(), "{}", r.text().unwrap());
    }
    let clients = 8;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..clients {
            s.spawn(|| {
                let client = reqwest::blocking::Client::new();
                loop {
                    let j = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if j >= requests {
                        break;
                    }
                    let r = client.post(&url).json(&body(j)).send().unwrap();
                    assert!(r.status().is_success(), "{}", r.text().unwrap());
                }
            });
        }
    });
    t.elapsed().as_secs_f64()
}
