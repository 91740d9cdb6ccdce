use super::Context;
use super::output::OutputArgs;
use super::registry_args::RegistryArgs;
use crate::ops::install::{self, InstallOptions};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Requirements like `sst2@1.2`, `sst2@^1.2`, `team/news@~2.0.1` [default: xpm.toml's]
    specs: Vec<String>,
    /// Install exactly the versions in xpm.lock; fail if it is missing or out of date
    #[arg(long)]
    locked: bool,
    /// Use only cached indexes and installed artifacts; never touch the network
    #[arg(long)]
    offline: bool,
    /// Only experts on this base model: a sha256: base digest or a base id
    #[arg(long, value_name = "DIGEST|ID")]
    base: Option<String>,
    /// Refuse experts without a valid signature (see `[trust]` in xpm.toml)
    #[arg(long)]
    require_signatures: bool,
    /// Parallel downloads
    #[arg(short, long, default_value_t = install::DEFAULT_JOBS, value_name = "N")]
    jobs: usize,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    registry: RegistryArgs,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    let opts = InstallOptions {
        require_signatures: a.require_signatures,
        specs: a.specs,
        registry: a.registry.registry.clone(),
        locked: a.locked,
        offline: a.offline,
        base: a.base,
        jobs: a.jobs.max(1),
        dir: std::env::current_dir()?,
    };
    let r = install::install(
        &ctx.home,
        &opts,
        &a.registry.client(&ctx.printer),
        &ctx.printer,
    )?;
    a.output.format().print(&ctx.printer, &r, |r| {
        for e in &r.experts {
            let how = if e.downloaded { "downloaded" } else { "cached" };
            let y = if e.yanked { ", yanked" } else { "" };
            ctx.printer
                .out(format!("{}@{} ({how}{y}) {}", e.name, e.version, e.cksum));
        }
        ctx.printer.status(
            "Installed",
            format!(
                "{} expert(s) on base {} ({} downloaded); locked in {}",
                r.experts.len(),
                r.base.id,
                crate::units::human_bytes(r.downloaded_bytes),
                r.lockfile.display()
            ),
        );
    })
}
