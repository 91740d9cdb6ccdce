//! `xpm merge`: a recipe (a file, or the flags) to a merged expert: its experts located (`.xpm`
//! files or installed experts), merged tensor by tensor with a built-in strategy and per-tensor
//! overrides or a plugin strategy, and optionally applied to a base model.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Error, IoResultExt, Result};
use crate::format::manifest::{BaseModel, ExpertKind, Manifest, Provenance, ProvenanceInput};
use crate::format::{ArtifactReader, ArtifactWriter, Content, Dtype, TensorData, encode_tensor};
use crate::home::XpmHome;
use crate::merge::engine::merge_tensor_loading;
use crate::merge::input::{ExpertSet, load_input};
use crate::merge::lora::{self, LoraFactors};
use crate::merge::plugin::Plugin;
use crate::merge::recipe::{Recipe, RecipeExpert, TensorOverride, param_from_str, parse_override};
use crate::merge::{Input, MergeParams, Output, Strategy};
use crate::printer::Printer;

/// How the tensors are combined: built-in strategies, or one plugin strategy.
#[derive(Debug, Clone)]
pub enum MergeMethod {
    /// A built-in strategy with its parameters, and per-tensor overrides (the first matching
    /// pattern wins).
    Builtin {
        strategy: Strategy,
        params: MergeParams,
        overrides: Vec<TensorOverride>,
    },
    /// A plugin strategy for every tensor, with its parameters (a JSON object) and the seed.
    Plugin {
        plugin: Arc<Plugin>,
        params: serde_json::Value,
        seed: u64,
    },
}

impl MergeMethod {
    /// A built-in strategy with its default parameters and no overrides.
    pub fn builtin(strategy: Strategy) -> Self {
        MergeMethod::Builtin {
            strategy,
            params: MergeParams::default(),
            overrides: Vec::new(),
        }
    }

    /// What status lines and the description call it: `ties`, or `median (plugin 1.0.0)`.
    pub fn label(&self) -> String {
        match self {
            MergeMethod::Builtin { strategy, .. } => strategy.to_string(),
            MergeMethod::Plugin { plugin, .. } => {
                format!("{} (plugin {})", plugin.name, plugin.version)
            }
        }
    }

    /// Check every parameter before any tensor is read.
    fn validate(&self) -> Result<()> {
        match self {
            MergeMethod::Builtin {
                strategy,
                params,
                overrides,
            } => {
                params.validate_for(*strategy)?;
                for o in overrides {
                    o.params.validate_for(o.strategy)?;
                }
                Ok(())
            }
            MergeMethod::Plugin { plugin, params, .. } => plugin.check_params(params),
        }
    }

    /// The `merge` section of the merged expert's provenance (without `densified`).
    fn provenance(&self, weights: &[f64]) -> serde_json::Value {
        match self {
            MergeMethod::Builtin {
                strategy,
                params,
                overrides,
            } => serde_json::json!({
                "strategy": strategy,
                "plugin": null,
                "weights": weights,
                "params": params,
                "overrides": overrides.iter().map(|o| serde_json::json!({
                    "tensors": o.pattern,
                    "strategy": o.strategy,
                    "params": o.params,
                })).collect::<Vec<_>>(),
            }),
            MergeMethod::Plugin { plugin, params, .. } => serde_json::json!({
                "strategy": plugin.name,
                "plugin": {
                    "name": plugin.name,
                    "version": plugin.version,
                    "sha256": plugin.sha256,
                    "abi": format!("{}.{}", plugin.abi_major, plugin.abi_minor),
                    "params": params,
                },
                "weights": weights,
                "params": null,
                "overrides": [],
            }),
        }
    }
}

/// Everything `merge` needs.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub experts: Vec<PathBuf>,
    /// One weight per expert (default 1).
    pub weights: Vec<f64>,
    pub method: MergeMethod,
    pub name: String,
    pub version: semver::Version,
    pub out: PathBuf,
    pub level: i32,
    /// The recipe this merge runs, embedded in the manifest with each expert pinned to its
    /// exact version and sha256; expert digests it already names are checked.
    pub recipe: Option<Recipe>,
}

/// What a merge did.
#[derive(Debug, Clone)]
pub struct MergeSummary {
    pub manifest: Manifest,
    /// Tensors where a LoRA or dense input forced a dense computation.
    pub densified: Vec<String>,
}

