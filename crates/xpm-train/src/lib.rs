//! `xpm train`: sparse experts (the paper's method), LoRA and full fine-tuning in one trainer.
//!
//! One data pipeline, one optimizer and one loop for every method, so comparisons are fair;
//! only the adapter on the target layers differs (METHOD.md). Sparse training keeps, per
//! layer, a values vector of length nnz scattered into the frozen base weight; its AdamW
//! moments have length nnz too. The base weights are never modified.

pub mod bert;
pub mod data;
pub mod eval;
pub mod fused;
pub mod hub;
mod linear;
pub mod llama;
pub mod mask;
pub mod model;
pub mod nn;
pub mod optim;
pub mod toy;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use globset::{Glob, GlobSetBuilder};

use data::{Dataset, Task};
use mask::ScoreRule;
use model::{Batch, DeviceChoice, Metrics, ModelDir, Net, ce, make_batch, to_vec};
use nn::Adapter;
use optim::{Accum, AdamW, Param};
use xpm_core::error::{Error, IoResultExt, Result};
use xpm_core::format::manifest::{
    BaseModel, ExpertKind, Manifest, Provenance, ProvenanceInput, Selection, Training,
};
use xpm_core::format::{ArtifactWriter, Content, Dtype, TensorData, encode_tensor};
use xpm_core::home::XpmHome;
use xpm_core::printer::Printer;
use xpm_core::rng::SplitMix64;

/// The adapter trained on the target layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    Sparse,
    Lora,
    Full,
    /// Only the classification head on the frozen base (a linear probe: the "base + head"
    /// baseline, and the head for evaluating a merge on a task it was not merged from).
    Head,
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
            Method::Head => 1e-3,
        }
    }
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

/// Everything `train` needs.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// A model directory, or `hf:ORG/NAME[@REV]`.
    pub base: String,
    pub data: PathBuf,
    pub eval: Option<PathBuf>,
    pub method: Method,
    pub name: String,
    pub version: semver::Version,
    pub out: PathBuf,
    pub epochs: usize,
    pub lr: Option<f64>,
    /// Learning rate of the classification head (default: max(lr, 1e-3)).
    pub head_lr: Option<f64>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_seq_len: usize,
    pub seed: u64,
    /// `attn` (default), `mlp`, `all`, or glob patterns over weight names.
    pub targets: Vec<String>,
    pub keep_ratio: f64,
    pub score: ScoreRule,
    pub block_size: Option<u32>,
    pub schedule: Schedule,
    pub reselect_every: usize,
    pub score_batches: usize,
    pub lora_rank: u32,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub weight_decay: Option<f64>,
    pub warmup: f64,
    pub clip: f64,
    /// Evaluate every N optimizer steps (and at the end of each epoch).
    pub eval_every: Option<usize>,
    /// Stop after this many optimizer steps (for smoke tests and benchmarks).
    pub max_steps: Option<usize>,
    /// Use at most this many training examples (the first N of the file).
    pub limit: Option<usize>,
    pub device: DeviceChoice,
    pub json_log: Option<PathBuf>,
    pub description: Option<String>,
    pub license: Option<String>,
}

impl TrainOptions {
    /// Defaults for everything but the required inputs.
    pub fn new(base: String, data: PathBuf, method: Method, name: &str, out: PathBuf) -> Self {
        TrainOptions {
            base,
            data,
            eval: None,
            method,
            name: name.to_string(),
            version: semver::Version::new(0, 1, 0),
            out,
            epochs: 1,
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
        }
    }

