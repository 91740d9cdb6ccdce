//! Every kind of bad input gets a non-zero exit, a message naming the file and the problem, a
//! hint, and leaves nothing behind.

mod common;

use std::path::Path;

use common::*;
use predicates::prelude::*;

/// A valid artifact at `a.xpm` in a fresh context.
fn with_artifact() -> TestContext {
    let ctx = TestContext::new();
    let (base, tuned, _, _) = base_and_tuned(&ctx);
    ctx.xpm()
        .args(["extract", "--base"])
        .arg(&base)
        .arg("--tuned")
        .arg(&tuned)
        .args(["--name", "ex", "--version", "1.0.0", "-o", "a.xpm"])
        .assert()
        .success();
    ctx
}

/// `xpm verify a.xpm` and `xpm unpack a.xpm` both fail with `needle` and a hint, and the
/// unpack leaves no output directory and no temp files.
fn assert_rejected(ctx: &TestContext, needle: &str) {
    ctx.xpm()
        .args(["verify", "a.xpm"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("`a.xpm`"))
        .stderr(predicate::str::contains(needle))
        .stderr(predicate::str::contains("hint:"));
    ctx.xpm()
        .args(["unpack", "a.xpm", "-o", "out"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(needle));
    assert!(!ctx.path("out").exists(), "no partial output");
    assert_eq!(ctx.temp_leftovers(), Vec::<String>::new());
}

/// The tensors of `a.xpm`, as `xpm unpack` writes them.
fn tensor_bytes(ctx: &TestContext) -> Vec<u8> {
    ctx.xpm()
        .args(["unpack", "a.xpm", "-o", "tb"])
        .assert()
        .success();
    let b = std::fs::read(ctx.path("tb/tensors.safetensors")).unwrap();
    std::fs::remove_dir_all(ctx.path("tb")).unwrap();
    b
}

fn edit_bytes(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(path).unwrap();
    f(&mut b);
    std::fs::write(path, b).unwrap();
}

#[test]
fn truncated_file() {
    let ctx = with_artifact();
    edit_bytes(&ctx.path("a.xpm"), |b| b.truncate(b.len() - 100));
    assert_rejected(&ctx, "truncated");
    edit_bytes(&ctx.path("a.xpm"), |b| b.truncate(30));
    assert_rejected(&ctx, "truncated");
}

#[test]
fn flipped_bit_in_the_manifest() {
    let ctx = with_artifact();
    edit_bytes(&ctx.path("a.xpm"), |b| {
        let r = manifest_range(b);
        b[r.start + 40] ^= 0x04;
    });
    assert_rejected(&ctx, "does not match its sha256");
    // Even the cheap `inspect` notices.
    ctx.xpm()
        .args(["inspect", "a.xpm"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("flipped bits"));
}

#[test]
fn flipped_bit_in_the_payload() {
    let ctx = with_artifact();
    let bytes = std::fs::read(ctx.path("a.xpm")).unwrap();
    let pos = manifest_range(&bytes).start / 2; // inside the tensor frames
    edit_bytes(&ctx.path("a.xpm"), |b| b[pos] ^= 0x80);
    assert_rejected(&ctx, "frame blake3 mismatch");
    ctx.xpm()
        .args(["verify", "a.xpm"])
        .assert()
        .stderr(predicate::str::contains("is damaged"));
}

#[test]
fn wrong_magic() {
    let ctx = with_artifact();
    edit_bytes(&ctx.path("a.xpm"), |b| b[1] = b'Z');
    assert_rejected(&ctx, "wrong magic bytes");
    // A file that is something else entirely.
    std::fs::write(ctx.path("a.xpm"), b"{\"not\": \"an artifact\"}").unwrap();
    assert_rejected(&ctx, "wrong magic bytes");
}

#[test]
fn unsupported_format_version() {
    let ctx = with_artifact();
    edit_bytes(&ctx.path("a.xpm"), |b| b[8] = 2);
    ctx.xpm()
        .args(["verify", "a.xpm"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("uses xpm format 2.2"))
        .stderr(predicate::str::contains("hint: upgrade xpm"));
}

#[test]
fn a_newer_minor_version_is_still_read() {
    let ctx = with_artifact();
    let bytes = std::fs::read(ctx.path("a.xpm")).unwrap();
    let (mut prelude, mut manifest, payload) = split_artifact(&bytes);
    prelude[10] = 7;
    manifest["format_version"] = "1.7".into();
    manifest["a_field_from_the_future"] = serde_json::json!({"x": 1});
    std::fs::write(
        ctx.path("a.xpm"),
        assemble_artifact(&prelude, &manifest, &payload),
    )
    .unwrap();
    ctx.xpm().args(["verify", "a.xpm"]).assert().success();
}

/// `a.xpm` rewritten as format 1.`minor` (0 or 1), as xpm wrote every artifact before 1.2:
/// frames named by their SHA-256, and for 1.0 no prelude flag and the whole-file sha256 in the
/// trailer.
fn as_format_1(ctx: &TestContext, minor: u8) {
    let bytes = std::fs::read(ctx.path("a.xpm")).unwrap();
    let (mut prelude, mut manifest, payload) = split_artifact(&bytes);
    prelude[10] = minor;
    prelude[12] = u8::from(minor >= 1);
    manifest["format_version"] = format!("1.{minor}").into();
    sha256_frames(&mut manifest, &payload);
    std::fs::write(
        ctx.path("a.xpm"),
        assemble_artifact(&prelude, &manifest, &payload),
    )
    .unwrap();
}

/// `xpm verify a.xpm` passes and prints the sha256 of the whole file.
fn verifies_to_its_file_digest(ctx: &TestContext) {
    let bytes = std::fs::read(ctx.path("a.xpm")).unwrap();
    ctx.xpm()
        .args(["verify", "a.xpm"])
        .assert()
        .success()
        .stdout(predicate::str::contains(sha256_hex(&bytes)));
}

#[test]
fn format_1_0_artifacts_are_still_read_and_verified() {
    let ctx = with_artifact();
    as_format_1(&ctx, 0);
    verifies_to_its_file_digest(&ctx);
    ctx.xpm()
        .args(["unpack", "a.xpm", "-o", "out"])
        .assert()
        .success();
    std::fs::remove_dir_all(ctx.path("out")).unwrap();
    // Damage in a 1.0 payload is named by its frame; damage in its manifest's trailer digest
    // by the whole-file digest.
    let good = std::fs::read(ctx.path("a.xpm")).unwrap();
    edit_bytes(&ctx.path("a.xpm"), |b| {
        let pos = manifest_range(b).start / 2;
        b[pos] ^= 0x10;
    });
    assert_rejected(&ctx, "frame sha256 mismatch");
    let mut b = good;
    let k = b.len() - 20;
    b[k] ^= 1;
    std::fs::write(ctx.path("a.xpm"), b).unwrap();
    ctx.xpm()
        .args(["verify", "a.xpm"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("does not match its trailer"));
}

#[test]
fn format_1_1_artifacts_are_still_read_and_verified() {
    let ctx = with_artifact();
    let want = tensor_bytes(&ctx);
    as_format_1(&ctx, 1);
    verifies_to_its_file_digest(&ctx);
    assert_eq!(
        tensor_bytes(&ctx),
        want,
        "the same tensors from the 1.1 file"
    );
    // Its frames are checked by their SHA-256.
    edit_bytes(&ctx.path("a.xpm"), |b| {
        let pos = manifest_range(b).start / 2;
        b[pos] ^= 0x10;
    });
    assert_rejected(&ctx, "frame sha256 mismatch");
}

#[test]
fn a_frame_digest_of_the_other_formats_algorithm_is_refused() {
    // A 1.2 file whose frames carry SHA-256 digests, and a 1.1 file with BLAKE3 ones: neither
    // is what a writer of that version writes.
    let ctx = with_artifact();
    let good = std::fs::read(ctx.path("a.xpm")).unwrap();
    rewrite_manifest(&ctx.path("a.xpm"), |m| {
        let (_, _, payload) = split_artifact(&good);
        sha256_frames(m, &payload);
    });
    assert_rejected(
        &ctx,
        "a sha256 frame digest, but format 1.2 names frames by blake3",
    );
    std::fs::write(ctx.path("a.xpm"), &good).unwrap();
    let (mut prelude, mut manifest, payload) = split_artifact(&good);
    prelude[10] = 1;
    manifest["format_version"] = "1.1".into();
    std::fs::write(
        ctx.path("a.xpm"),
        assemble_artifact(&prelude, &manifest, &payload),
    )
    .unwrap();
    assert_rejected(
        &ctx,
        "a blake3 frame digest, but format 1.1 names frames by sha256",
    );
    // Two digests for one frame, or none.
    std::fs::write(ctx.path("a.xpm"), &good).unwrap();
    rewrite_manifest(&ctx.path("a.xpm"), |m| {
        m["tensors"][0]["stored"][0]["sha256"] = format!("sha256:{}", "0".repeat(64)).into();
    });
    assert_rejected(&ctx, "a frame names two digests");
    std::fs::write(ctx.path("a.xpm"), &good).unwrap();
    rewrite_manifest(&ctx.path("a.xpm"), |m| {
        m["tensors"][0]["stored"][0]
            .as_object_mut()
            .unwrap()
            .remove("blake3");
    });
    assert_rejected(&ctx, "a frame names no digest");
    // A malformed digest is named, escaped.
    std::fs::write(ctx.path("a.xpm"), &good).unwrap();
    rewrite_manifest(&ctx.path("a.xpm"), |m| {
        m["payload"]["header"]["blake3"] = "blake3:../../etc\n".into();
    });
    assert_rejected(&ctx, "is not `blake3:` and 64 lowercase hex digits");
}

#[test]
fn the_prelude_flag_must_match_the_trailer_kind() {
    // A 1.2 file without its flag, and a 1.0 file with it: refused as damaged, not misread.
    let ctx = with_artifact();
    edit_bytes(&ctx.path("a.xpm"), |b| b[12] = 0);
    assert_rejected(&ctx, "flags 0x0 in the prelude, but format 1.2 defines 0x1");
    let ctx = with_artifact();
    as_format_1(&ctx, 0);
    edit_bytes(&ctx.path("a.xpm"), |b| b[12] = 1);
    assert_rejected(&ctx, "flags 0x1 in the prelude, but format 1.0 defines 0x0");
    // A damaged content digest is caught on open.
    let ctx = with_artifact();
    edit_bytes(&ctx.path("a.xpm"), |b| {
        let k = b.len() - 20;
        b[k] ^= 1;
    });
    assert_rejected(&ctx, "content digest does not match");
}

#[test]
fn manifest_shape_disagrees_with_the_payload() {
    let ctx = with_artifact();
    rewrite_manifest(&ctx.path("a.xpm"), |m| {
        m["tensors"][0]["shape"] = serde_json::json!([64, 25])
    });
    assert_rejected(&ctx, "manifest");
}

#[test]
fn manifest_nnz_disagrees_with_the_payload() {
    let ctx = with_artifact();
    rewrite_manifest(&ctx.path("a.xpm"), |m| {
        let d = &mut m["tensors"][1]["delta"];
        d["nnz"] = (d["nnz"].as_u64().unwrap() - 1).into();
    });
    assert_rejected(&ctx, "tensor `");
}

#[test]
fn manifest_frame_digest_disagrees_with_the_payload() {
    let ctx = with_artifact();
    rewrite_manifest(&ctx.path("a.xpm"), |m| {
        m["tensors"][2]["stored"][1]["blake3"] = format!("blake3:{}", "0".repeat(64)).into();
    });
    assert_rejected(&ctx, "frame blake3 mismatch");
}

#[test]
fn decompression_bomb_is_refused_before_allocating() {
    // The manifest declares a terabyte for one frame (and a consistent total): refused from the
    // declared sizes alone.
    let ctx = with_artifact();
    rewrite_manifest(&ctx.path("a.xpm"), |m| {
        let t = &mut m["tensors"][0];
        t["shape"] = serde_json::json!([1u64 << 20, 1u64 << 18]);
        let nnz = 1u64 << 36;
        t["delta"]["nnz"] = nnz.into();
        t["delta"]["density"] = (nnz as f64 / (1u64 << 38) as f64).into();
        let old = t["stored"][1]["raw_size"].as_u64().unwrap();
        t["stored"][1]["raw_size"] = (nnz * 4).into();
        let p = &mut m["payload"]["raw_size"];
        *p = (p.as_u64().unwrap() - old + nnz * 4).into();
    });
    assert_rejected(&ctx, "decompression bomb");
}

#[test]
fn frame_declaring_a_different_size_than_the_manifest_is_refused() {
    // A value frame swapped for a small frame that decompresses to a different size, with every
    // digest fixed up: the zstd frame header disagrees with the manifest.
    let ctx = with_artifact();
    let bytes = std::fs::read(ctx.path("a.xpm")).unwrap();
    let (prelude, mut manifest, mut payload) = split_artifact(&bytes);
    let part = manifest["tensors"][0]["stored"][1].clone();
    let (off, size) = (
        part["offset"].as_u64().unwrap() as usize,
        part["size"].as_u64().unwrap() as usize,
    );
    let fake = zstd::bulk::compress(
        &vec![0u8; part["raw_size"].as_u64().unwrap() as usize * 2],
        3,
    )
    .unwrap();
    assert!(fake.len() <= size);
    let mut frame = fake.clone();
    // Pad with a zstd skippable frame so offsets stay put.
    if size - fake.len() >= 8 {
        frame.extend_from_slice(&0x184D2A50u32.to_le_bytes());
        frame.extend_from_slice(&((size - fake.len() - 8) as u32).to_le_bytes());
        frame.resize(size, 0);
        payload[off..off + size].copy_from_slice(&frame);
        manifest["tensors"][0]["stored"][1]["blake3"] =
            xpm::digest::FrameDigest::of(&frame).to_string().into();
        std::fs::write(
            ctx.path("a.xpm"),
            assemble_artifact(&prelude, &manifest, &payload),
        )
        .unwrap();
        assert_rejected(&ctx, "the zstd frame declares");
    }
}

/// An unpacked directory whose single sparse tensor has these indices.
fn unpacked_with_indices(ctx: &TestContext, idx: &[i64]) {
    let dir = ctx.path("un");
    std::fs::create_dir_all(&dir).unwrap();
    let m = serde_json::json!({
        "format_version": "1.0", "name": "bad", "version": "1.0.0",
        "base": {"id": "t", "digest": format!("sha256:{}", "ef".repeat(32))}, "kind": "sparse",
        "tensors": [{"name": "w", "shape": [4, 4], "dtype": "f32",
                     "delta": {"kind": "sparse", "nnz": idx.len(), "density": idx.len() as f64 / 16.0}}]
    });
    std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
    let ib: Vec<u8> = idx.iter().flat_map(|i| i.to_le_bytes()).collect();
    let vb = f32_bytes(&vec![1.0; idx.len()]);
    let views = vec![
        (
            "w.indices".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![idx.len()], &ib)
                .unwrap(),
        ),
        (
            "w.values".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![idx.len()], &vb)
                .unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, &dir.join("tensors.safetensors")).unwrap();
}

#[test]
fn unsorted_duplicate_and_out_of_range_indices() {
    for (idx, needle) in [
        (&[3i64, 1, 5][..], "not sorted"),
        (&[1, 5, 5][..], "appears twice"),
        (&[1, 5, 16][..], "out of range"),
        (&[-1, 2][..], "negative"),
    ] {
        let ctx = TestContext::new();
        unpacked_with_indices(&ctx, idx);
        ctx.xpm()
            .args(["pack", "un", "-o", "x.xpm"])
            .assert()
            .code(1)
            .stderr(predicate::str::contains("`un`"))
            .stderr(predicate::str::contains(needle))
            .stderr(predicate::str::contains("hint:"));
        assert!(!ctx.path("x.xpm").exists(), "no partial output for {idx:?}");
        assert_eq!(ctx.temp_leftovers(), Vec::<String>::new());
    }
}

#[test]
fn base_and_tuned_with_different_tensors_or_shapes() {
    let ctx = TestContext::new();
    let base = random_tensors(&[("a", &[4, 4]), ("b", &[4, 4]), ("c", &[2, 2])], 1);
    let mut tuned = perturb(&base, 2, 0.1);
    tuned[1].1 = vec![2, 8];
    tuned.pop();
    tuned.push(("d".into(), vec![2, 2], vec![0.0; 4]));
    write_st(&ctx.path("b.safetensors"), &base, safetensors::Dtype::F32);
    write_st(&ctx.path("t.safetensors"), &tuned, safetensors::Dtype::F32);
    ctx.xpm()
        .args([
            "extract",
            "--base",
            "b.safetensors",
            "--tuned",
            "t.safetensors",
            "--name",
            "x",
            "--version",
            "1.0.0",
            "-o",
            "x.xpm",
        ])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("do not have the same tensors"))
        .stderr(predicate::str::contains("`c` is only in the base"))
        .stderr(predicate::str::contains("`d` is only in the tuned model"))
        .stderr(predicate::str::contains(
            "`b` is [4, 4] in the base, [2, 8]",
        ))
        .stderr(predicate::str::contains("hint:"));
    assert!(!ctx.path("x.xpm").exists());
    assert_eq!(ctx.temp_leftovers(), Vec::<String>::new());
}

#[test]
fn density_outside_the_unit_interval() {
    let ctx = TestContext::new();
    let (base, tuned, _, _) = base_and_tuned(&ctx);
    for d in ["0", "-0.1", "1.5", "NaN"] {
        ctx.xpm()
            .args(["extract", "--base"])
            .arg(&base)
            .arg("--tuned")
            .arg(&tuned)
            .args([
                "--name",
                "x",
                "--version",
                "1.0.0",
                "-o",
                "x.xpm",
                &format!("--density={d}"),
            ])
            .assert()
            .code(1)
            .stderr(predicate::str::contains("outside (0, 1]"))
            .stderr(predicate::str::contains("hint:"));
        assert!(!ctx.path("x.xpm").exists());
    }
}

#[test]
fn missing_files_and_bad_names() {
    let ctx = TestContext::new();
    ctx.xpm()
        .args(["verify", "nope.xpm"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("cannot open `nope.xpm`"))
        .stderr(predicate::str::contains("hint: check that the path exists"));
    let (base, tuned, _, _) = base_and_tuned(&ctx);
    ctx.xpm()
        .args(["extract", "--base"])
        .arg(&base)
        .arg("--tuned")
        .arg(&tuned)
        .args(["--name", "../Evil", "--version", "1.0.0"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("invalid expert name"));
    ctx.xpm()
        .args([
            "extract",
            "--base",
            "x",
            "--tuned",
            "y",
            "--name",
            "a",
            "--version",
            "one",
        ])
        .assert()
        .code(2);
    ctx.xpm()
        .args(["extract", "--base"])
        .arg(&base)
        .arg("--tuned")
        .arg(&tuned)
        .args([
            "--name",
            "x",
            "--version",
            "1.0.0",
            "--targets",
            "no.such.*",
        ])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("matches the targets"));
}

#[test]
fn unpack_refuses_a_non_empty_output_directory() {
    let ctx = with_artifact();
    std::fs::create_dir_all(ctx.path("out")).unwrap();
    std::fs::write(ctx.path("out/precious"), "keep").unwrap();
    ctx.xpm()
        .args(["unpack", "a.xpm", "-o", "out"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("already exists and is not empty"));
    assert_eq!(
        std::fs::read_to_string(ctx.path("out/precious")).unwrap(),
        "keep"
    );
}