/// Merge and write the artifact.
pub fn merge(opts: &MergeOptions, printer: &Printer) -> Result<MergeSummary> {
    let weights = check_request(opts, printer)?;
    let label = opts.method.label();
    let set = ExpertSet::open(&opts.experts)?;
    if set
        .readers
        .iter()
        .all(|r| r.manifest().kind == ExpertKind::Sparse)
    {
        // Sparse tensors of similar sizes, one after another: keep freed memory for the next
        // (a command's choice; training and serving keep theirs). Dense inputs keep returning
        // it: their large buffers would raise the peak by half (alloc.rs).
        crate::alloc::reuse_if_lean();
    }
    // Dense inputs too reuse their own buffers from tensor to tensor (each thread's previous
    // tensor's, which its next needs), just not what the allocator frees.
    crate::pool::keep_large_buffers();
    for name in &set.names {
        if let Some((strategy, params)) = builtin_for(&opts.method, name) {
            params.check_tensor(strategy, name, set.info[name].0.iter().product())?;
        }
    }
    let digests = input_digests(opts, &set.readers)?;
    let inputs_desc: Vec<String> = set
        .readers
        .iter()
        .map(|r| format!("{}@{}", r.manifest().name, r.manifest().version))
        .collect();
    let weights = degenerate_checks(opts, weights, &set.names, &digests, &inputs_desc, printer)?;
    printer.status(
        "Merging",
        format!(
            "{} with `{}` ({} tensors)",
            inputs_desc.join(", "),
            label,
            set.names.len()
        ),
    );
    let mut writer = ArtifactWriter::create(&opts.out, opts.level)?;
    let (densified, kinds) = merge_tensors(opts, &set, &weights, &mut writer, printer)?;
    let manifest = merged_manifest(
        opts,
        &set,
        &weights,
        &digests,
        &densified,
        &kinds,
        &label,
        &inputs_desc,
    );
    // What was merged is what was hashed: no input was written to since.
    for r in &set.readers {
        r.check_unchanged()?;
    }
    let manifest = writer.finish(manifest)?;
    if !densified.is_empty() {
        printer.warn(format!(
            "{} tensor(s) had LoRA or dense inputs and were merged densely: {}",
            densified.len(),
            densified.join(", ")
        ));
    }
    printer.status("Wrote", opts.out.display());
    Ok(MergeSummary {
        manifest,
        densified,
    })
}

/// The request's own checks, before any expert is read: something to merge, a valid name, one
/// finite weight per expert (default 1), valid parameters, safe outputs. Returns the weights.
fn check_request(opts: &MergeOptions, printer: &Printer) -> Result<Vec<f64>> {
    if opts.experts.is_empty() {
        return Err(Error::input(
            "nothing to merge",
            Some("give at least one expert"),
        ));
    }
    crate::format::manifest::validate_name(&opts.name)
        .map_err(|e| Error::input(format!("invalid expert name: {e}"), None))?;
    let weights = if opts.weights.is_empty() {
        vec![1.0; opts.experts.len()]
    } else if opts.weights.len() == opts.experts.len() {
        opts.weights.clone()
    } else {
        return Err(Error::input(
            format!(
                "{} weights for {} experts",
                opts.weights.len(),
                opts.experts.len()
            ),
            Some("give one weight per expert, in the same order, e.g. `--weights 1,0.5`"),
        ));
    };
    if weights.iter().any(|w| !w.is_finite()) {
        return Err(Error::input("weights must be finite numbers", None));
    }
    opts.method.validate()?;
    let inputs: Vec<&std::path::Path> = opts.experts.iter().map(PathBuf::as_path).collect();
    crate::fsutil::check_outputs(&[("-o", &opts.out)], &inputs)?;
    crate::fsutil::announce_new_parents(&[("-o", &opts.out)], printer);
    Ok(weights)
}

/// How the merged expert's provenance names one input.
#[derive(Debug)]
struct InputDigest {
    /// The whole file's sha256 (the artifact digest): computed only where needed, because it
    /// costs a pass over the file besides the merge's own reads.
    artifact: Option<String>,
    /// The content digest of a format 1.1 input (checked on open, no pass over the payload).
    content: Option<String>,
}

impl InputDigest {
    /// What tells two inputs apart: the content digest, else the artifact digest (a 1.0 file
    /// and a 1.1 file are never the same bytes).
    fn key(&self) -> &str {
        self.content
            .as_deref()
            .or(self.artifact.as_deref())
            .expect("an input has a content or an artifact digest")
    }
}

/// How provenance names every input, checked against the recipe's pins.
///
/// A format 1.1 input is named by its content digest, which its reader checked on open; the
/// merge then checks every frame against the manifest as it reads it, so each input byte is
/// read once and hashed once. The whole-file digest is computed only for a format 1.0 input
/// (whose trailer holds it) or where the recipe pins `sha256`. Those files are hashed whole
/// and per frame in one read, and their readers then read frames without hashing them again;
/// [`ArtifactReader::check_unchanged`] runs before the output is committed.
fn input_digests(opts: &MergeOptions, readers: &[ArtifactReader]) -> Result<Vec<InputDigest>> {
    let pins: Vec<Option<&RecipeExpert>> = match &opts.recipe {
        Some(recipe) => recipe.experts.iter().map(Some).collect(),
        None => vec![None; readers.len()],
    };
    // `key`: the recipe's field; `what`: the digest in words.
    let refuse = |e: &RecipeExpert,
                  r: &ArtifactReader,
                  key: &str,
                  what: &str,
                  want: &str,
                  got: &str| {
        Error::input(
            format!(
                "the recipe pins `{}` to {what} {want}, but `{}` has {got}",
                e.expert,
                r.path().display()
            ),
            Some(&format!(
                "install the exact artifact the recipe names, or remove its `{key}` to accept another"
            )),
        )
    };
    // The content pins first: they cost nothing.
    for (r, pin) in readers.iter().zip(&pins) {
        if let Some(e) = pin
            && let Some(want) = &e.content_digest
        {
            let got = r.content_digest();
            if got.as_ref() != Some(want) {
                let got = got.unwrap_or_else(|| "no content digest (format 1.0)".into());
                return Err(refuse(e, r, "content_digest", "content digest", want, &got));
            }
        }
    }
    let digests: Vec<InputDigest> = {
        use rayon::prelude::*;
        readers
            .par_iter()
            .zip(&pins)
            .map(|(r, pin)| {
                let content = r.content_digest();
                let pinned = pin.is_some_and(|e| e.sha256.is_some());
                let artifact = if content.is_none() || pinned {
                    Some(r.verify_file_digest()?)
                } else {
                    None
                };
                Ok(InputDigest { artifact, content })
            })
            .collect::<Result<_>>()?
    };
    for ((r, pin), got) in readers.iter().zip(&pins).zip(&digests) {
        if let Some(e) = pin
            && let (Some(want), Some(got)) = (&e.sha256, &got.artifact)
            && got != want
        {
            return Err(refuse(e, r, "sha256", "sha256", want, got));
        }
    }
    Ok(digests)
}

