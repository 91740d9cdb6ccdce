//! Merge benchmark (docs/benchmarks.md, "Merge"): 20 sparse experts at 5 % density over 64
//! tensors of 1024 × 1024 (67 M target parameters), merged with `ties` and `sparse-mean` by the
//! release `xpm` binary:
//!
//! - sparse-native (the experts as they are) against the same merge on densified inputs (the
//!   same deltas stored as dense experts, which the engine merges with full support);
//! - against an I/O floor: decoding every input tensor and encoding + writing the output, with
//!   no merge arithmetic, in-process and parallel like `xpm merge` (and with its allocator settings,
//!   `xpm::alloc::reuse`);
//! - peak RSS of each run (GNU time);
//! - the merge arithmetic alone per input entry, on one thread, against the plainest
//!   `sparse-mean`, the bare scatter into blocked f64 sums that any merge keeping per-position
//!   f64 sums must do (with and without TIES's sign vote), and one read of every entry; and
//!   what the goals (`ties` ≤ 1.15×, `sparse-mean` ≤ 1.1× the floor) leave for it per entry;
//! - with `TORCH_PYTHON=…/python` (a Python with torch and safetensors): against PyTorch merging
//!   the same experts densified, with mergekit's formulas (`benches/torch_merge.py`), and the
//!   largest difference between its result and xpm's.
//!
//! Run: `cargo bench --bench merge` (`-- --quick` for 4 experts × 16 tensors, `-- --rounds N`
//! for N rounds of the sparse, densified and floor runs, default 3, `-- --arithmetic` for the
//! arithmetic section alone). Writes the table
//! to `target/bench-merge.md`. `XPM_BENCH_KEEP=1` keeps the generated experts (for profiling);
//! `XPM_BENCH_DIR=/dev/shm` writes them and every output there instead of under `target/`.

mod common;
use common::median;

// The I/O floor runs in this process: with the allocator and settings of `xpm merge` itself.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use rayon::prelude::*;
use xpm::format::{
    ArtifactReader, ArtifactWriter, BaseModel, Content, Dtype, ExpertKind, Manifest, TensorData,
    encode_tensor,
};
use xpm::merge::input::load_input_at;
use xpm::rng::SplitMix64;

const SIDE: u64 = 1024;
const DENSITY: f64 = 0.05;

fn manifest(name: &str, kind: ExpertKind) -> Manifest {
    Manifest::new(
        name,
        "1.0.0".parse().unwrap(),
        BaseModel {
            id: "bench-base".into(),
            digest: xpm::digest::sha256(b"bench-base"),
        },
        kind,
    )
}

/// Expert `e`: for each tensor, ~5 % of positions with N(0, 1)-ish values; written sparse and,
/// when `dense_path` is given, also as a dense expert holding the same deltas.
fn write_expert(e: u64, tensors: usize, sparse_path: &Path, dense_path: Option<&Path>) {
    let n = (SIDE * SIDE) as usize;
    let mut sw = ArtifactWriter::create(sparse_path, 1).unwrap();
    let mut dw = dense_path.map(|p| ArtifactWriter::create(p, 1).unwrap());
    for t in 0..tensors {
        let mut g = SplitMix64(xpm::rng::splitmix64(e * 1000 + t as u64 + 1));
        let mut idx = Vec::with_capacity((n as f64 * DENSITY * 1.1) as usize);
        let mut val = Vec::with_capacity(idx.capacity());
        let threshold = (DENSITY * u64::MAX as f64) as u64;
        for i in 0..n as u64 {
            if g.next_u64() < threshold {
                idx.push(i);
                val.push(g.uniform() * 2.0 - 1.0);
            }
        }
        let name = format!("encoder.layer.{t}.weight");
        if let Some(dw) = dw.as_mut() {
            let mut d = vec![0f32; n];
            for (i, v) in idx.iter().zip(&val) {
                d[*i as usize] = *v;
            }
            let td = TensorData {
                name: name.clone(),
                shape: vec![SIDE, SIDE],
                dtype: Dtype::F32,
                content: Content::Dense {
                    delta: Dtype::F32.from_f32(&d),
                },
            };
            dw.push(encode_tensor(&td, 1).unwrap()).unwrap();
        }
        let ts = TensorData {
            name,
            shape: vec![SIDE, SIDE],
            dtype: Dtype::F32,
            content: Content::Sparse {
                indices: idx,
                values: Dtype::F32.from_f32(&val),
                block_size: None,
            },
        };
        sw.push(encode_tensor(&ts, 1).unwrap()).unwrap();
    }
    sw.finish(manifest(&format!("sparse-{e}"), ExpertKind::Sparse))
        .unwrap();
    if let Some(dw) = dw {
        dw.finish(manifest(&format!("dense-{e}"), ExpertKind::Dense))
            .unwrap();
    }
}

