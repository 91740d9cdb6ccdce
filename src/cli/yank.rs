use super::Context;
use super::output::{self, OutputArgs};
use super::registry_args::RegistryArgs;

#[derive(Debug, clap::Args)]
#[command(mut_arg("json", output::help("Print the recorded index line as JSON")))]
pub struct Args {
    /// The version to yank, as NAME@VERSION
    spec: String,
    /// Un-yank: make the version resolvable again
    #[arg(long)]
    undo: bool,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    output: OutputArgs,
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
    a.output.format().print_line(&ctx.printer, &line, |line| {
        let verb = if line.yanked { "Yanked" } else { "Unyanked" };
        ctx.printer.status(verb, line.id())
    })
}
