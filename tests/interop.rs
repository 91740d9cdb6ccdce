//! `xpm import peft` / `xpm export --format peft` with the real binary.
//!
//! The checks against the real peft, transformers and torch (BERT, GPT-2 and Llama built from
//! configs; PEFT's own `merge_and_unload` and `PeftModel.from_pretrained`) are in
//! tests/python/peft_interop.py, run by `peft_round_trips_with_the_real_peft`. The tests here
//! need no Python: a hand-written adapter (checked against the LoRA formula computed here),
//! the `hf:` source through a local mock of the Hub, and every refusal.

mod common;

use std::path::{Path, PathBuf};

use common::train::HubMock;
use common::*;

/// A base with one linear layer (`layer.0.q`: weight [4, 6], bias [4]) and a norm.
fn write_base(ctx: &TestContext) -> (PathBuf, Tensors) {
    let base = random_tensors(
        &[
            ("layer.0.q.weight", &[4, 6]),
            ("layer.0.q.bias", &[4]),
            ("norm.weight", &[6]),
        ],
        1,
    );
    let dir = ctx.path("base");
    write_st(
        &dir.join("model.safetensors"),
        &base,
        safetensors::Dtype::F32,
    );
    (dir, base)
}

/// A PEFT LoRA adapter: r 2, α 4 (α/r = 2), a lora_bias, the classifier head (new) and the
/// norm (whole) in modules_to_save.
fn write_adapter(dir: &Path, config: serde_json::Value) -> Tensors {
    let t = random_tensors(
        &[
            ("base_model.model.layer.0.q.lora_A.weight", &[2, 6]),
            ("base_model.model.layer.0.q.lora_B.weight", &[4, 2]),
            ("base_model.model.layer.0.q.lora_B.bias", &[4]),
            ("base_model.model.classifier.weight", &[3, 6]),
            ("base_model.model.norm.weight", &[6]),
        ],
        2,
    );
    write_st(
        &dir.join("adapter_model.safetensors"),
        &t,
        safetensors::Dtype::F32,
    );
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    t
}

fn lora_config() -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"],
        "lora_bias": true, "modules_to_save": ["classifier", "norm"],
        "base_model_name_or_path": "org/tiny", "task_type": "SEQ_CLS"
    })
}

fn read_model(dir: &Path) -> std::collections::HashMap<String, Vec<f32>> {
    read_st(&dir.join("model.safetensors"))
}

/// Every tensor of an f32 safetensors file.
fn read_st(file: &Path) -> std::collections::HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let f = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (n, f)
        })
        .collect()
}

/// The applied model: base + 2·B·A on the weight, 2·bias on the bias, the norm replaced, the
/// head added.
fn check_applied(applied: &Path, base: &Tensors, adapter: &Tensors) {
    let m = read_model(applied);
    let (a, b, bias) = (&adapter[0].2, &adapter[1].2, &adapter[2].2);
    let w = &m["layer.0.q.weight"];
    for o in 0..4 {
        for i in 0..6 {
            let d: f32 = (0..2).map(|k| b[o * 2 + k] * a[k * 6 + i]).sum::<f32>() * 2.0;
            let want = base[0].2[o * 6 + i] + d;
            assert!((w[o * 6 + i] - want).abs() <= 1e-6, "W[{o},{i}]");
        }
    }
    for o in 0..4 {
        assert!((m["layer.0.q.bias"][o] - (base[1].2[o] + bias[o] * 2.0)).abs() <= 1e-6);
    }
    assert_eq!(
        m["classifier.weight"], adapter[3].2,
        "the head is added as it is"
    );
    for (got, want) in m["norm.weight"].iter().zip(&adapter[4].2) {
        assert!((got - want).abs() <= 1e-6, "the norm is replaced");
    }
}

