use std::path::PathBuf;

use anyhow::Context as _;

use super::Context;
use crate::format::{Dtype, ExpertKind};
use crate::ops::extract::{ExtractOptions, extract};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Base model: a safetensors file or a model directory (single file or sharded)
    #[arg(long, value_name = "PATH")]
    base: PathBuf,
    /// Fine-tuned model with the same tensors as the base
    #[arg(long, value_name = "PATH")]
    tuned: PathBuf,
    /// Fraction of entries kept per target tensor, in (0, 1]
    #[arg(
        long,
        default_value_t = 0.05,
        value_name = "D",
        allow_negative_numbers = true
    )]
    density: f64,
    /// Glob patterns over tensor names [default: every floating-point tensor of rank ≥ 2]
    #[arg(long, num_args = 1.., value_name = "GLOB")]
    targets: Vec<String>,
    /// `sparse` keeps the top-k entries; `dense` keeps the full delta
    #[arg(long, default_value = "sparse", value_parser = parse_kind)]
    kind: ExpertKind,
    /// Expert name (lowercase letters, digits, `-`, `_`, optional `namespace/`)
    #[arg(long)]
    name: String,
    /// Expert version (semver)
    #[arg(long, value_name = "SEMVER")]
    version: semver::Version,
    /// Output artifact [default: NAME-VERSION.xpm]
    #[arg(short, long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Human id of the base model, e.g. `sentence-transformers/all-MiniLM-L6-v2`
    #[arg(long, value_name = "ID")]
    base_id: Option<String>,
    /// Stored value type [default: the tuned model's]
    #[arg(long, value_name = "f32|f16|bf16")]
    values_dtype: Option<Dtype>,
    #[arg(long)]
    description: Option<String>,
    /// SPDX license expression
    #[arg(long)]
    license: Option<String>,
    #[arg(long = "author", value_name = "NAME")]
    authors: Vec<String>,
    /// zstd level (1–22)
    #[arg(long, default_value_t = crate::format::artifact::DEFAULT_LEVEL, value_parser = clap::value_parser!(i32).range(1..=22))]
    level: i32,
}

fn parse_kind(s: &str) -> Result<ExpertKind, String> {
    match s {
        "sparse" => Ok(ExpertKind::Sparse),
        "dense" => Ok(ExpertKind::Dense),
        other => Err(format!(
            "`{other}` is not an extractable kind (sparse, dense)"
        )),
    }
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    let out = a
        .out
        .unwrap_or_else(|| crate::ops::default_out(&a.name, &a.version));
    let opts = ExtractOptions {
        base: a.base,
        tuned: a.tuned,
        density: a.density,
        targets: a.targets,
        kind: a.kind,
        name: a.name,
        version: a.version,
        out: out.clone(),
        base_id: a.base_id,
        values_dtype: a.values_dtype,
        description: a.description,
        license: a.license,
        authors: a.authors,
        level: a.level,
    };
    extract(&opts, &ctx.home, &ctx.printer)
        .with_context(|| format!("cannot extract `{}@{}`", opts.name, opts.version))?;
    Ok(())
}
