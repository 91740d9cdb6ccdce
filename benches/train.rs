//! Training step time and memory on MiniLM (docs/benchmarks.md, "Training").
//!
//! ```sh
//! scripts/fetch-assets.sh                       # MiniLM + Reuters-8, once
//! cargo bench --bench train                     # xpm only
//! TORCH_PYTHON=/path/to/venv/bin/python cargo bench --bench train   # and PyTorch beside it
//! ```
//!
//! Each configuration runs in its own child process (so peak memory is its own): sparse 2 %
//! and 5 %, LoRA r8 and full fine-tuning of the attention projections, batch 32, sequence 64,
//! on Reuters-8 texts. The step time is the median over `--steps` optimizer steps after two
//! warm-up steps (one-shot SNIP selection happens before and is reported apart). With
//! `TORCH_PYTHON` set, `benches/torch_train.py` measures PyTorch's head-only, masked-dense
//! (the reference code's sparse training), LoRA and full steps on the same data in the same
//! run, and the table gives ratios against it.

use std::path::{Path, PathBuf};
use std::process::Command;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 32;
const SEQ: usize = 64;
const WARMUP: usize = 2;

struct Config {
    label: &'static str,
    method: xpm::train::Method,
    keep: f64,
}

const CONFIGS: &[Config] = &[
    Config {
        label: "sparse 2 %",
        method: xpm::train::Method::Sparse,
        keep: 0.02,
    },
    Config {
        label: "sparse 5 %",
        method: xpm::train::Method::Sparse,
        keep: 0.05,
    },
    Config {
        label: "LoRA r8",
        method: xpm::train::Method::Lora,
        keep: 0.0,
    },
    Config {
        label: "full",
        method: xpm::train::Method::Full,
        keep: 0.0,
    },
];

fn peak_rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn child(index: usize, data: &Path, minilm: &Path, steps: usize) {
    let c = &CONFIGS[index];
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.jsonl");
    let mut o = xpm::train::TrainOptions::new(
        minilm.display().to_string(),
        data.to_path_buf(),
        c.method,
        "bench",
        dir.path().join("bench.xpm"),
    );
    o.batch_size = BATCH;
    o.max_seq_len = SEQ;
    o.max_steps = Some(steps + WARMUP);
    o.keep_ratio = if c.keep > 0.0 { c.keep } else { 0.05 };
    o.json_log = Some(log.clone());
    let home = xpm::home::XpmHome::resolve(Some(dir.path().join("home")));
    let t0 = std::time::Instant::now();
    let r = xpm::train::train(&o, &home, &xpm::printer::Printer::silent()).unwrap();
    let total = t0.elapsed().as_secs_f64();
    let mut times: Vec<f64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["step_time_s"].as_f64())
        .skip(WARMUP)
        .collect();
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "label": c.label, "median_s": median, "trainable": r.trainable_params,
            "state_bytes": r.optimizer_state_bytes, "peak_rss_mb": peak_rss_mb(),
            "total_s": total,
        })
    );
}

fn main() {
    xpm::alloc::configure();
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = args
        .iter()
        .position(|a| a == "--steps")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let assets = std::env::var_os("XPM_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/xpm-assets"));
    let minilm = assets.join("minilm");
    if !minilm.join("model.safetensors").is_file() {
        eprintln!(
            "no MiniLM in {}: run scripts/fetch-assets.sh",
            assets.display()
        );
        std::process::exit(2);
    }
    if let Ok(i) = std::env::var("XPM_BENCH_CHILD") {
        let data = PathBuf::from(std::env::var("XPM_BENCH_DATA").unwrap());
        child(i.parse().unwrap(), &data, &minilm, steps);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    xpm::ops::data_import::import(&xpm::ops::data_import::ImportOptions {
        input: assets.join("orange/reuters-r8-train.tab"),
        out: data.clone(),
        limit: Some(BATCH * (steps + WARMUP + 4)),
        seed: Some(0),
        ..Default::default()
    })
    .unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rows = Vec::new();
    for (i, config) in CONFIGS.iter().enumerate() {
        let out = Command::new(&exe)
            .args(["--steps", &steps.to_string()])
            .env("XPM_BENCH_CHILD", i.to_string())
            .env("XPM_BENCH_DATA", &data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(
            out.stdout
                .split(|&b| b == b'\n')
                .find(|l| l.starts_with(b"{"))
                .unwrap(),
        )
        .unwrap();
        eprintln!(
            "xpm {}: {:.3} s/step",
            config.label,
            v["median_s"].as_f64().unwrap()
        );
        rows.push(v);
    }
    let mut torch: Vec<serde_json::Value> = Vec::new();
    if let Ok(py) = std::env::var("TORCH_PYTHON") {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/torch_train.py");
        let out = Command::new(py)
            .arg(script)
            .args(["--mode", "all", "--json", "--threads", "2"])
            .args([
                "--steps",
                &steps.to_string(),
                "--warmup-steps",
                &WARMUP.to_string(),
            ])
            .args([
                "--model",
                minilm.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
            ])
            .args([
                "--batch-size",
                &BATCH.to_string(),
                "--max-seq-len",
                &SEQ.to_string(),
            ])
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        torch = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
    }
    let t = |mode: &str| {
        torch
            .iter()
            .find(|v| v["mode"] == mode)
            .and_then(|v| v["median_s"].as_f64())
    };
    let lora = rows[2]["median_s"].as_f64().unwrap();
    println!(
        "\nMiniLM-L6, batch {BATCH}, seq {SEQ}, {steps} steps after {WARMUP} warm-up, attention q/k/v/o adapted\n"
    );
    println!(
        "| configuration | s/step | × LoRA | × PyTorch masked-dense | trainable params | optimizer state | peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        let s = r["median_s"].as_f64().unwrap();
        println!(
            "| xpm {} | {:.3} | {:.2} | {} | {} | {:.2} MiB | {:.0} MiB |",
            r["label"].as_str().unwrap(),
            s,
            s / lora,
            t("masked-dense")
                .map(|m| format!("{:.2}", s / m))
                .unwrap_or("–".into()),
            r["trainable"],
            r["state_bytes"].as_f64().unwrap() / 1048576.0,
            r["peak_rss_mb"].as_f64().unwrap()
        );
    }
    for v in &torch {
        println!(
            "| PyTorch {} {} | {:.3} | {:.2} | {} | {} | – | {:.0} MiB (cumulative) |",
            v["torch_version"].as_str().unwrap_or(""),
            v["mode"].as_str().unwrap_or(""),
            v["median_s"].as_f64().unwrap(),
            v["median_s"].as_f64().unwrap() / lora,
            t("masked-dense")
                .map(|m| format!("{:.2}", v["median_s"].as_f64().unwrap() / m))
                .unwrap_or("–".into()),
            v["trainable_params"],
            v["peak_rss_mb"].as_f64().unwrap_or(f64::NAN)
        );
    }
}
