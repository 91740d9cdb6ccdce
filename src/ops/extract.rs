//! `xpm extract`: a sparse (or dense) expert from a base and a fine-tuned checkpoint.
//!
//! Per target tensor, keeps exactly k = ⌊density · n⌋ entries of |tuned − base| with the largest
//! magnitude, ties going to the lower flat index, so the result is reproducible bit for bit.

use std::path::PathBuf;

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::checkpoint::{self, Checkpoint};
use crate::error::{Error, Result};
use crate::format::manifest::{
    BaseModel, ExpertKind, FORMAT_MAJOR, FORMAT_MINOR, Manifest, Provenance, ProvenanceInput,
    Selection,
};
use crate::format::{ArtifactWriter, Content, Dtype, TensorData, encode_tensor};
use crate::home::XpmHome;
use crate::printer::Printer;
use crate::select::{keep_count, top_k_abs};

/// Everything `extract` needs.
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    pub base: PathBuf,
    pub tuned: PathBuf,
    /// Fraction of entries kept per target tensor, in (0, 1]; ignored for dense.
    pub density: f64,
    /// Glob patterns over tensor names; empty = every floating-point tensor of rank ≥ 2.
    pub targets: Vec<String>,
    /// `Sparse` or `Dense`.
    pub kind: ExpertKind,
    pub name: String,
    pub version: semver::Version,
    pub out: PathBuf,
    /// Human id of the base model; defaults to the base path's file or directory name.
    pub base_id: Option<String>,
    /// Stored value type; defaults to the tuned tensor's type (f32 for f64 inputs).
    pub values_dtype: Option<Dtype>,
    pub description: Option<String>,
    pub license: Option<String>,
    pub authors: Vec<String>,
    pub level: i32,
}

/// Check flags before any work starts.
pub fn validate(opts: &ExtractOptions) -> Result<()> {
    crate::format::manifest::validate_name(&opts.name).map_err(|e| {
        Error::input(
            format!("invalid expert name: {e}"),
            Some("e.g. `sst2-sparse` or `team/sst2-sparse`"),
        )
    })?;
    if opts.kind == ExpertKind::Sparse && !(opts.density > 0.0 && opts.density <= 1.0) {
        return Err(Error::input(
            format!("density {} is outside (0, 1]", opts.density),
            Some(
                "density is the fraction of entries kept per tensor, e.g. `--density 0.05` for 5 %",
            ),
        ));
    }
    if opts.kind == ExpertKind::Lora {
        return Err(Error::input(
            "extract builds sparse or dense experts",
            Some("LoRA experts come from `xpm train --method lora`"),
        ));
    }
    Ok(())
}

/// Run the extraction and write the artifact. Returns the written manifest.
pub fn extract(opts: &ExtractOptions, home: &XpmHome, printer: &Printer) -> Result<Manifest> {
    validate(opts)?;
    let inputs: Vec<PathBuf> = [&opts.base, &opts.tuned]
        .into_iter()
        .flat_map(|p| crate::fsutil::files_of(p))
        .collect();
    let inputs: Vec<&std::path::Path> = inputs.iter().map(PathBuf::as_path).collect();
    crate::fsutil::check_outputs(&[("-o", &opts.out)], &inputs)?;
    crate::fsutil::announce_new_parents(&[("-o", &opts.out)], printer);
    let base = Checkpoint::open(&opts.base)?;
    let tuned = Checkpoint::open(&opts.tuned)?;
    compare_tensor_sets(&base, &tuned)?;
    let targets = select_targets(&base, &opts.targets)?;

    printer.status("Hashing", format!("base model `{}`", opts.base.display()));
    let base_digest = base.digest(Some(&home.cache))?;
    let tuned_digest = tuned.digest(Some(&home.cache))?;

    printer.status(
        "Extracting",
        format!(
            "{}@{} ({} of {} tensors, {})",
            opts.name,
            opts.version,
            targets.len(),
            base.len(),
            match opts.kind {
                ExpertKind::Sparse => format!("density {}", opts.density),
                _ => "dense".to_string(),
            }
        ),
    );
    let pb = printer.progress(targets.len() as u64, "Extracting");
    let mut writer = ArtifactWriter::create(&opts.out, opts.level)?;
    crate::parallel::map_ordered(
        &targets,
        |name| {
            let t = delta_tensor(&base, &tuned, name, opts)?;
            let e = encode_tensor(&t, opts.level);
            pb.inc(1);
            pb.set_message(name.clone());
            e
        },
        |e| writer.push(e),
    )?;
    pb.finish_and_clear();

    let base_id = opts.base_id.clone().unwrap_or_else(|| {
        opts.base
            .file_name()
            .map(|f| {
                f.to_string_lossy()
                    .trim_end_matches(".safetensors")
                    .to_string()
            })
            .unwrap_or_else(|| opts.base.display().to_string())
    });
    let manifest = Manifest {
        format_version: format!("{FORMAT_MAJOR}.{FORMAT_MINOR}"),
        name: opts.name.clone(),
        version: opts.version.clone(),
        description: opts.description.clone(),
        license: opts.license.clone(),
        authors: opts.authors.clone(),
        base: BaseModel {
            id: base_id,
            digest: base_digest.clone(),
        },
        kind: opts.kind,
        tensors: Vec::new(),
        selection: (opts.kind == ExpertKind::Sparse).then(|| Selection {
            method: "extract".into(),
            score_rule: Some("magnitude".into()),
            keep_ratio: Some(opts.density),
            schedule: Some("one-shot".into()),
            targets: opts.targets.clone(),
            tie_break: Some("lower flat index first".into()),
            ..Selection::default()
        }),
        training: None,
        provenance: Some(Provenance {
            tool: format!("xpm {}", env!("CARGO_PKG_VERSION")),
            inputs: vec![
                ProvenanceInput {
                    role: "base".into(),
                    name: opts.base.display().to_string(),
                    digest: Some(base_digest),
                    content_digest: None,
                },
                ProvenanceInput {
                    role: "tuned".into(),
                    name: opts.tuned.display().to_string(),
                    digest: Some(tuned_digest),
                    content_digest: None,
                },
            ],
            ..Provenance::default()
        }),
        payload: None,
        extra: Default::default(),
    };
    let manifest = writer.finish(manifest)?;
    printer.status(
        "Wrote",
        format!(
            "{} ({} tensors)",
            opts.out.display(),
            manifest.tensors.len()
        ),
    );
    Ok(manifest)
}

