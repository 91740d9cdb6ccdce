//! A model directory loaded for training or evaluation: architecture, weights, tokenizer, and
//! the task network on top (encoder + classification head, or decoder LM).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use tokenizers::{Tokenizer, TruncationParams};

use super::bert::{Bert, mean_pool};
use super::data::{Encoded, Example, Task};
use super::llama::Llama;
use super::nn::{AdaptedLinear, Head, cross_entropy};
use xpm_core::checkpoint::Checkpoint;
use xpm_core::error::{Error, IoResultExt, Result};
use xpm_core::rng::SplitMix64;

/// Candle errors, with what was being done.
pub fn ce(what: &str) -> impl Fn(candle_core::Error) -> Error + '_ {
    move |e| Error::compute(what, e)
}

/// Supported architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Bert,
    Llama,
}

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Bert => "bert",
            Arch::Llama => "llama",
        }
    }

    pub fn task(self) -> Task {
        match self {
            Arch::Bert => Task::Classification,
            Arch::Llama => Task::CausalLm,
        }
    }
}

/// A model directory: `config.json`, `tokenizer.json`, safetensors weights.
pub struct ModelDir {
    pub dir: PathBuf,
    pub arch: Arch,
    pub config: serde_json::Value,
    pub tokenizer: Tokenizer,
    pub checkpoint: Checkpoint,
}

impl ModelDir {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::input(
                format!("`{}` is not a model directory", dir.display()),
                Some(
                    "pass a directory with config.json, tokenizer.json and *.safetensors \
                     (a Hugging Face model folder), or `hf:ORG/NAME`",
                ),
            ));
        }
        let cfg_path = dir.join("config.json");
        let config: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&cfg_path).at("read", &cfg_path)?,
        )
        .map_err(|e| {
            Error::input(
                format!("`{}` is not valid JSON: {e}", cfg_path.display()),
                None,
            )
        })?;
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let archs: Vec<&str> = config
            .get("architectures")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        let arch = if model_type == "bert" || archs.iter().any(|a| a.starts_with("Bert")) {
            Arch::Bert
        } else if model_type == "llama" || archs.iter().any(|a| a.starts_with("Llama")) {
            Arch::Llama
        } else {
            return Err(Error::input(
                format!(
                    "`{}` is a `{model_type}` model, which `xpm train` does not support",
                    cfg_path.display()
                ),
                Some("supported: BERT-family encoders (model_type `bert`) and Llama decoders"),
            ));
        };
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(Error::input(
                format!("`{}` has no tokenizer.json", dir.display()),
                Some("xpm tokenises with the `tokenizers` library's tokenizer.json"),
            ));
        }
        let mut tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| {
            Error::input(format!("cannot load `{}`: {e}", tok_path.display()), None)
        })?;
        // xpm pads batches itself (to the longest text, with an attention mask) and checks
        // lengths itself (training truncates to `--max-seq-len`, `xpm serve` refuses what is
        // over the expert's limit). A file's own settings would pad every text with tokens
        // the mask calls real, or truncate silently: sentence-transformers' MiniLM pads every
        // text to 128 tokens.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::input(format!("`{}`: {e}", tok_path.display()), None))?;
        let checkpoint = Checkpoint::open(dir)?;
        Ok(ModelDir {
            dir: dir.to_path_buf(),
            arch,
            config,
            tokenizer,
            checkpoint,
        })
    }

    /// Every floating-point tensor as f32 on `dev`.
    pub fn weights(&self, dev: &Device) -> Result<HashMap<String, Tensor>> {
        let mut w = HashMap::new();
        for name in self.checkpoint.names() {
            let info = self.checkpoint.info(name).expect("listed");
            if !xpm_core::checkpoint::is_float(info.dtype) {
                continue;
            }
            let v = self.checkpoint.to_f32(name)?;
            let t = Tensor::from_vec(v, info.shape.clone(), dev).map_err(ce("load weights"))?;
            w.insert(name.to_string(), t);
        }
        Ok(w)
    }

    /// Tokenise examples, truncating to `max_len` tokens. Classification targets are indices
    /// into `labels`; an unknown label is an error naming the file's example.
    pub fn encode(
        &self,
        examples: &[Example],
        labels: &[String],
        max_len: usize,
        source: &Path,
    ) -> Result<Vec<Encoded>> {
        let mut tok = self.tokenizer.clone();
        tok.with_truncation(Some(TruncationParams {
            max_length: max_len,
            ..Default::default()
        }))
        .map_err(|e| Error::input(format!("tokenizer: {e}"), None))?;
        tok.with_padding(None);
        let terr = |e: tokenizers::Error| Error::input(format!("tokenizer: {e}"), None);
        let mut out = Vec::with_capacity(examples.len());
        for (i, ex) in examples.iter().enumerate() {
            match ex {
                Example::Class { text, label } => {
                    let target = labels.iter().position(|l| l == label).ok_or_else(|| {
                        Error::input(
                            format!(
                                "example {} of `{}` has label `{label}`, which the training data \
                                 does not have (labels: {})",
                                i + 1,
                                source.display(),
                                labels.join(", ")
                            ),
                            Some("evaluate on data with the training label set"),
                        )
                    })?;
                    let enc = tok.encode(text.as_str(), true).map_err(terr)?;
                    out.push(Encoded {
                        ids: enc.get_ids().to_vec(),
                        target: target as u32,
                    });
                }
                Example::Causal { prompt, completion } => {
                    let p = tok.encode(prompt.as_str(), true).map_err(terr)?;
                    let c = tok.encode(completion.as_str(), false).map_err(terr)?;
                    let mut ids = p.get_ids().to_vec();
                    let n_prompt = ids.len().min(max_len.saturating_sub(1));
                    ids.truncate(n_prompt);
                    ids.extend_from_slice(c.get_ids());
                    if let Some(eos) = self.eos_id() {
                        ids.push(eos);
                    }
                    ids.truncate(max_len);
                    out.push(Encoded {
                        ids,
                        target: n_prompt as u32,
                    });
                }
            }
        }
        Ok(out)
    }

    pub fn eos_id(&self) -> Option<u32> {
        match self.config.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| v as u32),
            Some(serde_json::Value::Array(a)) => {
                a.first().and_then(|v| v.as_u64()).map(|v| v as u32)
            }
            _ => None,
        }
    }

    pub fn pad_id(&self) -> u32 {
        self.config
            .get("pad_token_id")
            .and_then(|v| v.as_u64())
            .unwrap_or(0) as u32
    }
}

