//! `xpm merge` beyond a plain merged expert: `--apply-to` model directories, recipes and
//! per-tensor overrides, LoRA-space `cat` / `svd`, and `xpm overlap` — through the real binary.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use predicates::prelude::*;

/// A sharded base directory (with config and tokenizer files) and two sparse experts from two
/// fine-tunes of it.
fn base_and_experts(ctx: &TestContext) -> Tensors {
    let base = random_tensors(
        &[
            ("enc.0.q.weight", &[32, 24]),
            ("enc.0.k.weight", &[32, 24]),
            ("enc.1.q.weight", &[32, 24]),
            ("norm.weight", &[24]),
        ],
        21,
    );
    write_sharded(&ctx.path("base"), &base);
    std::fs::write(ctx.path("base/config.json"), r#"{"model_type": "bert"}"#).unwrap();
    std::fs::write(ctx.path("base/tokenizer.json"), r#"{"version": "1.0"}"#).unwrap();
    std::fs::create_dir_all(ctx.path("base/1_Pooling")).unwrap();
    std::fs::write(ctx.path("base/1_Pooling/config.json"), "{}").unwrap();
    for (seed, name) in [(22, "e1"), (23, "e2")] {
        write_st(
            &ctx.path(&format!("{name}.safetensors")),
            &perturb(&base, seed, 0.05),
            safetensors::Dtype::F32,
        );
        ctx.xpm()
            .args([
                "extract",
                "--base",
                "base",
                "--tuned",
                &format!("{name}.safetensors"),
            ])
            .args([
                "--targets",
                "*.weight",
                "--density",
                "0.3",
                "--name",
                name,
                "--version",
                "1.0.0",
            ])
            .args(["-o", &format!("{name}.xpm")])
            .assert()
            .success();
    }
    base
}

/// Every tensor of a (possibly sharded) output directory, read with the safetensors crate.
fn read_model(dir: &Path) -> HashMap<String, (Vec<usize>, Vec<u8>)> {
    let mut out = HashMap::new();
    let files: Vec<std::path::PathBuf> = if dir.join("model.safetensors.index.json").exists() {
        let idx: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let mut f: Vec<String> = idx["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        f.sort();
        f.dedup();
        f.iter().map(|n| dir.join(n)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (n, v) in st.tensors() {
            out.insert(n, (v.shape().to_vec(), v.data().to_vec()));
        }
    }
    out
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The merged delta of every tensor, densified, from an unpacked expert.
fn merged_deltas(ctx: &TestContext, artifact: &str, base: &Tensors) -> HashMap<String, Vec<f32>> {
    let dir = format!("{artifact}.un");
    ctx.xpm()
        .args(["unpack", artifact, "-o", &dir])
        .assert()
        .success();
    let bytes = std::fs::read(ctx.path(&format!("{dir}/tensors.safetensors"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = HashMap::new();
    for (name, shape, _) in base {
        let n: usize = shape.iter().product();
        let mut d = vec![0f32; n];
        if let Ok(ix) = st.tensor(&format!("{name}.indices")) {
            let ix: Vec<i64> = ix
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let v = f32s(st.tensor(&format!("{name}.values")).unwrap().data());
            for (i, x) in ix.iter().zip(v) {
                d[*i as usize] = x;
            }
            out.insert(name.clone(), d);
        }
    }
    out
}

#[test]
fn apply_to_writes_base_plus_delta_exactly_as_a_sharded_model() {
    let ctx = TestContext::new();
    let base = base_and_experts(&ctx);
    ctx.xpm()
        .args([
            "merge",
            "e1.xpm",
            "e2.xpm",
            "--strategy",
            "ties",
            "--apply-to",
            "base",
        ])
        .args([
            "--out",
            "model",
            "--save-expert",
            "merged.xpm",
            "--max-shard-size",
            "4KB",
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("applied them to base"));
    assert!(ctx.path("model/model.safetensors.index.json").is_file());
    for f in [
        "config.json",
        "tokenizer.json",
        "1_Pooling/config.json",
        "xpm-applied.json",
    ] {
        assert!(ctx.path(&format!("model/{f}")).is_file(), "{f} missing");
    }
    let model = read_model(&ctx.path("model"));
    let deltas = merged_deltas(&ctx, "merged.xpm", &base);
    assert_eq!(model.len(), base.len());
    for (name, shape, w0) in &base {
        let (s, bytes) = &model[name];
        assert_eq!(s, shape);
        let got = f32s(bytes);
        match deltas.get(name) {
            Some(d) => {
                let want: Vec<f32> = w0.iter().zip(d).map(|(a, b)| a + b).collect();
                assert_eq!(got, want, "{name}: not exactly W0 + Δ");
                assert_ne!(got, *w0, "{name} unchanged");
            }
            None => assert_eq!(&got, w0, "{name} should be copied unchanged"),
        }
    }
    // The output is a base model again: an expert extracted against it has its digest.
    ctx.xpm()
        .args(["apply", "merged.xpm", "--base", "model", "--out", "model2"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("was made from base"));
    // Applying to an existing non-empty directory is refused, and nothing is written.
    ctx.xpm()
        .args(["apply", "merged.xpm", "--base", "base", "--out", "model"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("already exists"));
    assert!(
        ctx.temp_leftovers().is_empty(),
        "{:?}",
        ctx.temp_leftovers()
    );
    // `--json` prints what was written (the same counts as the result line).
    let o = ctx
        .xpm()
        .args(["apply", "merged.xpm", "--base", "base", "--out", "model3"])
        .args(["--max-shard-size", "4KB", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["out"], "model3");
    assert_eq!(r["changed"].as_u64().unwrap() as usize, deltas.len());
    assert_eq!(
        r["changed"].as_u64().unwrap() + r["copied"].as_u64().unwrap(),
        base.len() as u64
    );
    assert!(r["shards"].as_u64().unwrap() > 1);
    assert!(
        r["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "config.json")
    );
    // Python's safetensors loads it like the base, with the same values.
    python_check(&ctx);
}

fn python_check(ctx: &TestContext) {
    let Some(python) = common::python("safetensors, numpy") else {
        return;
    };
    let script = r#"
import json, sys, os
from safetensors.numpy import load_file
def load(d):
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        out = {}
        for f in sorted(set(json.load(open(idx))["weight_map"].values())):
            out.update(load_file(os.path.join(d, f)))
        return out
    return load_file(os.path.join(d, "model.safetensors"))
a, b = load(sys.argv[1]), load(sys.argv[2])
assert sorted(a) == sorted(b), (sorted(a), sorted(b))
changed = [k for k in a if (a[k] != b[k]).any()]
assert all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape for k in a)
print(len(changed))
"#;
    let out = run_python_code(
        &python,
        script,
        &[ctx.path("base").as_os_str(), ctx.path("model").as_os_str()],
        &ctx.path(""),
    );
    assert_eq!(out.trim(), "4");
}

#[test]
fn recipes_run_overrides_and_are_embedded() {
    let ctx = TestContext::new();
    base_and_experts(&ctx);
    std::fs::write(
        ctx.path("merge.toml"),
        r#"
strategy = "ties"
seed = 3
[output]
name = "combo"
version = "2.0.0"
[params]
density = 0.5
[[experts]]
expert = "e1.xpm"
[[experts]]
expert = "e2.xpm"
weight = 0.5
[[overrides]]
tensors = "enc.0.*"
strategy = "sparse-mean"
[[overrides]]
tensors = "*.q.weight"
strategy = "mean"
"#,
    )
    .unwrap();
    ctx.xpm()
        .args(["merge", "--recipe", "merge.toml", "-o", "r.xpm"])
        .assert()
        .success();
    // The same merge from flags gives the same bytes.
    ctx.xpm()
        .args([
            "merge",
            "e1.xpm",
            "e2.xpm",
            "--weights",
            "1,0.5",
            "--strategy",
            "ties",
            "--seed",
            "3",
        ])
        .args([
            "--param",
            "density=0.5",
            "--override",
            "enc.0.*:strategy=sparse-mean",
        ])
        .args([
            "--override",
            "*.q.weight:strategy=mean",
            "--name",
            "combo",
            "--version",
            "2.0.0",
            "-o",
            "f.xpm",
        ])
        .assert()
        .success();
    let out = ctx
        .xpm()
        .args(["inspect", "r.xpm", "--json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = &report["manifest"];
    assert_eq!(m["name"], "combo");
    assert_eq!(m["version"], "2.0.0");
    let recipe = &m["provenance"]["recipe"];
    assert_eq!(recipe["experts"][0]["expert"], "e1@=1.0.0");
    // Pinned by content digest (format 1.1), not by the whole-file sha256 (not computed).
    assert!(
        recipe["experts"][1]["content_digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert!(recipe["experts"][1].get("sha256").is_none(), "{recipe}");
    assert_eq!(recipe["overrides"][0]["strategy"], "sparse-mean");
    // First match wins: enc.0.q.weight took sparse-mean (keeps the union), enc.1.q.weight mean
    // (union too), enc.0.k.weight sparse-mean, the rest ties (fewer entries).
    let nnz: HashMap<String, u64> = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["nnz"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(nnz["enc.0.q.weight"] > nnz["norm.weight"] * 10, "{nnz:?}");
    let strip = |p: &str| {
        let mut v: serde_json::Value = serde_json::from_slice(
            &ctx.xpm()
                .args(["inspect", p, "--json"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        v["manifest"]["provenance"]["recipe"] = serde_json::Value::Null;
        v["manifest"]["payload"] = serde_json::Value::Null;
        v["file"] = serde_json::Value::Null;
        v["manifest"]["tensors"].clone()
    };
    assert_eq!(strip("r.xpm"), strip("f.xpm"));
    // Re-run from the embedded recipe: needs the experts installed by name.
    for e in ["e1.xpm", "e2.xpm"] {
        ctx.xpm().args(["publish", e]).assert().success();
    }
    ctx.xpm()
        .args(["install", "e1@1", "e2@1"])
        .assert()
        .success();
    let toml = toml_edit::ser::to_string_pretty(recipe).unwrap();
    std::fs::write(ctx.path("again.toml"), toml).unwrap();
    ctx.xpm()
        .args(["merge", "--recipe", "again.toml", "-o", "again.xpm"])
        .assert()
        .success();
    assert_eq!(strip("again.xpm"), strip("r.xpm"));
    // Run the recipe `v` from `file`; its result, else its error.
    let run_recipe = |v: &serde_json::Value, file: &str, out: &str| {
        std::fs::write(ctx.path(file), toml_edit::ser::to_string_pretty(v).unwrap()).unwrap();
        ctx.xpm()
            .args(["merge", "--recipe", file, "-o", out])
            .assert()
    };
    let json_of = |args: &[&str]| -> serde_json::Value {
        serde_json::from_slice(&ctx.xpm().args(args).output().unwrap().stdout).unwrap()
    };
    // A pinned digest that does not match is refused; so is a content digest that does not
    // match, and a pin that is not a digest at all.
    let mut v: serde_json::Value = recipe.clone();
    v["experts"][0]["sha256"] = format!("sha256:{}", "0".repeat(64)).into();
    run_recipe(&v, "bad.toml", "bad.xpm")
        .failure()
        .stderr(predicate::str::contains(
            "the recipe pins `e1@=1.0.0` to sha256",
        ));
    let mut v: serde_json::Value = recipe.clone();
    v["experts"][1]["content_digest"] = format!("sha256:{}", "1".repeat(64)).into();
    run_recipe(&v, "bad.toml", "bad.xpm")
        .failure()
        .stderr(predicate::str::contains(
            "the recipe pins `e2@=1.0.0` to content digest sha256:111",
        ));
    v["experts"][1]["content_digest"] = "sha256:../../etc".into();
    run_recipe(&v, "bad.toml", "bad.xpm")
        .failure()
        .stderr(predicate::str::contains("is not a sha256 digest"));
    assert!(!ctx.path("bad.xpm").exists());
    // A recipe that pins the whole-file sha256 (what `xpm verify` prints) gets it checked,
    // and the merge records it beside the content digest.
    let verified = json_of(&["verify", "e1.xpm", "--json"]);
    let mut v: serde_json::Value = recipe.clone();
    v["experts"][0]["sha256"] = verified["sha256"].clone();
    run_recipe(&v, "sha.toml", "sha.xpm").success();
    let sha = json_of(&["inspect", "sha.xpm", "--json"]);
    let inputs = &sha["manifest"]["provenance"]["inputs"];
    assert_eq!(inputs[0]["digest"], verified["sha256"]);
    assert_eq!(inputs[0]["content_digest"], verified["content_digest"]);
    assert!(inputs[1].get("digest").is_none(), "{inputs}");
    assert_eq!(strip("sha.xpm"), strip("r.xpm"));
    // Invalid recipes: unknown key, bad strategy in an override, recipe + experts.
    std::fs::write(
        ctx.path("x.toml"),
        "strategy = \"ties\"\nexperts = []\nbogus = 1\n",
    )
    .unwrap();
    ctx.xpm()
        .args(["merge", "--recipe", "x.toml", "-o", "x.xpm"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("not a valid merge recipe"));
    ctx.xpm()
        .args([
            "merge",
            "e1.xpm",
            "--override",
            "*:strategy=nope",
            "-o",
            "x.xpm",
        ])
        .assert()
        .failure()
        .stderr(predicate::str::contains("unknown merge strategy `nope`"));
    ctx.xpm()
        .args(["merge", "e1.xpm", "--recipe", "merge.toml", "-o", "x.xpm"])
        .assert()
        .failure();
}

/// A LoRA expert written with xpm's own writer: one [out, in] tensor, rank r.
fn lora_expert(path: &Path, name: &str, rank: u32, alpha: f64, seed: u64) -> (Vec<f32>, Vec<f32>) {
    use xpm::format::*;
    let (out, inp) = (12usize, 20usize);
    let mut g = Rng(seed);
    let a: Vec<f32> = (0..rank as usize * inp).map(|_| g.f32()).collect();
    let b: Vec<f32> = (0..out * rank as usize).map(|_| g.f32()).collect();
    let t = TensorData {
        name: "enc.0.q.weight".into(),
        shape: vec![out as u64, inp as u64],
        dtype: Dtype::F32,
        content: Content::Lora {
            rank,
            alpha,
            a: f32_bytes(&a),
            b: f32_bytes(&b),
        },
    };
    let mut w = ArtifactWriter::create(path, 3).unwrap();
    w.push(encode_tensor(&t, 3).unwrap()).unwrap();
    w.finish(Manifest::new(
        name,
        "1.0.0".parse().unwrap(),
        BaseModel {
            id: "m".into(),
            digest: xpm::digest::sha256(b"m"),
        },
        ExpertKind::Lora,
    ))
    .unwrap();
    (a, b)
}

fn lora_dense(a: &[f32], b: &[f32], rank: usize, scale: f64) -> Vec<f64> {
    let (out, inp) = (12, 20);
    let mut w = vec![0f64; out * inp];
    for o in 0..out {
        for k in 0..rank {
            for j in 0..inp {
                w[o * inp + j] += scale * b[o * rank + k] as f64 * a[k * inp + j] as f64;
            }
        }
    }
    w
}

#[test]
fn lora_cat_and_svd_reproduce_the_weighted_sum() {
    let ctx = TestContext::new();
    let (a1, b1) = lora_expert(&ctx.path("l1.xpm"), "l1", 4, 8.0, 1);
    let (a2, b2) = lora_expert(&ctx.path("l2.xpm"), "l2", 2, 4.0, 2);
    let want: Vec<f64> = lora_dense(&a1, &b1, 4, 2.0)
        .iter()
        .zip(lora_dense(&a2, &b2, 2, 2.0))
        .map(|(x, y)| x + 0.5 * y)
        .collect();
    for (strategy, extra, rank) in [("cat", vec![], 6), ("svd", vec!["--param", "rank=6"], 6)] {
        let out = format!("{strategy}.xpm");
        ctx.xpm()
            .args([
                "merge",
                "l1.xpm",
                "l2.xpm",
                "--weights",
                "1,0.5",
                "--strategy",
                strategy,
                "-o",
                &out,
            ])
            .args(&extra)
            .assert()
            .success();
        let r = xpm::format::ArtifactReader::open(ctx.path(&out)).unwrap();
        assert_eq!(r.manifest().kind, xpm::format::ExpertKind::Lora);
        let t = r.read_tensor(0).unwrap();
        let xpm::format::Content::Lora {
            rank: got_rank,
            alpha,
            a,
            b,
        } = t.content
        else {
            panic!("{strategy}: not LoRA")
        };
        assert_eq!(got_rank, rank, "{strategy}");
        let got = lora_dense(
            &t.dtype.to_f32(&a),
            &t.dtype.to_f32(&b),
            got_rank as usize,
            alpha / got_rank as f64,
        );
        let err = got
            .iter()
            .zip(&want)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-5, "{strategy}: max error {err}");
    }
    // A lower rank is an approximation, and rank defaults to the largest input rank (4).
    ctx.xpm()
        .args([
            "merge",
            "l1.xpm",
            "l2.xpm",
            "--strategy",
            "svd",
            "-o",
            "s4.xpm",
        ])
        .assert()
        .success();
    let r = xpm::format::ArtifactReader::open(ctx.path("s4.xpm")).unwrap();
    assert!(matches!(
        r.read_tensor(0).unwrap().content,
        xpm::format::Content::Lora { rank: 4, .. }
    ));
    // cat on a sparse expert is refused.
    let ctx2 = TestContext::new();
    base_and_experts(&ctx2);
    ctx2.xpm()
        .args([
            "merge",
            "e1.xpm",
            "e2.xpm",
            "--strategy",
            "cat",
            "-o",
            "c.xpm",
        ])
        .assert()
        .failure()
        .stderr(predicate::str::contains("merges LoRA experts"));
    assert!(!ctx2.path("c.xpm").exists());
}

#[test]
fn overlap_reports_jaccard_signs_and_interference() {
    let ctx = TestContext::new();
    base_and_experts(&ctx);
    ctx.xpm()
        .args(["overlap", "e1.xpm", "e2.xpm", "e1.xpm"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("jaccard")
                .and(predicate::str::contains("Δ sparse-mean"))
                .and(predicate::str::contains("overall")),
        );
    let out = ctx
        .xpm()
        .args(["overlap", "e1.xpm", "e2.xpm", "e1.xpm", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let schema: serde_json::Value = serde_json::from_slice(
        &std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/overlap.schema.json"))
            .unwrap(),
    )
    .unwrap();
    let v = jsonschema::validator_for(&schema).unwrap();
    assert!(
        v.is_valid(&r),
        "{:?}",
        v.iter_errors(&r).map(|e| e.to_string()).collect::<Vec<_>>()
    );
    let pairs = r["overall"]["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 3);
    // e1 against itself: identical masks and signs.
    let same = pairs.iter().find(|p| p["a"] == 0 && p["b"] == 2).unwrap();
    assert_eq!(same["jaccard"], 1.0);
    assert_eq!(same["sign_agreement"], 1.0);
    // Two independent 30 % masks: Jaccard near 0.3·0.3/(0.6−0.09) ≈ 0.18.
    let diff = pairs.iter().find(|p| p["a"] == 0 && p["b"] == 1).unwrap();
    let j = diff["jaccard"].as_f64().unwrap();
    assert!((0.08..0.3).contains(&j), "{j}");
    ctx.xpm().args(["overlap", "e1.xpm"]).assert().failure();
}

#[test]
fn experts_stored_in_different_dtypes_are_refused() {
    let ctx = TestContext::new();
    base_and_experts(&ctx);
    ctx.xpm()
        .args([
            "extract",
            "--base",
            "base",
            "--tuned",
            "e2.safetensors",
            "--targets",
            "*.weight",
        ])
        .args([
            "--density",
            "0.3",
            "--values-dtype",
            "f16",
            "--name",
            "h",
            "--version",
            "1.0.0",
            "-o",
            "h.xpm",
        ])
        .assert()
        .success();
    ctx.xpm()
        .args(["merge", "e1.xpm", "h.xpm", "-o", "x.xpm"])
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("stored as f16")
                .and(predicate::str::contains("as f32 in an earlier expert")),
        );
    assert!(!ctx.path("x.xpm").exists());
}
