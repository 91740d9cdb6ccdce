use std::path::PathBuf;

use anyhow::Context as _;

use super::Context;
use super::output::{self, OutputArgs};
use crate::ops::inspect;

#[derive(Debug, clap::Args)]
#[command(mut_arg(
    "json",
    output::help("Print the versioned JSON report (schemas/inspect.schema.json)")
))]
pub struct Args {
    /// The artifact to inspect
    artifact: PathBuf,
    #[command(flatten)]
    output: OutputArgs,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    let report = inspect::inspect(&a.artifact)
        .with_context(|| format!("cannot inspect `{}`", a.artifact.display()))?;
    a.output.format().print(&ctx.printer, &report, |r| {
        ctx.printer.out(inspect::render(r).trim_end())
    })
}
