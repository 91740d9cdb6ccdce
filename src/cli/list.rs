use super::Context;
use super::output::{self, OutputArgs};

#[derive(Debug, clap::Args)]
#[command(mut_arg("json", output::help("Print the records as JSON")))]
pub struct Args {
    #[command(flatten)]
    output: OutputArgs,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    let items = crate::ops::list::list(&ctx.home)?;
    a.output.format().print(&ctx.printer, &items, |items| {
        ctx.printer.out(crate::ops::list::render(items).trim_end())
    })
}
