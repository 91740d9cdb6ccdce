use std::path::PathBuf;

use anyhow::Context as _;

use super::Context;
use super::output::OutputArgs;
use crate::ops::interop::ExportRequest;
use xpm_interop::peft_export::{ExportOptions, PeftType};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The expert: a `.xpm` file or an installed expert (`name`, `name@req`)
    expert: String,
    /// Output format (PEFT adapter directory)
    #[arg(long, value_parser = ["peft"], default_value = "peft")]
    format: String,
    /// Output directory (must not exist, or be empty)
    #[arg(short, long, value_name = "DIR")]
    out: PathBuf,
    /// The base model [default: the expert's base id, as a directory or Hub id]
    #[arg(long, value_name = "MODEL")]
    base: Option<String>,
    /// `auto`: SHiRA when every 2-D delta is sparse on a linear layer, else LoRA
    #[arg(long, value_parser = ["auto", "lora", "shira"], default_value = "auto")]
    peft_type: String,
    /// `base_model_name_or_path` of the adapter [default: the expert's base id]
    #[arg(long, value_name = "ID")]
    base_id: Option<String>,
    /// PEFT task type, e.g. SEQ_CLS, CAUSAL_LM [default: from the import, a head, or the base's architecture]
    #[arg(long, value_name = "TYPE")]
    task_type: Option<String>,
    /// Prefix for every module path, e.g. `bert.` when the base checkpoint's names lack the
    /// prefix of the model class PEFT wraps
    #[arg(long, value_name = "PREFIX", default_value = "")]
    prefix: String,
    #[command(flatten)]
    output: OutputArgs,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    // Tensor after tensor of similar sizes: keep freed memory for the next (alloc.rs).
    crate::alloc::reuse();
    let req = ExportRequest {
        expert: a.expert.clone(),
        out: a.out,
        base: a.base,
        options: ExportOptions {
            peft_type: match a.peft_type.as_str() {
                "lora" => PeftType::Lora,
                "shira" => PeftType::Shira,
                _ => PeftType::Auto,
            },
            base_id: a.base_id,
            task_type: a.task_type,
            prefix: a.prefix,
        },
    };
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let r = crate::ops::interop::export_peft(&req, &cwd, &ctx.home, &ctx.hub, &ctx.printer)
        .with_context(|| format!("cannot export `{}`", a.expert))?;
    a.output.format().print(&ctx.printer, &r, |_| {})
}
