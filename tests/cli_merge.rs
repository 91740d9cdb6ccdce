//! `xpm merge` end to end through the real binary.

mod common;

use common::*;
use predicates::prelude::*;

/// Two sparse experts extracted from two fine-tunes of one base.
fn two_experts(ctx: &TestContext) -> (Tensors, Tensors, Tensors) {
    let base = random_tensors(&[("a.weight", &[24, 40]), ("b.weight", &[16, 16])], 11);
    let t1 = perturb(&base, 12, 0.05);
    let t2 = perturb(&base, 13, 0.05);
    write_st(
        &ctx.path("base.safetensors"),
        &base,
        safetensors::Dtype::F32,
    );
    write_st(&ctx.path("t1.safetensors"), &t1, safetensors::Dtype::F32);
    write_st(&ctx.path("t2.safetensors"), &t2, safetensors::Dtype::F32);
    for (t, n) in [("t1", "e1"), ("t2", "e2")] {
        ctx.xpm()
            .args([
                "extract",
                "--base",
                "base.safetensors",
                "--tuned",
                &format!("{t}.safetensors"),
            ])
            .args([
                "--density",
                "0.3",
                "--name",
                n,
                "--version",
                "1.0.0",
                "-o",
                &format!("{n}.xpm"),
            ])
            .assert()
            .success();
    }
    (base, t1, t2)
}

