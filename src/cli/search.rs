use super::Context;
use super::output::{self, OutputArgs};
use super::registry_args::RegistryArgs;

#[derive(Debug, clap::Args)]
#[command(mut_arg("json", output::help("Print the results as JSON")))]
pub struct Args {
    /// Words that must all occur in the name or description
    #[arg(required = true)]
    words: Vec<String>,
    /// Show at most this many results
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    limit: u64,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    registry: RegistryArgs,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    let location = a.registry.location(&ctx.home)?;
    let query = a.words.join(" ");
    let r = crate::ops::search::search(
        &ctx.home,
        &query,
        a.limit as usize,
        &location,
        &a.registry.client(&ctx.printer),
    )?;
    a.output.format().print(&ctx.printer, &r, |r| {
        if r.experts.is_empty() {
            ctx.printer
                .status("Searched", format!("no expert matches `{query}`"));
        } else {
            ctx.printer.out(crate::ops::search::render(r).trim_end());
        }
    })
}
