//! `xpm demo`: xpm's main job end to end on embedded defaults, with nothing to download.
//!
//! Prepares a small BERT-shaped base checkpoint (sharded, with an index file) and a fine-tuned
//! copy of it, then extracts a sparse expert, inspects and verifies it, unpacks it and packs it
//! again, and checks that the round trip is exact; publishes, installs and merges; and trains a
//! sparse and a LoRA expert on a tiny BERT and a keyword task, evaluating both.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoResultExt, Result};
use crate::format::st::{PlannedTensor, write_safetensors};
use crate::format::{ArtifactReader, Content, ExpertKind};
use crate::home::XpmHome;
use crate::ops;
use crate::printer::Printer;
use crate::rng::SplitMix64;

/// Marker file that lets `demo` safely clear its own directory on a re-run.
const MARKER: &str = ".xpm-demo";

/// What the demo did.
#[derive(Debug, Clone)]
pub struct DemoSummary {
    pub dir: PathBuf,
    pub artifact: PathBuf,
    pub tensors: usize,
    pub nnz: u64,
    pub file_size: u64,
    pub dense_bytes: u64,
    /// Fraction of the fine-tuning delta's squared L2 norm the sparse expert keeps.
    pub energy_kept: f64,
    /// Trained experts: (method, eval accuracy).
    pub trained: Vec<(String, f64)>,
}

/// Where the demo works when no directory is given: `$XPM_HOME/demo`.
pub fn default_dir(home: &XpmHome) -> std::path::PathBuf {
    home.root.join("demo")
}

/// Run the demo in `dir` (created; a previous demo there is replaced).
pub fn demo(dir: &Path, home: &XpmHome, printer: &Printer) -> Result<DemoSummary> {
    prepare_dir(dir)?;
    let base = dir.join("base-model");
    let tuned = dir.join("tuned-model");
    printer.status(
        "Preparing",
        format!(
            "a small base model and two fine-tunes of it in {}",
            dir.display()
        ),
    );
    let tuned_b = dir.join("tuned-model-b");
    write_models(&base, &[&tuned, &tuned_b])?;

    let artifact = dir.join("demo-expert-0.1.0.xpm");
    let opts = extract_options(&base, &tuned, &artifact);
    ops::extract::extract(&opts, home, printer)?;
    let report = inspect_and_round_trip(dir, &artifact, printer)?;

    // A second expert from the other fine-tune.
    let artifact_b = dir.join("demo-expert-b-0.1.0.xpm");
    let opts_b = ops::extract::ExtractOptions {
        tuned: tuned_b,
        name: "demo-expert-b".into(),
        out: artifact_b.clone(),
        ..opts.clone()
    };
    ops::extract::extract(&opts_b, home, printer)?;

    let installed = publish_and_install(dir, home, &[&opts, &opts_b], printer)?;
    merge_installed(dir, &installed, printer)?;
    let trained = train_and_eval(dir, home, printer)?;

    let energy_kept = energy_kept(&base, &tuned, &artifact)?;
    printer.status(
        "Kept",
        format!(
            "{:.1} % of the fine-tuning delta's energy with {:.1} % of the attention weights",
            energy_kept * 100.0,
            report.totals.density * 100.0
        ),
    );
    Ok(DemoSummary {
        dir: dir.to_path_buf(),
        artifact,
        tensors: report.tensors.len(),
        nnz: report.totals.nnz,
        file_size: report.file_size,
        dense_bytes: report.totals.dense_bytes,
        energy_kept,
        trained,
    })
}

