//! `xpm merge`: merge experts (`.xpm` paths) with a built-in strategy into a new expert.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::format::manifest::{BaseModel, ExpertKind, Manifest, Provenance, ProvenanceInput};
use crate::format::{ArtifactReader, ArtifactWriter, Content, Dtype, TensorData, encode_tensor};
use crate::merge::{Input, MergeParams, Output, Strategy, merge_tensor};
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

    let readers: Vec<ArtifactReader> = opts
        .experts
        .iter()
        .map(ArtifactReader::open)
        .collect::<Result<_>>()?;
    let first = readers[0].manifest();
    for r in &readers[1..] {
        let m = r.manifest();
        if m.base.digest != first.base.digest {
            return Err(Error::input(
                format!(
                    "`{}` ({}@{}) targets base `{}` ({}), but `{}` ({}@{}) targets `{}` ({})",
                    r.path().display(),
                    m.name,
                    m.version,
                    m.base.id,
                    m.base.digest,
                    readers[0].path().display(),
                    first.name,
                    first.version,
                    first.base.id,
                    first.base.digest
                ),
                Some("experts can only be merged when they were made from the same base model"),
            ));
        }
    }
    // The tensor set: every tensor of any expert, in first-seen order; shapes and dtypes must agree.
    let mut names: Vec<String> = Vec::new();
    let mut info: BTreeMap<String, (Vec<u64>, Dtype)> = BTreeMap::new();
    for r in &readers {
        for t in &r.manifest().tensors {
            match info.get(&t.name) {
                None => {
                    names.push(t.name.clone());
                    info.insert(t.name.clone(), (t.shape.clone(), t.dtype));
                }
                Some((shape, _)) if *shape != t.shape => {
                    return Err(Error::input(
                        format!(
                            "tensor `{}` is {:?} in `{}` but {:?} in an earlier expert",
                            t.name,
                            t.shape,
                            r.path().display(),
                            shape
                        ),
                        Some(
                            "experts of one base model have the same tensor shapes; is one of them corrupt or for another model?",
                        ),
                    ));
                }
                Some(_) => {}
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
            opts.strategy,
            names.len()
        ),
    );
    let pb = printer.progress(names.len() as u64, "Merging");
    let mut writer = ArtifactWriter::create(&opts.out, opts.level)?;
    let mut densified = Vec::new();
    let mut kinds = std::collections::BTreeSet::new();
    super::map_ordered(
        &names,
        |name| {
            let (shape, dtype) = info[name].clone();
            let mut inputs = Vec::with_capacity(readers.len());
            let mut dense_input = false;
            for r in &readers {
                let (input, dense) = load_input(r, name)?;
                dense_input |= dense;
                inputs.push(input);
            }
            let out = merge_tensor(name, &shape, &inputs, &weights, opts.strategy, &opts.params);
            let (content, sparse) = match out {
                Output::Sparse { indices, values } => (
                    Content::Sparse {
                        values: dtype.from_f32(&values),
                        indices,
                        block_size: None,
                    },
                    true,
                ),
                Output::Dense { values } => (
                    Content::Dense {
                        delta: dtype.from_f32(&values),
                    },
                    false,
                ),
            };
            let t = TensorData {
                name: name.clone(),
                shape,
                dtype,
                content,
            };
            let encoded = encode_tensor(&t, opts.level)?;
            pb.inc(1);
            Ok((encoded, dense_input, sparse))
        },
        |(encoded, dense, sparse)| {
            if dense {
                densified.push(encoded.entry().name.clone());
            }
            kinds.insert(sparse);
            writer.push(encoded)
        },
    )?;
    pb.finish_and_clear();
    let kind = if kinds.contains(&true) {
        ExpertKind::Sparse
    } else {
        ExpertKind::Dense
    };
    let mut inputs = Vec::new();
    for r in &readers {
        let m = r.manifest();
        inputs.push(ProvenanceInput {
            role: "expert".into(),
            name: format!("{}@{}", m.name, m.version),
            digest: Some(r.verify_file_digest()?),
        });
    }
    let mut extra = BTreeMap::new();
    extra.insert(
        "merge".to_string(),
        serde_json::json!({
            "strategy": opts.strategy,
            "weights": weights,
            "params": opts.params,
            "densified": densified,
        }),
    );
    let manifest = Manifest {
        format_version: String::new(),
        name: opts.name.clone(),
        version: opts.version.clone(),
        description: Some(format!(
            "`{}` merge of {}",
            opts.strategy,
            inputs_desc.join(", ")
        )),
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

/// One expert's delta for a tensor as an engine input; `true` when it is not sparse.
fn load_input(r: &ArtifactReader, name: &str) -> Result<(Input, bool)> {
    let Some(i) = r.manifest().tensors.iter().position(|t| t.name == name) else {
        return Ok((Input::Absent, false));
    };
    let t = r.read_tensor(i)?;
    Ok(match t.content {
        Content::Sparse {
            indices, values, ..
        } => (
            Input::Sparse {
                indices,
                values: t.dtype.to_f32(&values),
            },
            false,
        ),
        Content::Dense { delta } => (
            Input::Dense {
                values: t.dtype.to_f32(&delta),
            },
            true,
        ),
        Content::Lora { rank, alpha, a, b } => {
            // ΔW = (α / r) · B · A, formed densely (reported to the user).
            let (out, inp, r) = (t.shape[0] as usize, t.shape[1] as usize, rank as usize);
            let (a, b) = (t.dtype.to_f32(&a), t.dtype.to_f32(&b));
            let scale = (alpha / rank as f64) as f32;
            let mut w = vec![0f32; out * inp];
            for o in 0..out {
                for k in 0..r {
                    let bk = b[o * r + k] * scale;
                    let row = &a[k * inp..(k + 1) * inp];
                    for (x, &av) in w[o * inp..(o + 1) * inp].iter_mut().zip(row) {
                        *x += bk * av;
                    }
                }
            }
            (Input::Dense { values: w }, true)
        }
    })
}