/// Tensors of one batch.
#[derive(Clone)]
pub struct Batch {
    pub ids: Tensor,
    pub mask: Tensor,
    /// Classification: labels (b). Causal LM: next-token targets (b · (s − 1)).
    pub targets: Tensor,
    /// Causal LM: 1 where the target is a completion token (b · (s − 1)).
    pub weights: Option<Tensor>,
    pub size: usize,
}

/// Pad the examples at `idx` to the longest of them.
pub fn make_batch(
    data: &[Encoded],
    idx: &[usize],
    task: Task,
    pad: u32,
    dev: &Device,
) -> candle_core::Result<Batch> {
    let b = idx.len();
    let s = idx
        .iter()
        .map(|&i| data[i].ids.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let mut ids = vec![pad; b * s];
    let mut mask = vec![0f32; b * s];
    for (r, &i) in idx.iter().enumerate() {
        let e = &data[i].ids;
        ids[r * s..r * s + e.len()].copy_from_slice(e);
        mask[r * s..r * s + e.len()]
            .iter_mut()
            .for_each(|m| *m = 1.0);
    }
    let (targets, weights) = match task {
        Task::Classification => {
            let t: Vec<u32> = idx.iter().map(|&i| data[i].target).collect();
            (Tensor::new(t, dev)?, None)
        }
        Task::CausalLm => {
            let mut t = vec![0u32; b * (s - 1)];
            let mut w = vec![0f32; b * (s - 1)];
            for (r, &i) in idx.iter().enumerate() {
                let e = &data[i];
                for p in 0..e.ids.len().saturating_sub(1) {
                    t[r * (s - 1) + p] = e.ids[p + 1];
                    // Position p predicts token p + 1: a completion token when p + 1 ≥ n_prompt.
                    if p + 1 >= e.target as usize {
                        w[r * (s - 1) + p] = 1.0;
                    }
                }
            }
            (Tensor::new(t, dev)?, Some(Tensor::new(w, dev)?))
        }
    };
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, s), dev)?,
        mask: Tensor::from_vec(mask, (b, s), dev)?,
        targets,
        weights,
        size: b,
    })
}

/// The network being trained or evaluated.
pub enum Net {
    Classifier { bert: Bert, head: Head },
    CausalLm { llama: Llama },
}

