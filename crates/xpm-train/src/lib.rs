//! `xpm train`: sparse experts (the paper's method), LoRA and full fine-tuning in one trainer.
//!
//! One data pipeline, one optimizer and one loop for every method, so comparisons are fair;
//! only the adapter on the target layers differs (METHOD.md). Sparse training keeps, per
//! layer, a values vector of length nnz scattered into the frozen base weight; its AdamW
//! moments have length nnz too. The base weights are never modified.

pub mod bert;
pub mod data;
pub mod eval;
mod export;
pub mod fused;
pub mod hub;
mod linear;
pub mod llama;
pub mod mask;
pub mod model;
pub mod nn;
pub mod optim;
mod prepare;
pub mod tape;
pub mod toy;
mod trainer;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor, Var};
use globset::{Glob, GlobSetBuilder};

use mask::ScoreRule;
use model::{Batch, DeviceChoice, Metrics, Net, ce, to_vec};
use nn::Adapter;
use optim::{Accum, AdamW, Param};
use xpm_core::error::{Error, Result};
use xpm_core::home::XpmHome;
use xpm_core::printer::Printer;
use xpm_core::rng::SplitMix64;

/// The adapter trained on the target layers.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Sparse,
    Lora,
    Full,
    /// Only the classification head on the frozen base (a linear probe: the "base + head"
    /// baseline, and the head for evaluating a merge on a task it was not merged from).
    Head,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Sparse => "sparse",
            Method::Lora => "lora",
            Method::Full => "full",
            Method::Head => "head",
        }
    }

    /// The learning rate used when `--lr` is not given (MiniLM-sized encoders; see
    /// docs/training.md for how they were chosen).
    pub fn default_lr(self) -> f64 {
        match self {
            Method::Sparse => 1e-3,
            Method::Lora => 1e-3,
            Method::Full => 5e-5,
            Method::Head => DEFAULT_HEAD_LR,
        }
    }
}

/// The fewest optimizer steps a run should take. Without `--epochs`, training makes enough
/// passes over the data to reach it (at most [`MAX_AUTO_EPOCHS`]); a run with fewer steps
/// warns. On MiniLM with a few hundred Reuters-8 examples, one pass at batch 16 (15 steps)
/// left every method at the majority class; see docs/training.md, "How long to train".
pub const MIN_STEPS: usize = 100;

/// The classification head's peak learning rate when `--head-lr` is not given (unless `--lr` is
/// larger). The head starts from random weights; at 1e-3 a MiniLM head on a few hundred
/// Reuters-8 examples was still far from trained after 60 steps (docs/training.md).
pub const DEFAULT_HEAD_LR: f64 = 3e-3;

/// The most passes `--epochs` auto makes: small data sets get more passes, up to this many.
pub const MAX_AUTO_EPOCHS: usize = 20;

/// The number of epochs when `--epochs` is not given: the fewest passes that reach
/// [`MIN_STEPS`] optimizer steps, between 1 and [`MAX_AUTO_EPOCHS`].
pub fn auto_epochs(steps_per_epoch: usize) -> usize {
    MIN_STEPS
        .div_ceil(steps_per_epoch.max(1))
        .clamp(1, MAX_AUTO_EPOCHS)
}

/// When the sparse mask is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Schedule {
    /// Once, before training, from `--score-batches` batches.
    OneShot,
    /// Start dense; re-select every `--reselect-every` examples during the first epoch, then
    /// freeze (the reference setting).
    Periodic,
}

impl Schedule {
    pub fn as_str(self) -> &'static str {
        match self {
            Schedule::OneShot => "one-shot",
            Schedule::Periodic => "periodic",
        }
    }
}

