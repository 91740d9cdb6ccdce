use super::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Registry for this project (written to xpm.toml)
    #[arg(long, value_name = "URL")]
    registry: Option<String>,
    /// Pin the base model: a base id or a sha256: digest
    #[arg(long, value_name = "ID|DIGEST")]
    base: Option<String>,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    let dir = std::env::current_dir()?;
    let path = crate::ops::init::init(&dir, a.registry.as_deref(), a.base.as_deref())?;
    ctx.printer.status("Created", path.display());
    Ok(())
}
