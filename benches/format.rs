//! Artifact format benchmark: mask size against the entropy bound, pack / unpack throughput
//! against zstd alone on the same bytes at the same level, and peak memory of the real binary.
//!
//! Run: `cargo bench --bench format` (add `-- --quick` for a smaller, faster run;
//! `XPM_BENCH_DIR=/dev/shm` to work in memory instead of under `target/tmp`). Prints a
//! Markdown report (also written to `target/bench-format.md`); figures go to docs/benchmarks.md.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use xpm::format::manifest::{BaseModel, Delta, ExpertKind, Manifest};
use xpm::format::mask;
use xpm::format::st::{PlannedTensor, write_safetensors};
use xpm::printer::Printer;
use xpm::rng::SplitMix64;

const LEVEL: i32 = 3;

/// Binary entropy in bits.
fn h(d: f64) -> f64 {
    -d * d.log2() - (1.0 - d) * (1.0 - d).log2()
}

/// The top-k mask of a Gaussian delta: what `xpm extract` keeps from a dense fine-tune.
fn topk_mask(n: usize, density: f64, rng: &mut SplitMix64) -> (Vec<u64>, Vec<f32>) {
    let delta: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
    let k = (density * n as f64).floor() as usize;
    let idx = xpm::select::top_k_abs(&delta, k);
    let vals = idx.iter().map(|&i| delta[i as usize]).collect();
    (idx, vals)
}

fn best_of<T>(reps: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..reps {
        let t = Instant::now();
        let r = f();
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(r);
    }
    (best, out.unwrap())
}

fn manifest(tensors: Vec<xpm::format::TensorEntry>) -> Manifest {
    Manifest {
        format_version: "1.0".into(),
        name: "bench".into(),
        version: semver::Version::new(1, 0, 0),
        description: None,
        license: None,
        authors: vec![],
        base: BaseModel {
            id: "bench".into(),
            digest: format!("sha256:{}", "0".repeat(64)),
        },
        kind: ExpertKind::Sparse,
        tensors,
        selection: None,
        training: None,
        provenance: None,
        payload: None,
        extra: Default::default(),
    }
}

/// Write an unpacked expert directory; returns the byte size of tensors.safetensors.
/// (name, shape, sparse indices or `None` for dense, values)
type BenchTensor = (String, Vec<u64>, Option<Vec<u64>>, Vec<f32>);

fn write_unpacked(dir: &Path, tensors: &[BenchTensor]) -> u64 {
    std::fs::create_dir_all(dir).unwrap();
    let mut entries = Vec::new();
    let mut planned = Vec::new();
    for (name, shape, idx, _) in tensors {
        let n: u64 = shape.iter().product();
        let delta = match idx {
            Some(i) => {
                planned.push(PlannedTensor {
                    name: format!("{name}.indices"),
                    dtype: safetensors::Dtype::I64,
                    shape: vec![i.len()],
                });
                planned.push(PlannedTensor {
                    name: format!("{name}.values"),
                    dtype: safetensors::Dtype::F32,
                    shape: vec![i.len()],
                });
                Delta::Sparse {
                    nnz: i.len() as u64,
                    density: i.len() as f64 / n as f64,
                    encoding: None,
                    block_size: None,
                }
            }
            None => {
                planned.push(PlannedTensor {
                    name: format!("{name}.delta"),
                    dtype: safetensors::Dtype::F32,
                    shape: shape.iter().map(|&d| d as usize).collect(),
                });
                Delta::Dense
            }
        };
        entries.push(xpm::format::TensorEntry {
            name: name.clone(),
            shape: shape.clone(),
            dtype: xpm::format::Dtype::F32,
            delta,
            stored: vec![],
            new: false,
        });
    }
    let m = manifest(entries);
    std::fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    let path = dir.join("tensors.safetensors");
    write_safetensors(&path, &planned, None, |k| {
        let name = &planned[k].name;
        let (base, suffix) = name.rsplit_once('.').unwrap();
        let t = tensors.iter().find(|t| t.0 == base).unwrap();
        Ok(match suffix {
            "indices" => {
                t.2.as_ref()
                    .unwrap()
                    .iter()
                    .flat_map(|&i| (i as i64).to_le_bytes())
                    .collect()
            }
            _ => t.3.iter().flat_map(|v| v.to_le_bytes()).collect(),
        })
    })
    .unwrap();
    std::fs::metadata(&path).unwrap().len()
}