/// Wall time (s) and peak RSS (MB) of `xpm merge …` (release binary, GNU time).
fn run_merge(inputs: &[PathBuf], strategy: &str, out: &Path) -> (f64, f64) {
    // `density` is `ties`'s parameter; the strategies refuse parameters they do not use.
    let params: &[&str] = if strategy == "ties" {
        &["--param", "density=0.2"]
    } else {
        &[]
    };
    let args: Vec<&str> = ["--strategy", strategy]
        .into_iter()
        .chain(params.iter().copied())
        .collect();
    run_merge_with(inputs, &args, out)
}

fn run_merge_with(inputs: &[PathBuf], args: &[&str], out: &Path) -> (f64, f64) {
    let _ = std::fs::remove_file(out);
    let mut all: Vec<&std::ffi::OsStr> = vec!["merge".as_ref()];
    all.extend(inputs.iter().map(|p| p.as_os_str()));
    all.extend(args.iter().map(std::ffi::OsStr::new));
    all.extend(["-q".as_ref(), "-o".as_ref(), out.as_os_str()]);
    common::timed_peak_rss(Path::new(env!("CARGO_BIN_EXE_xpm")), &all)
}

/// Decode every input tensor and encode + write the output's tensors, no merge arithmetic:
/// what any merge must at least do, the way `xpm merge` does it. Per tensor, in parallel
/// across tensors: every input's part decoded into the engine's pooled buffers (every frame
/// hashed against the manifest), then the merged tensor (decoded beforehand, not timed)
/// encoded; the writer writes in order as results arrive, overlapping the work.
fn io_floor(inputs: &[PathBuf], merged: &Path, out: &Path) -> f64 {
    let readers: Vec<ArtifactReader> = inputs
        .iter()
        .map(|p| ArtifactReader::open(p).unwrap())
        .collect();
    let m = ArtifactReader::open(merged).unwrap();
    let n = m.manifest().tensors.len();
    let tensors: Vec<TensorData> = (0..n)
        .into_par_iter()
        .map(|i| m.read_tensor(i).unwrap())
        .collect();
    let level = xpm::format::artifact::DEFAULT_LEVEL;
    let t = Instant::now();
    let mut w = ArtifactWriter::create(out, level).unwrap();
    let order: Vec<usize> = (0..n).collect();
    xpm::parallel::map_ordered(
        &order,
        |&i| {
            for r in &readers {
                std::hint::black_box(load_input_at(r, i)?).recycle();
            }
            encode_tensor(&tensors[i], level)
        },
        |e| w.push(e),
    )
    .unwrap();
    let mut man = m.manifest().clone();
    man.tensors.clear();
    man.payload = None;
    w.finish(man).unwrap();
    t.elapsed().as_secs_f64()
}

