//! The seed corpus: small valid inputs for every target, written through the library's own
//! writers so they track the format. `write_all(DIR)` writes `DIR/<target>/seed-*`.
//! (File names carry no `.xpm` suffix: the repository's .gitignore ignores `*.xpm`.)

use std::collections::BTreeMap;
use std::path::Path;

use xpm_core::format::manifest::{
    BaseModel, ExpertKind, Manifest, Provenance, ProvenanceInput, Selection, Training,
};
use xpm_core::format::mask::{self, MaskEncoding};
use xpm_core::format::{ArtifactWriter, Content, Dtype, TensorData, encode_tensor};
use xpm_core::project::{LockedExpert, Lockfile, Project};
use xpm_core::registry::index::{IndexLine, RegistryConfig, render_index};

use crate::MaskCase;

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (self.next() % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }
}

fn base() -> BaseModel {
    BaseModel {
        id: "fuzz/base".into(),
        digest: xpm_core::digest::sha256(b"fuzz base"),
    }
}

fn sparse(
    name: &str,
    shape: Vec<u64>,
    indices: Vec<u64>,
    dtype: Dtype,
    rng: &mut Rng,
) -> TensorData {
    let values = dtype.from_f32(&rng.values(indices.len()));
    TensorData {
        name: name.into(),
        shape,
        dtype,
        content: Content::Sparse {
            indices,
            values,
            block_size: None,
        },
    }
}

fn dense(name: &str, shape: Vec<u64>, dtype: Dtype, rng: &mut Rng) -> TensorData {
    let n = shape.iter().product::<u64>() as usize;
    TensorData {
        name: name.into(),
        shape,
        dtype,
        content: Content::Dense {
            delta: dtype.from_f32(&rng.values(n)),
        },
    }
}

fn lora(name: &str, out: u64, inp: u64, rank: u32, dtype: Dtype, rng: &mut Rng) -> TensorData {
    let r = rank as usize;
    TensorData {
        name: name.into(),
        shape: vec![out, inp],
        dtype,
        content: Content::Lora {
            rank,
            alpha: 2.0 * rank as f64,
            a: dtype.from_f32(&rng.values(r * inp as usize)),
            b: dtype.from_f32(&rng.values(out as usize * r)),
        },
    }
}

/// Every `step`-th index of `n` starting at `start`.
fn strided(n: u64, start: u64, step: u64) -> Vec<u64> {
    (start..n).step_by(step as usize).collect()
}

/// Indices of the 16×16 tiles `tiles` (row-major tile ids) of a `rows × cols` tensor.
fn tiles(rows: u64, cols: u64, tiles: &[u64]) -> Vec<u64> {
    let per_row = cols.div_ceil(16);
    (0..rows * cols)
        .filter(|i| tiles.contains(&((i / cols / 16) * per_row + (i % cols) / 16)))
        .collect()
}

fn write_artifact(
    path: &Path,
    name: &str,
    kind: ExpertKind,
    tensors: Vec<(TensorData, bool)>,
    rich: bool,
) -> xpm_core::Result<Manifest> {
    let mut w = ArtifactWriter::create(path, 3)?;
    for (t, new) in tensors {
        let e = encode_tensor(&t, 3)?;
        w.push(if new { e.mark_new()? } else { e })?;
    }
    let mut m = Manifest::new(name, "1.2.3".parse().unwrap(), base(), kind);
    if rich {
        m.version = "2.0.0-rc.1+build.5".parse().unwrap();
        m.description = Some("A seed expert with every optional section".into());
        m.license = Some("MIT OR Apache-2.0".into());
        m.authors = vec!["Fuzz <fuzz@example.com>".into()];
        m.selection = Some(Selection {
            method: "extract".into(),
            score_rule: Some("magnitude".into()),
            keep_ratio: Some(0.1),
            block_size: Some(16),
            schedule: Some("one-shot".into()),
            seed: Some(7),
            targets: vec!["*.weight".into()],
            tie_break: Some("index".into()),
            extra: BTreeMap::new(),
        });
        m.training = Some(Training {
            method: Some("sparse".into()),
            data_digest: Some(xpm_core::digest::sha256(b"data")),
            seed: Some(1),
            hyperparameters: BTreeMap::from([("lr".into(), serde_json::json!(0.001))]),
            metrics: BTreeMap::from([("accuracy".into(), 0.9)]),
            head: None,
            extra: BTreeMap::new(),
        });
        m.provenance = Some(Provenance {
            tool: "xpm 0.1.0".into(),
            inputs: vec![ProvenanceInput {
                role: "base".into(),
                name: "fuzz/base".into(),
                digest: Some(xpm_core::digest::sha256(b"fuzz base")),
                content_digest: None,
            }],
            extra: BTreeMap::new(),
        });
        m.extra = BTreeMap::from([("tool.note".into(), serde_json::json!({"k": [1, 2]}))]);
    }
    w.finish(m)
}