/// Everything `train` needs; also the flags of `xpm train` (one declaration of each option and
/// its default: [`TrainOptions::new`] agrees with what the command line gives, a test checks it).
/// The doc comments of the fields are the flags' help.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct TrainOptions {
    /// Base model: a model directory (config.json, tokenizer.json, *.safetensors) or
    /// `hf:ORG/NAME[@REV]`
    #[arg(long, value_name = "MODEL")]
    pub base: String,
    /// Training data, JSONL: {"text", "label"} or {"prompt", "completion"}
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Evaluation data (same format): eval loss picks the saved checkpoint
    #[arg(long, value_name = "FILE")]
    pub eval: Option<PathBuf>,
    /// What to train on the target layers
    #[arg(long, value_enum, default_value = "sparse")]
    pub method: Method,
    /// Expert name (lowercase letters, digits, `-`, `_`, optional `namespace/`)
    #[arg(long)]
    pub name: String,
    /// Expert version (semver)
    #[arg(long, value_name = "SEMVER", default_value = "0.1.0")]
    pub version: semver::Version,
    /// Output artifact [default: NAME-VERSION.xpm]
    #[arg(short, long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Passes over the training data [default: auto: enough passes for at least 100 optimizer
    /// steps, at most 20]
    #[arg(long, value_name = "N")]
    pub epochs: Option<usize>,
    /// Peak learning rate [default: sparse 1e-3, lora 1e-3, full 5e-5]
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning rate of the classification head [default: max(lr, 3e-3)]
    #[arg(long)]
    pub head_lr: Option<f64>,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Truncate examples to this many tokens
    #[arg(long, default_value_t = 128)]
    pub max_seq_len: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Layers to adapt: `attn` (q/k/v/o), `mlp`, `all`, or globs over weight names
    #[arg(long, value_delimiter = ',', default_value = "attn")]
    pub targets: Vec<String>,
    /// Sparse: fraction of each target weight that is trained
    #[arg(long, default_value_t = 0.05)]
    pub keep_ratio: f64,
    /// Sparse: how entries are scored
    #[arg(long, value_enum, default_value = "snip")]
    pub score: ScoreRule,
    /// Sparse: select b × b tiles of the (out × in) weight instead of single entries
    #[arg(long, value_name = "B")]
    pub block_size: Option<u32>,
    /// Sparse: select once before training, or re-select during the first epoch
    #[arg(long, value_enum, default_value = "one-shot")]
    pub schedule: Schedule,
    /// Sparse, periodic: examples between re-selections
    #[arg(long, default_value_t = 100)]
    pub reselect_every: usize,
    /// Sparse: batches whose gradients are accumulated for one selection
    #[arg(long, default_value_t = 4)]
    pub score_batches: usize,
    #[arg(long, default_value_t = 8)]
    pub lora_rank: u32,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f64,
    /// AdamW weight decay [default: 0.01 for full, else 0]
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Fraction of steps with linear warm-up (then linear decay to 0)
    #[arg(long, default_value_t = 0.06)]
    pub warmup: f64,
    /// Clip the global gradient norm (0 = off)
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Evaluate every N optimizer steps (always at the end of each epoch)
    #[arg(long, value_name = "N")]
    pub eval_every: Option<usize>,
    /// Stop after N optimizer steps
    #[arg(long, value_name = "N")]
    pub max_steps: Option<usize>,
    /// Use only the first N training examples
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Write one JSON line per optimizer step (and per evaluation) to FILE
    #[arg(long, value_name = "FILE")]
    pub json_log: Option<PathBuf>,
    #[arg(long)]
    pub description: Option<String>,
    /// SPDX license expression
    #[arg(long)]
    pub license: Option<String>,
    /// Where `hf:` bases come from. Not a flag: `xpm train` fills it from the environment
    /// (`HF_ENDPOINT`, `HF_TOKEN`, `HF_HOME`), read once at the command edge.
    #[arg(skip)]
    pub hub: hub::HubConfig,
}

impl TrainOptions {
    /// Defaults for everything but the required inputs (the same as `xpm train`'s).
    pub fn new(base: String, data: PathBuf, method: Method, name: &str, out: PathBuf) -> Self {
        TrainOptions {
            base,
            data,
            eval: None,
            method,
            name: name.to_string(),
            version: semver::Version::new(0, 1, 0),
            out: Some(out),
            epochs: None,
            lr: None,
            head_lr: None,
            batch_size: 16,
            grad_accum: 1,
            max_seq_len: 128,
            seed: 0,
            targets: vec!["attn".into()],
            keep_ratio: 0.05,
            score: ScoreRule::Snip,
            block_size: None,
            schedule: Schedule::OneShot,
            reselect_every: 100,
            score_batches: 4,
            lora_rank: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            weight_decay: None,
            warmup: 0.06,
            clip: 1.0,
            eval_every: None,
            max_steps: None,
            limit: None,
            device: DeviceChoice::Cpu,
            json_log: None,
            description: None,
            license: None,
            hub: hub::HubConfig::default(),
        }
    }

    /// The artifact to write: `out`, else `NAME-VERSION.xpm` (a `/` in the name becomes `-`).
    pub fn out_path(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            PathBuf::from(format!(
                "{}-{}.xpm",
                self.name.replace('/', "-"),
                self.version
            ))
        })
    }

    pub fn lr(&self) -> f64 {
        self.lr.unwrap_or(self.method.default_lr())
    }

    /// Passes over data that gives `steps_per_epoch` optimizer steps per pass: `--epochs`, else
    /// [`auto_epochs`].
    pub fn epochs_for(&self, steps_per_epoch: usize) -> usize {
        self.epochs.unwrap_or_else(|| auto_epochs(steps_per_epoch))
    }

    pub fn weight_decay(&self) -> f64 {
        self.weight_decay.unwrap_or(match self.method {
            Method::Full => 0.01,
            _ => 0.0,
        })
    }

    fn validate(&self) -> Result<()> {
        xpm_core::format::manifest::validate_name(&self.name).map_err(|e| {
            Error::input(
                format!("invalid expert name: {e}"),
                Some("e.g. `reuters-sparse` or `team/reuters-sparse`"),
            )
        })?;
        let bad = |m: String, h: &str| Err(Error::input(m, Some(h)));
        if !(self.keep_ratio > 0.0 && self.keep_ratio <= 1.0) {
            return bad(
                format!("--keep-ratio {} is outside (0, 1]", self.keep_ratio),
                "the fraction of each target weight that is trained, e.g. 0.05",
            );
        }
        if self.epochs == Some(0) || self.batch_size == 0 || self.grad_accum == 0 {
            return bad(
                "--epochs, --batch-size and --grad-accum must be at least 1".into(),
                "e.g. --epochs 1 --batch-size 16",
            );
        }
        if self.max_seq_len < 4 {
            return bad(
                format!("--max-seq-len {} is too short", self.max_seq_len),
                "use at least 4 tokens; 128 is the default",
            );
        }
        if self.method == Method::Sparse
            && self.schedule == Schedule::OneShot
            && self.score.needs_delta()
        {
            return bad(
                format!(
                    "score rule `{}` needs a trained delta, which is zero before one-shot selection",
                    self.score.as_str()
                ),
                "use `--schedule periodic` with it, or `--score snip`",
            );
        }
        if let Some(b) = self.block_size
            && b == 0
        {
            return bad("--block-size must be at least 1".into(), "e.g. 16");
        }
        if self.method == Method::Lora && self.lora_rank == 0 {
            return bad("--lora-rank must be at least 1".into(), "e.g. 8");
        }
        if !(0.0..1.0).contains(&self.lora_dropout) || !(0.0..1.0).contains(&self.warmup) {
            return bad(
                "--lora-dropout and --warmup must be in [0, 1)".into(),
                "e.g. --lora-dropout 0.05 --warmup 0.06",
            );
        }
        Ok(())
    }
}