fn unpacked(
    ctx: &TestContext,
    artifact: &str,
    dir: &str,
) -> std::collections::HashMap<String, Vec<u8>> {
    ctx.xpm()
        .args(["unpack", artifact, "-o", dir])
        .assert()
        .success();
    let bytes = std::fs::read(ctx.path(&format!("{dir}/tensors.safetensors"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect()
}

fn sparse(m: &std::collections::HashMap<String, Vec<u8>>, name: &str) -> Vec<(i64, f32)> {
    let idx = &m[&format!("{name}.indices")];
    let val = &m[&format!("{name}.values")];
    idx.chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .zip(
            val.chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap())),
        )
        .collect()
}

#[test]
fn sparse_mean_averages_over_the_experts_holding_each_entry() {
    let ctx = TestContext::new();
    two_experts(&ctx);
    ctx.xpm()
        .args([
            "merge",
            "e1.xpm",
            "e2.xpm",
            "--strategy",
            "sparse-mean",
            "--name",
            "m",
            "-o",
            "m.xpm",
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("merged 2 experts"));
    ctx.xpm().args(["verify", "m.xpm"]).assert().success();
    let (e1, e2, m) = (
        unpacked(&ctx, "e1.xpm", "u1"),
        unpacked(&ctx, "e2.xpm", "u2"),
        unpacked(&ctx, "m.xpm", "um"),
    );
    for name in ["a.weight", "b.weight"] {
        let (a, b) = (sparse(&e1, name), sparse(&e2, name));
        let mut want: std::collections::BTreeMap<i64, Vec<f32>> = Default::default();
        for (i, v) in a.iter().chain(b.iter()) {
            want.entry(*i).or_default().push(*v);
        }
        let got = sparse(&m, name);
        assert_eq!(got.len(), want.len(), "support = union of masks");
        for ((gi, gv), (wi, wv)) in got.iter().zip(&want) {
            assert_eq!(gi, wi);
            let mean = wv.iter().map(|x| *x as f64).sum::<f64>() / wv.len() as f64;
            assert!((*gv as f64 - mean).abs() < 1e-6, "{name}[{gi}]");
        }
    }
    // Provenance records the inputs, their digests, the strategy and the parameters.
    let out = ctx
        .xpm()
        .args(["inspect", "--json", "m.xpm"])
        .output()
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let prov = &r["manifest"]["provenance"];
    assert_eq!(prov["inputs"][0]["name"], "e1@1.0.0");
    // Format 1.1 inputs are named by their content digest (what `inspect` prints), which the
    // merge gets without hashing the whole file; the whole-file digest is left out.
    let e2: serde_json::Value = serde_json::from_slice(
        &ctx.xpm()
            .args(["inspect", "--json", "e2.xpm"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let content = e2["content_digest"].as_str().unwrap();
    assert!(content.starts_with("sha256:"), "{e2}");
    assert_eq!(prov["inputs"][1]["content_digest"], content);
    assert!(prov["inputs"][1].get("digest").is_none(), "{prov}");
    assert_eq!(prov["merge"]["strategy"], "sparse-mean");
}

#[test]
fn random_strategies_are_bit_identical_across_thread_counts() {
    let ctx = TestContext::new();
    two_experts(&ctx);
    for (threads, out) in [("1", "one.xpm"), ("2", "two.xpm"), ("2", "again.xpm")] {
        ctx.xpm()
            .env("RAYON_NUM_THREADS", threads)
            .args([
                "merge",
                "e1.xpm",
                "e2.xpm",
                "--strategy",
                "dare-ties",
                "--seed",
                "42",
                "--param",
                "density=0.5",
                "-o",
                out,
            ])
            .assert()
            .success();
    }
    let one = std::fs::read(ctx.path("one.xpm")).unwrap();
    assert_eq!(one, std::fs::read(ctx.path("two.xpm")).unwrap());
    assert_eq!(one, std::fs::read(ctx.path("again.xpm")).unwrap());
    ctx.xpm()
        .args([
            "merge",
            "e1.xpm",
            "e2.xpm",
            "--strategy",
            "dare-ties",
            "--seed",
            "43",
            "--param",
            "density=0.5",
            "-o",
            "other.xpm",
        ])
        .assert()
        .success();
    assert_ne!(one, std::fs::read(ctx.path("other.xpm")).unwrap());
}

#[test]
fn every_strategy_runs_and_verifies() {
    let ctx = TestContext::new();
    two_experts(&ctx);
    for s in [
        "sparse-mean",
        "mean",
        "linear",
        "task-arithmetic",
        "magnitude-prune",
        "ties",
        "dare-linear",
        "dare-ties",
        "breadcrumbs",
        "breadcrumbs-ties",
        "della",
    ] {
        let out = format!("{s}.xpm");
        ctx.xpm()
            .args([
                "merge",
                "e1.xpm",
                "e2.xpm",
                "--strategy",
                s,
                "--weights",
                "1,0.5",
                "-o",
                &out,
            ])
            .assert()
            .success();
        ctx.xpm().args(["verify", &out]).assert().success();
    }
    ctx.xpm()
        .args([
            "merge",
            "e1.xpm",
            "e2.xpm",
            "--preset",
            "mergekit",
            "--strategy",
            "ties",
            "-o",
            "mk.xpm",
        ])
        .assert()
        .success();
}

#[test]
fn bad_merges_are_refused_and_write_nothing() {
    let ctx = TestContext::new();
    two_experts(&ctx);
    // An expert of another base model.
    let other = random_tensors(&[("a.weight", &[24, 40]), ("b.weight", &[16, 16])], 99);
    write_st(&ctx.path("ob.safetensors"), &other, safetensors::Dtype::F32);
    write_st(
        &ctx.path("ot.safetensors"),
        &perturb(&other, 5, 0.1),
        safetensors::Dtype::F32,
    );
    ctx.xpm()
        .args([
            "extract",
            "--base",
            "ob.safetensors",
            "--tuned",
            "ot.safetensors",
            "--name",
            "o",
            "--version",
            "1.0.0",
            "-o",
            "o.xpm",
        ])
        .assert()
        .success();
    ctx.xpm()
        .args(["merge", "e1.xpm", "o.xpm", "-o", "x.xpm"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("targets base"))
        .stderr(predicate::str::contains("hint: experts can only be merged"));
    ctx.xpm()
        .args(["merge", "e1.xpm", "e2.xpm", "--weights", "1", "-o", "x.xpm"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("1 weights for 2 experts"));
    ctx.xpm()
        .args([
            "merge",
            "e1.xpm",
            "e2.xpm",
            "--strategy",
            "ties",
            "--param",
            "density=2",
            "-o",
            "x.xpm",
        ])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("outside (0, 1]"));
    ctx.xpm()
        .args([
            "merge", "e1.xpm", "e2.xpm", "--param", "bogus=1", "-o", "x.xpm",
        ])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("unknown merge parameter `bogus`"));
    ctx.xpm()
        .args(["merge", "e1.xpm", "--strategy", "nope", "-o", "x.xpm"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("unknown merge strategy `nope`"));
    assert!(!ctx.path("x.xpm").exists());
    assert_eq!(ctx.temp_leftovers(), Vec::<String>::new());
}
