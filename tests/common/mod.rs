//! Shared test fixtures: an isolated `TestContext` (own XPM_HOME and working directory), the
//! real `xpm` binary, checkpoints written with the safetensors crate itself (independent of
//! xpm's writer), and a helper that rewrites an artifact's manifest with every digest fixed up,
//! to test the checks that lie beyond the digests.
#![allow(dead_code)]

pub mod registry;
pub mod train;

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use safetensors::tensor::TensorView;
use sha2::{Digest, Sha256};

pub struct TestContext {
    pub dir: tempfile::TempDir,
}

impl TestContext {
    pub fn new() -> Self {
        TestContext {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The real binary, run in the test directory with an isolated XPM_HOME.
    pub fn xpm(&self) -> Command {
        let mut c = Command::cargo_bin("xpm").unwrap();
        c.current_dir(self.dir.path())
            .env("XPM_HOME", self.path("home"))
            .env_remove("XPM_CACHE_DIR")
            .env("NO_COLOR", "1");
        c
    }

    /// Names of the entries of the test directory that look like leftovers of a failed write.
    pub fn temp_leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in walk(self.dir.path()) {
            let name = e.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with(".xpm-tmp-") || name.starts_with(".xpm-spool-") {
                out.push(e.display().to_string());
            }
        }
        out
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}

/// A tiny deterministic PRNG for fixtures.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

pub type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// Random f32 tensors with the given names and shapes.
pub fn random_tensors(specs: &[(&str, &[usize])], seed: u64) -> Tensors {
    let mut rng = Rng(seed);
    specs
        .iter()
        .map(|(n, s)| {
            let len = s.iter().product();
            (
                n.to_string(),
                s.to_vec(),
                (0..len).map(|_| rng.f32()).collect(),
            )
        })
        .collect()
}

/// `base` plus a perturbation of every value (scaled by `scale`).
pub fn perturb(base: &Tensors, seed: u64, scale: f32) -> Tensors {
    let mut rng = Rng(seed);
    base.iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                s.clone(),
                v.iter().map(|x| x + rng.f32() * scale).collect(),
            )
        })
        .collect()
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Write tensors as one safetensors file with the safetensors crate (dtype F32, F16 or BF16).
pub fn write_st(path: &Path, tensors: &Tensors, dtype: safetensors::Dtype) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            let b = match dtype {
                safetensors::Dtype::F32 => f32_bytes(v),
                safetensors::Dtype::F16 => v
                    .iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect(),
                safetensors::Dtype::BF16 => v
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect(),
                _ => unreachable!(),
            };
            (n.clone(), s.clone(), b)
        })
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap()))
        .collect();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Write a sharded model directory (two shards + index + config.json).
pub fn write_sharded(dir: &Path, tensors: &Tensors) {
    std::fs::create_dir_all(dir).unwrap();
    let half = tensors.len() / 2;
    let (a, b) = tensors.split_at(half);
    let mut map = serde_json::Map::new();
    for (i, part) in [a, b].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        write_st(&dir.join(&file), &part.to_vec(), safetensors::Dtype::F32);
        for (n, _, _) in part.iter() {
            map.insert(n.clone(), file.clone().into());
        }
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type":"bert"}"#).unwrap();
}

/// The standard fixture: a sharded base and a single-file tuned model.
pub fn base_and_tuned(ctx: &TestContext) -> (PathBuf, PathBuf, Tensors, Tensors) {
    let base = random_tensors(
        &[
            ("layer.0.attn.q.weight", &[32, 48]),
            ("layer.0.attn.k.weight", &[32, 48]),
            ("layer.0.attn.q.bias", &[32]),
            ("layer.0.mlp.up.weight", &[64, 32]),
            ("layer.1.attn.q.weight", &[32, 48]),
            ("embed.weight", &[50, 32]),
        ],
        1,
    );
    let tuned = perturb(&base, 2, 0.01);
    let (b, t) = (ctx.path("base"), ctx.path("tuned/model.safetensors"));
    write_sharded(&b, &base);
    write_st(&t, &tuned, safetensors::Dtype::F32);
    (b, t, base, tuned)
}

/// Split an artifact into (prelude, manifest JSON, payload).
pub fn split_artifact(bytes: &[u8]) -> (Vec<u8>, serde_json::Value, Vec<u8>) {
    let t = bytes.len() - 80;
    let mlen = u64::from_le_bytes(bytes[t..t + 8].try_into().unwrap()) as usize;
    let manifest: serde_json::Value = serde_json::from_slice(&bytes[t - mlen..t]).unwrap();
    (bytes[..16].to_vec(), manifest, bytes[16..t - mlen].to_vec())
}