    pub fn lr(&self) -> f64 {
        self.lr.unwrap_or(self.method.default_lr())
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
        if self.epochs == 0 || self.batch_size == 0 || self.grad_accum == 0 {
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
    /// `sparse`, `lora` or `full`.
    pub method: String,
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
                let (loss, _) = self.net.loss(b, None)?;
                let g = loss.backward()?;
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
            let (loss, _) = self.net.loss(b, Some(rng)).map_err(ce("forward"))?;
            loss_sum += loss.to_scalar::<f32>().map_err(ce("forward"))? as f64;
            let scaled = (loss / micro.len() as f64).map_err(ce("backward"))?;
            let g = scaled.backward().map_err(ce("backward"))?;
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
pub fn train(opts: &TrainOptions, home: &XpmHome, printer: &Printer) -> Result<TrainReport> {
    opts.validate()?;
    let (model_dir, base_id) = hub::resolve_base(&opts.base, home, printer)?;
    let mut inputs = xpm_core::fsutil::files_of(&model_dir);
    inputs.extend([opts.data.clone()].into_iter().chain(opts.eval.clone()));
    let inputs: Vec<&std::path::Path> = inputs.iter().map(PathBuf::as_path).collect();
    xpm_core::fsutil::check_outputs(&[("-o", &opts.out)], &inputs)?;
    xpm_core::fsutil::announce_new_parents(&[("-o", &opts.out)], printer);
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
    let labels = train_data.labels();
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
    }
    let dev = model::device(opts.device)?;
    printer.status("Hashing", format!("base model `{}`", model_dir.display()));
    let base_digest = md.checkpoint.digest(Some(&home.cache))?;
    let train_enc = md.encode(&train_data.examples, &labels, opts.max_seq_len, &opts.data)?;
    let eval_enc = match (&eval_data, &opts.eval) {
        (Some(d), Some(p)) => Some(md.encode(&d.examples, &labels, opts.max_seq_len, p)?),
        _ => None,
    };
    let mut rng = SplitMix64(opts.seed);
    let net = model::build_net(&md, &dev, labels.len(), None, &mut rng)?;
    let names: Vec<String> = net.linears().iter().map(|l| l.name.clone()).collect();
    let lr = opts.lr();
    let head_lr = opts.head_lr.unwrap_or(lr.max(1e-3));
    let mut run = Run::new(opts, net, dev.clone(), head_lr / lr, &mut rng)?;
    let pad = md.pad_id();
    let steps_per_epoch = train_enc
        .len()
        .div_ceil(opts.batch_size)
        .div_ceil(opts.grad_accum);
    let mut total_steps = steps_per_epoch * opts.epochs;
    if let Some(m) = opts.max_steps {
        total_steps = total_steps.min(m);
    }
    let opt = AdamW {
        lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: opts.weight_decay(),
        clip: opts.clip,
        warmup_steps: ((total_steps as f64) * opts.warmup).round() as usize,
        total_steps,
    };
    let mut log = match &opts.json_log {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).at("create", p)?,
        )),
        None => None,
    };
    let mut log_line = |v: serde_json::Value| -> Result<()> {
        if let Some(w) = log.as_mut() {
            writeln!(w, "{v}")
                .and_then(|_| w.flush())
                .map_err(|e| Error::io("write", opts.json_log.as_ref().expect("set"), e))?;
        }
        Ok(())
    };

    // One-shot selection before training.
    let mut data_rng = SplitMix64(opts.seed ^ 0x5eed_da7a);
    if opts.method == Method::Sparse && opts.schedule == Schedule::OneShot {
        let t0 = Instant::now();
        let order = data::batches(
            train_enc.len(),
            opts.batch_size,
            Some(&mut data_rng.clone()),
        );
        let sb: Vec<Batch> = order
            .iter()
            .take(opts.score_batches.max(1))
            .map(|idx| make_batch(&train_enc, idx, task, pad, &dev))
            .collect::<candle_core::Result<_>>()
            .map_err(ce("batch"))?;
        run.reselect(&sb, &mut rng)?;
        printer.status(
            "Selected",
            format!(
                "{} of each target weight by `{}` over {} batch(es) in {:.1}s",
                pct(opts.keep_ratio),
                opts.score.as_str(),
                sb.len(),
                t0.elapsed().as_secs_f64()
            ),
        );
    }
    let (trainable, _) = run.trainable();
    printer.status(
        "Training",
        format!(
            "{} on `{}` ({} layers, {} trainable parameters): {} examples, {} step(s)",
            opts.method.as_str(),
            base_id,
            run.targets.len(),
            trainable,
            train_enc.len(),
            total_steps
        ),
    );
    let pb = printer.progress(total_steps as u64, "Training");
    let mut step = 0usize;
    let mut first_loss = None;
    let mut last_loss = f64::NAN;
    let mut best: Option<(f64, Snapshot, Metrics)> = None;
    let mut examples_seen = 0usize;
    let mut next_reselect = opts.reselect_every;
    let mut step_times = Vec::new();
    // Under the periodic schedule the mask changes until the end of the first epoch: only
    // evaluations after it is frozen can pick the saved state (the saved mask must be the one
    // that belongs to the saved values, and the dense start is no sparse expert).
    let mut frozen = !(opts.method == Method::Sparse && opts.schedule == Schedule::Periodic);
    let mut recent: std::collections::VecDeque<Batch> = std::collections::VecDeque::new();
    let eval_now = |run: &Run,
                    step: usize,
                    candidate: bool,
                    log_line: &mut dyn FnMut(serde_json::Value) -> Result<()>,
                    best: &mut Option<(f64, Snapshot, Metrics)>|
     -> Result<()> {
        let Some(enc) = &eval_enc else { return Ok(()) };
        let m = model::evaluate(
            &run.net,
            enc,
            task,
            labels.len(),
            opts.batch_size.max(32),
            pad,
            &dev,
        )?;
        log_line(serde_json::json!({"event": "eval", "step": step, "metrics": m}))?;
        let line = format!(
            "step {step}: eval loss {:.4}{}",
            m.loss,
            m.accuracy
                .map(|a| format!(", accuracy {:.2} %", a * 100.0))
                .unwrap_or_default()
        );
        if printer.shows_progress() {
            pb.println(format!("{:>12} {line}", "Evaluated"));
        } else {
            printer.status("Evaluated", line);
        }
        if candidate && best.as_ref().is_none_or(|(l, _, _)| m.loss < *l) {
            *best = Some((m.loss, run.snapshot(step)?, m));
        }
        Ok(())
    };
    // The starting point: eval loss before any update (the saved state if nothing improves).
    eval_now(&run, 0, frozen, &mut log_line, &mut best)?;
    let mut last_eval = Some(0);
    // The final selection of the periodic schedule, on the most recent batches.
    let freeze = |run: &mut Run,
                  recent: &std::collections::VecDeque<Batch>,
                  rng: &mut SplitMix64|
     -> Result<()> {
        let batches: Vec<Batch> = recent.iter().cloned().collect();
        run.reselect(&batches, rng)
    };
    'epochs: for epoch in 0..opts.epochs {
        let order = data::batches(train_enc.len(), opts.batch_size, Some(&mut data_rng));
        for chunk in order.chunks(opts.grad_accum) {
            if step >= total_steps {
                break 'epochs;
            }
            let t0 = Instant::now();
            let micro: Vec<Batch> = chunk
                .iter()
                .map(|idx| make_batch(&train_enc, idx, task, pad, &dev))
                .collect::<candle_core::Result<_>>()
                .map_err(ce("batch"))?;
            let (loss, norm) = run.train_step(&micro, &opt, step, &mut rng)?;
            if !loss.is_finite() {
                return Err(Error::input(
                    format!("the training loss became {loss} at step {step}"),
                    Some(
                        "lower --lr, or clip gradients harder (a smaller --clip) and warm up longer (--warmup)",
                    ),
                ));
            }
            examples_seen += micro.iter().map(|b| b.size).sum::<usize>();
            if !frozen {
                for b in &micro {
                    recent.push_back(b.clone());
                    if recent.len() > opts.score_batches.max(1) {
                        recent.pop_front();
                    }
                }
            }
            let mut reselected = false;
            if !frozen && epoch == 0 && examples_seen >= next_reselect {
                freeze(&mut run, &recent, &mut rng)?;
                next_reselect += opts.reselect_every;
                reselected = true;
            }
            let dt = t0.elapsed().as_secs_f64();
            step_times.push(dt);
            first_loss.get_or_insert(loss);
            last_loss = loss;
            log_line(serde_json::json!({
                "step": step + 1, "epoch": epoch + 1, "loss": loss, "lr": opt.lr_at(step),
                "grad_norm": norm, "step_time_s": dt, "examples": examples_seen,
                "reselected": reselected,
            }))?;
            step += 1;
            pb.inc(1);
            pb.set_message(format!(
                "epoch {} · loss {loss:.4} · {dt:.2} s/step",
                epoch + 1
            ));
            if let Some(every) = opts.eval_every
                && step.is_multiple_of(every)
            {
                eval_now(&run, step, frozen, &mut log_line, &mut best)?;
                last_eval = Some(step);
            }
        }
        if !frozen {
            // End of the first epoch: the last selection, then the mask stays.
            freeze(&mut run, &recent, &mut rng)?;
            frozen = true;
            recent.clear();
            last_eval = None;
        }
        if last_eval != Some(step) {
            eval_now(&run, step, frozen, &mut log_line, &mut best)?;
            last_eval = Some(step);
        }
    }
    if !frozen {
        // Stopped by --max-steps inside the first epoch.
        freeze(&mut run, &recent, &mut rng)?;
        last_eval = None;
    }
    if last_eval != Some(step) {
        eval_now(&run, step, true, &mut log_line, &mut best)?;
    }
    pb.finish_and_clear();
    let (snapshot, eval_metrics) = match best {
        Some((_, s, m)) => (s, Some(m)),
        None => (run.snapshot(step)?, None),
    };
    if eval_metrics.is_some() && snapshot.step == 0 {
        printer.warn(
            "training did not lower the eval loss: the saved expert is the starting point \
             (untrained values and head); try another --lr, more data or more epochs",
        );
    }
    let (trainable_end, state_end) = run.trainable();
    let seconds_per_step = median(&mut step_times);

    // The expert.
    let mut tensors = Vec::new();
    let linears = run.net.linears();
    for (&li, st) in run.targets.iter().zip(&snapshot.layers) {
        let l = linears[li];
        let shape = vec![l.out_dim() as u64, l.in_dim() as u64];
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
        tensors.push((
            TensorData {
                name: l.name.clone(),
                shape,
                dtype: Dtype::F32,
                content,
            },
            false,
        ));
    }
    if let Some((w, b)) = &snapshot.head {
        let hidden = w.len() / labels.len();
        for (name, shape, v) in [
            (
                "classifier.weight",
                vec![labels.len() as u64, hidden as u64],
                w,
            ),
            ("classifier.bias", vec![labels.len() as u64], b),
        ] {
            tensors.push((
                TensorData {
                    name: name.into(),
                    shape,
                    dtype: Dtype::F32,
                    content: Content::Dense {
                        delta: Dtype::F32.from_f32(v),
                    },
                },
                true,
            ));
        }
    }
    let kind = match opts.method {
        Method::Sparse => ExpertKind::Sparse,
        Method::Lora => ExpertKind::Lora,
        Method::Full | Method::Head => ExpertKind::Dense,
    };
    let mut manifest = Manifest::new(
        &opts.name,
        opts.version.clone(),
        BaseModel {
            id: base_id.clone(),
            digest: base_digest.clone(),
        },
        kind,
    );
    manifest.description = opts.description.clone();
    manifest.license = opts.license.clone();
    let target_names: Vec<String> = run.targets.iter().map(|&i| names[i].clone()).collect();
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
    let mut hp = BTreeMap::new();
    for (k, v) in [
        ("epochs", serde_json::json!(opts.epochs)),
        ("lr", serde_json::json!(lr)),
        ("head_lr", serde_json::json!(head_lr)),
        ("batch_size", serde_json::json!(opts.batch_size)),
        ("grad_accum", serde_json::json!(opts.grad_accum)),
        ("max_seq_len", serde_json::json!(opts.max_seq_len)),
        ("optimizer", serde_json::json!("adamw")),
        ("betas", serde_json::json!([0.9, 0.999])),
        ("weight_decay", serde_json::json!(opts.weight_decay())),
        ("warmup", serde_json::json!(opts.warmup)),
        ("schedule", serde_json::json!("linear")),
        ("clip", serde_json::json!(opts.clip)),
        ("steps", serde_json::json!(step)),
        ("targets", serde_json::json!(target_names)),
    ] {
        hp.insert(k.to_string(), v);
    }
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
    let mut metrics = BTreeMap::from([
        (
            "train_loss_first".to_string(),
            first_loss.unwrap_or(f64::NAN),
        ),
        ("train_loss_last".to_string(), last_loss),
        ("saved_step".to_string(), snapshot.step as f64),
        ("trainable_params".to_string(), trainable_end as f64),
    ]);
    if let Some(m) = &eval_metrics {
        metrics.insert("eval_loss".into(), m.loss);
        if let Some(a) = m.accuracy {
            metrics.insert("eval_accuracy".into(), a);
        }
        if let Some(f) = m.macro_f1 {
            metrics.insert("eval_macro_f1".into(), f);
        }
        if let Some(e) = m.exact_match {
            metrics.insert("eval_exact_match".into(), e);
        }
    }
    metrics.retain(|_, v| v.is_finite());
    let mut extra = BTreeMap::from([
        ("task".to_string(), serde_json::json!(task.as_str())),
        (
            "architecture".to_string(),
            serde_json::json!(md.arch.as_str()),
        ),
        (
            "train_examples".to_string(),
            serde_json::json!(train_enc.len()),
        ),
        (
            "device".to_string(),
            serde_json::json!(if dev.is_cpu() { "cpu" } else { "cuda" }),
        ),
    ]);
    if task == Task::Classification {
        extra.insert("labels".into(), serde_json::json!(labels));
        extra.insert("pooling".into(), serde_json::json!("mean"));
        extra.insert(
            "head".into(),
            serde_json::json!(["classifier.weight", "classifier.bias"]),
        );
    }
    if let (Some(d), Some(_)) = (&eval_data, &opts.eval) {
        extra.insert("eval_data_digest".into(), serde_json::json!(d.digest));
    }
    manifest.training = Some(Training {
        method: Some(opts.method.as_str().into()),
        data_digest: Some(train_data.digest.clone()),
        seed: Some(opts.seed),
        hyperparameters: hp,
        metrics,
        extra,
    });
    manifest.provenance = Some(Provenance {
        tool: format!("xpm {}", env!("CARGO_PKG_VERSION")),
        inputs: vec![
            ProvenanceInput {
                role: "base".into(),
                name: base_id.clone(),
                digest: Some(base_digest),
            },
            ProvenanceInput {
                role: "data".into(),
                name: opts.data.display().to_string(),
                digest: Some(train_data.digest.clone()),
            },
        ],
        ..Provenance::default()
    });
    if let Some(parent) = opts.out.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).at("create directory", parent)?;
    }
    let mut writer = ArtifactWriter::create(&opts.out, 3)?;
    for (t, new) in &tensors {
        let e = encode_tensor(t, 3)?;
        writer.push(if *new { e.mark_new()? } else { e })?;
    }
    writer.finish(manifest)?;
    printer.status(
        "Wrote",
        format!(
            "{} ({} expert, {} tensors, saved step {})",
            opts.out.display(),
            opts.method.as_str(),
            tensors.len(),
            snapshot.step
        ),
    );
    Ok(TrainReport {
        out: opts.out.clone(),
        method: opts.method.as_str().to_string(),
        steps: step,
        trainable_params: trainable_end,
        optimizer_state_bytes: state_end,
        train_loss_first: first_loss.unwrap_or(f64::NAN),
        train_loss_last: last_loss,
        eval: eval_metrics,
        saved_step: snapshot.step,
        seconds_per_step,
    })
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
    use crate::data::Encoded;
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