/// The demo's sparse extraction of `tuned` against `base` into `out`.
fn extract_options(base: &Path, tuned: &Path, out: &Path) -> ops::extract::ExtractOptions {
    ops::extract::ExtractOptions {
        base: base.to_path_buf(),
        tuned: tuned.to_path_buf(),
        density: 0.05,
        targets: vec!["*.attention.*.weight".into()],
        kind: ExpertKind::Sparse,
        name: "demo-expert".into(),
        version: semver::Version::new(0, 1, 0),
        out: out.to_path_buf(),
        base_id: Some("xpm/demo-bert-tiny".into()),
        values_dtype: None,
        description: Some("A sparse expert extracted by `xpm demo`".into()),
        license: Some("MIT".into()),
        authors: vec!["xpm demo".into()],
        level: crate::format::artifact::DEFAULT_LEVEL,
    }
}

/// Inspect and verify `artifact`, then unpack it and pack it again and check that every tensor
/// survives exactly; its inspection report.
fn inspect_and_round_trip(
    dir: &Path,
    artifact: &Path,
    printer: &Printer,
) -> Result<ops::inspect::InspectReport> {
    let report = ops::inspect::inspect(artifact)?;
    printer.out(ops::inspect::render(&report));

    printer.status("Verifying", artifact.display());
    let v = ops::verify::verify(artifact, printer)?;
    printer.status("Verified", format!("{}@{} {}", v.name, v.version, v.sha256));

    let unpacked = dir.join("unpacked");
    ops::unpack::unpack(artifact, &unpacked, printer)?;
    let repacked = dir.join("repacked.xpm");
    ops::pack::pack(
        &unpacked,
        &repacked,
        crate::format::artifact::DEFAULT_LEVEL,
        printer,
    )?;
    check_same_tensors(artifact, &repacked)?;
    printer.status("Checked", "unpack → pack reproduces every tensor exactly");
    Ok(report)
}

/// Publish the experts to the embedded local registry ($XPM_HOME/registry), then install them
/// into a new project from there, as a user would.
fn publish_and_install(
    dir: &Path,
    home: &XpmHome,
    experts: &[&ops::extract::ExtractOptions],
    printer: &Printer,
) -> Result<ops::install::InstallReport> {
    let registry = crate::registry::default_location(home);
    let client = crate::registry::ClientOptions::default();
    let mut specs = Vec::new();
    for o in experts {
        let line = publish_once(home, o, &registry, &client, printer)?;
        specs.push(format!("{}@={}", line.name, line.vers));
    }
    let project = dir.join("project");
    std::fs::create_dir_all(&project).at("create directory", &project)?;
    ops::init::init(&project, None, None)?;
    let installed = ops::install::install(
        home,
        &ops::install::InstallOptions {
            require_signatures: false,
            specs,
            registry: None,
            locked: false,
            offline: false,
            base: None,
            jobs: ops::install::DEFAULT_JOBS,
            dir: project.clone(),
        },
        &client,
        printer,
    )?;
    printer.status(
        "Installed",
        format!(
            "{} into {} (locked in {})",
            installed
                .experts
                .iter()
                .map(|e| format!("{}@{}", e.name, e.version))
                .collect::<Vec<_>>()
                .join(", "),
            project.display(),
            installed.lockfile.display()
        ),
    );
    Ok(installed)
}

/// The paper's merge of the installed experts, inspected and verified.
fn merge_installed(
    dir: &Path,
    installed: &ops::install::InstallReport,
    printer: &Printer,
) -> Result<()> {
    let merged = dir.join("demo-merged-0.1.0.xpm");
    ops::merge::merge(
        &ops::merge::MergeOptions {
            experts: installed.experts.iter().map(|e| e.path.clone()).collect(),
            weights: vec![],
            method: ops::merge::MergeMethod::builtin(crate::merge::Strategy::SparseMean),
            name: "demo-merged".into(),
            version: semver::Version::new(0, 1, 0),
            out: merged.clone(),
            level: crate::format::artifact::DEFAULT_LEVEL,
            recipe: None,
        },
        printer,
    )?;
    let merged_report = ops::inspect::inspect(&merged)?;
    printer.out(ops::inspect::render(&merged_report));
    ops::verify::verify(&merged, printer)?;
    printer.status(
        "Merged",
        format!(
            "{} with `sparse-mean`: {} entries over the union of both masks ({:.1} % of the attention weights)",
            merged.display(),
            merged_report.totals.nnz,
            merged_report.totals.density * 100.0
        ),
    );
    Ok(())
}

