//! The mttl importer against files the real torch writes (tests/python/mttl_fixture.py): the
//! imported deltas equal torch's, bit for bit for sparse experts and within f32 rounding for
//! LoRA; a checkpoint whose pickle calls `os.system` is refused and runs nothing.
//!
//! Needs a Python with torch and safetensors: `$XPM_PYTHON` (scripts/test.sh sets it to the
//! environment scripts/python-env.sh builds) or `python3`. Skipped without one, except under
//! `XPM_REQUIRE_PYTHON=1` (CI), where that fails.

use std::path::{Path, PathBuf};

use xpm_core::checkpoint::Checkpoint;
use xpm_core::format::{Content, Dtype};
use xpm_interop::{Imported, mttl, torch};

/// The interpreter, if it can import `modules` (as the workspace's tests/common::python).
fn python(modules: &str) -> Option<PathBuf> {
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

fn fixture() -> Option<tempfile::TempDir> {
    let py = python("torch, safetensors")?;
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/mttl_fixture.py");
    let out = std::process::Command::new(py)
        .arg(&script)
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(dir)
}

/// Every tensor of a safetensors file as f64, by name.
fn expected(path: &Path) -> Vec<(String, Vec<u64>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let vals: Vec<f64> = match v.dtype() {
                safetensors::Dtype::F32 => v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::F64 => v
                    .data()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                d => panic!("{d:?}"),
            };
            (name, v.shape().iter().map(|&d| d as u64).collect(), vals)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn f32s(b: &[u8]) -> Vec<f32> {
    Dtype::F32.to_f32(b)
}

fn by_name(imp: &Imported, name: &str) -> xpm_core::format::TensorData {
    imp.tensors
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no {name}"))
        .materialize()
        .unwrap()
        .data
}

#[test]
fn mttl_experts_import_to_torchs_deltas() {
    let Some(dir) = fixture() else { return };
    let lib = dir.path().join("lib");
    let base = Checkpoint::open(&dir.path().join("base.safetensors")).unwrap();

    assert_eq!(
        mttl::list(&lib).unwrap(),
        vec!["evil", "lora", "lora-noalpha", "sparse"]
    );

    // Sparse: bit-exact.
    let imp = mttl::import(&lib, "sparse", &base).unwrap();
    assert_eq!(imp.source.format, "mttl-sparse");
    assert_eq!(imp.base_hint.as_deref(), Some("tiny/base"));
    assert_eq!(
        imp.source.files.keys().collect::<Vec<_>>(),
        vec!["sparse.ckpt", "sparse.meta"]
    );
    assert!(imp.source.files.values().all(|d| d.starts_with("sha256:")));
    assert_eq!(imp.extra["mttl"]["training_config"]["seed"], 42);
    let names: Vec<&str> = imp.tensors.iter().map(|t| t.name.as_str()).collect();
    // The base's order (sorted names).
    assert_eq!(
        names,
        vec!["layers.0.q.bias", "layers.0.q.weight", "layers.0.v.weight"]
    );
    for (name, shape, want) in expected(&dir.path().join("expected_sparse.safetensors")) {
        let t = by_name(&imp, &name);
        assert_eq!(t.shape, shape, "{name}");
        assert_eq!(t.dtype, Dtype::F32);
        let dense: Vec<f32> = match &t.content {
            Content::Sparse {
                indices, values, ..
            } => {
                let mut d = vec![0f32; want.len()];
                for (&i, v) in indices.iter().zip(f32s(values)) {
                    d[i as usize] = v;
                }
                assert!(!indices.is_empty() && indices.len() < want.len(), "{name}");
                d
            }
            Content::Dense { delta } => f32s(delta),
            Content::Lora { .. } => panic!("{name}"),
        };
        let got: Vec<u32> = dense.iter().map(|v| v.to_bits()).collect();
        let want: Vec<u32> = want.iter().map(|&v| (v as f32).to_bits()).collect();
        assert_eq!(got, want, "{name}");
    }

    // LoRA: (α/r)·B·A against torch's f64 product.
    let imp = mttl::import(&lib, "lora", &base).unwrap();
    assert_eq!(imp.source.format, "mttl-lora");
    for (name, shape, want) in expected(&dir.path().join("expected_lora.safetensors")) {
        let t = by_name(&imp, &name);
        assert_eq!(t.shape, shape);
        let Content::Lora { rank, alpha, a, b } = &t.content else {
            panic!("{name}")
        };
        assert_eq!((*rank, *alpha), (2, 16.0));
        let (r, out, inp) = (*rank as usize, shape[0] as usize, shape[1] as usize);
        let (a, b) = (f32s(a), f32s(b));
        let scale = alpha / r as f64;
        let max = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        for o in 0..out {
            for i in 0..inp {
                let mut s = 0f64;
                for k in 0..r {
                    s += b[o * r + k] as f64 * a[k * inp + i] as f64;
                }
                let got = s * scale;
                let w = want[o * inp + i];
                assert!(
                    (got - w).abs() <= 1e-6 * max,
                    "{name}[{o},{i}]: {got} vs {w}"
                );
            }
        }
    }

    // No alpha in the metadata: refused, naming the key.
    let e = mttl::import(&lib, "lora-noalpha", &base)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lora_alpha") && e.contains("lora-noalpha.meta"),
        "{e}"
    );

    // The hostile checkpoint: refused at its global, and nothing ran.
    let e = mttl::import(&lib, "evil", &base).unwrap_err().to_string();
    assert!(
        e.contains("refusing the pickle global `posix.system`") && e.contains("evil.ckpt"),
        "{e}"
    );
    assert!(!lib.join("pwned").exists(), "the pickle's command ran");

    // A name that is not there: the experts listed, with a suggestion.
    let e = mttl::import(&lib, "spars", &base).unwrap_err();
    let hint = e.hint().unwrap();
    assert!(hint.contains("did you mean `sparse`?"), "{hint}");
}

#[test]
fn a_base_that_does_not_fit_is_refused_naming_both() {
    let Some(dir) = fixture() else { return };
    let lib = dir.path().join("lib");
    // A base where q has another shape, and one without v.
    let other = dir.path().join("other.safetensors");
    let mut st =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 7], &[0u8; 112])
            .map(|v| vec![("layers.0.q.weight".to_string(), v)])
            .unwrap();
    let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![5, 6], &[0u8; 120])
        .unwrap();
    st.push(("layers.0.v.weight".to_string(), v));
    safetensors::serialize_to_file(st, None, &other).unwrap();
    let base = Checkpoint::open(&other).unwrap();
    let e = mttl::import(&lib, "lora", &base).unwrap_err().to_string();
    assert!(
        e.contains("model.layers.0.q.lora_a")
            && e.contains("layers.0.q.weight")
            && e.contains("[4, 7]"),
        "{e}"
    );

    let lone = dir.path().join("lone.safetensors");
    let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 6], &[0u8; 96])
        .unwrap();
    safetensors::serialize_to_file(vec![("layers.0.q.weight".to_string(), v)], None, &lone)
        .unwrap();
    let base = Checkpoint::open(&lone).unwrap();
    let e = mttl::import(&lib, "lora", &base).unwrap_err().to_string();
    assert!(
        e.contains("module `model.layers.0.v` matches no tensor"),
        "{e}"
    );
}