/// The artifacts: one per mask encoding and kind, a mixed one and an empty one.
fn artifacts(dir: &Path) -> xpm_core::Result<Vec<(String, Manifest)>> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let r = &mut rng;
    let mut out = Vec::new();
    let mut add = |file: &str, name: &str, kind, tensors, rich| -> xpm_core::Result<()> {
        let m = write_artifact(&dir.join(file), name, kind, tensors, rich)?;
        out.push((file.to_string(), m));
        Ok(())
    };
    // delta-rice: a 5 % mask.
    add(
        "seed-sparse-rice",
        "sparse-rice",
        ExpertKind::Sparse,
        vec![(
            sparse(
                "enc.0.weight",
                vec![24, 40],
                strided(960, 3, 19),
                Dtype::F32,
                r,
            ),
            false,
        )],
        false,
    )?;
    // bitmap: a 50 % mask, f16.
    add(
        "seed-sparse-bitmap",
        "sparse-bitmap",
        ExpertKind::Sparse,
        vec![(
            sparse(
                "enc.1.weight",
                vec![16, 16],
                strided(256, 0, 2),
                Dtype::F16,
                r,
            ),
            false,
        )],
        false,
    )?;
    // block16: two tiles of a 32 × 40 matrix (one clipped), bf16.
    add(
        "seed-sparse-block16",
        "sparse-block16",
        ExpertKind::Sparse,
        vec![(
            sparse(
                "enc.2.weight",
                vec![32, 40],
                tiles(32, 40, &[1, 5]),
                Dtype::BF16,
                r,
            ),
            false,
        )],
        false,
    )?;
    // full: every element; and an empty mask.
    add(
        "seed-sparse-full",
        "team/sparse-full",
        ExpertKind::Sparse,
        vec![
            (
                sparse("enc.3.bias", vec![3, 5], (0..15).collect(), Dtype::F32, r),
                false,
            ),
            (
                sparse("enc.3.weight", vec![7], Vec::new(), Dtype::F32, r),
                false,
            ),
        ],
        false,
    )?;
    // dense, with a new (task head) tensor and a scalar.
    add(
        "seed-dense",
        "dense-expert",
        ExpertKind::Dense,
        vec![
            (dense("enc.4.weight", vec![8, 8], Dtype::F32, r), false),
            (dense("enc.4.scale", vec![], Dtype::F16, r), false),
            (dense("classifier.weight", vec![2, 8], Dtype::F32, r), true),
        ],
        false,
    )?;
    // LoRA.
    add(
        "seed-lora",
        "lora-expert",
        ExpertKind::Lora,
        vec![
            (lora("enc.5.query.weight", 6, 10, 2, Dtype::F32, r), false),
            (lora("enc.5.value.weight", 4, 4, 1, Dtype::BF16, r), false),
        ],
        false,
    )?;
    // Everything in one, with every optional manifest section.
    add(
        "seed-mixed-rich",
        "ns/mixed",
        ExpertKind::Sparse,
        vec![
            (
                sparse("m.a", vec![20, 20], strided(400, 1, 37), Dtype::F32, r),
                false,
            ),
            (
                sparse("m.b", vec![16, 32], tiles(16, 32, &[0]), Dtype::F16, r),
                false,
            ),
            (dense("m.c", vec![4], Dtype::BF16, r), false),
            (lora("m.d", 3, 5, 2, Dtype::F32, r), false),
        ],
        true,
    )?;
    // No tensors at all.
    add("seed-empty", "empty", ExpertKind::Dense, Vec::new(), false)?;
    Ok(out)
}