/// Train experts too: a tiny BERT folder (config, tokenizer, weights) and a keyword task, one
/// sparse and one LoRA expert, each evaluated through `apply` as `xpm eval` does; (method, eval
/// accuracy) of each.
fn train_and_eval(dir: &Path, home: &XpmHome, printer: &Printer) -> Result<Vec<(String, f64)>> {
    let bert = dir.join("tiny-bert");
    crate::train::toy::write_tiny_bert(&bert, 1)?;
    let (train_data, eval_data) = (dir.join("train.jsonl"), dir.join("eval.jsonl"));
    crate::train::toy::write_keyword_data(&train_data, 192, 2)?;
    crate::train::toy::write_keyword_data(&eval_data, 60, 3)?;
    let mut trained = Vec::new();
    for method in [crate::train::Method::Sparse, crate::train::Method::Lora] {
        let name = format!("demo-trained-{}", method.as_str());
        let out = dir.join(format!("{name}-0.1.0.xpm"));
        let mut o = crate::train::TrainOptions::new(
            bert.display().to_string(),
            train_data.clone(),
            method,
            &name,
            out.clone(),
        );
        o.eval = Some(eval_data.clone());
        o.epochs = Some(2);
        o.lr = Some(1e-2);
        o.head_lr = Some(3e-2);
        o.keep_ratio = 0.1;
        o.seed = 7;
        let r = crate::train::train(&o, home, printer)?;
        let e = crate::train::eval::eval(
            &crate::train::eval::EvalOptions {
                base: bert.display().to_string(),
                expert: Some(out.clone()),
                merged: None,
                data: eval_data.clone(),
                batch_size: 32,
                max_seq_len: None,
                device: crate::train::model::DeviceChoice::Cpu,
                hub: Default::default(),
            },
            home,
            printer,
        )?;
        let acc = e.metrics.accuracy.unwrap_or(f64::NAN);
        printer.status(
            "Trained",
            format!(
                "{} ({}, {} trainable parameters): train loss {:.3} → {:.3}, eval accuracy {:.1} %",
                out.display(),
                r.method,
                r.trainable_params,
                r.train_loss_first,
                r.train_loss_last,
                acc * 100.0
            ),
        );
        trained.push((r.method.to_string(), acc));
    }
    Ok(trained)
}

/// Publish the expert `opts` extracted unless the registry already holds its exact bytes (a
/// re-run of the demo). If the version exists with other bytes (an older xpm wrote it), extract
/// it again as the next free patch version and publish that: published versions are immutable.
fn publish_once(
    home: &XpmHome,
    opts: &ops::extract::ExtractOptions,
    registry: &str,
    client: &crate::registry::ClientOptions,
    printer: &Printer,
) -> Result<crate::registry::IndexLine> {
    let sha = ArtifactReader::open(&opts.out)?.verify_file_digest()?;
    let reg = crate::registry::open(registry, home, client, true)?;
    let lines = reg.index(&opts.name)?.unwrap_or_default();
    if let Some(l) = lines.iter().find(|l| l.cksum == sha) {
        printer.status(
            "Published",
            format!("{} already (same bytes) in {}", l.id(), reg.source()),
        );
        return Ok(l.clone());
    }
    let mut version = opts.version.clone();
    while lines
        .iter()
        .any(|l| crate::registry::local::same_version(&l.vers, &version))
    {
        version.patch += 1;
    }
    let out = if version == opts.version {
        opts.out.clone()
    } else {
        let again = ops::extract::ExtractOptions {
            version: version.clone(),
            out: opts
                .out
                .with_file_name(format!("{}-{version}.xpm", opts.name)),
            ..opts.clone()
        };
        ops::extract::extract(&again, home, printer)?;
        again.out
    };
    let line = ops::publish::publish(home, &out, registry, client, None, printer)?;
    printer.status("Published", format!("{} to {}", line.id(), reg.source()));
    Ok(line)
}

