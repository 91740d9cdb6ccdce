//! `xpm merge`: merge experts (`.xpm` files or installed experts, located by the CLI) with a
//! built-in strategy, per-tensor overrides and an optional recipe, into a new expert.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::format::manifest::{BaseModel, ExpertKind, Manifest, Provenance, ProvenanceInput};
use crate::format::{ArtifactReader, ArtifactWriter, Content, Dtype, TensorData, encode_tensor};
use crate::merge::engine::merge_tensor_owned;
use crate::merge::lora::{self, LoraFactors};
use crate::merge::plugin::Plugin;
use crate::merge::recipe::{Recipe, TensorOverride};
use crate::merge::{Input, MergeParams, Output, Strategy};
use crate::merge::input::{ExpertSet, load_input};
use crate::printer::Printer;

/// Everything `merge` needs.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub experts: Vec<PathBuf>,
    /// One weight per expert (default 1).
    pub weights: Vec<f64>,
    pub strategy: Strategy,
    pub params: MergeParams,
    pub name: String,
    pub version: semver::Version,
    pub out: PathBuf,
    pub level: i32,
    /// Per-tensor strategy and parameters; the first matching pattern wins.
    pub overrides: Vec<TensorOverride>,
    /// The recipe this merge runs, embedded in the manifest with each expert pinned to its
    /// exact version and sha256; expert digests it already names are checked.
    pub recipe: Option<Recipe>,
    /// A plugin strategy and its parameters (JSON object); replaces `strategy` for every tensor.
    pub plugin: Option<(std::sync::Arc<Plugin>, serde_json::Value)>,
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
    opts.params.validate_for(opts.strategy)?;
    if let Some((plugin, params)) = &opts.plugin {
        if !opts.overrides.is_empty() {
            return Err(Error::input(
                "per-tensor overrides cannot be combined with a plugin strategy",
                Some("merge with the plugin alone, or use built-in strategies with overrides"),
            ));
        }
        plugin.check_params(params)?;
    }
    let label = match &opts.plugin {
        Some((p, _)) => format!("{} (plugin {})", p.name, p.version),
        None => opts.strategy.to_string(),
    };
    for o in &opts.overrides {
        o.params.validate_for(o.strategy)?;
    }

    let ExpertSet {
        readers,
        names,
        info,
    } = ExpertSet::open(&opts.experts)?;
    // The strategy and parameters of a tensor: the first matching override, else the merge's.
    let pick = |name: &str| match opts.overrides.iter().find(|o| o.matcher.is_match(name)) {
        Some(o) => (o.strategy, &o.params),
        None => (opts.strategy, &opts.params),
    };
    if opts.plugin.is_none() {
        for name in &names {
            let (strategy, params) = pick(name);
            params.check_tensor(strategy, name, info[name].0.iter().product())?;
        }
    }
    let first = readers[0].manifest();
    // Every input's file digest (recorded in provenance, checked against recipe pins).
    let digests: Vec<String> = {
        use rayon::prelude::*;
        readers
            .par_iter()
            .map(ArtifactReader::verify_file_digest)
            .collect::<Result<_>>()?
    };
    if let Some(recipe) = &opts.recipe {
        for ((e, r), got) in recipe.experts.iter().zip(&readers).zip(&digests) {
            if let Some(want) = &e.sha256
                && got != want
            {
                return Err(Error::input(
                    format!(
                        "the recipe pins `{}` to {want}, but `{}` is {got}",
                        e.expert,
                        r.path().display()
                    ),
                    Some(
                        "install the exact artifact the recipe names, or remove its `sha256` to accept another",
                    ),
                ));
            }
        }
    }
    let inputs_desc: Vec<String> = readers
        .iter()
        .map(|r| format!("{}@{}", r.manifest().name, r.manifest().version))
        .collect();
    printer.status(
        "Merging",
        format!(
            "{} with `{}` ({} tensors)",
            inputs_desc.join(", "),
            label,
            names.len()
        ),
    );
    let pb = printer.progress(names.len() as u64, "Merging");
    let mut writer = ArtifactWriter::create(&opts.out, opts.level)?;
    let mut densified = Vec::new();
    let mut kinds = std::collections::HashSet::new();
    crate::parallel::map_ordered(
        &names,
        |name| {
            let (shape, dtype) = info[name].clone();
            let mut dense_input = false;
            let (strategy, params) = pick(name);
            let (content, kind) = if let Some((plugin, pparams)) = &opts.plugin {
                let mut inputs = Vec::with_capacity(readers.len());
                for r in &readers {
                    let (input, dense) = load_input(r, name)?;
                    dense_input |= dense;
                    inputs.push(input);
                }
                let out = plugin.instance(pparams)?.merge(
                    name,
                    &shape,
                    dtype,
                    &inputs,
                    &weights,
                    opts.params.seed,
                )?;
                inputs.into_iter().for_each(Input::recycle);
                output_content(out, dtype)
            } else if strategy.is_lora_space() {
                (
                    lora_merge(&readers, name, &shape, &weights, strategy, params)?,
                    ExpertKind::Lora,
                )
            } else {
                let mut inputs = Vec::with_capacity(readers.len());
                for r in &readers {
                    let (input, dense) = load_input(r, name)?;
                    dense_input |= dense;
                    inputs.push(input);
                }
                output_content(
                    merge_tensor_owned(name, &shape, inputs, &weights, strategy, params),
                    dtype,
                )
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
    let kind = if kinds.contains(&ExpertKind::Lora) {
        ExpertKind::Lora
    } else if kinds.contains(&ExpertKind::Sparse) {
        ExpertKind::Sparse
    } else {
        ExpertKind::Dense
    };
    let mut inputs = Vec::new();
    for (r, d) in readers.iter().zip(&digests) {
        let m = r.manifest();
        inputs.push(ProvenanceInput {
            role: "expert".into(),
            name: format!("{}@{}", m.name, m.version),
            digest: Some(d.clone()),
        });
    }
    let mut extra = BTreeMap::new();
    extra.insert(
        "merge".to_string(),
        serde_json::json!({
            "strategy": match &opts.plugin {
                Some((p, _)) => serde_json::Value::from(p.name.clone()),
                None => serde_json::to_value(opts.strategy).expect("strategy"),
            },
            "plugin": opts.plugin.as_ref().map(|(p, params)| serde_json::json!({
                "name": p.name,
                "version": p.version,
                "sha256": p.sha256,
                "abi": format!("{}.{}", p.abi_major, p.abi_minor),
                "params": params,
            })),
            "weights": weights,
            "params": if opts.plugin.is_some() { serde_json::Value::Null } else { serde_json::to_value(&opts.params).expect("params") },
            "overrides": opts.overrides.iter().map(|o| serde_json::json!({
                "tensors": o.pattern,
                "strategy": o.strategy,
                "params": o.params,
            })).collect::<Vec<_>>(),
            "densified": densified,
        }),
    );
    if let Some(recipe) = &opts.recipe {
        // Pin every expert to what was actually merged, so the recipe re-runs exactly.
        let mut pinned = recipe.clone();
        for (e, input) in pinned.experts.iter_mut().zip(&inputs) {
            let (name, version) = input.name.split_once('@').expect("name@version");
            e.expert = format!("{name}@={version}");
            e.sha256 = input.digest.clone();
        }
        if let Some((p, _)) = &opts.plugin {
            pinned.plugin_sha256 = Some(p.sha256.clone());
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
    let manifest = Manifest {
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
    };
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
