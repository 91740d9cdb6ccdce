use super::Context;
use super::output::{self, OutputArgs};
use super::registry_args::RegistryArgs;
use crate::ops::owner::Change;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// List the owners of a name
    List(ListArgs),
    /// Make identities owners of a name (needs a token with the `owners` scope, of an owner)
    Add(ChangeArgs),
    /// Remove identities from the owners of a name (a name keeps at least one owner)
    Remove(ChangeArgs),
}

#[derive(Debug, clap::Args)]
#[command(mut_arg("json", output::help("Print the name and its owners as JSON")))]
struct ListArgs {
    /// The expert's name
    name: String,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, clap::Args)]
#[command(mut_arg(
    "json",
    output::help("Print the name and its owners after the change as JSON")
))]
struct ChangeArgs {
    /// The expert's name
    name: String,
    /// Identities of the registry's token config
    #[arg(required = true, value_name = "IDENTITY")]
    identities: Vec<String>,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    output: OutputArgs,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    let (name, change, registry, output) = match a.command {
        Command::List(l) => (l.name, Change::List, l.registry, l.output),
        Command::Add(c) => (c.name, Change::Add(c.identities), c.registry, c.output),
        Command::Remove(c) => (c.name, Change::Remove(c.identities), c.registry, c.output),
    };
    let location = registry.location(&ctx.home)?;
    let owners = crate::ops::owner::owner(
        &ctx.home,
        &name,
        &change,
        &location,
        &registry.client(&ctx.printer),
        &ctx.printer,
    )?;
    output
        .format()
        .print(&ctx.printer, &owners, |o| match change {
            Change::List if o.owners.is_empty() => ctx.printer.status(
                "Owners",
                format!(
                    "{} has no recorded owners (only admins may write it)",
                    o.name
                ),
            ),
            Change::List => {
                for who in &o.owners {
                    ctx.printer.out(who);
                }
            }
            _ => ctx
                .printer
                .status("Owners", format!("{}: {}", o.name, o.owners.join(", "))),
        })
}
