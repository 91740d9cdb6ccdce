use super::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the records as JSON
    #[arg(long)]
    json: bool,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    let items = crate::ops::list::list(&ctx.home)?;
    if a.json {
        ctx.printer.out(serde_json::to_string_pretty(&items)?);
    } else {
        ctx.printer.out(crate::ops::list::render(&items).trim_end());
    }
    Ok(())
}