/// Pack and unpack `dir` in-process; compare with zstd alone on tensors.safetensors.
/// Returns a Markdown table row group.
fn throughput(label: &str, dir: &Path, work: &Path, reps: usize, out: &mut String) {
    // "zstd alone" is what the zstd tool does: stream the file through one compressor into a
    // file (with its content checksum, as the CLI writes by default), and back.
    let src_path = dir.join("tensors.safetensors");
    let mb = std::fs::metadata(&src_path).unwrap().len() as f64 / 1e6;
    let zpath = work.join(format!("{label}.zst"));
    let (t_zc, _) = best_of(reps, || {
        let mut enc =
            zstd::stream::Encoder::new(std::fs::File::create(&zpath).unwrap(), LEVEL).unwrap();
        enc.include_checksum(true).unwrap();
        std::io::copy(&mut std::fs::File::open(&src_path).unwrap(), &mut enc).unwrap();
        enc.finish().unwrap();
    });
    let compressed_len = std::fs::metadata(&zpath).unwrap().len();
    let dpath = work.join(format!("{label}.raw"));
    let (t_zd, _) = best_of(reps, || {
        let mut dec = zstd::stream::Decoder::new(std::fs::File::open(&zpath).unwrap()).unwrap();
        std::io::copy(&mut dec, &mut std::fs::File::create(&dpath).unwrap()).unwrap();
    });
    let art = work.join(format!("{label}.xpm"));
    let printer = Printer::silent();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let (t_p1, _) = best_of(reps, || {
        one.install(|| xpm::ops::pack::pack(dir, &art, LEVEL, &printer).unwrap())
    });
    let (t_p, _) = best_of(reps, || {
        xpm::ops::pack::pack(dir, &art, LEVEL, &printer).unwrap()
    });
    let un = work.join(format!("{label}-un"));
    let (t_u, _) = best_of(reps, || {
        let _ = std::fs::remove_dir_all(&un);
        xpm::ops::unpack::unpack(&art, &un, &printer).unwrap()
    });
    let art_size = std::fs::metadata(&art).unwrap().len();
    out.push_str(&format!(
        "| {label} | {mb:.0} MB | zstd -{LEVEL}: {:.0} MB/s, {:.1} MB | {:.0} MB/s ({:.2}×) | {:.0} MB/s ({:.2}×) | {:.1} MB | zstd -d: {:.0} MB/s | {:.0} MB/s ({:.2}×) |\n",
        mb / t_zc,
        compressed_len as f64 / 1e6,
        mb / t_p1,
        t_zc / t_p1,
        mb / t_p,
        t_zc / t_p,
        art_size as f64 / 1e6,
        mb / t_zd,
        mb / t_u,
        t_zd / t_u,
    ));
}