/// Merge every tensor (in parallel, written in order) into `writer`. Returns the tensors that
/// had LoRA or dense inputs and the kinds of the merged tensors.
fn merge_tensors(
    opts: &MergeOptions,
    set: &ExpertSet,
    weights: &[f64],
    writer: &mut ArtifactWriter,
    printer: &Printer,
) -> Result<(Vec<String>, std::collections::HashSet<ExpertKind>)> {
    let (readers, names, info) = (&set.readers, &set.names, &set.info);
    let pb = printer.progress(names.len() as u64, "Merging");
    let mut densified = Vec::new();
    let mut kinds = std::collections::HashSet::new();
    crate::parallel::map_ordered(
        names,
        |name| {
            let (shape, dtype) = info[name].clone();
            let mut dense_input = false;
            let builtin = builtin_for(&opts.method, name);
            let (content, kind) = if let MergeMethod::Plugin {
                plugin,
                params: pparams,
                seed,
            } = &opts.method
            {
                let mut inputs = Vec::with_capacity(readers.len());
                for r in readers {
                    let (input, dense) = load_input(r, name)?;
                    dense_input |= dense;
                    inputs.push(input);
                }
                let out = plugin
                    .instance(pparams)?
                    .merge(name, &shape, dtype, &inputs, weights, *seed)?;
                inputs.into_iter().for_each(Input::recycle);
                output_content(out, dtype)
            } else if let Some((strategy, params)) = builtin.filter(|(s, _)| s.is_lora_space()) {
                (
                    lora_merge(readers, name, &shape, weights, strategy, params)?,
                    ExpertKind::Lora,
                )
            } else {
                let (strategy, params) = builtin.expect("a built-in method");
                let out = merge_tensor_loading(name, &shape, weights, strategy, params, |e| {
                    let (input, dense) = load_input(&readers[e], name)?;
                    dense_input |= dense;
                    Ok::<_, crate::Error>(input)
                })?;
                output_content(out, dtype)
            };
            let t = TensorData {
                name: name.clone(),
                shape,
                dtype,
                content,
            };
            let encoded = encode_tensor(&t, opts.level)?;
            t.content.recycle();
            pb.inc(1);
            Ok((encoded, dense_input, kind))
        },
        |(encoded, dense, kind)| {
            if dense {
                densified.push(encoded.entry().name.clone());
            }
            kinds.insert(kind);
            writer.push(encoded)
        },
    )?;
    pb.finish_and_clear();
    Ok((densified, kinds))
}

/// The merged expert's manifest: the kind of its tensors, the inputs and the method in
/// provenance, and the recipe with every expert pinned to what was merged.
#[allow(clippy::too_many_arguments)]
fn merged_manifest(
    opts: &MergeOptions,
    set: &ExpertSet,
    weights: &[f64],
    digests: &[InputDigest],
    densified: &[String],
    kinds: &std::collections::HashSet<ExpertKind>,
    label: &str,
    inputs_desc: &[String],
) -> Manifest {
    let first = set.readers[0].manifest();
    let kind = if kinds.contains(&ExpertKind::Lora) {
        ExpertKind::Lora
    } else if kinds.contains(&ExpertKind::Sparse) {
        ExpertKind::Sparse
    } else {
        ExpertKind::Dense
    };
    let mut inputs = Vec::new();
    for (r, d) in set.readers.iter().zip(digests) {
        let m = r.manifest();
        inputs.push(ProvenanceInput {
            role: "expert".into(),
            name: format!("{}@{}", m.name, m.version),
            digest: d.artifact.clone(),
            content_digest: d.content.clone(),
        });
    }
    let mut extra = BTreeMap::new();
    extra.insert("merge".to_string(), {
        let mut m = opts.method.provenance(weights);
        m["densified"] = serde_json::json!(densified);
        m
    });
    if let Some(recipe) = &opts.recipe {
        // Pin every expert to what was actually merged, so the recipe re-runs exactly.
        let mut pinned = recipe.clone();
        for (e, input) in pinned.experts.iter_mut().zip(&inputs) {
            let (name, version) = input.name.split_once('@').expect("name@version");
            e.expert = format!("{name}@={version}");
            e.sha256 = input.digest.clone();
            e.content_digest = input.content_digest.clone();
        }
        if let MergeMethod::Plugin { plugin, .. } = &opts.method {
            pinned.plugin_sha256 = Some(plugin.sha256.clone());
        }
        pinned.output = Some(crate::merge::recipe::RecipeOutput {
            name: opts.name.clone(),
            version: opts.version.to_string(),
        });
        extra.insert(
            "recipe".to_string(),
            serde_json::to_value(&pinned).expect("recipe serializes"),
        );
    }
    Manifest {
        format_version: String::new(),
        name: opts.name.clone(),
        version: opts.version.clone(),
        description: Some(format!("`{}` merge of {}", label, inputs_desc.join(", "))),
        license: None,
        authors: Vec::new(),
        base: BaseModel {
            id: first.base.id.clone(),
            digest: first.base.digest.clone(),
        },
        kind,
        tensors: Vec::new(),
        selection: None,
        training: None,
        provenance: Some(Provenance {
            tool: format!("xpm {}", env!("CARGO_PKG_VERSION")),
            inputs,
            extra,
        }),
        payload: None,
        extra: BTreeMap::new(),
    }
}

