use std::path::PathBuf;

use anyhow::Context as _;

use super::Context;
use super::output::OutputArgs;
use crate::ops::interop::{ImportOptions, ImportReport};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    source: Source,
}

#[derive(Debug, clap::Subcommand)]
enum Source {
    /// A PEFT adapter (LoRA or SHiRA) from a `save_pretrained` directory or a Hub repository
    Peft {
        /// The adapter directory, or `hf:ORG/NAME[@REVISION]`
        src: String,
        #[command(flatten)]
        common: Common,
    },
    /// Experts of an mttl expert library (a directory or `hf:` repository of `.ckpt`/`.meta`
    /// files), one artifact each
    Mttl {
        /// The library directory, or `hf:ORG/NAME[@REVISION]`
        library: String,
        /// Expert names in the library (`EXPERT.ckpt`)
        #[arg(required = true)]
        experts: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, clap::Args)]
struct Common {
    /// The base model the adapter was trained on: a model directory or `hf:ORG/NAME[@REV]`
    #[arg(long, value_name = "MODEL")]
    base: String,
    /// Expert name (lowercase letters, digits, `-`, `_`, optional `namespace/`) [mttl default:
    /// the library's expert name]
    #[arg(long)]
    name: Option<String>,
    /// Expert version (semver)
    #[arg(long, value_name = "SEMVER", default_value = "0.1.0")]
    version: semver::Version,
    /// Output artifact [default: NAME-VERSION.xpm]; with several mttl experts, a directory
    #[arg(short, long, value_name = "PATH")]
    out: Option<PathBuf>,
    #[arg(long)]
    description: Option<String>,
    /// zstd level (1–22)
    #[arg(long, default_value_t = crate::format::artifact::DEFAULT_LEVEL, value_parser = clap::value_parser!(i32).range(1..=22))]
    level: i32,
    #[command(flatten)]
    output: OutputArgs,
}

impl Common {
    fn options(&self, name: String, out: Option<PathBuf>) -> ImportOptions {
        ImportOptions {
            name,
            version: self.version.clone(),
            out,
            base: self.base.clone(),
            description: self.description.clone(),
            level: self.level,
        }
    }
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    // An import encodes tensor after tensor with buffers of the same sizes: keeping freed
    // memory for the next tensor costs about 2 % more peak RSS and saves a fresh page fault
    // per buffer (a 1 GB adapter: 2.3 s → 1.4 s; docs/benchmarks.md, "Import and export").
    crate::alloc::configure();
    match a.source {
        Source::Peft { src, common } => {
            let name = common.name.clone().ok_or_else(|| {
                crate::Error::input(
                    "`xpm import peft` needs `--name`",
                    Some("e.g. `--name sst2-lora --version 1.0.0`"),
                )
            })?;
            let opts = common.options(name, common.out.clone());
            let r =
                crate::ops::interop::import_peft(&src, &opts, &ctx.home, &ctx.hub, &ctx.printer)
                    .with_context(|| format!("cannot import the PEFT adapter `{src}`"))?;
            common.output.format().print(&ctx.printer, &r, |_| {})
        }
        Source::Mttl {
            library,
            experts,
            common,
        } => {
            let targets = crate::ops::interop::mttl_targets(
                &experts,
                common.name.as_deref(),
                common.out.as_deref(),
                &common.version,
            )?;
            let mut reports: Vec<ImportReport> = Vec::new();
            for (e, (name, out)) in experts.iter().zip(targets) {
                let opts = common.options(name, out);
                let r = crate::ops::interop::import_mttl(
                    &library,
                    e,
                    &opts,
                    &ctx.home,
                    &ctx.hub,
                    &ctx.printer,
                )
                .with_context(|| format!("cannot import expert `{e}` of `{library}`"))?;
                reports.push(r);
            }
            common.output.format().print(&ctx.printer, &reports, |_| {})
        }
    }
}
