//! Import and export throughput (docs/benchmarks.md, "Import and export"):
//!
//! A PEFT LoRA adapter of ~1 GiB (256 modules, r = 512, on `[1024, 1024]` f32 weights) against a
//! plain safetensors read + write of the same tensors (every tensor copied out of the mapped
//! file, then written to a new file), in the same run:
//!
//! 1. `xpm import peft` (the library call, with the base digest already cached, as on every run
//!    after the first): read, check, map to the base, compress, write the artifact;
//! 2. `xpm export --format peft` of that expert: read the artifact, decompress, write the PEFT
//!    directory.
//!
//! Every operation runs once per round, interleaved, 5 rounds; the table takes each one's best
//! round (this VM's write speed drifts by up to 3× within minutes), with the CPU seconds the
//! process spent in it, and the time of import's one sequential part (the SHA-256 of the
//! source, which provenance records), below which no import can go on any number of cores.
//! `taskset -c 0-N` pins it to fewer cores (`scripts/interop-cores.sh` runs a range of core
//! counts, here or, staged, on a machine with more cores). In process, each operation
//! runs under the allocator settings of its command (mimalloc, as the `xpm` binary: import's
//! `xpm::alloc::configure`, export's `xpm::alloc::reuse`); the plain copy under import's.
//!
//! Run: `cargo bench --bench interop` (`-- --quick` for 64 modules, ~256 MiB);
//! `XPM_BENCH_DIR=/dev/shm` puts the files in memory, out of reach of the disk's writeback;
//! `XPM_BENCH_KEEP=1` keeps the fixture; `XPM_BENCH_XPM` names the `xpm` binary of the command
//! rows (skipped without it or without GNU time). Writes the table to `target/bench-interop.md`
//! (or `$XPM_BENCH_OUT`).

mod common;

use std::path::Path;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use safetensors::tensor::TensorView;
use xpm::home::XpmHome;
use xpm::ops::interop::{ExportRequest, ImportOptions, export_peft, import_peft};
use xpm::printer::Printer;
use xpm::train::hub::HubConfig;
use xpm_interop::peft_export::{ExportOptions, PeftType};

const DIM: usize = 1024;
const RANK: usize = 512;