/// What `xpm merge` asks for: a recipe (from a file or from flags) and where the result goes.
#[derive(Debug, Clone)]
pub struct MergeRequest {
    pub recipe: Recipe,
    /// Plugin libraries named with `--plugin` (searched before the plugin directories).
    pub plugin_paths: Vec<PathBuf>,
    /// The plugin search path ([`crate::merge::plugin::search_path`]).
    pub plugin_search: Vec<PathBuf>,
    /// The merged expert's name and version [default: the recipe's, else `merged` 0.1.0].
    pub name: Option<String>,
    pub version: Option<semver::Version>,
    /// The merged expert, or with `apply_to` the model directory.
    pub out: PathBuf,
    /// Write base + merged Δ to `out` as a model directory instead of an expert.
    pub apply_to: Option<ApplyTo>,
    pub level: i32,
    /// Where installed experts are looked up (`xpm.lock` of the project around it).
    pub cwd: PathBuf,
}

/// Where `xpm merge` gets its recipe.
#[derive(Debug, Clone)]
pub enum RecipeSource {
    /// `--recipe FILE`; an explicit seed wins over the recipe's.
    File { path: PathBuf, seed: Option<u64> },
    /// The recipe the flags describe.
    Flags(MergeFlags),
}

/// The recipe flags of `xpm merge`, as given.
#[derive(Debug, Clone, Default)]
pub struct MergeFlags {
    pub experts: Vec<String>,
    /// One weight per expert, or none (all 1).
    pub weights: Vec<f64>,
    pub strategy: String,
    pub preset: Option<String>,
    /// The seed [default: 0].
    pub seed: Option<u64>,
    /// `KEY=VALUE` each.
    pub params: Vec<String>,
    /// `GLOB:KEY=VALUE,…` each.
    pub overrides: Vec<String>,
}

impl RecipeSource {
    /// The recipe: read from the file, or built from the flags (one weight per expert, or
    /// none).
    pub fn recipe(&self) -> Result<Recipe> {
        match self {
            RecipeSource::File { path, seed } => {
                let mut r = Recipe::read(path)?;
                if let Some(seed) = seed {
                    r.seed = *seed;
                }
                Ok(r)
            }
            RecipeSource::Flags(f) => recipe_from_flags(f),
        }
    }
}

/// The recipe the flags describe.
fn recipe_from_flags(f: &MergeFlags) -> Result<Recipe> {
    if !f.weights.is_empty() && f.weights.len() != f.experts.len() {
        return Err(Error::input(
            format!(
                "{} weights for {} experts",
                f.weights.len(),
                f.experts.len()
            ),
            Some("give one weight per expert, in the same order, e.g. `--weights 1,0.5`"),
        ));
    }
    let mut params = BTreeMap::new();
    for kv in &f.params {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| Error::input(format!("`--param {kv}` is not KEY=VALUE"), None))?;
        params.insert(k.trim().to_string(), param_from_str(v.trim()));
    }
    Ok(Recipe {
        version: crate::merge::recipe::RECIPE_VERSION,
        strategy: f.strategy.clone(),
        preset: f.preset.as_deref().map(str::parse).transpose()?,
        seed: f.seed.unwrap_or(0),
        output: None,
        params,
        experts: f
            .experts
            .iter()
            .enumerate()
            .map(|(i, e)| RecipeExpert {
                expert: e.clone(),
                weight: f.weights.get(i).copied().unwrap_or(1.0),
                sha256: None,
                content_digest: None,
            })
            .collect(),
        overrides: f
            .overrides
            .iter()
            .map(|o| parse_override(o))
            .collect::<Result<_>>()?,
        plugin_sha256: None,
    })
}

/// `--apply-to BASE`: the base model, where the merged expert is kept, the shard size.
#[derive(Debug, Clone)]
pub struct ApplyTo {
    pub base: PathBuf,
    /// Keep the merged expert here (else it is a temporary file beside the output).
    pub save_expert: Option<PathBuf>,
    pub max_shard_bytes: u64,
}