/// `xpm unpack` (not timed) every expert, then `benches/torch_merge.py` per strategy.
fn torch_baseline(
    python: &str,
    dir: &Path,
    experts: &[PathBuf],
    runs: &[(&str, PathBuf, f64, f64)],
) -> String {
    let unpack = |src: &Path, dst: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_xpm"))
            .arg("unpack")
            .arg(src)
            .arg("-q")
            .arg("-o")
            .arg(dst)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    eprintln!("unpacking the experts for PyTorch …");
    let dirs: Vec<PathBuf> = experts
        .par_iter()
        .enumerate()
        .map(|(i, e)| {
            let d = dir.join(format!("u{i}"));
            unpack(e, &d);
            d
        })
        .collect();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/torch_merge.py");
    let mut out = String::from(
        "\n### Against PyTorch (dense, mergekit's formulas)\n\n`benches/torch_merge.py`: the same \
         experts unpacked, each densified in torch, merged one tensor name at a time, written with \
         safetensors; 2 threads. Time from the first read to the written file (interpreter start \
         and `import torch` not counted); peak RSS is the process's, and in brackets above what the \
         interpreter holds once torch is imported.\n\n\
         | strategy | xpm sparse-native | PyTorch dense | xpm faster by | PyTorch memory / xpm | max \\|xpm − torch\\| |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for (strategy, merged, ts, ms) in runs {
        let check = dir.join(format!("u-{strategy}"));
        unpack(merged, &check);
        let o = Command::new(python)
            .arg(&script)
            .args(["--strategy", strategy, "--density", "0.2", "--threads", "2"])
            .arg("--out")
            .arg(dir.join("torch.safetensors"))
            .arg("--check")
            .arg(&check)
            .args(&dirs)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .last()
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
        let (tt, mt, mi) = (
            v["seconds"].as_f64().unwrap(),
            v["peak_rss_mb"].as_f64().unwrap(),
            v["rss_after_import_mb"].as_f64().unwrap(),
        );
        out.push_str(&format!(
            "| `{strategy}` | {ts:.2} s, {ms:.0} MB | {tt:.2} s, {mt:.0} MB (+{:.0}) | **{:.1}×** | **{:.1}×** ({:.1}×) | {:.1e} |\n",
            mt - mi,
            tt / ts,
            mt / ms,
            (mt - mi) / ms,
            v["max_abs_diff"].as_f64().unwrap_or(f64::NAN)
        ));
    }
    out
}

