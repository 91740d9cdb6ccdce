//! `xpm eval`: a base model, optionally with an expert (or a merged expert) applied, on a test
//! set. W0 + Δ is formed by [`xpm_merge::apply::apply`], the same code as `xpm apply` and
//! `xpm merge --apply-to`, into a temporary model directory.

use std::path::PathBuf;

use candle_core::Tensor;

use super::data::{Dataset, Task};
use super::model::{self, DeviceChoice, Metrics, ModelDir, ce};
use xpm_core::error::{Error, Result};
use xpm_core::format::ArtifactReader;
use xpm_core::home::XpmHome;
use xpm_core::printer::Printer;
use xpm_core::rng::SplitMix64;
use xpm_merge::engine::Input;

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub base: String,
    /// The task's expert: applied (unless `merged` is given) and the source of the
    /// classification head and label set.
    pub expert: Option<PathBuf>,
    /// A merged expert to apply instead of `expert`'s delta.
    pub merged: Option<PathBuf>,
    pub data: PathBuf,
    pub batch_size: usize,
    /// Default: the expert's training `max_seq_len`, else 128.
    pub max_seq_len: Option<usize>,
    pub device: DeviceChoice,
    /// Hub settings for an `hf:` base (read once by the CLI).
    pub hub: super::hub::HubConfig,
}

/// `xpm eval --json` output (schemas/eval.schema.json).
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct EvalReport {
    /// 1.
    pub schema_version: u32,
    /// The base model's id (directory name, or `ORG/NAME` for `hf:` bases).
    pub base: String,
    /// The task's expert (head and labels; its delta unless `merged` is given).
    pub expert: Option<String>,
    /// The merged expert whose delta was applied.
    pub merged: Option<String>,
    /// The test data file and its `sha256:` digest.
    pub data: String,
    pub data_digest: String,
    /// `classification` or `causal-lm`.
    pub task: crate::data::Task,
    #[serde(flatten)]
    pub metrics: Metrics,
}

pub fn eval(opts: &EvalOptions, home: &XpmHome, printer: &Printer) -> Result<EvalReport> {
    let (base_dir, base_id) = super::hub::resolve_base_with(&opts.base, &opts.hub, printer)?;
    let data = Dataset::load(&opts.data)?;
    let head_src = match &opts.expert {
        Some(p) => Some(ArtifactReader::open(p)?),
        None => None,
    };
    let (labels, max_len) = training_settings(head_src.as_ref(), opts.max_seq_len);
    // The temporary directory lives until the evaluation is done.
    let (model_dir, _tmp) = model_to_evaluate(opts, base_dir, home, printer)?;
    let md = ModelDir::open(&model_dir)?;
    let task = md.arch.task();
    if data.task != task {
        return Err(Error::input(
            format!(
                "`{}` is {} data, but the model is {}",
                opts.data.display(),
                data.task.as_str(),
                task.as_str()
            ),
            None,
        ));
    }
    let dev = model::device(opts.device)?;
    let head = if task == Task::Classification {
        Some(classification_head(head_src.as_ref(), &labels, &dev)?)
    } else {
        None
    };
    let classes = labels.len();
    let net = model::build_net(&md, &dev, classes, head, &mut SplitMix64(0))?;
    let enc = md.encode(&data.examples, &labels, max_len, &opts.data)?;
    printer.status(
        "Evaluating",
        format!("{} examples of `{}`", enc.len(), opts.data.display()),
    );
    let metrics = model::evaluate(
        &net,
        &enc,
        task,
        classes,
        opts.batch_size,
        md.pad_id(),
        &dev,
    )?;
    Ok(EvalReport {
        schema_version: 1,
        base: base_id,
        expert: opts.expert.as_ref().map(|p| p.display().to_string()),
        merged: opts.merged.as_ref().map(|p| p.display().to_string()),
        data: opts.data.display().to_string(),
        data_digest: data.digest,
        task,
        metrics,
    })
}

/// The label set the task's expert was trained with (empty without one), and the sequence
/// length to evaluate at: `max_seq_len`, else the expert's training one, else 128.
pub fn training_settings(
    head_src: Option<&ArtifactReader>,
    max_seq_len: Option<usize>,
) -> (Vec<String>, usize) {
    let training = head_src.and_then(|r| r.manifest().training.clone());
    let labels: Vec<String> = training
        .as_ref()
        .and_then(|t| t.head.as_ref())
        .map(|h| h.labels.clone())
        .unwrap_or_default();
    let max_len = max_seq_len.unwrap_or_else(|| {
        training
            .as_ref()
            .and_then(|t| t.hyperparameters.get("max_seq_len"))
            .and_then(|v| v.as_u64())
            .unwrap_or(128) as usize
    });
    (labels, max_len)
}

/// The model directory to evaluate: the base with the merged expert's (else the expert's) delta
/// applied, in a temporary directory under `$XPM_HOME` (returned too: it is deleted when
/// dropped); the base itself without either.
fn model_to_evaluate(
    opts: &EvalOptions,
    base_dir: PathBuf,
    home: &XpmHome,
    printer: &Printer,
) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    let Some(expert) = opts.merged.as_ref().or(opts.expert.as_ref()) else {
        return Ok((base_dir, None));
    };
    std::fs::create_dir_all(&home.root).map_err(|e| Error::io("create", &home.root, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".xpm-eval-")
        .tempdir_in(&home.root)
        .map_err(|e| Error::io("create a temporary directory in", &home.root, e))?;
    let out = tmp.path().join("model");
    xpm_merge::apply::apply(
        &base_dir,
        expert,
        &out,
        xpm_merge::apply::DEFAULT_MAX_SHARD_BYTES,
        home,
        printer,
    )?;
    Ok((out, Some(tmp)))
}

/// The classification head (weight, bias) stored in the task's expert `head_src`, which must
/// record its label set.
pub fn classification_head(
    head_src: Option<&ArtifactReader>,
    labels: &[String],
    dev: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let Some(r) = head_src else {
        return Err(Error::input(
            "classification needs the task's expert for its head and label set",
            Some("pass `--expert TASK.xpm` (with `--merged M.xpm` to evaluate a merge)"),
        ));
    };
    if labels.is_empty() {
        return Err(Error::input(
            format!(
                "`{}` records no label set: it was not trained by `xpm train`",
                r.path().display()
            ),
            None,
        ));
    }
    // The manifest names the head's tensors, weight first.
    let names: Vec<String> = r
        .manifest()
        .training
        .as_ref()
        .and_then(|t| t.head.as_ref())
        .map(|h| h.tensors.clone())
        .filter(|t| t.len() == 2)
        .unwrap_or_else(|| vec!["classifier.weight".into(), "classifier.bias".into()]);
    let mut parts = Vec::new();
    for name in &names {
        let i = r
            .manifest()
            .tensors
            .iter()
            .position(|t| t.name == *name && t.new)
            .ok_or_else(|| {
                Error::input(
                    format!("`{}` has no head tensor `{name}`", r.path().display()),
                    Some("train a classification expert with `xpm train`"),
                )
            })?;
        let Input::Dense { values } = xpm_merge::input::load_input_at(r, i)? else {
            return Err(Error::corrupt(r.path(), format!("`{name}` is not dense")));
        };
        let shape: Vec<usize> = r.manifest().tensors[i]
            .shape
            .iter()
            .map(|&d| d as usize)
            .collect();
        parts.push(Tensor::from_vec(values, shape, dev).map_err(ce("head"))?);
    }
    let b = parts.pop().expect("two");
    let w = parts.pop().expect("two");
    Ok((w, b))
}
