use super::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Experts to compare (`.xpm` files or installed `name@req`), all on one base model
    #[arg(required = true, num_args = 2.., value_name = "EXPERT")]
    experts: Vec<String>,
    /// Print the versioned JSON report (schemas/overlap.schema.json)
    #[arg(long)]
    json: bool,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    let paths = super::merge::locate_all(&a.experts, ctx)?;
    let r = crate::ops::overlap::overlap(&paths)?;
    if a.json {
        ctx.printer.out(serde_json::to_string_pretty(&r)?);
    } else {
        ctx.printer.out(crate::ops::overlap::render(&r).trim_end());
    }
    Ok(())
}