fn masks() -> Vec<(String, MaskCase)> {
    let mut out = Vec::new();
    let shapes: [(&str, Vec<u64>); 4] = [
        ("1d", vec![100]),
        ("2d", vec![40, 37]),
        ("3d", vec![3, 5, 7]),
        ("scalar", vec![]),
    ];
    for (sname, shape) in &shapes {
        let n: u64 = shape.iter().product();
        for (dname, idx) in [
            ("sparse", strided(n, 2, 13)),
            ("half", strided(n, 1, 2)),
            ("all", (0..n).collect::<Vec<_>>()),
            ("none", Vec::new()),
        ] {
            for enc in crate::ENCODINGS {
                if let Ok(bytes) = mask::encode(enc, &idx, shape) {
                    out.push((
                        format!("seed-{enc}-{sname}-{dname}"),
                        MaskCase {
                            encoding: enc,
                            shape: shape.clone(),
                            nnz: idx.len() as u64,
                            bytes,
                        },
                    ));
                }
            }
        }
    }
    for (rows, cols, t) in [
        (32u64, 40u64, vec![1u64, 5]),
        (17, 16, vec![0, 1]),
        (16, 16, vec![0]),
    ] {
        let idx = tiles(rows, cols, &t);
        let bytes = mask::encode(MaskEncoding::Block16, &idx, &[rows, cols]).unwrap();
        out.push((
            format!("seed-block16-{rows}x{cols}"),
            MaskCase {
                encoding: MaskEncoding::Block16,
                shape: vec![rows, cols],
                nnz: idx.len() as u64,
                bytes,
            },
        ));
    }
    // A Rice stream with a large parameter.
    let idx = vec![0u64, 40_000, 65_000];
    out.push((
        "seed-delta-rice-wide".into(),
        MaskCase {
            encoding: MaskEncoding::DeltaRice,
            shape: vec![65_535],
            nnz: 3,
            bytes: mask::encode(MaskEncoding::DeltaRice, &idx, &[65_535]).unwrap(),
        },
    ));
    out
}

const LOCK_TOML: &str = "registry = \"http://127.0.0.1:8417\"\nbase = \"fuzz/base\"\n\n[experts]\nsst2 = \"^1.2\"\n\"team/news\" = \"~2.0.1\"\n";

const RECIPES: [(&str, &str); 3] = [
    (
        "seed-ties",
        r#"version = 1
strategy = "ties"
preset = "mergekit"
seed = 7
plugin_sha256 = "sha256:0000000000000000000000000000000000000000000000000000000000000000"

[output]
name = "merged"
version = "0.1.0"

[params]
density = 0.3
lambda = 1.0
sign = "weighted"
divisor = "weights"
normalize = true

[[experts]]
expert = "a.xpm"
sha256 = "sha256:1111111111111111111111111111111111111111111111111111111111111111"

[[experts]]
expert = "b@^1"
weight = 0.5
content_digest = "sha256:2222222222222222222222222222222222222222222222222222222222222222"

[[overrides]]
tensors = "*.query.weight"
strategy = "mean"

[[overrides]]
tensors = "layer.{0,1}.*"
params = { density = 0.5, rescale = false }
"#,
    ),
    (
        "seed-peft-dare",
        r#"strategy = "dare-ties"
preset = "peft"
[params]
density = 0.2
[[experts]]
expert = "x"
[[experts]]
expert = "y.xpm"
weight = -1.5
"#,
    ),
    (
        "seed-lora-svd",
        r#"strategy = "svd"
[params]
rank = 4
[[experts]]
expert = "l1"
[[experts]]
expert = "l2"
[[overrides]]
tensors = "[a-c]?*.weight"
strategy = "cat"
"#,
    ),
];

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), bytes)
}