#[test]
fn real_torch_files_read() {
    let Some(py) = python("torch") else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.pt");
    let code = r#"
import collections, sys, torch
m = torch.nn.Linear(3, 2)
sd = m.state_dict()  # an OrderedDict with _metadata (BUILD)
sd["half"] = torch.arange(6, dtype=torch.float16).reshape(2, 3)
sd["bf"] = torch.arange(4, dtype=torch.bfloat16)
sd["mask"] = torch.tensor([True, False, True])
sd["u8"] = torch.tensor([1, 0], dtype=torch.uint8)
sd["long"] = torch.tensor([-3, 2**40])
sd["view"] = sd["half"][1]
sd["param"] = torch.nn.Parameter(torch.ones(2))
sd["scalar"] = torch.tensor(2.5)
sd["empty"] = torch.zeros(0, 3)
torch.save(sd, sys.argv[1])
torch.save(torch.ones(3, 2).t(), sys.argv[1] + ".t")
torch.save({"dtype": torch.float32, "n": [1, 2.5, None, "x", (1, 2)], "b": b"\x00\x01"},
           sys.argv[1] + ".meta")
"#;
    let st = std::process::Command::new(py)
        .args(["-c", code])
        .arg(&path)
        .status()
        .unwrap();
    assert!(st.success());
    let sd = torch::load_state_dict(&path).unwrap();
    let get = |n: &str| sd.iter().find(|(k, _)| k == n).unwrap().1.clone();
    assert_eq!(get("weight").shape, vec![2, 3]);
    assert_eq!(get("half").to_f32(), vec![0., 1., 2., 3., 4., 5.]);
    assert_eq!(get("view").to_f32(), vec![3., 4., 5.]);
    assert_eq!(get("bf").to_f32(), vec![0., 1., 2., 3.]);
    assert_eq!(get("mask").nonzero(), vec![true, false, true]);
    assert_eq!(get("u8").nonzero(), vec![true, false]);
    assert_eq!(get("long").to_f32(), vec![-3., (1u64 << 40) as f32]);
    assert_eq!(get("param").to_f32(), vec![1., 1.]);
    let s = get("scalar");
    assert_eq!((s.shape.len(), s.to_f32()), (0, vec![2.5]));
    assert_eq!(get("empty").shape, vec![0, 3]);

    let e = torch::load(&dir.path().join("t.pt.t"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not contiguous"), "{e}");

    let m = torch::load(&dir.path().join("t.pt.meta")).unwrap();
    assert_eq!(
        m.get("dtype"),
        Some(&torch::PyValue::Dtype(torch::TorchDtype::F32))
    );
    assert_eq!(
        m.to_json()["n"],
        serde_json::json!([1, 2.5, null, "x", [1, 2]])
    );
    assert_eq!(m.get("b"), Some(&torch::PyValue::Bytes(vec![0, 1])));
}
