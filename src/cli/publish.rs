use std::path::PathBuf;

use super::Context;
use super::registry_args::RegistryArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The artifact to publish (verified completely first)
    artifact: PathBuf,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Print the recorded index line as JSON
    #[arg(long)]
    json: bool,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    let location = a.registry.location(&ctx.home)?;
    let line = crate::ops::publish::publish(
        &ctx.home,
        &a.artifact,
        &location,
        &a.registry.client(&ctx.printer),
        &ctx.printer,
    )?;
    if a.json {
        ctx.printer.out(serde_json::to_string(&line)?);
    } else {
        ctx.printer
            .status("Published", format!("{} ({})", line.id(), line.cksum));
    }
    Ok(())
}
