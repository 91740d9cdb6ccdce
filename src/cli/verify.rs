use std::path::PathBuf;

use anyhow::Context as _;

use super::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Artifacts to verify
    #[arg(required_unless_present = "store", conflicts_with = "store")]
    artifacts: Vec<PathBuf>,
    /// Verify every installed artifact in the store ($XPM_HOME) instead; exits 1 when any is
    /// damaged (`xpm install` fetches a damaged one again)
    #[arg(long)]
    store: bool,
    /// Print one JSON object per artifact
    #[arg(long)]
    json: bool,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    if a.store {
        return verify_store(a.json, ctx);
    }
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

fn verify_store(json: bool, ctx: &Context) -> anyhow::Result<()> {
    let checks = crate::store::Store::new(&ctx.home).verify_all(&ctx.printer)?;
    for c in &checks {
        if json {
            ctx.printer.out(serde_json::to_string(c)?);
        } else {
            match &c.problem {
                None => ctx.printer.out(format!("ok {} {}", c.id, c.path.display())),
                Some(p) => ctx.printer.out(format!("damaged {}: {p}", c.id)),
            }
        }
    }
    let damaged = checks.iter().filter(|c| c.problem.is_some()).count();
    if damaged > 0 {
        anyhow::bail!(crate::Error::input(
            format!(
                "{damaged} of {} installed artifact(s) in the store are damaged",
                checks.len()
            ),
            Some("`xpm install` in the projects that use them fetches them again"),
        ));
    }
    if !json {
        ctx.printer.status(
            "Verified",
            format!("{} installed artifact(s)", checks.len()),
        );
    }
    Ok(())
}