/// What `xpm merge` did.
#[derive(Debug, Clone)]
pub struct MergeOutcome {
    pub summary: MergeSummary,
    pub experts: usize,
    /// The strategy as the recipe names it.
    pub strategy: String,
    /// The model directory written with `apply_to`.
    pub applied: Option<crate::merge::apply::ApplyReport>,
}

/// The merge method a recipe names: a built-in strategy (its plan), else the plugin that
/// provides it, checked against the recipe's `plugin_sha256` pin. Returns the method and the
/// experts' weights.
pub fn method_from_recipe(
    recipe: &Recipe,
    plugin_paths: &[PathBuf],
    plugin_search: &[PathBuf],
) -> Result<(MergeMethod, Vec<f64>)> {
    if recipe.strategy.parse::<Strategy>().is_ok() {
        let plan = recipe.plan()?;
        let method = MergeMethod::Builtin {
            strategy: plan.strategy,
            params: plan.params,
            overrides: plan.overrides,
        };
        return Ok((method, plan.weights));
    }
    let p = crate::merge::plugin::find(&recipe.strategy, plugin_paths, plugin_search)?
        .ok_or_else(|| {
            Error::input(
                format!(
                    "unknown merge strategy `{}`: not built in, and no plugin provides it",
                    recipe.strategy
                ),
                Some(&format!(
                    "{}built-in strategies: {}; plugins are loaded from --plugin PATH, or as `{}` from $XPM_PLUGIN_PATH and {} (`xpm plugin list` shows what is there)",
                    crate::suggest::hint_prefix(
                        &recipe.strategy,
                        Strategy::ALL.into_iter().chain(Strategy::LORA).map(|s| s.as_str())
                    ),
                    Strategy::ALL
                        .into_iter()
                        .chain(Strategy::LORA)
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    crate::merge::plugin::library_file_name(&recipe.strategy),
                    plugin_search
                        .last()
                        .map_or_else(String::new, |d| d.display().to_string())
                )),
            )
        })?;
    if let Some(want) = &recipe.plugin_sha256
        && *want != p.sha256
    {
        return Err(Error::input(
            format!(
                "the recipe pins plugin `{}` to {want}, but `{}` is {}",
                p.name,
                p.path.display(),
                p.sha256
            ),
            Some("use the exact plugin build the recipe names, or remove `plugin_sha256`"),
        ));
    }
    if !recipe.overrides.is_empty() || recipe.preset.is_some() {
        return Err(Error::input(
            format!(
                "plugin strategy `{}` cannot be combined with --override or --preset",
                p.name
            ),
            Some("merge with the plugin alone; overrides and presets apply to built-in strategies"),
        ));
    }
    let method = MergeMethod::Plugin {
        plugin: Arc::new(p),
        params: recipe.params_json(),
        seed: recipe.seed,
    };
    Ok((method, recipe.experts.iter().map(|e| e.weight).collect()))
}

/// `xpm merge`: locate the recipe's experts, merge them with the method it names, and with
/// `apply_to` write base + merged Δ as a model directory.
pub fn run(req: MergeRequest, home: &XpmHome, printer: &Printer) -> Result<MergeOutcome> {
    let MergeRequest {
        mut recipe,
        plugin_paths,
        plugin_search,
        name,
        version,
        out,
        apply_to,
        level,
        cwd,
    } = req;
    let (method, weights) = method_from_recipe(&recipe, &plugin_paths, &plugin_search)?;
    let inputs: Vec<String> = recipe.experts.iter().map(|e| e.expert.clone()).collect();
    let experts = super::locate_experts(&inputs, &cwd, home)?;
    let name = name
        .or_else(|| recipe.output.as_ref().map(|o| o.name.clone()))
        .unwrap_or_else(|| "merged".into());
    let version = match (version, &recipe.output) {
        (Some(v), _) => v,
        (None, Some(o)) => o.version.parse().map_err(|e| {
            Error::input(
                format!(
                    "the recipe's output version `{}` is not a semantic version: {e}",
                    o.version
                ),
                Some("write it as MAJOR.MINOR.PATCH, e.g. `1.0.0`"),
            )
        })?,
        (None, None) => semver::Version::new(0, 1, 0),
    };
    recipe.output = None;
    let strategy = recipe.strategy.clone();
    // With `apply_to` the merged expert goes to `save_expert`, or to a temporary file beside
    // the output directory (removed when this returns).
    let mut _tmp = None;
    let artifact = match &apply_to {
        None => out.clone(),
        Some(ApplyTo {
            save_expert: Some(f),
            ..
        }) => f.clone(),
        Some(_) => {
            let dir = crate::fsutil::parent_dir(&out);
            std::fs::create_dir_all(&dir).at("create directory", &dir)?;
            let t = crate::fsutil::temp_builder(false)
                .suffix(".xpm")
                .tempfile_in(&dir)
                .at("create a temporary file in", &dir)?
                .into_temp_path();
            let p = t.to_path_buf();
            _tmp = Some(t);
            p
        }
    };
    let opts = MergeOptions {
        experts,
        weights,
        method,
        name,
        version,
        out: artifact.clone(),
        level,
        recipe: Some(recipe),
    };
    let summary = merge(&opts, printer)?;
    let applied = match &apply_to {
        Some(a) => Some(crate::merge::apply::apply(
            &a.base,
            &artifact,
            &out,
            a.max_shard_bytes,
            home,
            printer,
        )?),
        None => None,
    };
    Ok(MergeOutcome {
        summary,
        experts: opts.experts.len(),
        strategy,
        applied,
    })
}

