//! Training step time and memory on MiniLM (docs/benchmarks.md, "Training").
//!
//! ```sh
//! scripts/fetch-assets.sh                       # MiniLM + Reuters-8, once
//! cargo bench --bench train                     # xpm only
//! TORCH_PYTHON=/path/to/venv/bin/python cargo bench --bench train   # and PyTorch beside it
//! cargo bench --bench train -- --rounds 5 --steps 8                  # more rounds / steps
//! TORCH_PYTHON=… cargo bench --bench train -- --threads 1,2          # serial part, see below
//! ```
//!
//! Each configuration runs in its own child process (so peak memory is its own): sparse 2 %
//! and 5 %, LoRA r8 and full fine-tuning of the attention projections, batch 32, sequence 64,
//! on Reuters-8 texts. The step time is the median over `--steps` optimizer steps after two
//! warm-up steps (one-shot SNIP selection happens before and is reported apart). With
//! `TORCH_PYTHON` set, `benches/torch_train.py` measures PyTorch's head-only, masked-dense
//! (the reference code's sparse training), LoRA and full steps on the same data in the same
//! run, and the table gives ratios against it. The whole set runs `--rounds` times (default 3)
//! in turn, because this machine's speed drifts over minutes: ratios are formed within a round
//! and the table shows the medians over rounds.
//!
//! `--threads A,B` measures every configuration (and PyTorch's modes) at A and at B threads
//! instead, fits Amdahl's law to each, and predicts the step at 16 threads and xpm ÷ PyTorch
//! there (`serial_fraction`).