#[test]
fn a_peft_lora_imports_applies_and_exports() {
    let ctx = TestContext::new();
    let (base_dir, base) = write_base(&ctx);
    let src = ctx.path("adapter");
    std::fs::create_dir_all(&src).unwrap();
    let adapter = write_adapter(&src, lora_config());
    let out = ctx
        .xpm()
        .args([
            "import",
            "peft",
            "adapter",
            "--base",
            "base",
            "--name",
            "tiny-lora",
        ])
        .args(["--version", "1.0.0", "-o", "t.xpm", "--json"])
        .assert()
        .success();
    let r: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert_eq!(r["kind"], "lora");
    assert_eq!(r["tensors"], 4);
    assert_eq!(r["new_tensors"], 1);
    assert_eq!(r["source"]["format"], "peft-lora");
    assert!(
        r["source"]["files"]["adapter_model.safetensors"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    // The manifest records the source as provenance.
    let inspect = ctx
        .xpm()
        .args(["inspect", "t.xpm", "--json"])
        .assert()
        .success();
    let m: serde_json::Value = serde_json::from_slice(&inspect.get_output().stdout).unwrap();
    let m = m.get("manifest").unwrap_or(&m);
    assert_eq!(m["provenance"]["source"]["format"], "peft-lora", "{m}");
    assert_eq!(m["extra"]["peft_task_type"], "SEQ_CLS");
    ctx.xpm()
        .args(["apply", "t.xpm", "--base", "base", "--out", "applied"])
        .assert()
        .success();
    check_applied(&ctx.path("applied"), &base, &adapter);

    // Export: a LoRA directory with the factors, lora_bias and the head; then back again.
    ctx.xpm()
        .args(["export", "t.xpm", "--base"])
        .arg(&base_dir)
        .args(["-o", "exported"])
        .assert()
        .success();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ctx.path("exported/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["lora_bias"], true);
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["base_model_name_or_path"], "base");
    let readme = std::fs::read_to_string(ctx.path("exported/README.md")).unwrap();
    assert!(
        readme.starts_with("---\nbase_model: base\nlibrary_name: peft\n"),
        "{readme}"
    );
    ctx.xpm()
        .args([
            "import", "peft", "exported", "--base", "base", "--name", "back",
        ])
        .args(["--version", "1.0.0", "-o", "back.xpm"])
        .assert()
        .success();
    ctx.xpm()
        .args(["apply", "back.xpm", "--base", "base", "--out", "applied2"])
        .assert()
        .success();
    check_applied(&ctx.path("applied2"), &base, &adapter);
    // Exporting over a non-empty directory, or against another base, is refused.
    ctx.xpm()
        .args(["export", "t.xpm", "--base", "base", "-o", "exported"])
        .assert()
        .failure()
        .stderr(predicates::str::contains("already exists and is not empty"));
    let other = ctx.path("other");
    write_st(
        &other.join("model.safetensors"),
        &random_tensors(&[("layer.0.q.weight", &[4, 6])], 9),
        safetensors::Dtype::F32,
    );
    ctx.xpm()
        .args(["export", "t.xpm", "--base", "other", "-o", "x"])
        .assert()
        .failure()
        .stderr(predicates::str::contains(
            "is not the base of tiny-lora@1.0.0",
        ));
    assert!(!ctx.path("x").exists());
}

/// `xpm export` reads a LoRA expert's factors while it writes the adapter: a damaged factor
/// frame is found there (its sha256), the command fails naming the tensor, and no directory is
/// left behind.
#[test]
fn export_of_a_damaged_factor_fails_and_writes_nothing() {
    let ctx = TestContext::new();
    write_base(&ctx);
    let src = ctx.path("adapter");
    std::fs::create_dir_all(&src).unwrap();
    write_adapter(&src, lora_config());
    ctx.xpm()
        .args(["import", "peft", "adapter", "--base", "base", "--name", "t"])
        .args(["--version", "1.0.0", "-o", "t.xpm"])
        .assert()
        .success();
    let path = ctx.path("t.xpm");
    let part = {
        let r = xpm::format::ArtifactReader::open(&path).unwrap();
        let t = r
            .manifest()
            .tensors
            .iter()
            .find(|t| t.name == "layer.0.q.weight")
            .unwrap();
        let p = &t.stored[1]; // lora_B
        xpm::format::artifact::PRELUDE_LEN + p.offset + p.size / 2
    };
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[part as usize] ^= 0x80;
    std::fs::write(&path, bytes).unwrap();
    ctx.xpm()
        .args(["export", "t.xpm", "--base", "base", "-o", "exported"])
        .assert()
        .code(1)
        .stderr(predicates::str::contains(
            "tensor `layer.0.q.weight` (lora_B): frame blake3 mismatch",
        ));
    assert!(!ctx.path("exported").exists());
}

/// A LoRA on a sequence classifier's head: PEFT saves heads whole (`modules_to_save`), so the
/// export writes base + s·B·A there, while the other module's factors are streamed out of the
/// artifact as they are. Both come back through `xpm import` to the same applied weights.
#[test]
fn a_lora_head_is_exported_whole_and_the_other_factors_as_they_are() {
    let ctx = TestContext::new();
    let base = random_tensors(
        &[
            ("layer.0.q.weight", &[4, 6]),
            ("classifier.weight", &[3, 4]),
        ],
        1,
    );
    write_st(
        &ctx.path("base/model.safetensors"),
        &base,
        safetensors::Dtype::F32,
    );
    let src = ctx.path("adapter");
    let adapter = random_tensors(
        &[
            ("base_model.model.layer.0.q.lora_A.weight", &[2, 6]),
            ("base_model.model.layer.0.q.lora_B.weight", &[4, 2]),
            ("base_model.model.classifier.lora_A.weight", &[2, 4]),
            ("base_model.model.classifier.lora_B.weight", &[3, 2]),
        ],
        2,
    );
    write_st(
        &src.join("adapter_model.safetensors"),
        &adapter,
        safetensors::Dtype::F32,
    );
    let config = serde_json::json!({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q", "classifier"],
        "base_model_name_or_path": "org/tiny", "task_type": "SEQ_CLS"
    });
    std::fs::write(src.join("adapter_config.json"), config.to_string()).unwrap();
    let import = |from: &str, out: &str| {
        ctx.xpm()
            .args(["import", "peft", from, "--base", "base", "--name", "h"])
            .args(["--version", "1.0.0", "-o", out])
            .assert()
            .success();
    };
    import("adapter", "h.xpm");
    let out = ctx
        .xpm()
        .args([
            "export", "h.xpm", "--base", "base", "-o", "exported", "--json",
        ])
        .assert()
        .success();
    let r: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert_eq!(
        r["modules_to_save"],
        serde_json::json!(["classifier"]),
        "{r}"
    );
    let exported = read_st(&ctx.path("exported/adapter_model.safetensors"));
    // The adapter module's factors, bit for bit.
    assert_eq!(
        exported["base_model.model.layer.0.q.lora_A.weight"],
        adapter[0].2
    );
    assert_eq!(
        exported["base_model.model.layer.0.q.lora_B.weight"],
        adapter[1].2
    );
    // The head, whole: base + 2·B·A.
    let (a, b) = (&adapter[2].2, &adapter[3].2);
    let head = &exported["base_model.model.classifier.weight"];
    for o in 0..3 {
        for i in 0..4 {
            let d: f32 = (0..2).map(|k| b[o * 2 + k] * a[k * 4 + i]).sum::<f32>() * 2.0;
            let want = base[1].2[o * 4 + i] + d;
            assert!((head[o * 4 + i] - want).abs() <= 1e-6, "head[{o},{i}]");
        }
    }
    // Both apply to the same weights.
    import("exported", "back.xpm");
    for (e, dir) in [("h.xpm", "applied"), ("back.xpm", "applied2")] {
        ctx.xpm()
            .args(["apply", e, "--base", "base", "--out", dir])
            .assert()
            .success();
    }
    let (one, two) = (
        read_model(&ctx.path("applied")),
        read_model(&ctx.path("applied2")),
    );
    for name in ["layer.0.q.weight", "classifier.weight"] {
        for (x, y) in one[name].iter().zip(&two[name]) {
            assert!((x - y).abs() <= 1e-6, "{name}: {x} against {y}");
        }
    }
}

#[test]
fn a_hub_adapter_is_downloaded_verified_and_recorded() {
    let ctx = TestContext::new();
    let (_, base) = write_base(&ctx);
    let src = ctx.path("adapter");
    std::fs::create_dir_all(&src).unwrap();
    let adapter = write_adapter(&src, lora_config());
    let hub = HubMock::start("org/tiny-lora", &src, false);
    let out = ctx
        .xpm()
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_HOME", ctx.path("hf"))
        .env_remove("HF_TOKEN")
        .args(["import", "peft", "hf:org/tiny-lora", "--base", "base"])
        .args([
            "--name",
            "tiny-lora",
            "--version",
            "1.0.0",
            "-o",
            "t.xpm",
            "--json",
        ])
        .assert()
        .success();
    let r: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert_eq!(r["source"]["location"], "hf:org/tiny-lora");
    assert_eq!(r["source"]["revision"], "main");
    // The weights' digest is the one the download was checked against (recorded, not hashed
    // a second time): the file's sha256.
    let want = {
        use sha2::Digest;
        let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)))
    };
    assert_eq!(
        r["source"]["files"]["adapter_model.safetensors"],
        serde_json::Value::String(want)
    );
    ctx.xpm()
        .args(["apply", "t.xpm", "--base", "base", "--out", "applied"])
        .assert()
        .success();
    check_applied(&ctx.path("applied"), &base, &adapter);
    // A damaged download (the weights' bytes do not match their announced sha256) is refused,
    // and nothing is written.
    let bad = HubMock::start("org/tiny-lora", &src, true);
    ctx.xpm()
        .env("HF_ENDPOINT", &bad.url)
        .env("HF_HOME", ctx.path("hf2"))
        .env_remove("HF_TOKEN")
        .args(["import", "peft", "hf:org/tiny-lora", "--base", "base"])
        .args(["--name", "tiny-lora", "--version", "1.0.0", "-o", "bad.xpm"])
        .assert()
        .failure()
        .stderr(predicates::str::contains("but the hub announced sha256:"));
    assert!(!ctx.path("bad.xpm").exists());
}

