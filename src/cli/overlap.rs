use super::Context;
use super::output::{self, OutputArgs};

#[derive(Debug, clap::Args)]
#[command(mut_arg(
    "json",
    output::help("Print the versioned JSON report (schemas/overlap.schema.json)")
))]
pub struct Args {
    /// Experts to compare (`.xpm` files or installed `name@req`), all on one base model
    #[arg(required = true, num_args = 2.., value_name = "EXPERT")]
    experts: Vec<String>,
    #[command(flatten)]
    output: OutputArgs,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    let paths = super::merge::locate_all(&a.experts, ctx)?;
    let r = crate::ops::overlap::overlap(&paths)?;
    a.output.format().print(&ctx.printer, &r, |r| {
        ctx.printer.out(crate::ops::overlap::render(r).trim_end())
    })
}