/// What training produced (`xpm train --json`, schemas/train.schema.json).
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct TrainReport {
    /// The written expert.
    pub out: PathBuf,
    /// `sparse`, `lora`, `full` or `head`.
    pub method: Method,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Trainable elements (adapter values or factors, and the head).
    pub trainable_params: u64,
    /// AdamW moments held: two f32 per trainable element.
    pub optimizer_state_bytes: u64,
    pub train_loss_first: f64,
    pub train_loss_last: f64,
    /// Metrics of the saved checkpoint (with `--eval`).
    pub eval: Option<Metrics>,
    /// The optimizer step whose state was saved.
    pub saved_step: usize,
    /// Median wall time of an optimizer step.
    pub seconds_per_step: f64,
}

/// One adapted layer's saved state.
#[derive(Clone)]
enum LayerState {
    Sparse { indices: Vec<u32>, values: Vec<f32> },
    Lora { a: Vec<f32>, b: Vec<f32> },
    Full { w: Vec<f32> },
}

#[derive(Clone)]
struct Snapshot {
    layers: Vec<LayerState>,
    head: Option<(Vec<f32>, Vec<f32>)>,
    step: usize,
}

/// Per sparse layer: values of entries that left the mask (they keep them and may return).
#[derive(Default)]
struct Retired(HashMap<u32, f32>);

/// The training run's live state.
struct Run<'a> {
    opts: &'a TrainOptions,
    net: Net,
    /// Indices into `net.linears()` of the target layers.
    targets: Vec<usize>,
    params: Vec<Param>,
    /// For each target layer, its range in `params`.
    layer_params: Vec<std::ops::Range<usize>>,
    retired: Vec<Retired>,
    dev: Device,
    head_lr_scale: f64,
}

/// Resolve `--targets` against the model's linear layers.
fn match_targets(names: &[String], patterns: &[String]) -> Result<Vec<usize>> {
    let mut globs = GlobSetBuilder::new();
    let (mut attn, mut mlp) = (false, false);
    for p in patterns {
        match p.as_str() {
            "attn" => attn = true,
            "mlp" => mlp = true,
            "all" => (attn, mlp) = (true, true),
            _ => {
                globs.add(Glob::new(p).map_err(|e| {
                    Error::input(format!("invalid target pattern `{p}`: {e}"), None)
                })?);
            }
        }
    }
    let globs = globs
        .build()
        .map_err(|e| Error::input(format!("invalid target patterns: {e}"), None))?;
    let out: Vec<usize> = names
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            let a = Net::is_attention(n);
            (attn && a) || (mlp && !a) || globs.is_match(n.as_str())
        })
        .map(|(i, _)| i)
        .collect();
    if out.is_empty() {
        return Err(Error::input(
            format!("--targets {} matches no linear layer", patterns.join(",")),
            Some(&format!(
                "use `attn`, `mlp`, `all` or globs over names such as `{}`",
                names.first().map(String::as_str).unwrap_or("")
            )),
        ));
    }
    Ok(out)
}

impl<'a> Run<'a> {
    /// Match the targets on `net` and install fresh adapters.
    fn new(
        opts: &'a TrainOptions,
        net: Net,
        dev: Device,
        head_lr_scale: f64,
        rng: &mut SplitMix64,
    ) -> Result<Self> {
        let names: Vec<String> = net.linears().iter().map(|l| l.name.clone()).collect();
        let targets = match opts.method {
            Method::Head => Vec::new(),
            _ => match_targets(&names, &opts.targets)?,
        };
        let mut run = Run {
            opts,
            net,
            retired: (0..targets.len()).map(|_| Retired::default()).collect(),
            targets,
            params: Vec::new(),
            layer_params: Vec::new(),
            dev,
            head_lr_scale,
        };
        run.init_adapters(rng)?;
        Ok(run)
    }

