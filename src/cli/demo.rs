use std::path::PathBuf;

use anyhow::Context as _;

use super::Context;
use crate::ops::inspect::human_bytes;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Working directory for the demo's files [default: $XPM_HOME/demo]
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    crate::alloc::configure();
    // SAFETY: the first thing the command does; `main` started no thread before it.
    unsafe { super::configure_training_threads() };
    let dir = a
        .dir
        .unwrap_or_else(|| crate::ops::demo::default_dir(&ctx.home));
    let s = crate::ops::demo::demo(&dir, &ctx.home, &ctx.printer)
        .with_context(|| format!("the demo failed in `{}`", dir.display()))?;
    ctx.printer.out(format!(
        "demo complete: {} holds {} sparse tensors ({} entries) in {} instead of {} dense; \
         it keeps {:.1} % of the fine-tuning delta's energy. Trained experts: {}. Files are in {}",
        s.artifact.display(),
        s.tensors,
        s.nnz,
        human_bytes(s.file_size),
        human_bytes(s.dense_bytes),
        s.energy_kept * 100.0,
        s.trained
            .iter()
            .map(|(m, a)| format!("{m} {:.1} % accuracy", a * 100.0))
            .collect::<Vec<_>>()
            .join(", "),
        s.dir.display()
    ));
    Ok(())
}