/// Merges that cannot mean what the user wants are refused, and ones that are probably a
/// mistake are warned about, each with a hint: all-zero weights, weights that sum to 0 for
/// `mean`, weights whose sum overflows (rescaled where the strategy is scale-invariant), a
/// single expert, the same artifact twice, an override that matches no tensor. Returns the
/// weights to merge with.
fn degenerate_checks(
    opts: &MergeOptions,
    weights: Vec<f64>,
    names: &[String],
    digests: &[InputDigest],
    inputs_desc: &[String],
    printer: &Printer,
) -> Result<Vec<f64>> {
    if weights.iter().all(|&w| w == 0.0) {
        return Err(Error::input(
            "every weight is 0: the merge would be empty",
            Some("give at least one expert a non-zero weight, e.g. `--weights 1,0.5`"),
        ));
    }
    let (strategy, normalize) = match &opts.method {
        MergeMethod::Builtin {
            strategy, params, ..
        } => (Some(*strategy), params.normalize),
        MergeMethod::Plugin { .. } => (None, false),
    };
    let sum: f64 = weights.iter().sum();
    if strategy == Some(Strategy::Mean) && sum == 0.0 {
        return Err(Error::input(
            format!("the weights {weights:?} sum to 0, and `mean` divides by their sum"),
            Some("use weights with a non-zero sum, or `task-arithmetic` for signed combinations"),
        ));
    }
    let mut weights = weights;
    if !weights.iter().map(|w| w.abs()).sum::<f64>().is_finite() {
        let scale_free =
            matches!(strategy, Some(Strategy::Mean | Strategy::SparseMean)) || normalize;
        if !scale_free {
            return Err(Error::input(
                format!("the weights {weights:?} are too large: their sum overflows"),
                Some(
                    "scale the weights down; only their ratios matter for `mean` and `sparse-mean`",
                ),
            ));
        }
        // Only the ratios matter here: 1e308,1e308 means 1,1.
        let max = weights.iter().fold(0f64, |m, w| m.max(w.abs()));
        weights.iter_mut().for_each(|w| *w /= max);
    }
    if weights.len() == 1 {
        printer.warn(format!(
            "merging a single expert ({}): the result is its own delta{}",
            inputs_desc[0],
            match strategy {
                Some(s) if s.keeps_union() || s == Strategy::SparseMean => "",
                _ => " after the strategy's trimming",
            }
        ));
    }
    for (j, d) in digests.iter().enumerate() {
        if let Some(i) = digests[..j].iter().position(|x| x.key() == d.key()) {
            printer.warn(format!(
                "expert {} and expert {} are the same artifact ({}); it counts twice",
                i + 1,
                j + 1,
                inputs_desc[i]
            ));
        }
    }
    if let MergeMethod::Builtin { overrides, .. } = &opts.method {
        for o in overrides {
            if !names.iter().any(|n| o.matcher.is_match(n)) {
                printer.warn(format!(
                    "the override `{}` matches no tensor of these experts; it does nothing",
                    o.pattern
                ));
            }
        }
    }
    Ok(weights)
}

/// The built-in strategy and parameters of a tensor: the first matching override, else the
/// merge's; `None` for a plugin merge (the plugin handles every tensor).
fn builtin_for<'m>(method: &'m MergeMethod, name: &str) -> Option<(Strategy, &'m MergeParams)> {
    match method {
        MergeMethod::Builtin {
            strategy,
            params,
            overrides,
        } => Some(match overrides.iter().find(|o| o.matcher.is_match(name)) {
            Some(o) => (o.strategy, &o.params),
            None => (*strategy, params),
        }),
        MergeMethod::Plugin { .. } => None,
    }
}

/// A merged tensor as stored content, in the experts' dtype.
fn output_content(out: Output, dtype: Dtype) -> (Content, ExpertKind) {
    let bytes = |values: Vec<f32>| {
        let mut out = crate::pool::take(values.len() * dtype.size());
        dtype.from_f32_into(&values, &mut out);
        crate::pool::give(values);
        out
    };
    match out {
        Output::Sparse { indices, values } => (
            Content::Sparse {
                values: bytes(values),
                indices,
                block_size: None,
            },
            ExpertKind::Sparse,
        ),
        Output::Dense { values } => (
            Content::Dense {
                delta: bytes(values),
            },
            ExpertKind::Dense,
        ),
    }
}