fn prepare_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .at("read directory", dir)?
            .next()
            .is_none();
        if !empty && !dir.join(MARKER).exists() {
            return Err(Error::input(
                format!("`{}` exists and was not made by `xpm demo`", dir.display()),
                Some("pass `--dir` with a new or empty directory"),
            ));
        }
        std::fs::remove_dir_all(dir).at("clear", dir)?;
    }
    std::fs::create_dir_all(dir).at("create directory", dir)?;
    std::fs::write(dir.join(MARKER), b"made by xpm demo; safe to delete\n")
        .at("write", dir.join(MARKER))?;
    Ok(())
}

/// Sizes of the demo's BERT-shaped models.
const HIDDEN: usize = 128;
const FFN: usize = 512;
const VOCAB: usize = 1000;
const LAYERS: usize = 4;

/// Write the base (two shards + index) and fine-tuned models (one file each).
fn write_models(base: &Path, tuned: &[&Path]) -> Result<()> {
    let specs = model_specs();
    let mut rng = SplitMix64(0x5eed);
    let base_vals: Vec<Vec<f32>> = specs
        .iter()
        .map(|(_, shape)| {
            let n: usize = shape.iter().product();
            (0..n).map(|_| rng.normal() * 0.05).collect()
        })
        .collect();
    // Each fine-tune: tiny noise everywhere, and larger moves on ~3 % of attention entries.
    let tuned_vals: Vec<Vec<Vec<f32>>> = tuned
        .iter()
        .map(|_| {
            specs
                .iter()
                .zip(&base_vals)
                .map(|((name, _), b)| {
                    b.iter()
                        .map(|&v| {
                            let mut d = rng.normal() * 1e-4;
                            if name.contains(".attention.") && rng.uniform() < 0.03 {
                                d += rng.normal() * 0.02;
                            }
                            v + d
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    for d in std::iter::once(base).chain(tuned.iter().copied()) {
        write_config(d)?;
    }
    write_base_shards(base, &specs, &base_vals)?;
    let all: Vec<usize> = (0..specs.len()).collect();
    for (dir, vals) in tuned.iter().zip(&tuned_vals) {
        write_safetensors(
            &dir.join(crate::checkpoint::SINGLE_FILE),
            &plan(&specs, &all),
            None,
            |k| Ok(f32_bytes(&vals[k])),
        )?;
    }
    Ok(())
}

/// (name, shape) of every tensor of the demo models, in file order.
fn model_specs() -> Vec<(String, Vec<usize>)> {
    let (hidden, ffn, vocab, layers) = (HIDDEN, FFN, VOCAB, LAYERS);
    let mut specs: Vec<(String, Vec<usize>)> = vec![(
        "embeddings.word_embeddings.weight".into(),
        vec![vocab, hidden],
    )];
    for l in 0..layers {
        let p = format!("encoder.layer.{l}");
        for m in ["query", "key", "value"] {
            specs.push((
                format!("{p}.attention.self.{m}.weight"),
                vec![hidden, hidden],
            ));
            specs.push((format!("{p}.attention.self.{m}.bias"), vec![hidden]));
        }
        specs.push((
            format!("{p}.attention.output.dense.weight"),
            vec![hidden, hidden],
        ));
        specs.push((format!("{p}.intermediate.dense.weight"), vec![ffn, hidden]));
        specs.push((format!("{p}.output.dense.weight"), vec![hidden, ffn]));
        specs.push((format!("{p}.output.LayerNorm.weight"), vec![hidden]));
    }
    specs
}

/// A model folder's `config.json`.
fn write_config(d: &Path) -> Result<()> {
    std::fs::create_dir_all(d).at("create directory", d)?;
    let config = serde_json::json!({
        "architectures": ["BertModel"], "model_type": "bert", "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
        "vocab_size": VOCAB, "_name_or_path": "xpm/demo-bert-tiny"
    });
    std::fs::write(
        d.join("config.json"),
        serde_json::to_vec_pretty(&config).expect("json"),
    )
    .at("write", d.join("config.json"))?;
    Ok(())
}

/// The base: two shards and an index, the layout large Hugging Face models use.
fn write_base_shards(base: &Path, specs: &[(String, Vec<usize>)], vals: &[Vec<f32>]) -> Result<()> {
    let half = specs.len() / 2;
    let shards = [
        (0..half).collect::<Vec<_>>(),
        (half..specs.len()).collect::<Vec<_>>(),
    ];
    let mut weight_map = serde_json::Map::new();
    for (s, idx) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", s + 1);
        write_safetensors(
            &base.join(&file),
            &plan(specs, idx),
            Some(HashMap::from([("format".to_string(), "pt".to_string())])),
            |k| Ok(f32_bytes(&vals[idx[k]])),
        )?;
        for &i in idx {
            weight_map.insert(specs[i].0.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    let ip = base.join(crate::checkpoint::INDEX_FILE);
    std::fs::write(&ip, serde_json::to_vec_pretty(&index).expect("json")).at("write", &ip)?;
    Ok(())
}

/// F32 plans of the tensors `idx` of `specs`.
fn plan(specs: &[(String, Vec<usize>)], idx: &[usize]) -> Vec<PlannedTensor> {
    idx.iter()
        .map(|&i| PlannedTensor {
            name: specs[i].0.clone(),
            dtype: safetensors::Dtype::F32,
            shape: specs[i].1.clone(),
        })
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Both artifacts decode to identical tensors.
fn check_same_tensors(a: &Path, b: &Path) -> Result<()> {
    let (ra, rb) = (ArtifactReader::open(a)?, ArtifactReader::open(b)?);
    let (ma, mb) = (ra.manifest(), rb.manifest());
    if ma.tensors.len() != mb.tensors.len()
        || ma.without_storage().tensors != mb.without_storage().tensors
    {
        return Err(Error::input(
            format!(
                "`{}` and `{}` describe different tensors",
                a.display(),
                b.display()
            ),
            None,
        ));
    }
    for i in 0..ma.tensors.len() {
        if ra.read_tensor(i)? != rb.read_tensor(i)? {
            return Err(Error::input(
                format!(
                    "tensor `{}` differs after unpack and pack",
                    ma.tensors[i].name
                ),
                Some("this is a bug in xpm; please report it"),
            ));
        }
    }
    Ok(())
}

/// Σ kept δ² / Σ δ² over the expert's tensors.
fn energy_kept(base: &Path, tuned: &Path, artifact: &Path) -> Result<f64> {
    let (b, t) = (
        crate::checkpoint::Checkpoint::open(base)?,
        crate::checkpoint::Checkpoint::open(tuned)?,
    );
    let r = ArtifactReader::open(artifact)?;
    let (mut kept, mut total) = (0f64, 0f64);
    for i in 0..r.manifest().tensors.len() {
        let td = r.read_tensor(i)?;
        let (bv, tv) = (b.to_f32(&td.name)?, t.to_f32(&td.name)?);
        total += bv
            .iter()
            .zip(&tv)
            .map(|(b, t)| ((t - b) as f64).powi(2))
            .sum::<f64>();
        if let Content::Sparse { values, .. } = &td.content {
            kept += td
                .dtype
                .to_f32(values)
                .iter()
                .map(|v| (*v as f64).powi(2))
                .sum::<f64>();
        }
    }
    Ok(if total > 0.0 { kept / total } else { 1.0 })
}
