use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context as _;

use super::Context;
use crate::merge::{MergeParams, Preset, Strategy};
use crate::ops::merge::{MergeOptions, merge};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Experts to merge, all made from the same base model: `.xpm` files, or installed
    /// experts as `name` / `name@req` (the version xpm.lock pins, else the highest installed)
    #[arg(required = true, value_name = "EXPERT")]
    experts: Vec<String>,
    /// sparse-mean, mean, linear, task-arithmetic, magnitude-prune, ties, dare-linear,
    /// dare-ties, breadcrumbs, breadcrumbs-ties, della
    #[arg(long, default_value = "sparse-mean")]
    strategy: Strategy,
    /// One weight per expert, comma-separated [default: all 1]
    #[arg(long, value_delimiter = ',', value_name = "W,…")]
    weights: Vec<f64>,
    /// Strategy parameter, repeatable: lambda, density, gamma, epsilon, sign
    /// (total|weighted|frequency), divisor (count|weights), rescale (bernoulli|l1), normalize
    #[arg(long = "param", value_name = "KEY=VALUE")]
    params: Vec<String>,
    /// Start from another library's defaults: `peft` or `mergekit`
    #[arg(long)]
    preset: Option<Preset>,
    /// Seed of the random strategies (dare-*, della)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Name of the merged expert
    #[arg(long, default_value = "merged")]
    name: String,
    /// Version of the merged expert
    #[arg(long, default_value = "0.1.0", value_name = "SEMVER")]
    version: semver::Version,
    /// Output artifact
    #[arg(short, long, value_name = "FILE")]
    out: PathBuf,
    /// zstd level (1–22)
    #[arg(long, default_value_t = crate::format::artifact::DEFAULT_LEVEL, value_parser = clap::value_parser!(i32).range(1..=22))]
    level: i32,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    let mut params = a.preset.map(MergeParams::preset).unwrap_or_default();
    params.seed = a.seed;
    let mut overrides = BTreeMap::new();
    for kv in &a.params {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("`--param {kv}` is not KEY=VALUE"))?;
        overrides.insert(k.trim().to_string(), v.trim().to_string());
    }
    params.apply(&overrides)?;
    let project = crate::project::Project::discover(&std::env::current_dir()?)?;
    let lock = project.read_lock()?;
    let store = crate::store::Store::new(&ctx.home);
    let experts = a
        .experts
        .iter()
        .map(|e| store.locate(e, lock.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    let opts = MergeOptions {
        experts,
        weights: a.weights,
        strategy: a.strategy,
        params,
        name: a.name,
        version: a.version,
        out: a.out.clone(),
        level: a.level,
    };
    let s = merge(&opts, &ctx.printer)
        .with_context(|| format!("cannot merge into `{}`", a.out.display()))?;
    ctx.printer.out(format!(
        "merged {} experts with `{}` into {} ({} tensors)",
        opts.experts.len(),
        opts.strategy,
        a.out.display(),
        s.manifest.tensors.len()
    ));
    Ok(())
}