/// `cat` or `svd` of the experts' LoRA factors for one tensor (see [`crate::merge::lora`]).
/// Experts without the tensor contribute nothing; a non-LoRA delta is refused.
fn lora_merge(
    readers: &[ArtifactReader],
    name: &str,
    shape: &[u64],
    weights: &[f64],
    strategy: Strategy,
    params: &MergeParams,
) -> Result<Content> {
    let mut factors = Vec::new();
    let mut dtype = None;
    for (r, w) in readers.iter().zip(weights) {
        let Some(i) = r.manifest().tensors.iter().position(|t| t.name == name) else {
            continue;
        };
        let t = r.read_tensor(i)?;
        match t.content {
            Content::Lora { rank, alpha, a, b } => {
                dtype.get_or_insert(t.dtype);
                factors.push((
                    *w,
                    LoraFactors {
                        rank: rank as usize,
                        alpha,
                        a: t.dtype.to_f32(&a),
                        b: t.dtype.to_f32(&b),
                    },
                ));
            }
            _ => {
                let m = r.manifest();
                return Err(Error::input(
                    format!(
                        "`{strategy}` merges LoRA experts, but {}@{} stores `{name}` as a {} delta",
                        m.name, m.version, m.kind
                    ),
                    Some(
                        "use a strategy that works on deltas (e.g. `mean`, `ties`), which densifies LoRA inputs",
                    ),
                ));
            }
        }
    }
    let [out, inp] = shape else {
        return Err(Error::input(
            format!("`{strategy}` needs 2-D tensors, but `{name}` has shape {shape:?}"),
            None,
        ));
    };
    let (out, inp) = (*out as usize, *inp as usize);
    let refs: Vec<(f64, &LoraFactors)> = factors.iter().map(|(w, f)| (*w, f)).collect();
    let f = match strategy {
        Strategy::Svd => lora::svd(&refs, out, inp, params.rank.map(|r| r as usize)),
        _ => lora::cat(&refs, out, inp),
    };
    let dtype = dtype.unwrap_or(Dtype::F32);
    Ok(Content::Lora {
        rank: f.rank as u32,
        alpha: f.alpha,
        a: dtype.from_f32(&f.a),
        b: dtype.from_f32(&f.b),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(experts: usize, weights: Vec<f64>, method: MergeMethod, out: PathBuf) -> MergeOptions {
        MergeOptions {
            experts: (0..experts)
                .map(|i| PathBuf::from(format!("in-{i}.xpm")))
                .collect(),
            weights,
            method,
            name: "merged".into(),
            version: semver::Version::new(0, 1, 0),
            out,
            level: 3,
            recipe: None,
        }
    }

    fn builtin(s: Strategy) -> MergeMethod {
        MergeMethod::builtin(s)
    }

    fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn check_request_defaults_the_weights_and_refuses_bad_requests() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("m.xpm");
        let p = Printer::silent();
        let mean = || builtin(Strategy::Mean);
        assert_eq!(
            check_request(&opts(2, vec![], mean(), out.clone()), &p).unwrap(),
            vec![1.0, 1.0]
        );
        assert_eq!(
            check_request(&opts(2, vec![0.5, 2.0], mean(), out.clone()), &p).unwrap(),
            vec![0.5, 2.0]
        );
        let e = err(check_request(&opts(0, vec![], mean(), out.clone()), &p));
        assert_eq!(e, "nothing to merge");
        let e = err(check_request(
            &opts(2, vec![1.0, 2.0, 3.0], mean(), out.clone()),
            &p,
        ));
        assert_eq!(e, "3 weights for 2 experts");
        let e = err(check_request(
            &opts(2, vec![1.0, f64::NAN], mean(), out.clone()),
            &p,
        ));
        assert_eq!(e, "weights must be finite numbers");
        let mut bad_name = opts(1, vec![], mean(), out.clone());
        bad_name.name = "Bad Name".into();
        assert!(err(check_request(&bad_name, &p)).starts_with("invalid expert name"));
        // Parameters are checked for the strategy before anything is read.
        let bad_params = MergeMethod::Builtin {
            strategy: Strategy::Ties,
            params: MergeParams {
                density: 2.0,
                ..MergeParams::default()
            },
            overrides: Vec::new(),
        };
        assert!(check_request(&opts(2, vec![], bad_params, out.clone()), &p).is_err());
        // The output may not be one of the inputs.
        let e = err(check_request(
            &opts(2, vec![], mean(), PathBuf::from("in-1.xpm")),
            &p,
        ));
        assert!(e.contains("is also an input"), "{e}");
    }

    fn degenerate(strategy: Strategy, weights: Vec<f64>) -> Result<Vec<f64>> {
        let n = weights.len();
        let o = opts(
            n,
            weights.clone(),
            builtin(strategy),
            PathBuf::from("m.xpm"),
        );
        let digests: Vec<InputDigest> = (0..n)
            .map(|i| InputDigest {
                artifact: None,
                content: Some(format!("sha256:{i}")),
            })
            .collect();
        let desc: Vec<String> = (0..n).map(|i| format!("e{i}@1.0.0")).collect();
        let names = vec!["w".to_string()];
        degenerate_checks(&o, weights, &names, &digests, &desc, &Printer::silent())
    }

    #[test]
    fn degenerate_weights_are_refused_or_rescaled() {
        let e = err(degenerate(Strategy::TaskArithmetic, vec![0.0, 0.0]));
        assert_eq!(e, "every weight is 0: the merge would be empty");
        let e = err(degenerate(Strategy::Mean, vec![1.0, -1.0]));
        assert!(
            e.contains("sum to 0, and `mean` divides by their sum"),
            "{e}"
        );
        // A zero sum is fine where nothing divides by it.
        assert_eq!(
            degenerate(Strategy::TaskArithmetic, vec![1.0, -1.0]).unwrap(),
            vec![1.0, -1.0]
        );
        // An overflowing sum: only the ratios matter for mean, so it is rescaled...
        assert_eq!(
            degenerate(Strategy::Mean, vec![f64::MAX, f64::MAX / 2.0]).unwrap(),
            vec![1.0, 0.5]
        );
        // ...but not for task arithmetic, whose scale is the result's.
        let e = err(degenerate(
            Strategy::TaskArithmetic,
            vec![f64::MAX, f64::MAX],
        ));
        assert!(e.contains("their sum overflows"), "{e}");
        // A single expert or a repeated artifact is only warned about.
        assert_eq!(degenerate(Strategy::Mean, vec![2.0]).unwrap(), vec![2.0]);
    }

    fn recipe(strategy: &str, weights: &[f64]) -> Recipe {
        Recipe {
            version: crate::merge::recipe::RECIPE_VERSION,
            strategy: strategy.into(),
            preset: None,
            seed: 0,
            output: None,
            params: BTreeMap::new(),
            experts: weights
                .iter()
                .enumerate()
                .map(|(i, w)| RecipeExpert {
                    expert: format!("e{i}.xpm"),
                    weight: *w,
                    sha256: None,
                    content_digest: None,
                })
                .collect(),
            overrides: Vec::new(),
            plugin_sha256: None,
        }
    }

    #[test]
    fn method_from_recipe_plans_builtins_and_names_unknown_strategies() {
        let (m, w) = method_from_recipe(&recipe("ties", &[1.0, 0.5]), &[], &[]).unwrap();
        assert_eq!(w, vec![1.0, 0.5]);
        assert!(matches!(
            m,
            MergeMethod::Builtin {
                strategy: Strategy::Ties,
                ..
            }
        ));
        assert_eq!(m.label(), "ties");

        let d = tempfile::tempdir().unwrap();
        let search = vec![d.path().to_path_buf()];
        let e = method_from_recipe(&recipe("tie", &[1.0]), &[], &search).unwrap_err();
        assert!(
            e.to_string()
                .contains("unknown merge strategy `tie`: not built in, and no plugin provides it"),
            "{e}"
        );
        let hint = e.hint().unwrap_or_default().to_string();
        assert!(hint.contains("ties"), "{hint}");
        assert!(hint.contains(&library_file("tie")), "{hint}");
        assert!(hint.contains(&d.path().display().to_string()), "{hint}");
    }

    fn library_file(name: &str) -> String {
        crate::merge::plugin::library_file_name(name)
    }

    fn flags(experts: &[&str], weights: &[f64]) -> MergeFlags {
        MergeFlags {
            experts: experts.iter().map(|s| s.to_string()).collect(),
            weights: weights.to_vec(),
            strategy: "mean".into(),
            ..MergeFlags::default()
        }
    }

    #[test]
    fn recipes_from_flags_and_files() {
        let r = RecipeSource::Flags(flags(&["a.xpm", "b@^1"], &[]))
            .recipe()
            .unwrap();
        assert_eq!(r.seed, 0);
        assert_eq!(
            r.experts.iter().map(|e| e.weight).collect::<Vec<_>>(),
            vec![1.0, 1.0]
        );
        let mut f = flags(&["a.xpm", "b.xpm"], &[0.25, 0.75]);
        f.seed = Some(9);
        f.preset = Some("mergekit".into());
        f.params = vec![" density = 0.5".into()];
        f.overrides = vec!["*.bias:strategy=mean".into()];
        let r = RecipeSource::Flags(f).recipe().unwrap();
        assert_eq!(r.seed, 9);
        assert_eq!(r.experts[1].weight, 0.75);
        assert_eq!(r.params.len(), 1);
        assert!(r.params.contains_key("density"));
        assert!(r.preset.is_some());
        assert_eq!(r.overrides.len(), 1);

        let e = err(RecipeSource::Flags(flags(&["a.xpm"], &[1.0, 2.0])).recipe());
        assert_eq!(e, "2 weights for 1 experts");
        let mut f = flags(&["a.xpm"], &[]);
        f.params = vec!["density".into()];
        assert_eq!(
            err(RecipeSource::Flags(f).recipe()),
            "`--param density` is not KEY=VALUE"
        );
        let mut f = flags(&["a.xpm"], &[]);
        f.preset = Some("nope".into());
        assert_eq!(
            err(RecipeSource::Flags(f).recipe()),
            "unknown preset `nope`"
        );

        // A recipe file's seed, unless one is given.
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("merge.toml");
        std::fs::write(
            &path,
            "strategy = \"ties\"\nseed = 7\n[[experts]]\nexpert = \"a.xpm\"\n",
        )
        .unwrap();
        let file = |seed| RecipeSource::File {
            path: path.clone(),
            seed,
        };
        assert_eq!(file(None).recipe().unwrap().seed, 7);
        assert_eq!(file(Some(3)).recipe().unwrap().seed, 3);
    }
}
