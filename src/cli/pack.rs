use std::path::PathBuf;

use anyhow::Context as _;

use super::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Unpacked expert directory (`manifest.json` + `tensors.safetensors`)
    dir: PathBuf,
    /// Output artifact
    #[arg(short, long, value_name = "FILE")]
    out: PathBuf,
    /// zstd level (1–22)
    #[arg(long, default_value_t = crate::format::artifact::DEFAULT_LEVEL, value_parser = clap::value_parser!(i32).range(1..=22))]
    level: i32,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    crate::ops::pack::pack(&a.dir, &a.out, a.level, &ctx.printer)
        .with_context(|| format!("cannot pack `{}`", a.dir.display()))?;
    Ok(())
}
