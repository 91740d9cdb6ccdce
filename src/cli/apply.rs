use std::path::PathBuf;

use super::Context;
use super::output::OutputArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The expert to apply (`.xpm` file or installed `name@req`)
    expert: String,
    /// The base model it was made from (safetensors file or model directory)
    #[arg(long, value_name = "MODEL")]
    base: PathBuf,
    /// The new model directory (must not exist, or be empty)
    #[arg(short, long, value_name = "DIR")]
    out: PathBuf,
    /// Largest safetensors file before sharding, e.g. `5GB`, `500MB`
    #[arg(long, default_value = "5GB", value_name = "SIZE", value_parser = super::size_arg)]
    max_shard_size: u64,
    #[command(flatten)]
    output: OutputArgs,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    let expert = super::merge::locate_all(std::slice::from_ref(&a.expert), ctx)?.remove(0);
    let r = crate::ops::apply::apply(
        &a.base,
        &expert,
        &a.out,
        a.max_shard_size,
        &ctx.home,
        &ctx.printer,
    )?;
    a.output.format().print(&ctx.printer, &r, |r| {
        ctx.printer.out(format!(
            "wrote {}: {} tensors changed, {} copied, {} safetensors file(s), {} other file(s)",
            r.out.display(),
            r.changed,
            r.copied,
            r.shards,
            r.files.len()
        ))
    })
}