mod common;
use common::median;

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
    // SAFETY: at the start of `main`, before this bench starts any thread.
    unsafe { xpm::cli::configure_training_threads() };
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = common::flag(&args, "--steps", 8);
    let rounds: usize = common::flag(&args, "--rounds", 3).max(1);
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
    let run_xpm_on = |i: usize, threads: Option<usize>| -> serde_json::Value {
        let mut cmd = Command::new(&exe);
        if let Some(t) = threads {
            cmd.env("RAYON_NUM_THREADS", t.to_string());
        }
        let out = cmd
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
        serde_json::from_slice(
            out.stdout
                .split(|&b| b == b'\n')
                .find(|l| l.starts_with(b"{"))
                .unwrap(),
        )
        .unwrap()
    };
    let torch_py = std::env::var("TORCH_PYTHON").ok();
    let run_xpm = |i: usize| run_xpm_on(i, None);
    let run_torch_on = |py: &str, threads: usize| -> Vec<serde_json::Value> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/torch_train.py");
        let out = Command::new(py)
            .arg(script)
            .args(["--mode", "all", "--json", "--threads", &threads.to_string()])
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
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let run_torch = |py: &str| run_torch_on(py, 2);
    let list: String = common::flag(&args, "--threads", String::new());
    if !list.is_empty() {
        let threads: Vec<usize> = list.split(',').map(|t| t.parse().unwrap()).collect();
        assert!(
            threads.len() == 2 && threads[0] < threads[1],
            "--threads takes two counts, smaller first (e.g. 1,2)"
        );
        serial_fraction(&threads, rounds, &|i, t| run_xpm_on(i, Some(t)), &|t| {
            torch_py
                .as_deref()
                .map(|py| run_torch_on(py, t))
                .unwrap_or_default()
        });
        return;
    }
    // The machine's speed drifts over minutes: every round runs each configuration (and
    // PyTorch) once, and the table takes the median over rounds. Ratios are formed within a
    // round, then their median is taken.
    let mut xpm_rounds: Vec<Vec<serde_json::Value>> = Vec::new();
    let mut torch_rounds: Vec<Vec<serde_json::Value>> = Vec::new();
    for round in 0..rounds {
        let rows: Vec<serde_json::Value> = (0..CONFIGS.len()).map(&run_xpm).collect();
        let torch = torch_py.as_deref().map(run_torch).unwrap_or_default();
        let line: Vec<String> = rows
            .iter()
            .map(|v| format!("{} {:.3}", v["label"].as_str().unwrap(), median_s(v)))
            .chain(
                torch
                    .iter()
                    .map(|v| format!("torch {} {:.3}", v["mode"].as_str().unwrap(), median_s(v))),
            )
            .collect();
        eprintln!("round {}: {} (s/step)", round + 1, line.join(", "));
        xpm_rounds.push(rows);
        torch_rounds.push(torch);
    }
    let torch_s = |r: usize, mode: &str| -> Option<f64> {
        torch_rounds[r]
            .iter()
            .find(|v| v["mode"] == mode)
            .map(median_s)
    };
    let lora_s = |r: usize| median_s(&xpm_rounds[r][2]);
    println!(
        "\nMiniLM-L6, batch {BATCH}, seq {SEQ}, {steps} steps after {WARMUP} warm-up, attention q/k/v/o adapted; median over {rounds} rounds\n"
    );
    println!("CPU: {}\n", cpu_description());
    println!(
        "| configuration | s/step | × LoRA | × PyTorch masked-dense | × PyTorch, same method | trainable params | optimizer state | peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let ratio_cell = |f: &dyn Fn(usize) -> Option<f64>| -> String {
        let v: Vec<f64> = (0..rounds).filter_map(f).collect();
        if v.is_empty() {
            "–".into()
        } else {
            format!("{:.2}", median(v))
        }
    };
    for (i, c) in CONFIGS.iter().enumerate() {
        let s = median((0..rounds).map(|r| median_s(&xpm_rounds[r][i])).collect());
        let first = &xpm_rounds[0][i];
        // PyTorch's step for the same method: sparse against masked-dense, LoRA against
        // LoRA, full (q/k/v/o) against full training of the same weights.
        let same = match c.method {
            xpm::train::Method::Lora => "lora",
            xpm::train::Method::Full => "full-attn",
            _ => "masked-dense",
        };
        println!(
            "| xpm {} | {:.3} | {} | {} | {} | {} | {:.2} MiB | {:.0} MiB |",
            c.label,
            s,
            ratio_cell(&|r| Some(median_s(&xpm_rounds[r][i]) / lora_s(r))),
            ratio_cell(&|r| torch_s(r, "masked-dense").map(|m| median_s(&xpm_rounds[r][i]) / m)),
            ratio_cell(&|r| torch_s(r, same).map(|m| median_s(&xpm_rounds[r][i]) / m)),
            first["trainable"],
            first["state_bytes"].as_f64().unwrap() / 1048576.0,
            first["peak_rss_mb"].as_f64().unwrap()
        );
    }
    if let Some(first) = torch_rounds.first() {
        for v in first {
            let mode = v["mode"].as_str().unwrap_or("");
            let s = median((0..rounds).filter_map(|r| torch_s(r, mode)).collect());
            println!(
                "| PyTorch {} {} | {:.3} | {} | {} | – | {} | – | {:.0} MiB (cumulative) |",
                v["torch_version"].as_str().unwrap_or(""),
                mode,
                s,
                ratio_cell(&|r| torch_s(r, mode).map(|t| t / lora_s(r))),
                ratio_cell(&|r| Some(torch_s(r, mode)? / torch_s(r, "masked-dense")?)),
                v["trainable_params"],
                v["peak_rss_mb"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
}

/// Step times at two thread counts a < b, and the serial part they imply: a step of t threads
/// takes S + P / t (Amdahl), so P = (T(a) − T(b)) / (1/a − 1/b), S = T(a) − P / a, and
/// T(16) = S + P / 16 is the prediction for 16 threads. PyTorch's same method gets the same fit
/// in the same rounds, so the last column predicts xpm ÷ PyTorch at 16 threads.
fn serial_fraction(
    threads: &[usize],
    rounds: usize,
    run_xpm: &dyn Fn(usize, usize) -> serde_json::Value,
    run_torch: &dyn Fn(usize) -> Vec<serde_json::Value>,
) {
    let (a, b) = (threads[0], threads[1]);
    // times[config][thread index] over rounds; torch[mode][thread index] over rounds.
    let mut xpm = vec![[Vec::new(), Vec::new()]; CONFIGS.len()];
    let mut torch: std::collections::BTreeMap<String, [Vec<f64>; 2]> = Default::default();
    for round in 0..rounds {
        for (k, &t) in threads.iter().enumerate() {
            for (i, times) in xpm.iter_mut().enumerate() {
                times[k].push(median_s(&run_xpm(i, t)));
            }
            for v in run_torch(t) {
                let mode = v["mode"].as_str().unwrap_or("").to_string();
                torch.entry(mode).or_default()[k].push(median_s(&v));
            }
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    let fit = |ta: f64, tb: f64| {
        let p = (ta - tb) / (1.0 / a as f64 - 1.0 / b as f64);
        let s = ta - p / a as f64;
        (s, p)
    };
    println!(
        "
Serial part, MiniLM-L6, batch {BATCH}, seq {SEQ}; medians over {rounds} rounds
"
    );
    println!(
        "CPU: {}
",
        cpu_description()
    );
    println!(
        "| configuration | T({a}) s | T({b}) s | serial S s | S ÷ T(1) | predicted T(16) s | gain {b}→16 | PyTorch same method T({a}) / T({b}) / T(16) | × PyTorch at {b} | predicted × PyTorch at 16 |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|");
    for (i, c) in CONFIGS.iter().enumerate() {
        let (ta, tb) = (median(xpm[i][0].clone()), median(xpm[i][1].clone()));
        let (s, p) = fit(ta, tb);
        let t16 = s + p / 16.0;
        let same = match c.method {
            xpm::train::Method::Lora => "lora",
            xpm::train::Method::Full => "full-attn",
            _ => "masked-dense",
        };
        let theirs = torch.get(same).map(|t| {
            let (pa, pb) = (median(t[0].clone()), median(t[1].clone()));
            let (ps, pp) = fit(pa, pb);
            (pa, pb, ps + pp / 16.0)
        });
        let (cell, now, at16) = match theirs {
            Some((pa, pb, p16)) => (
                format!("{pa:.3} / {pb:.3} / {p16:.3}"),
                format!("{:.2}", tb / pb),
                format!("**{:.2}**", t16 / p16),
            ),
            None => ("–".into(), "–".into(), "–".into()),
        };
        println!(
            "| xpm {} | {ta:.3} | {tb:.3} | {s:.3} | {:.2} | {t16:.3} | {:.2}× | {cell} | {now} | {at16} |",
            c.label,
            s / (s + p),
            tb / t16,
        );
    }
}

/// The CPU's model name and the vector extensions that matter for the kernels (Linux's
/// /proc/cpuinfo; "unknown" elsewhere).
fn cpu_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let flags = field("flags").unwrap_or_default();
    let have: Vec<&str> = [
        "avx2",
        "fma",
        "avx512f",
        "avx512_vnni",
        "avx512_bf16",
        "amx_tile",
        "amx_bf16",
    ]
    .into_iter()
    .filter(|f| flags.split_whitespace().any(|x| x == *f))
    .collect();
    format!(
        "{}, {} threads available; {}",
        field("model name").unwrap_or_else(|| "unknown".into()),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        if have.is_empty() {
            "no AVX2".to_string()
        } else {
            have.join(", ")
        }
    )
}

fn median_s(v: &serde_json::Value) -> f64 {
    v["median_s"].as_f64().unwrap()
}