/// Peak RSS (KiB) of the release binary running `args`, via GNU time.
fn peak_rss(args: &[&str]) -> Option<u64> {
    let out = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg(env!("CARGO_BIN_EXE_xpm"))
        .args(args)
        .arg("-q")
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .last()?
        .trim()
        .parse()
        .ok()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let side: u64 = if quick { 1024 } else { 4096 };
    let n_tensors = 4;
    let reps = if quick { 1 } else { 3 };
    let work = common::bench_dir().join("bench-format");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let mut rng = SplitMix64(42);
    let mut report = String::new();
    report.push_str(&format!(
        "## Mask size: {n_tensors} tensors of {side}×{side} (n = {} entries), top-k of a Gaussian delta\n\n",
        n_tensors as u64 * side * side
    ));
    report.push_str("| density | nnz | encoding | mask bytes | after zstd | entropy bound n·H(d)/8 | mask / bound | raw u32 indices | int64 (row, col) pairs | u32 / mask | pairs / mask |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    let mut sparse_sets = Vec::new();
    for density in [0.01, 0.05] {
        let n = side * side;
        let mut tensors = Vec::new();
        let (mut mask_bytes, mut zbytes, mut nnz, mut enc) = (0u64, 0u64, 0u64, String::new());
        for t in 0..n_tensors {
            let (idx, vals) = topk_mask(n as usize, density, &mut rng);
            let (e, bytes) = mask::encode_best(&idx, &[side, side]);
            mask_bytes += bytes.len() as u64;
            zbytes += zstd::bulk::compress(&bytes, LEVEL).unwrap().len() as u64;
            nnz += idx.len() as u64;
            enc = e.to_string();
            tensors.push((
                format!("layer.{t}.weight"),
                vec![side, side],
                Some(idx),
                vals,
            ));
        }
        let total = n * n_tensors as u64;
        let bound = total as f64 * h(density) / 8.0;
        report.push_str(&format!(
            "| {:.0} % | {nnz} | {enc} | {mask_bytes} | {zbytes} | {bound:.0} | {:.3}× | {} | {} | {:.2}× | {:.2}× |\n",
            density * 100.0,
            mask_bytes as f64 / bound,
            nnz * 4,
            nnz * 16,
            (nnz * 4) as f64 / mask_bytes as f64,
            (nnz * 16) as f64 / mask_bytes as f64,
        ));
        sparse_sets.push((density, tensors));
    }

    report.push_str(
        "\n## Pack and unpack throughput against zstd alone on the same bytes (level 3)\n\n",
    );
    report.push_str("Input: the unpacked expert's `tensors.safetensors` (i64 indices + f32 values, or f32 dense deltas). \
zstd alone streams that file through one zstd compressor (level 3, content checksum on, as the `zstd` tool does) into a file, \
and back. Pack reads the file, validates, encodes masks, compresses, hashes every frame (BLAKE3, format 1.2), then writes and fsyncs the artifact; \
unpack checks every frame's digest, decompresses, decodes masks, then writes and fsyncs `tensors.safetensors`. \
Ratios are zstd time / xpm time (≥ 1 means xpm is faster); best of the runs.\n\n");
    report.push_str("| expert | input | zstd alone (compress) | pack, 1 thread | pack, all cores | artifact | zstd alone (decompress) | unpack |\n|---|---|---|---|---|---|---|---|\n");
    for (density, tensors) in &sparse_sets {
        let dir = work.join(format!("sparse-{density}"));
        write_unpacked(&dir, tensors);
        throughput(
            &format!("sparse {:.0} %", density * 100.0),
            &dir,
            &work,
            reps,
            &mut report,
        );
    }
    let dense: Vec<_> = (0..n_tensors)
        .map(|t| {
            let n = (side * side) as usize;
            (
                format!("layer.{t}.weight"),
                vec![side, side],
                None,
                (0..n).map(|_| rng.normal() * 1e-3).collect(),
            )
        })
        .collect();
    let dense_dir = work.join("dense");
    write_unpacked(&dense_dir, &dense);
    throughput("dense f32", &dense_dir, &work, reps, &mut report);
    drop(dense);

    // Peak memory of the real binary: many tensors, so the artifact is far larger than one tensor.
    let many = if quick { 8 } else { 24 };
    let big: Vec<_> = (0..many)
        .map(|t| {
            let n = (side * side) as usize;
            (
                format!("big.{t}.weight"),
                vec![side, side],
                None,
                (0..n).map(|_| rng.normal() * 1e-3).collect::<Vec<f32>>(),
            )
        })
        .collect();
    let big_dir = work.join("big");
    let big_bytes = write_unpacked(&big_dir, &big);
    drop(big);
    let big_art = work.join("big.xpm");
    let pack_rss = peak_rss(&[
        "pack",
        big_dir.to_str().unwrap(),
        "-o",
        big_art.to_str().unwrap(),
    ]);
    let unpack_rss = peak_rss(&[
        "unpack",
        big_art.to_str().unwrap(),
        "-o",
        work.join("big-un").to_str().unwrap(),
    ]);
    let verify_rss = peak_rss(&["verify", big_art.to_str().unwrap()]);
    let tensor_mb = (side * side * 4) as f64 / 1e6;
    report.push_str(&format!(
        "\n## Peak memory (release binary, GNU time max RSS)\n\nDense expert: {many} tensors of {side}×{side} f32, {:.0} MB in all, largest tensor {tensor_mb:.0} MB.\n\n| command | peak RSS | peak / largest tensor | peak / expert |\n|---|---|---|---|\n",
        big_bytes as f64 / 1e6
    ));
    for (cmd, rss) in [
        ("xpm pack", pack_rss),
        ("xpm unpack", unpack_rss),
        ("xpm verify", verify_rss),
    ] {
        if let Some(kib) = rss {
            let mb = kib as f64 * 1024.0 / 1e6;
            report.push_str(&format!(
                "| {cmd} | {mb:.0} MB | {:.1}× | {:.2}× |\n",
                mb / tensor_mb,
                mb / (big_bytes as f64 / 1e6)
            ));
        } else {
            report.push_str(&format!("| {cmd} | (GNU time unavailable) | | |\n"));
        }
    }
    println!("{report}");
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("bench-format.md");
    std::fs::write(target, &report).unwrap();
    let _ = std::fs::remove_dir_all(&work);
}
