//! The last stage of `train`: the saved state as an expert artifact (deltas, the head as `new`
//! tensors, the manifest's selection, training and provenance sections).

use std::collections::BTreeMap;

use super::data::Task;
use super::model::{Metrics, to_vec};
use super::prepare::Prepared;
use super::trainer::Fit;
use super::{LayerState, Method, TrainOptions, TrainReport};
use xpm_core::error::Result;
use xpm_core::format::artifact::DEFAULT_LEVEL;
use xpm_core::format::manifest::{
    BaseModel, ClassificationHead, ExpertKind, Manifest, Provenance, ProvenanceInput, Selection,
    Training,
};
use xpm_core::format::{ArtifactWriter, Content, Dtype, TensorData, encode_tensor};
use xpm_core::printer::Printer;

/// Write the expert to [`TrainOptions::out_path`] (atomically) and report the run.
pub(crate) fn write_expert(
    opts: &TrainOptions,
    input: &Prepared,
    fit: &Fit<'_>,
    printer: &Printer,
) -> Result<TrainReport> {
    let tensors = tensors(opts, input, fit)?;
    let manifest = manifest(opts, input, fit);
    let out = opts.out_path();
    let mut writer = ArtifactWriter::create(&out, DEFAULT_LEVEL)?;
    for (t, new) in &tensors {
        let e = encode_tensor(t, DEFAULT_LEVEL)?;
        writer.push(if *new { e.mark_new()? } else { e })?;
    }
    writer.finish(manifest)?;
    printer.status(
        "Wrote",
        format!(
            "{} ({} expert, {} tensors, saved step {})",
            out.display(),
            opts.method.as_str(),
            tensors.len(),
            fit.snapshot.step
        ),
    );
    let (trainable, state_bytes) = fit.run.trainable();
    Ok(TrainReport {
        out,
        method: opts.method,
        steps: fit.steps,
        trainable_params: trainable,
        optimizer_state_bytes: state_bytes,
        train_loss_first: fit.first_loss.unwrap_or(f64::NAN),
        train_loss_last: fit.last_loss,
        eval: fit.eval.clone(),
        saved_step: fit.snapshot.step,
        seconds_per_step: fit.seconds_per_step,
    })
}

/// The saved deltas, then the classification head (`true`: a `new` tensor).
fn tensors(
    opts: &TrainOptions,
    input: &Prepared,
    fit: &Fit<'_>,
) -> Result<Vec<(TensorData, bool)>> {
    let mut tensors = Vec::new();
    let linears = fit.run.net.linears();
    for (&li, st) in fit.run.targets.iter().zip(&fit.snapshot.layers) {
        let l = linears[li];
        let content = match st {
            LayerState::Sparse { indices, values } => Content::Sparse {
                indices: indices.iter().map(|&i| i as u64).collect(),
                values: Dtype::F32.from_f32(values),
                block_size: opts.block_size,
            },
            LayerState::Lora { a, b } => Content::Lora {
                rank: opts.lora_rank,
                alpha: opts.lora_alpha,
                a: Dtype::F32.from_f32(a),
                b: Dtype::F32.from_f32(b),
            },
            LayerState::Full { w } => {
                let w0 = to_vec(&l.w0)?;
                let d: Vec<f32> = w.iter().zip(&w0).map(|(a, b)| a - b).collect();
                Content::Dense {
                    delta: Dtype::F32.from_f32(&d),
                }
            }
        };
        let shape = vec![l.out_dim() as u64, l.in_dim() as u64];
        let t = TensorData {
            name: l.name.clone(),
            shape,
            dtype: Dtype::F32,
            content,
        };
        tensors.push((t, false));
    }
    if let Some((w, b)) = &fit.snapshot.head {
        let classes = input.labels.len();
        let hidden = w.len() / classes;
        for (name, shape, v) in [
            ("classifier.weight", vec![classes as u64, hidden as u64], w),
            ("classifier.bias", vec![classes as u64], b),
        ] {
            let t = TensorData {
                name: name.into(),
                shape,
                dtype: Dtype::F32,
                content: Content::Dense {
                    delta: Dtype::F32.from_f32(v),
                },
            };
            tensors.push((t, true));
        }
    }
    Ok(tensors)
}

