use std::path::PathBuf;

use super::Context;
use super::output::{self, OutputArgs};
use super::registry_args::RegistryArgs;

#[derive(Debug, clap::Args)]
#[command(mut_arg("json", output::help("Print the recorded index line as JSON")))]
pub struct Args {
    /// The artifact to publish (verified completely first)
    artifact: PathBuf,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    output: OutputArgs,
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
    a.output.format().print_line(&ctx.printer, &line, |line| {
        ctx.printer
            .status("Published", format!("{} ({})", line.id(), line.cksum))
    })
}