/// Refuse base/tuned pairs whose tensor names or shapes differ, listing the differences.
pub fn compare_tensor_sets(base: &Checkpoint, tuned: &Checkpoint) -> Result<()> {
    let mut problems = Vec::new();
    for n in base.names() {
        match tuned.info(n) {
            None => problems.push(format!("`{n}` is only in the base")),
            Some(t) => {
                let b = base.info(n).expect("listed");
                if b.shape != t.shape {
                    problems.push(format!(
                        "`{n}` is {:?} in the base, {:?} in the tuned model",
                        b.shape, t.shape
                    ));
                }
            }
        }
    }
    for n in tuned.names() {
        if base.info(n).is_none() {
            problems.push(format!("`{n}` is only in the tuned model"));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let more = problems.len().saturating_sub(5);
    let mut msg = format!(
        "`{}` and `{}` do not have the same tensors: {}",
        base.root().display(),
        tuned.root().display(),
        problems[..problems.len().min(5)].join("; ")
    );
    if more > 0 {
        msg.push_str(&format!("; and {more} more"));
    }
    Err(Error::input(
        msg,
        Some(
            "the tuned checkpoint must be a fine-tune of this base (same architecture and tensor names)",
        ),
    ))
}

/// The target tensors: names matching the patterns (or every float tensor of rank ≥ 2).
pub fn select_targets(base: &Checkpoint, patterns: &[String]) -> Result<Vec<String>> {
    let set = build_globs(patterns)?;
    let names: Vec<String> = base
        .names()
        .filter(|n| {
            let info = base.info(n).expect("listed");
            checkpoint::is_float(info.dtype)
                && match &set {
                    Some(s) => s.is_match(n),
                    None => info.shape.len() >= 2,
                }
        })
        .map(str::to_string)
        .collect();
    // `xpm apply` adds deltas to f32, f16 and bf16 tensors only: refuse now what it would
    // refuse later.
    if let Some(n) = names
        .iter()
        .find(|n| base.info(n).expect("listed").dtype == safetensors::Dtype::F64)
    {
        return Err(Error::input(
            format!(
                "target tensor `{n}` of `{}` is f64; xpm's experts apply to f32, f16 and bf16 tensors",
                base.root().display()
            ),
            Some("convert both models to f32 first, or leave the f64 tensors out with --targets"),
        ));
    }
    if names.is_empty() {
        let sample: Vec<&str> = base.names().take(3).collect();
        return Err(Error::input(
            format!(
                "no floating-point tensor of `{}` matches the targets {:?}",
                base.root().display(),
                patterns
            ),
            Some(&format!(
                "targets are glob patterns over tensor names, such as `*.attention.*.weight`; this model has e.g. {}",
                sample
                    .iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        ));
    }
    Ok(names)
}

fn build_globs(patterns: &[String]) -> Result<Option<GlobSet>> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(Glob::new(p).map_err(|e| {
            Error::input(
                format!("invalid target pattern `{p}`: {e}"),
                Some("use glob syntax, e.g. `*.query.weight`"),
            )
        })?);
    }
    Ok(Some(b.build().map_err(|e| {
        Error::input(format!("invalid target patterns: {e}"), None)
    })?))
}

/// The delta of one tensor as the expert stores it.
fn delta_tensor(
    base: &Checkpoint,
    tuned: &Checkpoint,
    name: &str,
    opts: &ExtractOptions,
) -> Result<TensorData> {
    let b = base.to_f32(name)?;
    let t = tuned.to_f32(name)?;
    let info = tuned.info(name).expect("compared");
    let dtype = opts
        .values_dtype
        .or_else(|| Dtype::from_safetensors(info.dtype))
        .unwrap_or(Dtype::F32);
    let delta: Vec<f32> = t.iter().zip(&b).map(|(t, b)| t - b).collect();
    if let Some(i) = delta.iter().position(|d| !d.is_finite()) {
        return Err(Error::input(
            format!(
                "tensor `{name}`: the delta at flat index {i} is not finite ({})",
                delta[i]
            ),
            Some("the base or the tuned checkpoint holds NaN or infinite values"),
        ));
    }
    let shape: Vec<u64> = info.shape.iter().map(|&d| d as u64).collect();
    let content = match opts.kind {
        ExpertKind::Dense => Content::Dense {
            delta: dtype.from_f32(&delta),
        },
        _ => {
            let k = keep_count(opts.density, delta.len());
            let indices = top_k_abs(&delta, k);
            let kept: Vec<f32> = indices.iter().map(|&i| delta[i as usize]).collect();
            Content::Sparse {
                indices,
                values: dtype.from_f32(&kept),
                block_size: None,
            }
        }
    };
    Ok(TensorData {
        name: name.to_string(),
        shape,
        dtype,
        content,
    })
}
