//! The artifact commands end to end, through the real `xpm` binary.

mod common;

use common::*;
use predicates::prelude::*;
use serde_json::Value;

fn extract(
    ctx: &TestContext,
    base: &std::path::Path,
    tuned: &std::path::Path,
    extra: &[&str],
) -> assert_cmd::assert::Assert {
    ctx.xpm()
        .args(["extract", "--base"])
        .arg(base)
        .arg("--tuned")
        .arg(tuned)
        .args(["--name", "ex", "--version", "1.0.0"])
        .args(extra)
        .assert()
}

fn inspect_json(ctx: &TestContext, file: &str) -> Value {
    let out = ctx
        .xpm()
        .args(["inspect", "--json", file])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn schema(file: &str) -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schemas")
        .join(file);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The indices of the top-k |t - b| entries, ties to the lower index, computed independently.
fn reference_topk(b: &[f32], t: &[f32], k: usize) -> Vec<i64> {
    let d: Vec<f32> = t.iter().zip(b).map(|(t, b)| t - b).collect();
    let mut order: Vec<usize> = (0..d.len()).collect();
    order.sort_by(|&x, &y| d[y].abs().total_cmp(&d[x].abs()).then(x.cmp(&y)));
    let mut keep: Vec<i64> = order[..k].iter().map(|&i| i as i64).collect();
    keep.sort();
    keep
}

#[test]
fn extract_keeps_exactly_the_top_k_and_round_trips_through_unpack_and_pack() {
    let ctx = TestContext::new();
    let (base, tuned, bt, tt) = base_and_tuned(&ctx);
    extract(
        &ctx,
        &base,
        &tuned,
        &[
            "--density",
            "0.1",
            "--targets",
            "*.attn.*.weight",
            "-o",
            "ex.xpm",
        ],
    )
    .success();

    let report = inspect_json(&ctx, "ex.xpm");
    assert_eq!(report["schema_version"], 1);
    let validator = jsonschema::validator_for(&schema("inspect.schema.json")).unwrap();
    assert!(
        validator.is_valid(&report),
        "inspect --json does not match its schema"
    );
    let names: Vec<&str> = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "layer.0.attn.k.weight",
            "layer.0.attn.q.weight",
            "layer.1.attn.q.weight"
        ]
    );
    for t in report["tensors"].as_array().unwrap() {
        assert_eq!(t["nnz"], 153, "⌊0.1 · 32·48⌋ = 153 for {}", t["name"]);
    }
    assert!(
        report["manifest"]["base"]["digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );

    ctx.xpm()
        .args(["verify", "ex.xpm"])
        .assert()
        .success()
        .stdout(predicate::str::contains("ok ex.xpm ex@1.0.0 sha256:"));
    ctx.xpm()
        .args(["unpack", "ex.xpm", "-o", "un"])
        .assert()
        .success();

    // The unpacked manifest validates against the manifest schema.
    let m: Value =
        serde_json::from_slice(&std::fs::read(ctx.path("un/manifest.json")).unwrap()).unwrap();
    assert!(
        jsonschema::validator_for(&schema("manifest.schema.json"))
            .unwrap()
            .is_valid(&m)
    );

    // The unpacked tensors are exactly the reference top-k with the exact deltas.
    let bytes = std::fs::read(ctx.path("un/tensors.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for name in names {
        let (_, _, b) = bt.iter().find(|x| x.0 == name).unwrap();
        let (_, _, t) = tt.iter().find(|x| x.0 == name).unwrap();
        let idx = st.tensor(&format!("{name}.indices")).unwrap();
        assert_eq!(idx.dtype(), safetensors::Dtype::I64);
        let got: Vec<i64> = idx
            .data()
            .chunks(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, reference_topk(b, t, 153), "{name}");
        let vals = st.tensor(&format!("{name}.values")).unwrap();
        let got_v: Vec<f32> = vals
            .data()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let want_v: Vec<f32> = got.iter().map(|&i| t[i as usize] - b[i as usize]).collect();
        assert_eq!(got_v, want_v, "{name}");
    }

    // unpack → pack gives back the same manifest (modulo storage) and the same tensors.
    ctx.xpm()
        .args(["pack", "un", "-o", "re.xpm"])
        .assert()
        .success();
    let re = inspect_json(&ctx, "re.xpm");
    assert_eq!(re["manifest"]["tensors"], report["manifest"]["tensors"]);
    ctx.xpm()
        .args(["unpack", "re.xpm", "-o", "un2"])
        .assert()
        .success();
    assert_eq!(
        std::fs::read(ctx.path("un2/tensors.safetensors")).unwrap(),
        bytes
    );
}

#[test]
fn extract_is_deterministic_and_caches_the_base_digest() {
    let ctx = TestContext::new();
    let (base, tuned, _, _) = base_and_tuned(&ctx);
    extract(&ctx, &base, &tuned, &["-o", "a.xpm"]).success();
    let cache = ctx.path("home/cache/base-digests-v1");
    assert!(
        std::fs::read_dir(&cache).unwrap().count() >= 1,
        "base digest cached"
    );
    extract(&ctx, &base, &tuned, &["-o", "b.xpm"]).success();
    assert_eq!(
        std::fs::read(ctx.path("a.xpm")).unwrap(),
        std::fs::read(ctx.path("b.xpm")).unwrap()
    );
    // Default targets: every float tensor of rank ≥ 2 (the bias is left out).
    let r = inspect_json(&ctx, "a.xpm");
    assert_eq!(r["tensors"].as_array().unwrap().len(), 5);
    assert_eq!(r["manifest"]["selection"]["keep_ratio"], 0.05);
}

#[test]
fn dense_extract_stores_the_exact_delta() {
    let ctx = TestContext::new();
    let (base, tuned, bt, tt) = base_and_tuned(&ctx);
    extract(
        &ctx,
        &base,
        &tuned,
        &[
            "--kind",
            "dense",
            "--targets",
            "embed.weight",
            "-o",
            "d.xpm",
        ],
    )
    .success();
    ctx.xpm()
        .args(["unpack", "d.xpm", "-o", "un"])
        .assert()
        .success();
    let bytes = std::fs::read(ctx.path("un/tensors.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let d = st.tensor("embed.weight.delta").unwrap();
    assert_eq!(d.shape(), [50, 32]);
    let got: Vec<f32> = d
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let (b, t) = (
        &bt.iter().find(|x| x.0 == "embed.weight").unwrap().2,
        &tt.iter().find(|x| x.0 == "embed.weight").unwrap().2,
    );
    let want: Vec<f32> = t.iter().zip(b.iter()).map(|(t, b)| t - b).collect();
    assert_eq!(got, want);
}

#[test]
fn half_precision_models_keep_their_dtype() {
    let ctx = TestContext::new();
    let base = random_tensors(&[("w", &[40, 40])], 7);
    let tuned = perturb(&base, 8, 0.1);
    for (dt, name) in [
        (safetensors::Dtype::F16, "f16"),
        (safetensors::Dtype::BF16, "bf16"),
    ] {
        let (b, t) = (
            ctx.path(&format!("{name}/b.safetensors")),
            ctx.path(&format!("{name}/t.safetensors")),
        );
        write_st(&b, &base, dt);
        write_st(&t, &tuned, dt);
        let out = format!("{name}.xpm");
        extract(&ctx, &b, &t, &["--density", "0.25", "-o", &out]).success();
        let r = inspect_json(&ctx, &out);
        assert_eq!(r["tensors"][0]["dtype"], name);
        assert_eq!(r["tensors"][0]["nnz"], 400);
        ctx.xpm().args(["verify", &out]).assert().success();
    }
}

#[test]
fn lora_and_mixed_experts_pack_from_a_hand_written_directory() {
    let ctx = TestContext::new();
    let dir = ctx.path("lora");
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = serde_json::json!({
        "format_version": "1.0", "name": "team/lora-x", "version": "0.2.0",
        "base": {"id": "tiny", "digest": format!("sha256:{}", "ab".repeat(32))},
        "kind": "lora",
        "tensors": [
            {"name": "q.weight", "shape": [8, 6], "dtype": "f32", "delta": {"kind": "lora", "rank": 2, "alpha": 16.0}},
            {"name": "head.weight", "shape": [3, 8], "dtype": "f32", "delta": {"kind": "dense"}}
        ]
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    let t = random_tensors(
        &[
            ("q.weight.lora_A", &[2, 6]),
            ("q.weight.lora_B", &[8, 2]),
            ("head.weight.delta", &[3, 8]),
        ],
        3,
    );
    write_st(
        &dir.join("tensors.safetensors"),
        &t,
        safetensors::Dtype::F32,
    );
    ctx.xpm()
        .args(["pack", "lora", "-o", "l.xpm"])
        .assert()
        .success();
    ctx.xpm().args(["verify", "l.xpm"]).assert().success();
    ctx.xpm()
        .args(["inspect", "l.xpm"])
        .assert()
        .success()
        .stdout(predicate::str::contains("rank 2"));
    ctx.xpm()
        .args(["unpack", "l.xpm", "-o", "out"])
        .assert()
        .success();
    let bytes = std::fs::read(ctx.path("out/tensors.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (n, s, v) in &t {
        let got = st.tensor(n).unwrap();
        assert_eq!(got.shape(), &s[..]);
        assert_eq!(got.data(), f32_bytes(v), "{n}");
    }
}

#[test]
fn block_structured_masks_use_tile_lists() {
    // A mask made of whole 16×16 tiles is stored as a tile list, far smaller than the indices.
    let ctx = TestContext::new();
    let dir = ctx.path("blk");
    std::fs::create_dir_all(&dir).unwrap();
    let (rows, cols) = (64usize, 64usize);
    let tiles = [(0usize, 1usize), (2, 3), (3, 0)];
    let mut idx: Vec<i64> = Vec::new();
    for r in 0..rows {
        for c in 0..cols {
            if tiles.contains(&(r / 16, c / 16)) {
                idx.push((r * cols + c) as i64);
            }
        }
    }
    let nnz = idx.len();
    let manifest = serde_json::json!({
        "format_version": "1.0", "name": "blk", "version": "1.0.0",
        "base": {"id": "tiny", "digest": format!("sha256:{}", "cd".repeat(32))}, "kind": "sparse",
        "tensors": [{"name": "w", "shape": [rows, cols], "dtype": "f32",
                     "delta": {"kind": "sparse", "nnz": nnz, "density": nnz as f64 / (rows * cols) as f64, "block_size": 16}}]
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    let idx_bytes: Vec<u8> = idx.iter().flat_map(|i| i.to_le_bytes()).collect();
    let vals: Vec<u8> = f32_bytes(&(0..nnz).map(|i| i as f32).collect::<Vec<_>>());
    let views = vec![
        (
            "w.indices".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![nnz], &idx_bytes)
                .unwrap(),
        ),
        (
            "w.values".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![nnz], &vals)
                .unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, &dir.join("tensors.safetensors")).unwrap();
    ctx.xpm()
        .args(["pack", "blk", "-o", "b.xpm"])
        .assert()
        .success();
    let r = inspect_json(&ctx, "b.xpm");
    assert_eq!(r["tensors"][0]["encoding"], "block16");
    ctx.xpm()
        .args(["unpack", "b.xpm", "-o", "un"])
        .assert()
        .success();
    let bytes = std::fs::read(ctx.path("un/tensors.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("w.indices").unwrap().data(), &idx_bytes[..]);
}

#[test]
fn the_decompressed_payload_is_one_safetensors_file() {
    let ctx = TestContext::new();
    let (base, tuned, _, _) = base_and_tuned(&ctx);
    extract(&ctx, &base, &tuned, &["-o", "a.xpm"]).success();
    let bytes = std::fs::read(ctx.path("a.xpm")).unwrap();
    let (_, manifest, payload) = split_artifact(&bytes);
    // The header frame (last in the payload) followed by the data frames decompresses, as one
    // zstd stream, to a safetensors file.
    let h = manifest["payload"]["header"]["offset"].as_u64().unwrap() as usize;
    let reordered = [&payload[h..], &payload[..h]].concat();
    let raw = zstd::stream::decode_all(&reordered[..]).unwrap();
    assert_eq!(
        raw.len() as u64,
        manifest["payload"]["raw_size"].as_u64().unwrap()
    );
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    assert_eq!(
        st.len(),
        10,
        "a mask and a values tensor for each of 5 tensors"
    );
    assert!(st.names().contains(&"embed.weight.mask"));
}

#[test]
fn unpacked_files_load_in_python_safetensors() {
    // CI installs Python's `safetensors` and `numpy` and sets XPM_REQUIRE_PYTHON=1, so this test
    // cannot pass vacuously there; elsewhere it is skipped when they are missing.
    let Some(python) = common::python("safetensors, numpy") else {
        return;
    };
    let ctx = TestContext::new();
    let (base, tuned, bt, tt) = base_and_tuned(&ctx);
    extract(
        &ctx,
        &base,
        &tuned,
        &[
            "--density",
            "0.2",
            "--targets",
            "layer.0.attn.q.weight",
            "-o",
            "a.xpm",
        ],
    )
    .success();
    ctx.xpm()
        .args(["unpack", "a.xpm", "-o", "un"])
        .assert()
        .success();
    let script = r#"
import json, sys, numpy as np
from safetensors.numpy import load_file
t = load_file(sys.argv[1] + "/tensors.safetensors")
m = json.load(open(sys.argv[1] + "/manifest.json"))
e = m["tensors"][0]
idx, val = t[e["name"] + ".indices"], t[e["name"] + ".values"]
assert idx.dtype == np.int64 and len(idx) == e["delta"]["nnz"]
d = np.zeros(int(np.prod(e["shape"])), dtype=np.float32)
d[idx] = val
print(json.dumps(d.reshape(e["shape"]).tolist()))
"#;
    let out = run_python_code(
        &python,
        script,
        &[ctx.path("un").as_os_str()],
        &ctx.path(""),
    );
    let dense: Vec<Vec<f32>> = serde_json::from_str(&out).unwrap();
    let (b, t) = (&bt[0].2, &tt[0].2);
    assert_eq!(bt[0].0, "layer.0.attn.q.weight");
    let keep = reference_topk(b, t, 307);
    for (i, row) in dense.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let f = i * 48 + j;
            let want = if keep.binary_search(&(f as i64)).is_ok() {
                t[f] - b[f]
            } else {
                0.0
            };
            assert_eq!(v, want, "entry ({i}, {j})");
        }
    }
}

#[test]
fn demo_runs_the_main_job_end_to_end() {
    let ctx = TestContext::new();
    ctx.xpm()
        .args(["demo", "--dir", "demo"])
        .assert()
        .success()
        .stdout(predicate::str::contains("demo complete"))
        .stdout(predicate::str::contains("Trained experts: sparse"))
        .stderr(predicate::str::contains(
            "unpack → pack reproduces every tensor exactly",
        ));
    // It trained and evaluated a sparse and a LoRA expert on its tiny BERT.
    for m in ["sparse", "lora"] {
        ctx.xpm()
            .args(["verify", &format!("demo/demo-trained-{m}-0.1.0.xpm")])
            .assert()
            .success();
    }
    ctx.xpm()
        .args(["verify", "demo/demo-expert-0.1.0.xpm"])
        .assert()
        .success();
    // It published both experts to the embedded registry, installed and locked them, and
    // merged the installed copies.
    assert!(ctx.path("home/registry/index/de/mo/demo-expert").is_file());
    let lock = std::fs::read_to_string(ctx.path("demo/project/xpm.lock")).unwrap();
    assert!(
        lock.contains("demo-expert-b") && lock.contains("cksum"),
        "{lock}"
    );
    ctx.xpm()
        .arg("list")
        .assert()
        .success()
        .stdout(predicate::str::contains("demo-expert-b"));
    ctx.xpm()
        .args(["inspect", "demo/demo-merged-0.1.0.xpm", "--json"])
        .assert()
        .success()
        .stdout(predicate::str::contains("demo-expert-b@0.1.0"));
    // A second run replaces its own directory and finds its experts already published; a
    // foreign directory is refused.
    ctx.xpm()
        .args(["demo", "--dir", "demo"])
        .assert()
        .success()
        .stderr(predicate::str::contains("already (same bytes)"));
    std::fs::create_dir_all(ctx.path("mine")).unwrap();
    std::fs::write(ctx.path("mine/keep.txt"), "x").unwrap();
    ctx.xpm()
        .args(["demo", "--dir", "mine"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("was not made by `xpm demo`"));
    assert!(ctx.path("mine/keep.txt").exists());
}

/// The Python reader of docs/format.md §2.5, run as the page shows it with the reference
/// `blake3` and `zstandard` packages, reads and checks an artifact of this build (format 1.2:
/// BLAKE3 frames) and one rewritten as format 1.1 (SHA-256 frames), and arrives at the artifact
/// digest `xpm verify` prints.
#[test]
fn the_format_pages_python_reader_reads_every_minor() {
    let Some(python) = common::python("blake3, zstandard") else {
        return;
    };
    let page = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/format.md"),
    )
    .unwrap();
    let from = page.find("### 2.5 Reading by hand").unwrap();
    let start = from + page[from..].find("```python\n").unwrap() + "```python\n".len();
    let end = start + page[start..].find("```").unwrap();
    // The page's reader, then what it computed.
    let script = format!(
        "{}\nprint(artifact_digest, len(values), len(image))\n",
        &page[start..end]
    );
    let ctx = TestContext::new();
    let (base, tuned, _, _) = base_and_tuned(&ctx);
    extract(&ctx, &base, &tuned, &["-o", "expert.xpm"]).success();
    let run = |ctx: &TestContext| {
        let printed = run_python_code(&python, &script, &[], &ctx.path(""));
        let verify = ctx.xpm().args(["verify", "expert.xpm"]).output().unwrap();
        let verified = String::from_utf8_lossy(&verify.stdout).to_string();
        let digest = printed.split_whitespace().next().unwrap().to_string();
        assert!(verified.contains(&digest), "{printed} against {verified}");
        printed
    };
    let bytes = std::fs::read(ctx.path("expert.xpm")).unwrap();
    let (_, manifest, _) = split_artifact(&bytes);
    assert_eq!(manifest["format_version"], "1.2");
    assert!(manifest["payload"]["header"]["blake3"].is_string());
    let new = run(&ctx);
    // The same artifact as format 1.1.
    let (mut prelude, mut manifest, payload) = split_artifact(&bytes);
    prelude[10] = 1;
    manifest["format_version"] = "1.1".into();
    sha256_frames(&mut manifest, &payload);
    std::fs::write(
        ctx.path("expert.xpm"),
        assemble_artifact(&prelude, &manifest, &payload),
    )
    .unwrap();
    let old = run(&ctx);
    // Same values and image sizes; another file, so another digest.
    let tail = |s: &str| s.split_whitespace().skip(1).collect::<Vec<_>>().join(" ");
    assert_eq!(tail(&new), tail(&old));
    assert_ne!(new, old);
}
