use std::path::PathBuf;

use anyhow::Context as _;

use super::Context;
use super::output::{self, OutputArgs, OutputFormat};

#[derive(Debug, clap::Args)]
#[command(mut_arg("json", output::help("Print one JSON object per artifact")))]
pub struct Args {
    /// Artifacts to verify
    #[arg(required_unless_present = "store", conflicts_with = "store")]
    artifacts: Vec<PathBuf>,
    /// Verify every installed artifact in the store ($XPM_HOME) instead; exits 1 when any is
    /// damaged (`xpm install` fetches a damaged one again)
    #[arg(long)]
    store: bool,
    #[command(flatten)]
    output: OutputArgs,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    if a.store {
        return verify_store(a.output.format(), ctx);
    }
    for path in &a.artifacts {
        let r = crate::ops::verify::verify(path, &ctx.printer)
            .with_context(|| format!("verification of `{}` failed", path.display()))?;
        a.output.format().print_line(&ctx.printer, &r, |r| {
            ctx.printer.out(format!(
                "ok {} {}@{} {} ({} tensors, {} stored entries)",
                path.display(),
                r.name,
                r.version,
                r.sha256,
                r.tensors,
                r.nnz
            ))
        })?;
    }
    Ok(())
}

fn verify_store(format: OutputFormat, ctx: &Context) -> anyhow::Result<()> {
    let checks = crate::store::Store::new(&ctx.home).verify_all(&ctx.printer)?;
    for c in &checks {
        format.print_line(&ctx.printer, c, |c| match &c.problem {
            None => ctx.printer.out(format!("ok {} {}", c.id, c.path.display())),
            Some(p) => ctx.printer.out(format!("damaged {}: {p}", c.id)),
        })?;
    }
    crate::store::StoreCheck::damage(&checks)?;
    if !format.is_json() {
        ctx.printer.status(
            "Verified",
            format!("{} installed artifact(s)", checks.len()),
        );
    }
    Ok(())
}