/// The merge arithmetic alone, on one thread, against two references on the same decoded
/// entries (the first `tensors` tensors of every expert): the engine's `sparse-mean` and `ties`
/// (per input entry, output included), the plainest `sparse-mean` (f64 sums and counts over the
/// whole tensor, then a pass for the output), and one read of every entry (an index and a
/// value summed: the memory traffic any merge pays). Best of 3. For the bound: how far
/// the engine's per-entry cost is from what a merge cannot avoid.
fn arithmetic(sparse: &[PathBuf], tensors: usize) -> String {
    use xpm::merge::engine::{Input, Output, merge_tensor_owned};
    use xpm::merge::{MergeParams, Strategy};
    let readers: Vec<ArtifactReader> = sparse
        .iter()
        .map(|p| ArtifactReader::open(p).unwrap())
        .collect();
    let all: Vec<Vec<Input>> = (0..tensors)
        .map(|t| {
            readers
                .iter()
                .map(|r| load_input_at(r, t).unwrap())
                .collect()
        })
        .collect();
    let entries: usize = all
        .iter()
        .flatten()
        .map(|i| match i {
            Input::Sparse { values, .. } => values.len(),
            _ => 0,
        })
        .sum();
    let n = (SIDE * SIDE) as usize;
    let w = vec![1.0f64; readers.len()];
    let best = |f: &mut dyn FnMut() -> usize| {
        (0..3)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(f());
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    };
    // The engine consumes its inputs: the copies' cost is measured and taken out.
    let copy = best(&mut || all.iter().map(|ins| ins.clone().len()).sum());
    let engine = |strategy: Strategy, p: MergeParams| {
        best(&mut || {
            all.iter()
                .map(|ins| {
                    match merge_tensor_owned("t", &[SIDE, SIDE], ins.clone(), &w, strategy, &p) {
                        Output::Sparse { indices, .. } => indices.len(),
                        Output::Dense { values } => values.len(),
                    }
                })
                .sum()
        }) - copy
    };
    let mean = engine(Strategy::SparseMean, MergeParams::default());
    let ties = engine(
        Strategy::Ties,
        MergeParams {
            density: 0.2,
            ..MergeParams::default()
        },
    );
    let (mut num, mut den) = (vec![0f64; n], vec![0f64; n]);
    let (mut oi, mut ov): (Vec<u64>, Vec<f32>) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let plain = best(&mut || {
        let mut outs = 0;
        for ins in &all {
            for input in ins {
                if let Input::Sparse { indices, values } = input {
                    for (&i, &v) in indices.iter().zip(values) {
                        num[i as usize] += v as f64;
                        den[i as usize] += 1.0;
                    }
                }
            }
            oi.clear();
            ov.clear();
            for (j, (x, d)) in num.iter_mut().zip(den.iter_mut()).enumerate() {
                if *d != 0.0 {
                    oi.push(j as u64);
                    ov.push((*x / *d) as f32);
                    (*x, *d) = (0.0, 0.0);
                }
            }
            outs += oi.len();
        }
        outs
    });
    // What any merge that keeps per-position f64 sums must do per entry: the engine's blocks,
    // each entry added to a weighted sum and its weight to another, nothing else (no union,
    // no output).
    const BLK: u64 = 8192;
    let (mut bn, mut bd, mut bv) = (
        vec![0f64; 2 * BLK as usize],
        vec![0f64; 2 * BLK as usize],
        vec![0f64; BLK as usize],
    );
    // `vote`: also TIES's sign vote, the sums split by sign (the engine's lanes).
    let mut sums_only = |vote: bool| {
        best(&mut || {
            let mut outs = 0usize;
            for ins in &all {
                let mut cur = vec![0usize; ins.len()];
                for c0 in (0..n as u64).step_by(BLK as usize) {
                    let c1 = c0 + BLK;
                    for (input, at) in ins.iter().zip(cur.iter_mut()) {
                        let Input::Sparse { indices, values } = input else {
                            continue;
                        };
                        let w = 1.0f64;
                        for (&i, &v) in indices[*at..].iter().zip(&values[*at..]) {
                            if i >= c1 {
                                break;
                            }
                            let o = (i - c0) as usize & (BLK as usize - 1);
                            let v = v as f64;
                            if vote {
                                bv[o] += v;
                                let l = (2 * o + usize::from(v < 0.0)) & (2 * BLK as usize - 1);
                                bn[l] += w * v;
                                bd[l] += w;
                            } else {
                                bn[o] += w * v;
                                bd[o] += w;
                            }
                            *at += 1;
                        }
                    }
                    outs += bd[outs & (BLK as usize - 1)] as usize + bv[0] as usize;
                    bn.fill(0.0);
                    bd.fill(0.0);
                    bv.fill(0.0);
                }
            }
            outs
        })
    };
    let (sums, sums_vote) = (sums_only(false), sums_only(true));
    let read = best(&mut || {
        let (mut acc, mut xor) = (0f64, 0u64);
        for input in all.iter().flatten() {
            if let Input::Sparse { indices, values } = input {
                for (&i, &v) in indices.iter().zip(values) {
                    acc += v as f64;
                    xor ^= i;
                }
            }
        }
        (acc as usize) ^ xor as usize
    });
    let ns = |t: f64| t * 1e9 / entries as f64;
    format!(
        "\n### Arithmetic per input entry\n\nOne thread, the first {tensors} tensors of every expert ({entries} entries), decoded beforehand; best of 3:\n\n| | time | per entry |\n|---|---:|---:|\n| engine `sparse-mean` (output included) | {:.1} ms | {:.2} ns |\n| engine `ties` | {:.1} ms | {:.2} ns |\n| plainest `sparse-mean` (whole-tensor f64 sums and counts, output pass) | {:.1} ms | {:.2} ns |\n| blocked f64 sums only (no union, no output) | {:.1} ms | {:.2} ns |\n| the same with TIES's sign vote and sums split by sign | {:.1} ms | {:.2} ns |\n| one read of every entry (index and value) | {:.1} ms | {:.2} ns |\n",
        mean * 1e3,
        ns(mean),
        ties * 1e3,
        ns(ties),
        plain * 1e3,
        ns(plain),
        sums * 1e3,
        ns(sums),
        sums_vote * 1e3,
        ns(sums_vote),
        read * 1e3,
        ns(read),
    )
}