    fn sparse_k(&self, li: usize) -> usize {
        let l = self.net.linears()[li];
        xpm_core::select::keep_count(self.opts.keep_ratio, l.out_dim() * l.in_dim())
    }

    /// Install adapters on the target layers (sparse layers start empty or dense, by schedule).
    fn init_adapters(&mut self, rng: &mut SplitMix64) -> Result<()> {
        let opts = self.opts;
        let dev = self.dev.clone();
        let targets = self.targets.clone();
        for &li in &targets {
            let l = &mut self.net.linears_mut()[li];
            let (out, inn) = (l.out_dim(), l.in_dim());
            l.adapter = match opts.method {
                Method::Sparse => {
                    // Periodic: dense start. One-shot: replaced by the selection before training.
                    let n = out * inn;
                    Adapter::Sparse {
                        indices: Tensor::arange(0u32, n as u32, &dev).map_err(ce("init"))?,
                        values: Var::zeros(n, candle_core::DType::F32, &dev).map_err(ce("init"))?,
                    }
                }
                Method::Lora => {
                    let r = opts.lora_rank as usize;
                    let bound = 1.0 / (inn as f32).sqrt();
                    let a: Vec<f32> = (0..r * inn)
                        .map(|_| (rng.uniform() * 2.0 - 1.0) * bound)
                        .collect();
                    Adapter::Lora {
                        a: Var::from_tensor(
                            &Tensor::from_vec(a, (r, inn), &dev).map_err(ce("init"))?,
                        )
                        .map_err(ce("init"))?,
                        b: Var::zeros((out, r), candle_core::DType::F32, &dev)
                            .map_err(ce("init"))?,
                        scale: opts.lora_alpha / r as f64,
                        dropout: opts.lora_dropout,
                    }
                }
                Method::Full => Adapter::Full {
                    w: Var::from_tensor(&l.w0.copy().map_err(ce("init"))?).map_err(ce("init"))?,
                },
                Method::Head => Adapter::None,
            };
        }
        self.rebuild_params()
    }

    /// Rebuild the optimizer's parameter list, carrying moments of unchanged variables.
    fn rebuild_params(&mut self) -> Result<()> {
        let old: Vec<Param> = std::mem::take(&mut self.params);
        let find = |v: &Var| old.iter().position(|p| p.var.id() == v.id());
        let mut params = Vec::new();
        let mut ranges = Vec::new();
        let linears = self.net.linears();
        for &li in &self.targets {
            let start = params.len();
            for v in linears[li].vars() {
                params.push(match find(&v) {
                    Some(i) => Param {
                        var: v,
                        ..old[i].clone()
                    },
                    None => Param::new(v, true, 1.0).map_err(ce("optimizer"))?,
                });
            }
            ranges.push(start..params.len());
        }
        if let Net::Classifier { head, .. } = &self.net {
            for (v, decay) in [(head.w.clone(), true), (head.b.clone(), false)] {
                params.push(match find(&v) {
                    Some(i) => Param {
                        var: v,
                        ..old[i].clone()
                    },
                    None => Param::new(v, decay, self.head_lr_scale).map_err(ce("optimizer"))?,
                });
            }
        }
        self.params = params;
        self.layer_params = ranges;
        Ok(())
    }

    /// Accumulated ∂L/∂W of every target layer over `batches` (the scoring pass).
    fn dense_grads(&mut self, batches: &[Batch]) -> Result<Vec<Vec<f32>>> {
        let targets = self.targets.clone();
        let mut saved = Vec::new();
        let mut probes = Vec::new();
        for &li in &targets {
            let l = &mut self.net.linears_mut()[li];
            let w = Var::from_tensor(&l.effective_weight().map_err(ce("score"))?)
                .map_err(ce("score"))?;
            probes.push(w.clone());
            saved.push(std::mem::replace(&mut l.adapter, Adapter::Probe { w }));
        }
        let mut acc: Vec<Option<Tensor>> = vec![None; targets.len()];
        let mut result = Ok(());
        for b in batches {
            let mut step = || -> candle_core::Result<()> {
                let (_, g) = self.net.loss_and_grads(b, None, 1.0)?;
                for (slot, p) in acc.iter_mut().zip(&probes) {
                    if let Some(g) = g.get(p.as_tensor()) {
                        *slot = Some(match slot.take() {
                            None => g.clone(),
                            Some(a) => (a + g)?,
                        });
                    }
                }
                Ok(())
            };
            if let Err(e) = step() {
                result = Err(e);
                break;
            }
        }
        for (&li, a) in targets.iter().zip(saved) {
            self.net.linears_mut()[li].adapter = a;
        }
        result.map_err(ce("score"))?;
        acc.into_iter()
            .map(|g| match g {
                Some(g) => to_vec(&g),
                None => Err(Error::input(
                    "a target layer received no gradient while scoring",
                    Some("this is a bug in xpm; please report it"),
                )),
            })
            .collect()
    }