impl Net {
    pub fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        match self {
            Net::Classifier { bert, .. } => bert.linears_mut(),
            Net::CausalLm { llama } => llama.linears_mut(),
        }
    }

    pub fn linears(&self) -> Vec<&AdaptedLinear> {
        match self {
            Net::Classifier { bert, .. } => bert.linears(),
            Net::CausalLm { llama } => llama.linears(),
        }
    }

    /// Whether a linear layer is in the attention block (vs the MLP), by name.
    pub fn is_attention(name: &str) -> bool {
        name.contains(".attention.") || name.contains(".self_attn.")
    }

    /// The loss of one batch and the gradients of `scale · loss` for every trainable
    /// variable. A BERT classifier on the CPU takes the hand-differentiated step
    /// ([`super::tape`]) unless `XPM_CANDLE_AUTOGRAD` is set (a switch for comparing the two);
    /// everything else goes through Candle's autograd.
    pub fn loss_and_grads(
        &self,
        batch: &Batch,
        rng: Option<&mut SplitMix64>,
        scale: f64,
    ) -> candle_core::Result<(f32, GradStore)> {
        if let Net::Classifier { bert, head } = self
            && super::tape::fits(bert)
            && std::env::var_os("XPM_CANDLE_AUTOGRAD").is_none()
        {
            return bert.classifier_step(head, batch, rng, scale);
        }
        let (loss, _) = self.loss(batch, rng)?;
        let value = loss.to_scalar::<f32>()?;
        Ok((value, (loss * scale)?.backward()?))
    }

    /// [`Self::loss`] for evaluation: no dropout, and a BERT encoder runs without building a
    /// graph ([`Bert::infer`]).
    pub fn eval_loss(&self, batch: &Batch) -> candle_core::Result<(Tensor, Tensor)> {
        match self {
            Net::Classifier { bert, head } => {
                classifier_loss(head, &bert.infer(&batch.ids, &batch.mask)?, batch)
            }
            Net::CausalLm { .. } => self.loss(batch, None),
        }
    }

    /// Loss and logits (classification: b × classes; LM: b·(s−1) × vocab).
    pub fn loss(
        &self,
        batch: &Batch,
        rng: Option<&mut SplitMix64>,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        match self {
            Net::Classifier { bert, head } => {
                classifier_loss(head, &bert.forward(&batch.ids, &batch.mask, rng)?, batch)
            }
            Net::CausalLm { llama } => {
                let logits = llama.forward(&batch.ids, &batch.mask, rng)?;
                let (b, s, v) = logits.dims3()?;
                let logits = logits.narrow(1, 0, s - 1)?.reshape((b * (s - 1), v))?;
                let loss = cross_entropy(&logits, &batch.targets, batch.weights.as_ref())?;
                Ok((loss, logits))
            }
        }
    }
}

/// The classification loss and logits of encoder states `hidden` (b × s × h): mean pooling
/// over the batch's mask, the head, cross-entropy against the batch's labels.
pub(crate) fn classifier_loss(
    head: &Head,
    hidden: &Tensor,
    batch: &Batch,
) -> candle_core::Result<(Tensor, Tensor)> {
    let logits = head.forward(&mean_pool(hidden, &batch.mask)?)?;
    let loss = cross_entropy(&logits, &batch.targets, None)?;
    Ok((loss, logits))
}

/// Build the network from a model directory. `head`: existing head weights (evaluation), else
/// a fresh head for `classes` classes.
pub fn build_net(
    md: &ModelDir,
    dev: &Device,
    classes: usize,
    head: Option<(Tensor, Tensor)>,
    rng: &mut SplitMix64,
) -> Result<Net> {
    build_net_from(md, md.weights(dev)?, dev, classes, head, rng)
}

/// [`build_net`] from weights already loaded ([`ModelDir::weights`]). The network's tensors
/// share their storage with `w`'s: a caller that keeps clones of them (`xpm serve`) can change
/// the network's weights in place.
pub fn build_net_from(
    md: &ModelDir,
    w: HashMap<String, Tensor>,
    dev: &Device,
    classes: usize,
    head: Option<(Tensor, Tensor)>,
    rng: &mut SplitMix64,
) -> Result<Net> {
    match md.arch {
        Arch::Bert => {
            let config: candle_transformers::models::bert::Config =
                serde_json::from_value(md.config.clone()).map_err(|e| {
                    Error::input(
                        format!(
                            "`{}/config.json` is not a BERT config: {e}",
                            md.dir.display()
                        ),
                        None,
                    )
                })?;
            let bert = Bert::load(w, config).map_err(ce("load the BERT weights"))?;
            let head = match head {
                Some((w, b)) => Head {
                    w: candle_core::Var::from_tensor(&w).map_err(ce("head"))?,
                    b: candle_core::Var::from_tensor(&b).map_err(ce("head"))?,
                },
                None => Head::init(classes, bert.hidden_size(), rng, dev).map_err(ce("head"))?,
            };
            Ok(Net::Classifier { bert, head })
        }
        Arch::Llama => {
            let llama = Llama::load(w, &md.config).map_err(ce("load the Llama weights"))?;
            Ok(Net::CausalLm { llama })
        }
    }
}