/// The manifest: identity, base, selection (sparse), training record and provenance.
fn manifest(opts: &TrainOptions, input: &Prepared, fit: &Fit<'_>) -> Manifest {
    let kind = match opts.method {
        Method::Sparse => ExpertKind::Sparse,
        Method::Lora => ExpertKind::Lora,
        Method::Full | Method::Head => ExpertKind::Dense,
    };
    let base = BaseModel {
        id: input.base_id.clone(),
        digest: input.base_digest.clone(),
    };
    let mut manifest = Manifest::new(&opts.name, opts.version.clone(), base, kind);
    manifest.description = opts.description.clone();
    manifest.license = opts.license.clone();
    if opts.method == Method::Sparse {
        manifest.selection = Some(Selection {
            method: "train".into(),
            score_rule: Some(opts.score.as_str().into()),
            keep_ratio: Some(opts.keep_ratio),
            block_size: opts.block_size,
            schedule: Some(opts.schedule.as_str().into()),
            seed: Some(opts.seed),
            targets: opts.targets.clone(),
            tie_break: Some("lower flat index first".into()),
            extra: BTreeMap::from([
                ("score_batches".into(), opts.score_batches.into()),
                ("reselect_every".into(), opts.reselect_every.into()),
            ]),
        });
    }
    manifest.training = Some(Training {
        method: Some(opts.method.as_str().into()),
        data_digest: Some(input.train_data.digest.clone()),
        seed: Some(opts.seed),
        hyperparameters: hyperparameters(opts, fit),
        metrics: metrics(fit),
        head: (input.task == Task::Classification).then(|| ClassificationHead {
            labels: input.labels.clone(),
            pooling: "mean".into(),
            tensors: vec!["classifier.weight".into(), "classifier.bias".into()],
        }),
        extra: training_extra(opts, input),
    });
    manifest.provenance = Some(Provenance {
        tool: format!("xpm {}", env!("CARGO_PKG_VERSION")),
        inputs: vec![
            ProvenanceInput {
                role: "base".into(),
                name: input.base_id.clone(),
                digest: Some(input.base_digest.clone()),
                content_digest: None,
            },
            ProvenanceInput {
                role: "data".into(),
                name: opts.data.display().to_string(),
                digest: Some(input.train_data.digest.clone()),
                content_digest: None,
            },
        ],
        ..Provenance::default()
    });
    manifest
}

fn hyperparameters(opts: &TrainOptions, fit: &Fit<'_>) -> BTreeMap<String, serde_json::Value> {
    let linears = fit.run.net.linears();
    let target_names: Vec<&str> = fit
        .run
        .targets
        .iter()
        .map(|&i| linears[i].name.as_str())
        .collect();
    let mut hp: BTreeMap<String, serde_json::Value> = [
        ("epochs", serde_json::json!(fit.epochs)),
        ("lr", serde_json::json!(fit.lr)),
        ("head_lr", serde_json::json!(fit.head_lr)),
        ("batch_size", serde_json::json!(opts.batch_size)),
        ("grad_accum", serde_json::json!(opts.grad_accum)),
        ("max_seq_len", serde_json::json!(opts.max_seq_len)),
        ("optimizer", serde_json::json!("adamw")),
        ("betas", serde_json::json!([0.9, 0.999])),
        ("weight_decay", serde_json::json!(opts.weight_decay())),
        ("warmup", serde_json::json!(opts.warmup)),
        ("schedule", serde_json::json!("linear")),
        ("clip", serde_json::json!(opts.clip)),
        ("steps", serde_json::json!(fit.steps)),
        ("targets", serde_json::json!(target_names)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if opts.method == Method::Lora {
        hp.insert("lora_rank".into(), opts.lora_rank.into());
        hp.insert("lora_alpha".into(), opts.lora_alpha.into());
        hp.insert("lora_dropout".into(), opts.lora_dropout.into());
    }
    if let Some(m) = opts.max_steps {
        hp.insert("max_steps".into(), m.into());
    }
    if let Some(n) = opts.limit {
        hp.insert("limit".into(), n.into());
    }
    hp
}

fn metrics(fit: &Fit<'_>) -> BTreeMap<String, f64> {
    let (trainable, _) = fit.run.trainable();
    let mut metrics = BTreeMap::from([
        (
            "train_loss_first".to_string(),
            fit.first_loss.unwrap_or(f64::NAN),
        ),
        ("train_loss_last".to_string(), fit.last_loss),
        ("saved_step".to_string(), fit.snapshot.step as f64),
        ("trainable_params".to_string(), trainable as f64),
    ]);
    if let Some(m) = &fit.eval {
        add_eval_metrics(&mut metrics, m);
    }
    metrics.retain(|_, v| v.is_finite());
    metrics
}

fn add_eval_metrics(metrics: &mut BTreeMap<String, f64>, m: &Metrics) {
    metrics.insert("eval_loss".into(), m.loss);
    for (k, v) in [
        ("eval_accuracy", m.accuracy),
        ("eval_macro_f1", m.macro_f1),
        ("eval_exact_match", m.exact_match),
    ] {
        if let Some(v) = v {
            metrics.insert(k.into(), v);
        }
    }
}

/// The task, the model and, for classification, the head's labels and pooling (what `xpm eval`
/// and `xpm apply` read back).
fn training_extra(opts: &TrainOptions, input: &Prepared) -> BTreeMap<String, serde_json::Value> {
    let mut extra = BTreeMap::from([
        ("task".to_string(), serde_json::json!(input.task.as_str())),
        (
            "architecture".to_string(),
            serde_json::json!(input.md.arch.as_str()),
        ),
        (
            "train_examples".to_string(),
            serde_json::json!(input.train_enc.len()),
        ),
        (
            "device".to_string(),
            serde_json::json!(if input.dev.is_cpu() { "cpu" } else { "cuda" }),
        ),
    ]);
    if let (Some(d), Some(_)) = (&input.eval_data, &opts.eval) {
        extra.insert("eval_data_digest".into(), serde_json::json!(d.digest));
    }
    extra
}