    /// (Re-)select every sparse layer's mask. Values of dropped entries are retired (kept),
    /// returning entries get their retired values back; moments carry over for kept entries.
    fn reselect(&mut self, batches: &[Batch], rng: &mut SplitMix64) -> Result<()> {
        let opts = self.opts;
        let grads = if opts.score.needs_gradient() {
            self.dense_grads(batches)?
        } else {
            vec![Vec::new(); self.targets.len()]
        };
        for (t, &li) in self.targets.clone().iter().enumerate() {
            let k = self.sparse_k(li);
            let (old_idx, old_vals, w, out, inn) = {
                let l = self.net.linears()[li];
                let Adapter::Sparse { indices, values } = &l.adapter else {
                    unreachable!("sparse method")
                };
                let idx: Vec<u32> = indices.to_vec1().map_err(ce("reselect"))?;
                let vals = to_vec(values.as_tensor())?;
                let w = to_vec(&l.effective_weight().map_err(ce("reselect"))?)?;
                (idx, vals, w, l.out_dim(), l.in_dim())
            };
            let mut delta = vec![0f32; out * inn];
            for (&i, &v) in &self.retired[t].0 {
                delta[i as usize] = v;
            }
            for (&i, &v) in old_idx.iter().zip(&old_vals) {
                delta[i as usize] = v;
            }
            let scores = mask::score(opts.score, &grads[t], &w, &delta, rng);
            let block = opts.block_size.map(|b| b as usize);
            let new_idx = mask::select(&scores, out, inn, k, block);
            // Carry moments of kept entries (both index lists are sorted).
            let range = self.layer_params[t].clone();
            let (old_m, old_v) = (
                to_vec(&self.params[range.start].m)?,
                to_vec(&self.params[range.start].v)?,
            );
            let (mut m, mut v) = (vec![0f32; new_idx.len()], vec![0f32; new_idx.len()]);
            let mut j = 0;
            for (n, &i) in new_idx.iter().enumerate() {
                while j < old_idx.len() && old_idx[j] < i {
                    j += 1;
                }
                if j < old_idx.len() && old_idx[j] == i {
                    m[n] = old_m[j];
                    v[n] = old_v[j];
                }
            }
            let retired = &mut self.retired[t].0;
            for (&i, &val) in old_idx.iter().zip(&old_vals) {
                if val != 0.0 {
                    retired.insert(i, val);
                }
            }
            let vals: Vec<f32> = new_idx.iter().map(|&i| delta[i as usize]).collect();
            for i in &new_idx {
                retired.remove(i);
            }
            let dev = self.dev.clone();
            let n = new_idx.len();
            let values =
                Var::from_tensor(&Tensor::from_vec(vals, n, &dev).map_err(ce("reselect"))?)
                    .map_err(ce("reselect"))?;
            let indices = Tensor::from_vec(new_idx, n, &dev).map_err(ce("reselect"))?;
            self.net.linears_mut()[li].adapter = Adapter::Sparse {
                indices,
                values: values.clone(),
            };
            self.params[range.start] = Param {
                var: values,
                m: Tensor::from_vec(m, n, &dev).map_err(ce("reselect"))?,
                v: Tensor::from_vec(v, n, &dev).map_err(ce("reselect"))?,
                decay: true,
                lr_scale: 1.0,
            };
        }
        Ok(())
    }

    fn snapshot(&self, step: usize) -> Result<Snapshot> {
        let linears = self.net.linears();
        let mut layers = Vec::new();
        for &li in &self.targets {
            layers.push(match &linears[li].adapter {
                Adapter::Sparse { indices, values } => LayerState::Sparse {
                    indices: indices.to_vec1().map_err(ce("snapshot"))?,
                    values: to_vec(values.as_tensor())?,
                },
                Adapter::Lora { a, b, .. } => LayerState::Lora {
                    a: to_vec(a.as_tensor())?,
                    b: to_vec(b.as_tensor())?,
                },
                Adapter::Full { w } => LayerState::Full {
                    w: to_vec(w.as_tensor())?,
                },
                Adapter::None | Adapter::Probe { .. } => unreachable!("targets are adapted"),
            });
        }
        let head = match &self.net {
            Net::Classifier { head, .. } => {
                Some((to_vec(head.w.as_tensor())?, to_vec(head.b.as_tensor())?))
            }
            Net::CausalLm { .. } => None,
        };
        Ok(Snapshot { layers, head, step })
    }

    fn trainable(&self) -> (u64, u64) {
        let n: u64 = self
            .params
            .iter()
            .map(|p| p.var.as_tensor().elem_count() as u64)
            .sum();
        let bytes: u64 = self.params.iter().map(Param::state_bytes).sum();
        (n, bytes)
    }

    /// One optimizer step over micro-batches; returns the mean loss.
    fn train_step(
        &mut self,
        micro: &[Batch],
        opt: &AdamW,
        step: usize,
        rng: &mut SplitMix64,
    ) -> Result<(f64, f64)> {
        let mut acc = Accum::new(self.params.len());
        let mut loss_sum = 0f64;
        for b in micro {
            let (loss, g) = self
                .net
                .loss_and_grads(b, Some(rng), 1.0 / micro.len() as f64)
                .map_err(ce("training step"))?;
            loss_sum += loss as f64;
            acc.add(&self.params, &g).map_err(ce("backward"))?;
        }
        let norm = optim::step(opt, &mut self.params, &acc, step).map_err(ce("step"))?;
        Ok((loss_sum / micro.len() as f64, norm))
    }
}