/// Evaluation metrics.
#[derive(Debug, Clone, Default, serde::Serialize, schemars::JsonSchema)]
pub struct Metrics {
    /// Examples evaluated.
    pub examples: usize,
    /// Mean cross-entropy (per example for classification, per completion token for LM).
    pub loss: f64,
    /// Classification: share of examples predicted right.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Classification: mean F1 over the classes present in the data or the predictions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub macro_f1: Option<f64>,
    /// Causal LM: share of examples whose every completion token is the argmax prediction
    /// (teacher-forced).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<f64>,
}

/// Evaluate `net` on encoded data (no dropout, no gradients kept).
pub fn evaluate(
    net: &Net,
    data: &[Encoded],
    task: Task,
    classes: usize,
    batch: usize,
    pad: u32,
    dev: &Device,
) -> Result<Metrics> {
    let mut loss_sum = 0f64;
    let mut weight_sum = 0f64;
    let mut confusion = vec![vec![0usize; classes.max(1)]; classes.max(1)];
    let mut exact = 0usize;
    for idx in super::data::batches(data.len(), batch, None) {
        let b = make_batch(data, &idx, task, pad, dev).map_err(ce("batch"))?;
        let (loss, logits) = net.eval_loss(&b).map_err(ce("evaluate"))?;
        let loss = loss.to_scalar::<f32>().map_err(ce("evaluate"))? as f64;
        let preds: Vec<u32> = logits
            .argmax(1)
            .and_then(|t| t.to_vec1())
            .map_err(ce("evaluate"))?;
        let targets: Vec<u32> = b.targets.to_vec1().map_err(ce("evaluate"))?;
        match task {
            Task::Classification => {
                loss_sum += loss * idx.len() as f64;
                weight_sum += idx.len() as f64;
                for (p, t) in preds.iter().zip(&targets) {
                    confusion[*t as usize][*p as usize] += 1;
                }
            }
            Task::CausalLm => {
                let w: Vec<f32> = b
                    .weights
                    .as_ref()
                    .expect("lm")
                    .to_vec1()
                    .map_err(ce("evaluate"))?;
                let n: f64 = w.iter().map(|&x| x as f64).sum();
                loss_sum += loss * n;
                weight_sum += n;
                let per = preds.len() / idx.len();
                for r in 0..idx.len() {
                    let ok = (0..per).all(|p| {
                        let k = r * per + p;
                        w[k] == 0.0 || preds[k] == targets[k]
                    });
                    exact += ok as usize;
                }
            }
        }
    }
    let mut m = Metrics {
        examples: data.len(),
        loss: loss_sum / weight_sum.max(1.0),
        ..Metrics::default()
    };
    match task {
        Task::Classification => {
            let correct: usize = (0..classes).map(|c| confusion[c][c]).sum();
            m.accuracy = Some(correct as f64 / data.len().max(1) as f64);
            let mut f1s = Vec::new();
            for (c, row) in confusion.iter().enumerate().take(classes) {
                let tp = row[c] as f64;
                let support: f64 = row.iter().sum::<usize>() as f64;
                let predicted: f64 = (0..classes).map(|t| confusion[t][c]).sum::<usize>() as f64;
                if support == 0.0 && predicted == 0.0 {
                    continue; // absent class: left out of the macro average
                }
                let f1 = if tp == 0.0 {
                    0.0
                } else {
                    2.0 * tp / (support + predicted)
                };
                f1s.push(f1);
            }
            m.macro_f1 = Some(f1s.iter().sum::<f64>() / f1s.len().max(1) as f64);
        }
        Task::CausalLm => m.exact_match = Some(exact as f64 / data.len().max(1) as f64),
    }
    Ok(m)
}

/// The requested device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    Auto,
}

pub fn device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => Device::cuda_if_available(0).map_err(ce("CUDA device")),
        DeviceChoice::Cuda => Device::new_cuda(0).map_err(|e| {
            Error::input(
                format!("cannot use CUDA device 0: {e}"),
                Some(
                    "build xpm with `--features cuda` (needs the CUDA toolkit) and check \
                     `nvidia-smi`; or use `--device cpu`",
                ),
            )
        }),
    }
}

/// f32 contents of a tensor (for snapshots and saving).
pub fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .map_err(ce("read tensor"))
}