/// Write every target's seeds under `root/<target>/`; returns the number of files.
pub fn write_all(root: &Path) -> xpm_core::Result<usize> {
    let io = |e: std::io::Error| xpm_core::Error::io("write", root, e);
    let mut n = 0;

    // artifact and upload.
    let art = root.join("artifact");
    std::fs::create_dir_all(&art).map_err(io)?;
    let manifests = artifacts(&art)?;
    for (file, _) in &manifests {
        let bytes = std::fs::read(art.join(file)).map_err(io)?;
        write(&root.join("upload"), file, &bytes).map_err(io)?;
        n += 2;
    }

    // mask.
    for (name, case) in masks() {
        write(&root.join("mask"), &name, &case.to_bytes()).map_err(io)?;
        n += 1;
    }

    // index: index files, a registry config, a manifest, requirement and location strings.
    let lines: Vec<IndexLine> = manifests
        .iter()
        .map(|(file, m)| {
            let mut l =
                IndexLine::for_artifact(m, &xpm_core::digest::sha256(file.as_bytes()), 1234);
            l.pubtime = "2026-01-02T03:04:05Z".into();
            l
        })
        .collect();
    let index = root.join("index");
    write(&index, "seed-index-all", &render_index(&lines)).map_err(io)?;
    let mut two = lines[..2].to_vec();
    two[1].yanked = true;
    two[1].v = 2;
    write(&index, "seed-index-yanked-future", &render_index(&two)).map_err(io)?;
    let cfg = RegistryConfig {
        dl: "https://cdn.example/blobs/{prefix}/{sha256}".into(),
        api: Some("https://api.example/".into()),
        auth_required: true,
        max_upload_size: Some(1 << 30),
    };
    write(
        &index,
        "seed-config",
        &serde_json::to_vec_pretty(&cfg).unwrap(),
    )
    .map_err(io)?;
    let rich = &manifests
        .iter()
        .find(|(f, _)| f == "seed-mixed-rich")
        .unwrap()
        .1;
    write(&index, "seed-manifest", &serde_json::to_vec(rich).unwrap()).map_err(io)?;
    write(&index, "seed-requirement", b"team/news@~2.0.1").map_err(io)?;
    write(
        &index,
        "seed-location",
        b"https://registry.example:8417/xpm/",
    )
    .map_err(io)?;
    n += 6;

    // lockfile: written by the library itself.
    let proj_dir = root.join(".lock-scratch");
    std::fs::create_dir_all(&proj_dir).map_err(io)?;
    std::fs::write(proj_dir.join("xpm.toml"), LOCK_TOML).map_err(io)?;
    let project = Project::discover(&proj_dir)?;
    let lock = Lockfile {
        version: 1,
        base: base(),
        experts: lines
            .iter()
            .take(3)
            .map(|l| LockedExpert {
                name: l.name.clone(),
                version: l.vers.clone(),
                source: "http://127.0.0.1:8417".into(),
                cksum: l.cksum.clone(),
                size: l.size,
                kind: l.kind,
                signer: None,
            })
            .collect(),
    };
    project.write_lock(&lock)?;
    let text = std::fs::read(project.lock_path()).map_err(io)?;
    write(&root.join("lockfile"), "seed-lock", &text).map_err(io)?;
    project.write_lock(&Lockfile {
        experts: Vec::new(),
        ..lock
    })?;
    let text = std::fs::read(project.lock_path()).map_err(io)?;
    write(&root.join("lockfile"), "seed-lock-empty", &text).map_err(io)?;
    std::fs::remove_dir_all(&proj_dir).map_err(io)?;
    n += 2;

    // project_toml.
    let pt = root.join("project_toml");
    write(
        &pt,
        "seed-template",
        xpm_core::project::template(None, None).as_bytes(),
    )
    .map_err(io)?;
    write(
        &pt,
        "seed-template-set",
        xpm_core::project::template(
            Some("file:///srv/registry"),
            Some("sha256:2222222222222222222222222222222222222222222222222222222222222222"),
        )
        .as_bytes(),
    )
    .map_err(io)?;
    write(&pt, "seed-experts", LOCK_TOML.as_bytes()).map_err(io)?;
    write(
        &pt,
        "seed-inline",
        b"experts = { a = \"1\", \"ns/b\" = \">=0.1, <2\" }\n",
    )
    .map_err(io)?;
    n += 4;

    // recipe.
    for (name, text) in RECIPES {
        write(&root.join("recipe"), name, text.as_bytes()).map_err(io)?;
        n += 1;
    }
    Ok(n)
}

/// Hand-made inputs beyond the fuzzers' `-max_len` (written by `XPM_FUZZ_WRITE_CRAFTED=DIR`
/// under `DIR/<target>/`); the ones that fail are kept under `regressions/`.
pub fn write_crafted(root: &Path) -> xpm_core::Result<usize> {
    let io = |e: std::io::Error| xpm_core::Error::io("write", root, e);
    let dir = root.join("upload");
    std::fs::create_dir_all(&dir).map_err(io)?;
    // 260 empty sparse tensors of 2^56 - 1 elements each (the most a manifest may declare):
    // about 100 KiB, valid, and the element counts add up past u64::MAX.
    let mut rng = Rng(1);
    let tensors = (0..260)
        .map(|i| {
            let t = sparse(
                &format!("t{i}"),
                vec![(1 << 56) - 1],
                Vec::new(),
                Dtype::F32,
                &mut rng,
            );
            (t, false)
        })
        .collect();
    write_artifact(
        &dir.join("many-huge-empty-sparse"),
        "many-huge",
        ExpertKind::Sparse,
        tensors,
        false,
    )?;
    Ok(1)
}
