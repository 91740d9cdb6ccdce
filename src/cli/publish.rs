use std::path::PathBuf;

use super::Context;
use super::output::{self, OutputArgs};
use super::registry_args::RegistryArgs;
use crate::ops::trust::{SignRequest, key_path};

#[derive(Debug, clap::Args)]
#[command(mut_arg("json", output::help("Print the recorded index line as JSON")))]
pub struct Args {
    /// The artifact to publish (verified completely first)
    artifact: PathBuf,
    /// Sign the release with this minisign key: a name from `xpm key generate` or a `.key`
    /// file (an encrypted key reads its password from $XPM_KEY_PASSWORD)
    #[arg(long, value_name = "KEY")]
    sign: Option<String>,
    /// After a key change: the previous key, which signs a statement that KEY replaces it
    #[arg(long, value_name = "OLD_KEY", requires = "sign")]
    rotate_from: Option<String>,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    output: OutputArgs,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    let location = a.registry.location(&ctx.home)?;
    let sign = a.sign.as_deref().map(|k| SignRequest {
        key: key_path(&ctx.home, k),
        rotate_from: a.rotate_from.as_deref().map(|o| key_path(&ctx.home, o)),
        password: std::env::var("XPM_KEY_PASSWORD").ok(),
    });
    let line = crate::ops::publish::publish(
        &ctx.home,
        &a.artifact,
        &location,
        &a.registry.client(&ctx.printer),
        sign.as_ref(),
        &ctx.printer,
    )?;
    a.output.format().print_line(&ctx.printer, &line, |line| {
        ctx.printer
            .status("Published", format!("{} ({})", line.id(), line.cksum))
    })
}
