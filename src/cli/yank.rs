use super::Context;
use super::registry_args::RegistryArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The version to yank, as NAME@VERSION
    spec: String,
    /// Un-yank: make the version resolvable again
    #[arg(long)]
    undo: bool,
    #[command(flatten)]
    registry: RegistryArgs,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    let location = a.registry.location(&ctx.home)?;
    let line = crate::ops::yank::yank(
        &ctx.home,
        &a.spec,
        a.undo,
        &location,
        &a.registry.client(&ctx.printer),
        &ctx.printer,
    )?;
    let verb = if line.yanked { "Yanked" } else { "Unyanked" };
    ctx.printer.status(verb, line.id());
    Ok(())
}