/// Byte range of the manifest in an artifact.
pub fn manifest_range(bytes: &[u8]) -> std::ops::Range<usize> {
    let t = bytes.len() - 80;
    let mlen = u64::from_le_bytes(bytes[t..t + 8].try_into().unwrap()) as usize;
    t - mlen..t
}

/// Rebuild an artifact from parts, recomputing the manifest digest and the trailer, as a
/// (buggy or malicious) writer that gets every digest right would.
pub fn assemble_artifact(prelude: &[u8], manifest: &serde_json::Value, payload: &[u8]) -> Vec<u8> {
    let m = serde_json::to_vec(manifest).unwrap();
    let mut out = prelude.to_vec();
    out.extend_from_slice(payload);
    out.extend_from_slice(&m);
    out.extend_from_slice(&(m.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&m));
    // Format 1.1 and later: the content digest; 1.0: the sha256 of every byte before it.
    let minor = u16::from_le_bytes([prelude[10], prelude[11]]);
    let d: [u8; 32] = if minor >= 1 {
        xpm::format::artifact::content_digest(prelude, &m)
    } else {
        Sha256::digest(&out).into()
    };
    out.extend_from_slice(&d);
    out.extend_from_slice(b"XPM-END\n");
    out
}

/// Name every frame of `manifest` by its SHA-256 instead of its BLAKE3 digest, as writers of
/// formats 1.0 and 1.1 did (`payload` is the artifact's payload).
pub fn sha256_frames(manifest: &mut serde_json::Value, payload: &[u8]) {
    let mut fix = |frame: &mut serde_json::Value| {
        let (off, size) = (
            frame["offset"].as_u64().unwrap() as usize,
            frame["size"].as_u64().unwrap() as usize,
        );
        let obj = frame.as_object_mut().unwrap();
        assert!(obj.remove("blake3").is_some(), "a format 1.2 frame");
        obj.insert(
            "sha256".into(),
            xpm::digest::sha256(&payload[off..off + size]).into(),
        );
    };
    fix(&mut manifest["payload"]["header"]);
    for t in manifest["tensors"].as_array_mut().unwrap() {
        t["stored"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .for_each(&mut fix);
    }
}

/// Rewrite the manifest of the artifact at `path` in place, fixing up all digests.
pub fn rewrite_manifest(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let (prelude, mut manifest, payload) = split_artifact(&bytes);
    edit(&mut manifest);
    std::fs::write(path, assemble_artifact(&prelude, &manifest, &payload)).unwrap();
}

pub fn sha256_hex(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// The Python interpreter for tests that check xpm against a real Python client, if it can
/// import every module in `modules` (comma-separated, as in an `import` statement).
///
/// `$XPM_PYTHON` (set by scripts/test.sh to the environment of scripts/python-env.sh) or
/// `python3`. When the modules are missing the test is skipped, except where
/// `XPM_REQUIRE_PYTHON=1` (CI), where that is a failure: such a test can never pass vacuously
/// in CI.
pub fn python(modules: &str) -> Option<PathBuf> {
    let py = std::env::var_os("XPM_PYTHON").map_or_else(|| PathBuf::from("python3"), PathBuf::from);
    let have = std::process::Command::new(&py)
        .args(["-c", &format!("import {modules}")])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if have {
        return Some(py);
    }
    assert!(
        std::env::var_os("XPM_REQUIRE_PYTHON").is_none(),
        "{} cannot import {modules}; run scripts/python-env.sh and set XPM_PYTHON to the \
         interpreter it prints (scripts/test.sh does both)",
        py.display()
    );
    eprintln!("skipping: {} cannot import {modules}", py.display());
    None
}

/// Run `python -c CODE ARGS…` in `dir` and return its stdout; panics with its stderr when it
/// fails.
pub fn run_python_code(python: &Path, code: &str, args: &[&std::ffi::OsStr], dir: &Path) -> String {
    let out = std::process::Command::new(python)
        .args(["-c", code])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Run `tests/python/SCRIPT --xpm <the binary under test>` with `python`, offline and quiet, and
/// return its stdout; panics (with both outputs) when it fails.
pub fn run_python_check(python: &Path, script: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let out = std::process::Command::new(python)
        .arg(path)
        .arg("--xpm")
        .arg(env!("CARGO_BIN_EXE_xpm"))
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .env("TQDM_DISABLE", "1")
        .env("PYTHONWARNINGS", "ignore")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "{script}:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