/// How many threads Candle's element-wise ops should use on a machine with `cores` cores, when
/// it differs from Candle's default; the command edge applies it (`CANDLE_NUM_THREADS`) before
/// any tensor operation, unless the user set that variable.
///
/// Candle runs element-wise ops on its own pool (one worker per core but one, spinning up to
/// 25,000 pauses between ops) and matrix products on rayon's pool (one thread per core). On a
/// machine with two cores or fewer the spinning worker takes a core from the matrix products
/// that follow every element-wise op; there, element-wise ops run on the calling thread
/// instead. On the 2-core benchmark machine this made a MiniLM step about 9 % faster
/// (docs/benchmarks.md, "Training").
pub fn element_wise_threads(cores: usize) -> Option<usize> {
    (cores <= 2).then_some(1)
}

/// Train and write the expert. The artifact appears only when everything succeeded.
///
/// Three stages, each in its own module: [`prepare`] (check the options, the model and the
/// data), [`trainer`] (the optimizer loop, evaluations and the best snapshot), [`export`] (the
/// saved state as an artifact).
pub fn train(opts: &TrainOptions, home: &XpmHome, printer: &Printer) -> Result<TrainReport> {
    let input = prepare::prepare(opts, home, printer)?;
    let fit = trainer::Trainer::new(opts, &input, printer)?.fit()?;
    export::write_expert(opts, &input, &fit, printer)
}

