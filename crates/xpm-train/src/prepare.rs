//! The first stage of `train`: check the options against the model and the data, and load
//! both. Nothing is trained or written here.

use std::path::PathBuf;

use candle_core::Device;

use super::data::{Dataset, Encoded, Task};
use super::model::{self, ModelDir};
use super::{Method, TrainOptions};
use xpm_core::error::{Error, Result};
use xpm_core::home::XpmHome;
use xpm_core::printer::Printer;

/// Everything training reads: the base model, the encoded data and where it runs.
pub(crate) struct Prepared {
    /// The base's id as the user named it (a path or `hf:…`).
    pub base_id: String,
    pub base_digest: String,
    pub md: ModelDir,
    pub task: Task,
    /// Class labels in training order (classification), else empty.
    pub labels: Vec<String>,
    pub train_data: Dataset,
    pub eval_data: Option<Dataset>,
    pub train_enc: Vec<Encoded>,
    pub eval_enc: Option<Vec<Encoded>>,
    pub dev: Device,
}

/// Resolve the base, check the outputs and every option that depends on the model or the data,
/// then load, hash and encode.
pub(crate) fn prepare(opts: &TrainOptions, home: &XpmHome, printer: &Printer) -> Result<Prepared> {
    opts.validate()?;
    let (model_dir, base_id) = super::hub::resolve_base_with(&opts.base, &opts.hub, printer)?;
    let mut inputs = xpm_core::fsutil::files_of(&model_dir);
    inputs.extend([opts.data.clone()].into_iter().chain(opts.eval.clone()));
    let inputs: Vec<&std::path::Path> = inputs.iter().map(PathBuf::as_path).collect();
    let out = opts.out_path();
    xpm_core::fsutil::check_outputs(&[("-o", &out)], &inputs)?;
    xpm_core::fsutil::announce_new_parents(&[("-o", &out)], printer);
    let md = ModelDir::open(&model_dir)?;
    let mut train_data = Dataset::load(&opts.data)?;
    if let Some(n) = opts.limit {
        train_data.examples.truncate(n);
    }
    train_data.check_trainable()?;
    let task = md.arch.task();
    if train_data.task != task {
        return Err(Error::input(
            format!(
                "`{}` is {} data, but `{}` is a {} model ({})",
                opts.data.display(),
                train_data.task.as_str(),
                model_dir.display(),
                md.arch.as_str(),
                task.as_str()
            ),
            Some(
                "encoders train on {\"text\", \"label\"}; decoders on {\"prompt\", \"completion\"}",
            ),
        ));
    }
    let eval_data = match &opts.eval {
        Some(p) => {
            let d = Dataset::load(p)?;
            if d.task != task {
                return Err(Error::input(
                    format!(
                        "`{}` is {} data, but training is {}",
                        p.display(),
                        d.task.as_str(),
                        task.as_str()
                    ),
                    None,
                ));
            }
            Some(d)
        }
        None => None,
    };
    if opts.method == Method::Head && task != Task::Classification {
        return Err(Error::input(
            format!(
                "`--method head` trains a classification head, but `{}` is {} data",
                opts.data.display(),
                task.as_str()
            ),
            Some("use --method sparse, lora or full for prompt/completion data"),
        ));
    }
    if task == Task::Classification {
        check_classifier_base(opts, &md, &model_dir)?;
    }
    let dev = model::device(opts.device)?;
    printer.status("Hashing", format!("base model `{}`", model_dir.display()));
    let base_digest = md.checkpoint.digest(Some(&home.cache))?;
    let labels = train_data.labels();
    let train_enc = md.encode(&train_data.examples, &labels, opts.max_seq_len, &opts.data)?;
    let eval_enc = match (&eval_data, &opts.eval) {
        (Some(d), Some(p)) => Some(md.encode(&d.examples, &labels, opts.max_seq_len, p)?),
        _ => None,
    };
    Ok(Prepared {
        base_id,
        base_digest,
        md,
        task,
        labels,
        train_data,
        eval_data,
        train_enc,
        eval_enc,
        dev,
    })
}

/// A classification base must have no head of its own, and room for `--max-seq-len` tokens.
fn check_classifier_base(
    opts: &TrainOptions,
    md: &ModelDir,
    model_dir: &std::path::Path,
) -> Result<()> {
    for name in ["classifier.weight", "classifier.bias"] {
        if md.checkpoint.info(name).is_some() {
            return Err(Error::input(
                format!("`{}` already has a `{name}` tensor", model_dir.display()),
                Some("train from the encoder alone (a model without a classification head)"),
            ));
        }
    }
    let max_pos = md
        .config
        .get("max_position_embeddings")
        .and_then(|v| v.as_u64())
        .unwrap_or(512) as usize;
    if opts.max_seq_len > max_pos {
        return Err(Error::input(
            format!(
                "--max-seq-len {} exceeds the model's {max_pos} positions",
                opts.max_seq_len
            ),
            Some(&format!("use --max-seq-len {max_pos} or less")),
        ));
    }
    Ok(())
}