fn random_f32(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(n * 4);
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02;
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn write(path: &Path, tensors: &[(String, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// The base (`layers.i.proj.weight`) and the adapter directory.
fn fixture(root: &Path, modules: usize) {
    std::fs::create_dir_all(root.join("base")).unwrap();
    std::fs::create_dir_all(root.join("adapter")).unwrap();
    let base: Vec<_> = (0..modules)
        .map(|i| {
            (
                format!("layers.{i}.proj.weight"),
                vec![DIM, DIM],
                random_f32(DIM * DIM, i as u64 + 1),
            )
        })
        .collect();
    write(&root.join("base/model.safetensors"), &base);
    drop(base);
    let mut adapter = Vec::new();
    for i in 0..modules {
        adapter.push((
            format!("base_model.model.layers.{i}.proj.lora_A.weight"),
            vec![RANK, DIM],
            random_f32(RANK * DIM, 1000 + i as u64),
        ));
        adapter.push((
            format!("base_model.model.layers.{i}.proj.lora_B.weight"),
            vec![DIM, RANK],
            random_f32(DIM * RANK, 5000 + i as u64),
        ));
    }
    write(&root.join("adapter/adapter_model.safetensors"), &adapter);
    std::fs::write(
        root.join("adapter/adapter_config.json"),
        serde_json::json!({"peft_type": "LORA", "r": RANK, "lora_alpha": 16,
                           "target_modules": ["proj"]})
        .to_string(),
    )
    .unwrap();
}

/// The baseline: every tensor of the adapter file copied out, then written to a new file.
fn plain_copy(src: &Path, dst: &Path) {
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    drop(bytes);
    write(dst, &owned);
    let f = std::fs::File::open(dst).unwrap();
    f.sync_all().unwrap();
}

/// One timing of `f` after an untimed `setup` (removing the previous run's outputs, so the
/// disk holds one copy at a time): wall seconds and the CPU seconds the process spent meanwhile.
fn timed(setup: impl FnOnce(), f: impl FnOnce()) -> (f64, f64) {
    setup();
    let (t, cpu) = (Instant::now(), common::cpu_seconds());
    f();
    (t.elapsed().as_secs_f64(), common::cpu_seconds() - cpu)
}

/// Wall time (s) and peak RSS (MB) of the release `xpm` binary with `args`, under GNU time.
fn cli(args: &[&std::ffi::OsStr]) -> (f64, f64) {
    common::timed_peak_rss(&xpm_binary(), args)
}

/// The `xpm` binary the command rows run: `$XPM_BENCH_XPM` (for a machine that runs this bench
/// without the build tree, scripts/interop-cores.sh), else the release build beside this bench.
fn xpm_binary() -> std::path::PathBuf {
    std::env::var_os("XPM_BENCH_XPM").map_or_else(|| env!("CARGO_BIN_EXE_xpm").into(), Into::into)
}

/// `xpm import peft` and `xpm export` as commands on the fixture, `runs` times each
/// (interleaved): the best wall time and the largest peak RSS of each.
fn cli_import_export(root: &Path, adapter: &str, runs: usize) -> [(f64, f64); 2] {
    let (out, exported) = (root.join("cli.xpm"), root.join("cli-exported"));
    let (base, home) = (root.join("base"), root.join("home"));
    let mut best = [(f64::INFINITY, 0f64); 2];
    for _ in 0..runs {
        let _ = std::fs::remove_file(&out);
        let import = cli(&[
            "import".as_ref(),
            "peft".as_ref(),
            adapter.as_ref(),
            "--base".as_ref(),
            base.as_os_str(),
            "--name".as_ref(),
            "bench".as_ref(),
            "--version".as_ref(),
            "1.0.0".as_ref(),
            "-q".as_ref(),
            "--home".as_ref(),
            home.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
        ]);
        let _ = std::fs::remove_dir_all(&exported);
        let export = cli(&[
            "export".as_ref(),
            out.as_os_str(),
            "--base".as_ref(),
            base.as_os_str(),
            "-q".as_ref(),
            "--home".as_ref(),
            home.as_os_str(),
            "-o".as_ref(),
            exported.as_os_str(),
        ]);
        for (b, r) in best.iter_mut().zip([import, export]) {
            *b = (b.0.min(r.0), b.1.max(r.1));
        }
    }
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_dir_all(&exported);
    best
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let modules = if quick { 64 } else { 256 };
    let runs = 5;
    let mut tmp = tempfile::tempdir_in(common::bench_dir()).unwrap();
    if std::env::var_os("XPM_BENCH_KEEP").is_some() {
        // Keep the fixture (for profiling, or for measuring another build on it).
        tmp.disable_cleanup(true);
        eprintln!("keeping {}", tmp.path().display());
    }
    let root = tmp.path();
    eprintln!("writing the fixture ({modules} modules)…");
    fixture(root, modules);
    let adapter = root.join("adapter/adapter_model.safetensors");
    let size = std::fs::metadata(&adapter).unwrap().len() as f64;
    let home = XpmHome::resolve(Some(root.join("home")));
    let printer = Printer::silent();
    let hub = HubConfig::default();
    let opts = |i: usize| ImportOptions {
        name: "bench".into(),
        version: semver::Version::new(1, 0, 0),
        out: Some(root.join(format!("imported{i}.xpm"))),
        base: root.join("base").display().to_string(),
        description: None,
        level: xpm::format::artifact::DEFAULT_LEVEL,
    };
    // Warm-up: the base digest is cached from here on, the page cache holds the files.
    import_peft(
        &root.join("adapter").display().to_string(),
        &opts(99),
        &home,
        &hub,
        &printer,
    )
    .unwrap();

    // Interleaved rounds: this VM's write speed drifts by 3× within minutes (fresh guest
    // pages are slow to fault in), so every operation runs once per round, side by side, and
    // the table takes each operation's best round.
    let plain = root.join("plain.safetensors");
    let fast = |i: usize| ImportOptions {
        level: 1,
        ..opts(i)
    };
    let out = root.join("exported");
    let export = || {
        export_peft(
            &ExportRequest {
                expert: root.join("imported99.xpm").display().to_string(),
                out: out.clone(),
                base: Some(root.join("base").display().to_string()),
                options: ExportOptions {
                    peft_type: PeftType::Auto,
                    base_id: None,
                    task_type: None,
                    prefix: String::new(),
                },
            },
            root,
            &home,
            &hub,
            &printer,
        )
        .unwrap();
    };
    let adapter_dir = root.join("adapter").display().to_string();
    // Per operation, the best round's wall and CPU seconds.
    let mut best = [(f64::INFINITY, 0.0); 4];
    let mut fast_size = 0.0;
    for round in 0..runs {
        let t = [
            timed(
                || {
                    let _ = std::fs::remove_file(&plain);
                    xpm::alloc::configure();
                },
                || plain_copy(&adapter, &plain),
            ),
            timed(
                || {
                    let _ = std::fs::remove_file(root.join("imported0.xpm"));
                    xpm::alloc::configure();
                },
                || {
                    import_peft(&adapter_dir, &opts(0), &home, &hub, &printer).unwrap();
                },
            ),
            timed(
                || {
                    let _ = std::fs::remove_file(root.join("imported1.xpm"));
                    xpm::alloc::configure();
                },
                || {
                    import_peft(&adapter_dir, &fast(1), &home, &hub, &printer).unwrap();
                },
            ),
            timed(
                || {
                    let _ = std::fs::remove_dir_all(&out);
                    xpm::alloc::reuse();
                },
                export,
            ),
        ];
        eprintln!(
            "round {}: plain {:.2} s, import {:.2} s, import --level 1 {:.2} s, export {:.2} s",
            round + 1,
            t[0].0,
            t[1].0,
            t[2].0,
            t[3].0
        );
        for (b, t) in best.iter_mut().zip(t) {
            if t.0 < b.0 {
                *b = t;
            }
        }
        fast_size = std::fs::metadata(root.join("imported1.xpm")).unwrap().len() as f64;
    }
    // Import's sequential part: the SHA-256 of the source that provenance records (one stream,
    // on one core however many there are): no import of this file can take less.
    let sha = (0..runs)
        .map(|_| {
            let t = Instant::now();
            // As import does it: from the file's mapping (a fresh one each time).
            let file = xpm::checkpoint::Checkpoint::open(&adapter).unwrap();
            std::hint::black_box(file.file_digests());
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    let [plain_best, _, _, _] = best;
    let t_plain = plain_best.0;
    let _ = std::fs::remove_file(&plain);
    let _ = std::fs::remove_file(root.join("imported0.xpm"));
    let _ = std::fs::remove_file(root.join("imported1.xpm"));
    let _ = std::fs::remove_dir_all(&out);
    let artifact = std::fs::metadata(root.join("imported99.xpm"))
        .unwrap()
        .len() as f64;
    let mb = size / 1e6;
    let names = [
        "plain safetensors read + write".to_string(),
        "xpm import peft".into(),
        format!("xpm import peft --level 1 ({:.0} MB)", fast_size / 1e6),
        "xpm export --format peft".into(),
    ];
    let cores = common::cores();
    let mut md = format!(
        "{modules} LoRA modules (r = {RANK}, [{DIM}, {DIM}] f32), adapter {:.0} MB, artifact {:.0} MB; {cores} cores; best of {runs}\n\n| operation | time | MB/s | vs plain | CPU-s (cores busy) |\n|---|---:|---:|---:|---:|\n",
        mb,
        artifact / 1e6
    );
    for (name, (t, cpu)) in names.iter().zip(best) {
        md += &format!(
            "| {name} | {t:.2} s | {:.0} | {:.2}× | {cpu:.2} ({:.2}) |\n",
            mb / t,
            t_plain / t,
            cpu / t
        );
    }
    md += &format!(
        "| sha256 of the adapter (import's sequential part) | {sha:.2} s | {:.0} | {:.2}× at most | – |\n",
        mb / sha,
        t_plain / sha
    );
    // The command rows need GNU time (absent on some machines the bench is carried to).
    if Path::new("/usr/bin/time").exists() && xpm_binary().exists() {
        let [(ti, mi), (te, me)] = cli_import_export(root, &adapter_dir, 3);
        md += &format!(
            "\nThe release commands on the same adapter (best wall time of 3 interleaved runs, largest peak RSS; GNU time): `xpm import peft` {ti:.2} s, {mi:.0} MB; `xpm export --format peft` {te:.2} s, {me:.0} MB\n"
        );
    }
    print!("{md}");
    // `$XPM_BENCH_OUT`, else target/bench-interop.md (where that folder exists: not on a
    // machine that runs a copied bench binary).
    let out = std::env::var_os("XPM_BENCH_OUT").map_or_else(
        || {
            Path::new(env!("CARGO_TARGET_TMPDIR"))
                .parent()
                .unwrap()
                .join("bench-interop.md")
        },
        Into::into,
    );
    if let Err(e) = std::fs::write(&out, &md) {
        eprintln!("cannot write {}: {e}", out.display());
    }
}
