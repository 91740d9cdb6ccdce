use std::path::PathBuf;

use anyhow::Context as _;

use super::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The artifact to unpack
    artifact: PathBuf,
    /// Output directory (must not exist, or be empty)
    #[arg(short, long, value_name = "DIR")]
    out: PathBuf,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    crate::ops::unpack::unpack(&a.artifact, &a.out, &ctx.printer)
        .with_context(|| format!("cannot unpack `{}`", a.artifact.display()))?;
    Ok(())
}
