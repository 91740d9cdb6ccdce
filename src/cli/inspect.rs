use std::path::PathBuf;

use anyhow::Context as _;

use super::Context;
use crate::ops::inspect;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The artifact to inspect
    artifact: PathBuf,
    /// Print the versioned JSON report (schemas/inspect.schema.json)
    #[arg(long)]
    json: bool,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    let report = inspect::inspect(&a.artifact)
        .with_context(|| format!("cannot inspect `{}`", a.artifact.display()))?;
    if a.json {
        ctx.printer.out(serde_json::to_string_pretty(&report)?);
    } else {
        ctx.printer.out(inspect::render(&report).trim_end());
    }
    Ok(())
}
