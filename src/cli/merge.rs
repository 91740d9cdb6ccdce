use std::path::PathBuf;

use anyhow::Context as _;

use super::Context;
use crate::ops::merge::{ApplyTo, MergeFlags, MergeRequest, RecipeSource, run};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Experts to merge, all made from the same base model: `.xpm` files, or installed
    /// experts as `name` / `name@req` (the version xpm.lock pins, else the highest installed)
    #[arg(value_name = "EXPERT", required_unless_present = "recipe")]
    experts: Vec<String>,
    /// Run a merge recipe (merge.toml: experts, weights, strategy, params, overrides, seed)
    #[arg(long, value_name = "FILE", conflicts_with_all = ["experts", "strategy", "weights", "params", "preset", "overrides"])]
    recipe: Option<PathBuf>,
    /// sparse-mean, mean, linear, task-arithmetic, magnitude-prune, ties, dare-linear,
    /// dare-ties, breadcrumbs, breadcrumbs-ties, della
    /// (LoRA experts, in LoRA space:) cat, svd; or the name of a plugin strategy
    #[arg(long, default_value = "sparse-mean")]
    strategy: String,
    /// A plugin library to load (repeatable); also searched: $XPM_PLUGIN_PATH, $XPM_HOME/plugins
    #[arg(long = "plugin", value_name = "PATH")]
    plugins: Vec<PathBuf>,
    /// One weight per expert, comma-separated [default: all 1]
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "W,…",
        allow_hyphen_values = true
    )]
    weights: Vec<f64>,
    /// Strategy parameter, repeatable: lambda, density, gamma, epsilon, sign
    /// (total|weighted|frequency), divisor (count|weights|none), rescale (bernoulli|l1),
    /// normalize, rank (svd)
    #[arg(long = "param", value_name = "KEY=VALUE")]
    params: Vec<String>,
    /// Start from another library's defaults: `peft` or `mergekit`
    #[arg(long, value_parser = ["peft", "mergekit"])]
    preset: Option<String>,
    /// Other settings for tensors matching a glob, repeatable, first match wins:
    /// `GLOB:strategy=mean,density=0.5`
    #[arg(long = "override", value_name = "GLOB:KEY=VALUE,…")]
    overrides: Vec<String>,
    /// Seed of the random strategies (dare-*, della) [default: the recipe's, else 0]
    #[arg(long)]
    seed: Option<u64>,
    /// Name of the merged expert [default: the recipe's, else `merged`]
    #[arg(long)]
    name: Option<String>,
    /// Version of the merged expert [default: the recipe's, else 0.1.0]
    #[arg(long, value_name = "SEMVER")]
    version: Option<semver::Version>,
    /// Output: the merged expert (`.xpm`), or with --apply-to the new model directory
    #[arg(short, long, value_name = "PATH")]
    out: PathBuf,
    /// Write base + merged delta to --out as a model directory (sharded safetensors, config
    /// and tokenizer files copied) instead of an expert
    #[arg(long, value_name = "BASE")]
    apply_to: Option<PathBuf>,
    /// With --apply-to: also keep the merged expert here
    #[arg(long, value_name = "FILE", requires = "apply_to")]
    save_expert: Option<PathBuf>,
    /// With --apply-to: largest safetensors file before sharding
    #[arg(
        long,
        default_value = "5GB",
        value_name = "SIZE",
        requires = "apply_to",
        value_parser = super::size_arg
    )]
    max_shard_size: u64,
    /// zstd level (1–22)
    #[arg(long, default_value_t = crate::format::artifact::DEFAULT_LEVEL, value_parser = clap::value_parser!(i32).range(1..=22))]
    level: i32,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    let source = match a.recipe {
        Some(path) => RecipeSource::File { path, seed: a.seed },
        None => RecipeSource::Flags(MergeFlags {
            experts: a.experts,
            weights: a.weights,
            strategy: a.strategy,
            preset: a.preset,
            seed: a.seed,
            params: a.params,
            overrides: a.overrides,
        }),
    };
    let recipe = source.recipe()?;
    let apply_to = match &a.apply_to {
        Some(base) => Some(ApplyTo {
            base: base.clone(),
            save_expert: a.save_expert.clone(),
            max_shard_bytes: a.max_shard_size,
        }),
        None => None,
    };
    let req = MergeRequest {
        recipe,
        plugin_paths: a.plugins,
        plugin_search: ctx.plugin_search.clone(),
        name: a.name,
        version: a.version,
        out: a.out.clone(),
        apply_to,
        level: a.level,
        cwd: std::env::current_dir()?,
    };
    let o = run(req, &ctx.home, &ctx.printer)
        .with_context(|| format!("cannot merge into `{}`", a.out.display()))?;
    ctx.printer.out(match (&o.applied, &a.apply_to) {
        (Some(r), Some(base)) => format!(
            "merged {} experts with `{}` and applied them to {}: {} ({} tensors changed, {} safetensors file(s))",
            o.experts,
            o.strategy,
            base.display(),
            a.out.display(),
            r.changed,
            r.shards
        ),
        _ => format!(
            "merged {} experts with `{}` into {} ({} tensors)",
            o.experts,
            o.strategy,
            a.out.display(),
            o.summary.manifest.tensors.len()
        ),
    });
    Ok(())
}

/// Paths for merge inputs: files as given, installed experts (`name@req`) from the store.
pub(super) fn locate_all(inputs: &[String], ctx: &Context) -> anyhow::Result<Vec<PathBuf>> {
    Ok(crate::ops::locate_experts(
        inputs,
        &std::env::current_dir()?,
        &ctx.home,
    )?)
}
