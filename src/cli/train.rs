use std::path::PathBuf;

use super::Context;
use super::output::{self, OutputArgs};
use crate::train::mask::ScoreRule;
use crate::train::model::DeviceChoice;
use crate::train::{Method, Schedule, TrainOptions, train};

#[derive(Debug, clap::Args)]
#[command(mut_arg("json", output::help("Print the report as JSON")))]
pub struct Args {
    /// Base model: a model directory (config.json, tokenizer.json, *.safetensors) or
    /// `hf:ORG/NAME[@REV]`
    #[arg(long, value_name = "MODEL")]
    base: String,
    /// Training data, JSONL: {"text", "label"} or {"prompt", "completion"}
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Evaluation data (same format): eval loss picks the saved checkpoint
    #[arg(long, value_name = "FILE")]
    eval: Option<PathBuf>,
    /// What to train on the target layers
    #[arg(long, value_enum, default_value = "sparse")]
    method: Method,
    /// Expert name (lowercase letters, digits, `-`, `_`, optional `namespace/`)
    #[arg(long)]
    name: String,
    /// Expert version (semver)
    #[arg(long, value_name = "SEMVER", default_value = "0.1.0")]
    version: semver::Version,
    /// Output artifact [default: NAME-VERSION.xpm]
    #[arg(short, long, value_name = "FILE")]
    out: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Peak learning rate [default: sparse 1e-3, lora 1e-3, full 5e-5]
    #[arg(long)]
    lr: Option<f64>,
    /// Learning rate of the classification head [default: max(lr, 1e-3)]
    #[arg(long)]
    head_lr: Option<f64>,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Micro-batches per optimizer step
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Truncate examples to this many tokens
    #[arg(long, default_value_t = 128)]
    max_seq_len: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Layers to adapt: `attn` (q/k/v/o), `mlp`, `all`, or globs over weight names
    #[arg(long, value_delimiter = ',', default_value = "attn")]
    targets: Vec<String>,
    /// Sparse: fraction of each target weight that is trained
    #[arg(long, default_value_t = 0.05)]
    keep_ratio: f64,
    /// Sparse: how entries are scored
    #[arg(long, value_enum, default_value = "snip")]
    score: ScoreRule,
    /// Sparse: select b × b tiles of the (out × in) weight instead of single entries
    #[arg(long, value_name = "B")]
    block_size: Option<u32>,
    /// Sparse: select once before training, or re-select during the first epoch
    #[arg(long, value_enum, default_value = "one-shot")]
    schedule: Schedule,
    /// Sparse, periodic: examples between re-selections
    #[arg(long, default_value_t = 100)]
    reselect_every: usize,
    /// Sparse: batches whose gradients are accumulated for one selection
    #[arg(long, default_value_t = 4)]
    score_batches: usize,
    #[arg(long, default_value_t = 8)]
    lora_rank: u32,
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    lora_dropout: f64,
    /// AdamW weight decay [default: 0.01 for full, else 0]
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Fraction of steps with linear warm-up (then linear decay to 0)
    #[arg(long, default_value_t = 0.06)]
    warmup: f64,
    /// Clip the global gradient norm (0 = off)
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Evaluate every N optimizer steps (always at the end of each epoch)
    #[arg(long, value_name = "N")]
    eval_every: Option<usize>,
    /// Stop after N optimizer steps
    #[arg(long, value_name = "N")]
    max_steps: Option<usize>,
    /// Use only the first N training examples
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceChoice,
    /// Write one JSON line per optimizer step (and per evaluation) to FILE
    #[arg(long, value_name = "FILE")]
    json_log: Option<PathBuf>,
    #[arg(long)]
    description: Option<String>,
    /// SPDX license expression
    #[arg(long)]
    license: Option<String>,
    #[command(flatten)]
    output: OutputArgs,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    crate::alloc::configure();
    // SAFETY: the first thing the command does; `main` started no thread before it.
    unsafe { super::configure_training_threads() };
    let out = a.out.unwrap_or_else(|| {
        PathBuf::from(format!("{}-{}.xpm", a.name.replace('/', "-"), a.version))
    });
    let mut o = TrainOptions::new(a.base, a.data, a.method, &a.name, out);
    o.eval = a.eval;
    o.version = a.version;
    o.epochs = a.epochs;
    o.lr = a.lr;
    o.head_lr = a.head_lr;
    o.batch_size = a.batch_size;
    o.grad_accum = a.grad_accum;
    o.max_seq_len = a.max_seq_len;
    o.seed = a.seed;
    o.targets = a.targets;
    o.keep_ratio = a.keep_ratio;
    o.score = a.score;
    o.block_size = a.block_size;
    o.schedule = a.schedule;
    o.reselect_every = a.reselect_every;
    o.score_batches = a.score_batches;
    o.lora_rank = a.lora_rank;
    o.lora_alpha = a.lora_alpha;
    o.lora_dropout = a.lora_dropout;
    o.weight_decay = a.weight_decay;
    o.warmup = a.warmup;
    o.clip = a.clip;
    o.eval_every = a.eval_every;
    o.max_steps = a.max_steps;
    o.limit = a.limit;
    o.device = a.device;
    o.json_log = a.json_log;
    o.description = a.description;
    o.license = a.license;
    let r = train(&o, &ctx.home, &ctx.printer)?;
    a.output.format().print(&ctx.printer, &r, |r| {
        let mut line = format!(
            "trained {} ({}): {} steps, loss {:.4} → {:.4}, {} trainable parameters, {:.2} s/step",
            r.out.display(),
            r.method,
            r.steps,
            r.train_loss_first,
            r.train_loss_last,
            r.trainable_params,
            r.seconds_per_step
        );
        if let Some(m) = &r.eval {
            line.push_str(&format!("; eval loss {:.4}", m.loss));
            if let Some(acc) = m.accuracy {
                line.push_str(&format!(", accuracy {:.2} %", acc * 100.0));
            }
            if let Some(f1) = m.macro_f1 {
                line.push_str(&format!(", macro-F1 {:.4}", f1));
            }
            if let Some(em) = m.exact_match {
                line.push_str(&format!(", exact match {:.2} %", em * 100.0));
            }
            line.push_str(&format!(" (saved step {})", r.saved_step));
        }
        ctx.printer.out(line);
    })
}