#[test]
fn what_peft_cannot_express_in_xpm_is_refused_by_name() {
    let ctx = TestContext::new();
    write_base(&ctx);
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "dora",
            serde_json::json!({"peft_type": "LORA", "use_dora": true}),
            "DoRA adapter",
        ),
        (
            "replication",
            serde_json::json!({"peft_type": "LORA", "layer_replication": [[0, 1]]}),
            "sets `layer_replication`",
        ),
        (
            "ia3",
            serde_json::json!({"peft_type": "IA3"}),
            "is a IA3 adapter",
        ),
        (
            "layers",
            serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "layers_to_transform": [3]}),
            "is outside `layers_to_transform`",
        ),
    ];
    for (name, cfg, want) in cases {
        let dir = ctx.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        write_adapter(&dir, cfg);
        ctx.xpm()
            .args([
                "import", "peft", name, "--base", "base", "--name", "x", "-o",
            ])
            .arg(format!("{name}.xpm"))
            .assert()
            .failure()
            .stderr(predicates::str::contains(want));
        assert!(
            !ctx.path(&format!("{name}.xpm")).exists(),
            "{name}: nothing written"
        );
    }
    // Legacy pickle weights only.
    let dir = ctx.path("legacy");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), lora_config().to_string()).unwrap();
    std::fs::write(dir.join("adapter_model.bin"), b"PK\x03\x04").unwrap();
    ctx.xpm()
        .args(["import", "peft", "legacy", "--base", "base", "--name", "x"])
        .assert()
        .failure()
        .stderr(predicates::str::contains(
            "legacy pickle `adapter_model.bin`",
        ));
    // A module the base lacks, and a shape the base disagrees with: both named.
    let dir = ctx.path("wrong");
    std::fs::create_dir_all(&dir).unwrap();
    let t = random_tensors(
        &[
            ("base_model.model.layer.9.k.lora_A.weight", &[2, 6]),
            ("base_model.model.layer.9.k.lora_B.weight", &[4, 2]),
        ],
        3,
    );
    write_st(
        &dir.join("adapter_model.safetensors"),
        &t,
        safetensors::Dtype::F32,
    );
    std::fs::write(dir.join("adapter_config.json"), lora_config().to_string()).unwrap();
    ctx.xpm()
        .args(["import", "peft", "wrong", "--base", "base", "--name", "x"])
        .assert()
        .failure()
        .stderr(predicates::str::contains("module `layer.9.k`"))
        .stderr(predicates::str::contains("matches no tensor of the base"));
    let t = random_tensors(
        &[
            ("base_model.model.layer.0.q.lora_A.weight", &[2, 5]),
            ("base_model.model.layer.0.q.lora_B.weight", &[4, 2]),
        ],
        3,
    );
    write_st(
        &dir.join("adapter_model.safetensors"),
        &t,
        safetensors::Dtype::F32,
    );
    ctx.xpm()
        .args(["import", "peft", "wrong", "--base", "base", "--name", "x"])
        .assert()
        .failure()
        .stderr(predicates::str::contains(
            "B·A is [4, 5], but the base tensor `layer.0.q.weight` is [4, 6]",
        ));
    // SHiRA indices outside the weight.
    let dir = ctx.path("shira");
    std::fs::create_dir_all(&dir).unwrap();
    let idx: Vec<u8> = [0i64, 4, 1, 2]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let vals = f32_bytes(&[0.5, 0.25]);
    let views = vec![
        (
            "base_model.model.layer.0.q.shira_indices".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![2, 2], &idx)
                .unwrap(),
        ),
        (
            "base_model.model.layer.0.q.shira_weight".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &vals).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::json!({"peft_type": "SHIRA", "r": 1}).to_string(),
    )
    .unwrap();
    ctx.xpm()
        .args(["import", "peft", "shira", "--base", "base", "--name", "x"])
        .assert()
        .failure()
        .stderr(predicates::str::contains(
            "SHiRA index (4, 2) is outside `layer.0.q.weight` [4, 6]",
        ));
}

