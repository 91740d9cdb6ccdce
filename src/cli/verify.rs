use std::path::PathBuf;

use anyhow::Context as _;

use super::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Artifacts to verify
    #[arg(required = true)]
    artifacts: Vec<PathBuf>,
    /// Print one JSON object per artifact
    #[arg(long)]
    json: bool,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    for path in &a.artifacts {
        let r = crate::ops::verify::verify(path, &ctx.printer)
            .with_context(|| format!("verification of `{}` failed", path.display()))?;
        if a.json {
            ctx.printer.out(serde_json::to_string(&r)?);
        } else {
            ctx.printer.out(format!(
                "ok {} {}@{} {} ({} tensors, {} stored entries)",
                path.display(),
                r.name,
                r.version,
                r.sha256,
                r.tensors,
                r.nnz
            ));
        }
    }
    Ok(())
}
