use std::path::PathBuf;

use super::Context;
use super::output::{self, OutputArgs};
use crate::train::eval::{EvalOptions, eval};
use crate::train::model::DeviceChoice;

#[derive(Debug, clap::Args)]
#[command(mut_arg(
    "json",
    output::help("Print the result as JSON (schemas/eval.schema.json)")
))]
pub struct Args {
    /// Base model: a model directory or `hf:ORG/NAME[@REV]`
    #[arg(long, value_name = "MODEL")]
    base: String,
    /// The task's expert (`.xpm` or installed `name@req`): applied to the base, and the source
    /// of the classification head and labels
    #[arg(long, value_name = "EXPERT")]
    expert: Option<String>,
    /// A merged expert to apply instead of --expert's delta (the head still comes from --expert)
    #[arg(long, value_name = "EXPERT")]
    merged: Option<String>,
    /// Test data, JSONL
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Truncate examples to this many tokens [default: the expert's training setting]
    #[arg(long)]
    max_seq_len: Option<usize>,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceChoice,
    #[command(flatten)]
    output: OutputArgs,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    crate::alloc::configure();
    // SAFETY: the first thing the command does; `main` started no thread before it.
    unsafe { super::configure_training_threads() };
    let locate = |s: &Option<String>| -> anyhow::Result<Option<PathBuf>> {
        Ok(match s {
            Some(s) => Some(super::merge::locate_all(std::slice::from_ref(s), ctx)?.remove(0)),
            None => None,
        })
    };
    let o = EvalOptions {
        base: a.base,
        expert: locate(&a.expert)?,
        merged: locate(&a.merged)?,
        data: a.data,
        batch_size: a.batch_size.max(1),
        max_seq_len: a.max_seq_len,
        device: a.device,
        hub: ctx.hub.clone(),
    };
    let r = eval(&o, &ctx.home, &ctx.printer)?;
    a.output.format().print(&ctx.printer, &r, |r| {
        let m = &r.metrics;
        let mut line = format!("{} examples: loss {:.4}", m.examples, m.loss);
        if let Some(acc) = m.accuracy {
            line.push_str(&format!(", accuracy {:.2} %", acc * 100.0));
        }
        if let Some(f1) = m.macro_f1 {
            line.push_str(&format!(", macro-F1 {f1:.4}"));
        }
        if let Some(em) = m.exact_match {
            line.push_str(&format!(", exact match {:.2} %", em * 100.0));
        }
        ctx.printer.out(line);
    })
}