#[test]
fn peft_round_trips_with_the_real_peft() {
    let Some(python) = common::python("torch, transformers, peft, safetensors") else {
        return;
    };
    let stdout = common::run_python_check(&python, "peft_interop.py");
    assert!(stdout.contains("all checks pass"), "{stdout}");
    // Every check ran: 3 imports, 3 + 6 exports (each twice: weights, outputs), 2 round trips
    // and the SHiRA choice.
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        24,
        "{stdout}"
    );
}

#[test]
fn mttl_experts_import_through_the_cli_and_a_hostile_pickle_runs_nothing() {
    let Some(python) = common::python("torch, safetensors") else {
        return;
    };
    let ctx = TestContext::new();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/mttl_fixture.py");
    let st = std::process::Command::new(python)
        .arg(script)
        .arg(ctx.path("fx"))
        .status()
        .unwrap();
    assert!(st.success());
    // Two experts at once into a directory, named after the library's experts.
    let out = ctx
        .xpm()
        .args([
            "import",
            "mttl",
            "fx/lib",
            "sparse",
            "lora",
            "--base",
            "fx/base.safetensors",
        ])
        .args(["--version", "1.0.0", "-o", "imported", "--json"])
        .assert()
        .success();
    let r: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert_eq!(r[0]["kind"], "sparse");
    assert_eq!(r[0]["source"]["format"], "mttl-sparse");
    assert_eq!(r[1]["kind"], "lora");
    // The applied sparse expert is the base plus torch's delta, bit for bit.
    ctx.xpm()
        .args([
            "apply",
            "imported/sparse-1.0.0.xpm",
            "--base",
            "fx/base.safetensors",
        ])
        .args(["--out", "applied"])
        .assert()
        .success();
    let applied = read_model(&ctx.path("applied"));
    let bytes = std::fs::read(ctx.path("fx/expected_sparse.safetensors")).unwrap();
    let want = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let base_bytes = std::fs::read(ctx.path("fx/base.safetensors")).unwrap();
    let base = safetensors::SafeTensors::deserialize(&base_bytes).unwrap();
    for (name, delta) in want.tensors() {
        let d: Vec<f32> = delta
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let b: Vec<f32> = base
            .tensor(&name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let expect: Vec<f32> = b.iter().zip(&d).map(|(b, d)| b + d).collect();
        assert_eq!(applied[&name], expect, "{name}");
    }
    // The expert whose pickle calls os.system is refused, and the command never ran.
    ctx.xpm()
        .args([
            "import",
            "mttl",
            "fx/lib",
            "evil",
            "--base",
            "fx/base.safetensors",
        ])
        .assert()
        .failure()
        .stderr(predicates::str::contains("refusing the pickle global"));
    assert!(
        !ctx.path("fx/lib/pwned").exists(),
        "the pickle's command ran"
    );
    // An unknown expert gets the list and a suggestion.
    ctx.xpm()
        .args([
            "import",
            "mttl",
            "fx/lib",
            "sparce",
            "--base",
            "fx/base.safetensors",
        ])
        .assert()
        .failure()
        .stderr(predicates::str::contains("sparse"));
}