fn pct(x: f64) -> String {
    format!("{} %", (x * 1000.0).round() / 10.0)
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bert::Bert;
    use crate::bert::tests::{tiny_config, tiny_weights};
    use crate::data::{Encoded, Task};
    use crate::model::make_batch;
    use crate::nn::Head;

    fn run_for(opts: &TrainOptions) -> (Run<'_>, Vec<Batch>) {
        let dev = Device::Cpu;
        let c = tiny_config();
        let bert = Bert::load(tiny_weights(3), c).unwrap();
        let mut rng = SplitMix64(1);
        let head = Head::init(3, 32, &mut rng, &dev).unwrap();
        let net = Net::Classifier { bert, head };
        let run = Run::new(opts, net, dev.clone(), 1.0, &mut rng).unwrap();
        let data: Vec<Encoded> = (0..8u32)
            .map(|i| Encoded {
                ids: (0..3 + i % 4).map(|j| 1 + (i * 7 + j * 3) % 37).collect(),
                target: i % 3,
            })
            .collect();
        let batches = data::batches(8, 4, None)
            .iter()
            .map(|idx| make_batch(&data, idx, Task::Classification, 0, &dev).unwrap())
            .collect();
        (run, batches)
    }

    fn opts(method: Method) -> TrainOptions {
        let mut o = TrainOptions::new(String::new(), PathBuf::new(), method, "t", PathBuf::new());
        o.keep_ratio = 0.1;
        o.targets = vec!["all".into()];
        o
    }

    /// `--method head` trains the head alone: no adapter, every linear layer stays frozen.
    #[test]
    fn head_method_trains_only_the_head() {
        let o = opts(Method::Head);
        let (run, batches) = run_for(&o);
        assert!(run.targets.is_empty());
        assert!(
            run.net
                .linears()
                .iter()
                .all(|l| matches!(l.adapter, Adapter::None))
        );
        assert_eq!(run.params.len(), 2, "classifier weight and bias");
        assert_eq!(run.trainable().0, 3 * 32 + 3);
        let (loss, _) = run.net.loss(&batches[0], None).unwrap();
        let g = loss.backward().unwrap();
        for p in &run.params {
            assert!(g.get(p.var.as_tensor()).is_some());
        }
    }

    /// The failure to guard against is a silent no-op trainer: every trainable tensor must get
    /// a non-zero gradient, and an update must leave the base weights as they were.
    #[test]
    fn every_trainable_tensor_gets_a_gradient_and_w0_never_changes() {
        for method in [Method::Sparse, Method::Lora, Method::Full] {
            let o = opts(method);
            let (mut run, batches) = run_for(&o);
            let mut rng = SplitMix64(2);
            if method == Method::Sparse {
                run.reselect(&batches, &mut rng).unwrap();
            }
            let w0: Vec<Vec<f32>> = run
                .net
                .linears()
                .iter()
                .map(|l| to_vec(&l.w0).unwrap())
                .collect();
            let (loss, _) = run.net.loss(&batches[0], None).unwrap();
            let g = loss.backward().unwrap();
            let n_layers = run.targets.len();
            assert_eq!(n_layers, 12, "tiny BERT: 2 layers × 6 linears");
            // LoRA's B starts at zero, so A gets no gradient on the first step; B must.
            for (i, p) in run.params.iter().enumerate() {
                let grad = g.get(p.var.as_tensor());
                let lora_a = method == Method::Lora && i < 2 * n_layers && i % 2 == 0;
                if lora_a {
                    continue;
                }
                let grad = grad.unwrap_or_else(|| panic!("{method:?}: param {i} has no gradient"));
                let norm = grad
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(norm > 0.0, "{method:?}: param {i} has a zero gradient");
            }
            // Only adapter values and the head are trainable: their count is what we expect.
            let expected: usize = match method {
                Method::Sparse => run
                    .targets
                    .iter()
                    .map(|&li| run.sparse_k(li))
                    .sum::<usize>(),
                Method::Lora => run
                    .net
                    .linears()
                    .iter()
                    .map(|l| 8 * (l.in_dim() + l.out_dim()))
                    .sum(),
                Method::Full => run
                    .net
                    .linears()
                    .iter()
                    .map(|l| l.in_dim() * l.out_dim())
                    .sum(),
                Method::Head => unreachable!("not in this loop"),
            } + 3 * 32
                + 3;
            assert_eq!(run.trainable().0 as usize, expected, "{method:?}");
            let opt = AdamW {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
                clip: 1.0,
                warmup_steps: 0,
                total_steps: 2,
            };
            let before = loss.to_scalar::<f32>().unwrap();
            for s in 0..2 {
                run.train_step(&batches[..1], &opt, s, &mut rng).unwrap();
            }
            let (after, _) = run.net.loss(&batches[0], None).unwrap();
            assert!(
                after.to_scalar::<f32>().unwrap() < before,
                "{method:?}: loss did not fall"
            );
            for (l, w) in run.net.linears().iter().zip(&w0) {
                assert_eq!(
                    &to_vec(&l.w0).unwrap(),
                    w,
                    "{method:?}: W0 of {} changed",
                    l.name
                );
            }
            if method == Method::Sparse {
                // Optimizer moments have length nnz, not numel.
                let state: u64 = run.params.iter().map(Param::state_bytes).sum();
                assert_eq!(state, 8 * expected as u64);
            }
        }
    }

    fn sparse_state(run: &Run, t: usize) -> (Vec<u32>, Vec<f32>) {
        let Adapter::Sparse { indices, values } = &run.net.linears()[run.targets[t]].adapter else {
            panic!("sparse")
        };
        (
            indices.to_vec1().unwrap(),
            to_vec(values.as_tensor()).unwrap(),
        )
    }

    fn test_opt() -> AdamW {
        AdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            clip: 1.0,
            warmup_steps: 0,
            total_steps: 4,
        }
    }

    /// The periodic schedule starts dense: every entry of every target layer is trainable, at
    /// value 0 (ΔW = 0). A grad-delta selection then keeps exactly k entries per layer: the top
    /// k of −G ⊙ ΔW over the trained dense delta, with the values they were trained to.
    #[test]
    fn periodic_starts_dense_and_grad_delta_keeps_exactly_k() {
        let mut o = opts(Method::Sparse);
        o.schedule = Schedule::Periodic;
        o.score = ScoreRule::GradDelta;
        let (mut run, batches) = run_for(&o);
        for t in 0..run.targets.len() {
            let l = run.net.linears()[run.targets[t]];
            let (idx, vals) = sparse_state(&run, t);
            let numel = l.out_dim() * l.in_dim();
            assert_eq!(idx, (0..numel as u32).collect::<Vec<_>>(), "dense start");
            assert!(vals.iter().all(|&v| v == 0.0));
        }
        // Even with ΔW = 0 (every score ties), a selection keeps exactly k.
        let mut probe = run_for(&o).0;
        probe.reselect(&batches, &mut SplitMix64(3)).unwrap();
        for t in 0..probe.targets.len() {
            assert_eq!(
                sparse_state(&probe, t).0.len(),
                probe.sparse_k(probe.targets[t])
            );
        }
        let mut rng = SplitMix64(2);
        for s in 0..2 {
            run.train_step(&batches[..1], &test_opt(), s, &mut rng)
                .unwrap();
        }
        let dense: Vec<Vec<f32>> = (0..run.targets.len())
            .map(|t| sparse_state(&run, t).1)
            .collect();
        assert!(dense.iter().all(|d| d.iter().any(|&v| v != 0.0)));
        let grads = run.dense_grads(&batches).unwrap();
        run.reselect(&batches, &mut rng).unwrap();
        for t in 0..run.targets.len() {
            let li = run.targets[t];
            let (out, inn) = {
                let l = run.net.linears()[li];
                (l.out_dim(), l.in_dim())
            };
            let k = run.sparse_k(li);
            let scores: Vec<f32> = grads[t]
                .iter()
                .zip(&dense[t])
                .map(|(g, d)| -(g * d))
                .collect();
            let want = mask::select(&scores, out, inn, k, None);
            let (idx, vals) = sparse_state(&run, t);
            assert_eq!(idx.len(), k, "exactly k in layer {t}");
            assert_eq!(idx, want, "layer {t}: the top k of −G ⊙ ΔW");
            for (i, v) in idx.iter().zip(&vals) {
                assert_eq!(
                    *v, dense[t][*i as usize],
                    "layer {t}, entry {i} kept its value"
                );
            }
        }
    }

    /// Entries that stay in the mask keep their AdamW moments; entries that join start with
    /// zero moments.
    #[test]
    fn reselection_carries_moments_of_kept_entries() {
        let mut o = opts(Method::Sparse);
        o.schedule = Schedule::Periodic;
        o.score = ScoreRule::Random;
        o.targets = vec!["*.layer.0.attention.self.query.weight".into()];
        let (mut run, batches) = run_for(&o);
        let mut rng = SplitMix64(5);
        run.reselect(&batches, &mut rng).unwrap();
        let (idx1, _) = sparse_state(&run, 0);
        let p = run.layer_params[0].start;
        let n = idx1.len();
        let m: Vec<f32> = idx1.iter().map(|&i| 1.0 + i as f32).collect();
        let v: Vec<f32> = idx1.iter().map(|&i| 2.0 + i as f32).collect();
        run.params[p].m = Tensor::from_vec(m, n, &Device::Cpu).unwrap();
        run.params[p].v = Tensor::from_vec(v, n, &Device::Cpu).unwrap();
        run.reselect(&batches, &mut rng).unwrap();
        let (idx2, _) = sparse_state(&run, 0);
        let (m2, v2) = (
            to_vec(&run.params[p].m).unwrap(),
            to_vec(&run.params[p].v).unwrap(),
        );
        let (mut stayed, mut joined) = (0, 0);
        for (n, i) in idx2.iter().enumerate() {
            if idx1.contains(i) {
                stayed += 1;
                assert_eq!((m2[n], v2[n]), (1.0 + *i as f32, 2.0 + *i as f32));
            } else {
                joined += 1;
                assert_eq!((m2[n], v2[n]), (0.0, 0.0));
            }
        }
        assert!(stayed > 0 && joined > 0, "{stayed} stayed, {joined} joined");
    }

    /// A snapshot holds the mask with its values: re-selecting afterwards changes neither.
    #[test]
    fn snapshot_keeps_its_own_mask() {
        let mut o = opts(Method::Sparse);
        o.schedule = Schedule::Periodic;
        o.score = ScoreRule::Random;
        let (mut run, batches) = run_for(&o);
        let mut rng = SplitMix64(4);
        run.reselect(&batches, &mut rng).unwrap();
        run.train_step(&batches[..1], &test_opt(), 0, &mut rng)
            .unwrap();
        let snap = run.snapshot(1).unwrap();
        let before: Vec<(Vec<u32>, Vec<f32>)> = (0..run.targets.len())
            .map(|t| sparse_state(&run, t))
            .collect();
        run.reselect(&batches, &mut rng).unwrap();
        assert_ne!(sparse_state(&run, 0).0, before[0].0, "the live mask moved");
        for (t, l) in snap.layers.iter().enumerate() {
            let LayerState::Sparse { indices, values } = l else {
                panic!("sparse")
            };
            assert_eq!((indices, values), (&before[t].0, &before[t].1), "layer {t}");
        }
    }

    #[test]
    fn reselection_keeps_values_of_dropped_entries() {
        let mut o = opts(Method::Sparse);
        o.score = ScoreRule::Random;
        o.targets = vec!["*.layer.0.attention.self.query.weight".into()];
        let (mut run, batches) = run_for(&o);
        let mut rng = SplitMix64(9);
        run.reselect(&batches, &mut rng).unwrap();
        let k = run.sparse_k(run.targets[0]);
        let get = |run: &Run| -> (Vec<u32>, Vec<f32>) {
            let Adapter::Sparse { indices, values } = &run.net.linears()[run.targets[0]].adapter
            else {
                panic!("sparse")
            };
            (
                indices.to_vec1().unwrap(),
                to_vec(values.as_tensor()).unwrap(),
            )
        };
        let (idx1, _) = get(&run);
        assert_eq!(idx1.len(), k);
        // Give every kept entry a recognisable value: 1000 + its flat index.
        let vals: Vec<f32> = idx1.iter().map(|&i| 1000.0 + i as f32).collect();
        let Adapter::Sparse { values, .. } = &run.net.linears()[run.targets[0]].adapter else {
            unreachable!()
        };
        values
            .set(&Tensor::new(vals, &Device::Cpu).unwrap())
            .unwrap();
        // Re-select (random scores, another draw): some entries leave, some stay.
        run.reselect(&batches, &mut rng).unwrap();
        let (idx2, vals2) = get(&run);
        assert_eq!(idx2.len(), k, "exactly k after re-selection");
        let dropped: Vec<u32> = idx1.iter().filter(|i| !idx2.contains(i)).copied().collect();
        assert!(!dropped.is_empty());
        for (i, v) in idx2.iter().zip(&vals2) {
            let want = if idx1.contains(i) {
                1000.0 + *i as f32
            } else {
                0.0
            };
            assert_eq!(*v, want, "entry {i}");
        }
        for i in &dropped {
            assert_eq!(run.retired[0].0.get(i), Some(&(1000.0 + *i as f32)));
        }
        // Entries that come back get their values back: re-select until one returns.
        for _ in 0..20 {
            run.reselect(&batches, &mut rng).unwrap();
            let (idx3, vals3) = get(&run);
            if let Some(p) = idx3.iter().position(|i| dropped.contains(i)) {
                assert_eq!(vals3[p], 1000.0 + idx3[p] as f32);
                return;
            }
        }
        panic!("no dropped entry came back in 20 re-selections");
    }
}