fn main() {
    xpm::alloc::reuse();
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let rounds: usize = common::flag(&args, "--rounds", 3).max(1);
    let (experts, tensors) = if quick { (4u64, 16usize) } else { (20, 64) };
    let mut dir = tempfile::tempdir_in(common::bench_dir()).unwrap();
    if std::env::var_os("XPM_BENCH_KEEP").is_some() {
        // Keep the experts and outputs (for profiling `xpm merge` on them).
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    eprintln!(
        "writing {experts} experts × {tensors} tensors of {SIDE}×{SIDE} (sparse and dense) …"
    );
    let (sparse, dense): (Vec<PathBuf>, Vec<PathBuf>) = (0..experts)
        .into_par_iter()
        .map(|e| {
            let s = dir.path().join(format!("s{e}.xpm"));
            let d = dir.path().join(format!("d{e}.xpm"));
            write_expert(e, tensors, &s, Some(&d));
            (s, d)
        })
        .unzip();
    if args.iter().any(|a| a == "--arithmetic") {
        // Only the arithmetic section.
        println!("{}", arithmetic(&sparse, tensors.min(16)));
        return;
    }
    let size = |v: &[PathBuf]| {
        v.iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum::<u64>() as f64
            / 1e6
    };
    let params = tensors as f64 * (SIDE * SIDE) as f64 / 1e6;
    let mut report = format!(
        "## Merge (`cargo bench --bench merge`)\n\n{experts} sparse experts at {:.0} % density over {tensors} \
         tensors of {SIDE}×{SIDE} ({params:.0} M target parameters); inputs {:.0} MB sparse, {:.0} MB as \
         dense experts (zstd). Release `xpm merge`, 2 threads; medians over {rounds} rounds.\n\n\
         | strategy | inputs | time | peak RSS | vs sparse-native |\n|---|---|---:|---:|---:|\n",
        DENSITY * 100.0,
        size(&sparse),
        size(&dense),
    );
    // This VM's speed drifts by up to 30 % within minutes: each round measures sparse-native,
    // densified and the floor back to back, ratios are formed within a round, and the table
    // shows medians over rounds (and each round's ratio to the floor).
    let mut sparse_runs = Vec::new();
    let mut floors = Vec::new();
    for strategy in ["ties", "sparse-mean"] {
        let out_s = dir.path().join(format!("m-{strategy}-s.xpm"));
        let out_d = dir.path().join(format!("m-{strategy}-d.xpm"));
        let mut r: Vec<[f64; 5]> = Vec::new();
        for round in 0..rounds {
            let (ts, ms) = run_merge(&sparse, strategy, &out_s);
            let (td, md) = run_merge(&dense, strategy, &out_d);
            let floor = io_floor(&sparse, &out_s, &dir.path().join("floor.xpm"));
            eprintln!(
                "{strategy} round {}: sparse {ts:.2} s, densified {td:.2} s, floor {floor:.2} s",
                round + 1
            );
            r.push([ts, ms, td, md, floor]);
        }
        let col = |i: usize| median(r.iter().map(|x| x[i]).collect());
        let ratio = |f: &dyn Fn(&[f64; 5]) -> f64| median(r.iter().map(f).collect());
        let (ts, ms, td, md, floor) = (col(0), col(1), col(2), col(3), col(4));
        let per_round: Vec<String> = r.iter().map(|x| format!("{:.2}", x[0] / x[4])).collect();
        report.push_str(&format!(
            "| `{strategy}` | sparse-native | {ts:.2} s | {ms:.0} MB | 1.00× |\n\
             | `{strategy}` | densified | {td:.2} s | {md:.0} MB | {:.1}× slower, {:.1}× the memory |\n\
             | `{strategy}` | I/O floor (decode inputs, encode + write output) | {floor:.2} s | – | sparse-native is {:.2}× the floor (per round: {}) |\n",
            ratio(&|x| x[2] / x[0]),
            ratio(&|x| x[3] / x[1]),
            ratio(&|x| x[0] / x[4]),
            per_round.join(", "),
        ));
        sparse_runs.push((strategy, out_s, ts, ms));
        floors.push(floor);
    }
    if let Ok(python) = std::env::var("TORCH_PYTHON") {
        report.push_str(&torch_baseline(&python, dir.path(), &sparse, &sparse_runs));
    }
    // A plugin implementation of `mean` against the built-in, same inputs (release cdylib).
    let lib = common::build_release(
        "xpm-plugin-mean",
        &format!(
            "{}xpm_plugin_mean.{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_EXTENSION
        ),
    );
    // Interleaved rounds (built-in, then plugin), medians: single runs of either stray by up to
    // 30 % on this VM.
    let (mut builtin, mut plugin) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(3) {
        builtin.push(run_merge_with(
            &sparse,
            &["--strategy", "mean"],
            &dir.path().join("mean-b.xpm"),
        ));
        plugin.push(run_merge_with(
            &sparse,
            &[
                "--strategy",
                "plugin-mean",
                "--plugin",
                lib.to_str().unwrap(),
            ],
            &dir.path().join("mean-p.xpm"),
        ));
    }
    let ratios: Vec<String> = builtin
        .iter()
        .zip(&plugin)
        .map(|(b, p)| format!("{:.2}", p.0 / b.0))
        .collect();
    let tb = median(builtin.iter().map(|r| r.0).collect());
    let mb = median(builtin.iter().map(|r| r.1).collect());
    let tp = median(plugin.iter().map(|r| r.0).collect());
    let mp = median(plugin.iter().map(|r| r.1).collect());
    let frames = |p: &Path| -> Vec<Vec<String>> {
        xpm::format::ArtifactReader::open(p)
            .unwrap()
            .manifest()
            .tensors
            .iter()
            .map(|t| t.stored.iter().map(|p| p.digest.to_string()).collect())
            .collect()
    };
    let same = frames(&dir.path().join("mean-b.xpm")) == frames(&dir.path().join("mean-p.xpm"));
    report.push_str(&arithmetic(&sparse, tensors.min(16)));
    // What the goals leave for the arithmetic: at g × the floor, with both threads busy for
    // the whole merge (the floor keeps them 97 % busy), (g − 1) × floor × 2 thread-seconds
    // over every input entry of the merge.
    let all_entries: u64 = sparse
        .iter()
        .flat_map(|p| ArtifactReader::open(p).unwrap().manifest().tensors.clone())
        .map(|t| match t.delta {
            xpm::format::manifest::Delta::Sparse { nnz, .. } => nnz,
            _ => 0,
        })
        .sum();
    let budget = |g: f64, floor: f64| (g - 1.0) * floor * 2.0 * 1e9 / all_entries as f64;
    report.push_str(&format!(
        "\nBudget for the arithmetic per input entry ({all_entries} in the merge, 2 threads): `ties` at \
         1.15× its floor {:.2} ns, `sparse-mean` at 1.1× {:.2} ns.\n",
        budget(1.15, floors[0]),
        budget(1.1, floors[1]),
    ));
    report.push_str(&format!(
        "\n### Plugins\n\n`mean` built in against `plugin-mean` (plugins/examples/mean, release cdylib), same inputs:\n\n\
         | | time | peak RSS | ratio |\n|---|---:|---:|---:|\n\
         | built-in `mean` | {tb:.2} s | {mb:.0} MB | 1.00× |\n\
         | plugin `plugin-mean` | {tp:.2} s | {mp:.0} MB | {:.2}× |\n\n\
         Medians of {} interleaved rounds (per-round ratios: {}). Identical output payload: {same}.\n",
        tp / tb,
        builtin.len(),
        ratios.join(", ")
    ));
    println!("{report}");
    let out = common::target_dir().join("bench-merge.md");
    std::fs::write(&out, &report).unwrap();
    eprintln!("wrote {}", out.display());
}
