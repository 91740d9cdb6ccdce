//! mttl expert libraries: a directory with, per expert, `<expert>.ckpt` (`torch.save` of a
//! dict of tensors) and `<expert>.meta` (`torch.save` of plain metadata: `expert_name`,
//! `expert_model` = the base's Hub id, `expert_config`, `training_config`, `expert_deleted`).
//! Other files (`<expert>.<type>.bin` auxiliaries, a README, paper-era `<expert>_mask.npz`)
//! are ignored. Both pickles are read by the restricted reader of [`crate::torch`].
//!
//! Two kinds of expert come in:
//!
//! - **sparse** (mttl's masked sparse adapters): `<module>.sparse_layer.weight` `[out, in]`
//!   dense values with `<module>.sparse_layer.weight_mask` (0/1, float or bool/uint8) and an
//!   optional `<module>.sparse_layer.bias` `[out]`; mttl 1.0's `MaskedLinear` names them
//!   `sparse_weights`, `binary_mask` and `sparse_bias`, read the same. ΔW = weight ⊙ mask
//!   becomes an xpm sparse tensor on `<module>.weight` (the flat positions where the mask is
//!   non-zero, with the weight's values there, f32) and Δb = bias a dense delta on
//!   `<module>.bias`.
//! - **LoRA**: `<module>.lora_a` `[in, r]` and `<module>.lora_b` `[r, out]`, with the forward
//!   `x·lora_a·lora_b·(α/r)`, so ΔW = (α/r)·(lora_a·lora_b)ᵀ: an xpm LoRA tensor with
//!   A = lora_aᵀ `[r, in]` and B = lora_bᵀ `[out, r]` (exact transposes, dtype kept), α and r
//!   from the metadata's `lora_alpha` and `lora_rank` (`expert_config`, else
//!   `training_config`).
//!
//! A module path maps to the base tensor `<candidate>.weight` where the candidate is the path
//! itself, else the path with leading segments stripped (an mttl `model.` prefix the base
//! lacks), else the one base name that ends with `.<path>.weight` (a prefix the base has).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use xpm_core::checkpoint::Checkpoint;
use xpm_core::error::{Error, Result};
use xpm_core::format::{Content, Dtype, TensorData};

use crate::torch::{self, PyValue, TorchTensor};
use crate::{Imported, ImportedTensor, Pending, Source};

/// An expert's weights in a library.
pub const CKPT_EXT: &str = "ckpt";
/// An expert's metadata in a library.
pub const META_EXT: &str = "meta";

/// The experts of a library: the names with both `<name>.ckpt` and `<name>.meta`, sorted.
pub fn list(library: &Path) -> Result<Vec<String>> {
    use xpm_core::error::IoResultExt;
    let meta = std::fs::metadata(library).at("open", library)?;
    if !meta.is_dir() {
        return Err(Error::input(
            format!("`{}` is not a directory", library.display()),
            Some("give the mttl library's directory (it holds <expert>.ckpt and <expert>.meta)"),
        ));
    }
    let mut ckpts = std::collections::BTreeSet::new();
    let mut metas = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(library).at("list", library)? {
        let entry = entry.at("list", library)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(".ckpt") {
            ckpts.insert(stem.to_string());
        } else if let Some(stem) = name.strip_suffix(".meta") {
            metas.insert(stem.to_string());
        }
    }
    Ok(ckpts.intersection(&metas).cloned().collect())
}

fn check_name(expert: &str) -> Result<()> {
    if expert.is_empty()
        || expert.contains(['/', '\\', '\0'])
        || expert.contains("..")
        || expert.starts_with('.')
    {
        return Err(Error::input(
            format!("`{expert}` is not an mttl expert name"),
            Some("give the name of an expert in the library (its <name>.ckpt), without a path"),
        ));
    }
    Ok(())
}

/// The files of one expert, checked to exist.
fn files(library: &Path, expert: &str) -> Result<(PathBuf, PathBuf)> {
    check_name(expert)?;
    let ckpt = library.join(format!("{expert}.{CKPT_EXT}"));
    let meta = library.join(format!("{expert}.{META_EXT}"));
    if ckpt.is_file() && meta.is_file() {
        return Ok((ckpt, meta));
    }
    let available = list(library)?;
    if ckpt.is_file() {
        return Err(Error::input(
            format!(
                "the mttl library `{}` has `{expert}.ckpt` but no `{expert}.meta`",
                library.display()
            ),
            Some("mttl writes both; the metadata names the base model and LoRA's alpha and rank"),
        ));
    }
    let hint = format!(
        "{}{}",
        xpm_core::suggest::hint_prefix(expert, available.iter().map(String::as_str)),
        if available.is_empty() {
            "the library holds no experts (no <name>.ckpt with a <name>.meta)".to_string()
        } else {
            format!("experts in the library: {}", available.join(", "))
        }
    );
    Err(Error::input(
        format!(
            "the mttl library `{}` has no expert `{expert}`",
            library.display()
        ),
        Some(&hint),
    ))
}

/// The metadata fields used.
struct Meta {
    name: Option<String>,
    model: Option<String>,
    value: PyValue,
}

impl Meta {
    fn read(path: &Path) -> Result<Self> {
        let value = torch::load(path)?;
        if !matches!(value, PyValue::Dict(_)) {
            return Err(Error::input(
                format!(
                    "`{}` holds a {}, not mttl's metadata dict",
                    path.display(),
                    value.kind()
                ),
                Some(
                    "an mttl <expert>.meta is torch.save of a dict (expert_name, expert_model, …)",
                ),
            ));
        }
        let text = |k: &str| value.get(k).and_then(PyValue::as_str).map(str::to_string);
        let name = text("expert_name");
        let model = text("expert_model").or_else(|| {
            value
                .get("training_config")
                .and_then(|t| t.get("model"))
                .and_then(PyValue::as_str)
                .map(str::to_string)
        });
        if value.get("expert_deleted") == Some(&PyValue::Bool(true)) {
            return Err(Error::input(
                format!("`{}` marks the expert as deleted", path.display()),
                Some(
                    "mttl keeps deleted experts' files until the library is cleaned; choose another",
                ),
            ));
        }
        Ok(Meta { name, model, value })
    }

    /// `key` from `expert_config`, else `training_config`.
    fn config(&self, key: &str) -> Option<&PyValue> {
        ["expert_config", "training_config"]
            .iter()
            .filter_map(|c| self.value.get(c))
            .find_map(|c| c.get(key).filter(|v| !matches!(v, PyValue::None)))
    }
}

#[derive(Default)]
struct SparseParts {
    weight: Option<(String, TorchTensor)>,
    mask: Option<(String, TorchTensor)>,
    bias: Option<(String, TorchTensor)>,
}

#[derive(Default)]
struct LoraParts {
    a: Option<(String, TorchTensor)>,
    b: Option<(String, TorchTensor)>,
}

const KINDS_HINT: &str = "xpm imports mttl LoRA experts (<module>.lora_a, <module>.lora_b) and \
                          masked sparse experts (<module>.sparse_layer.weight, .weight_mask, \
                          .bias)";

/// Import expert `expert` of the mttl library `library` against `base`.
pub fn import(library: &Path, expert: &str, base: &Checkpoint) -> Result<Imported> {
    import_with(library, expert, base, &BTreeMap::new())
}

/// [`import`], recording `verified` digests (file name → `sha256:`, checked by the caller
/// against the bytes, as a Hub download's are) instead of hashing those files again.
pub fn import_with(
    library: &Path,
    expert: &str,
    base: &Checkpoint,
    verified: &BTreeMap<String, String>,
) -> Result<Imported> {
    let (ckpt_path, meta_path) = files(library, expert)?;
    let meta = Meta::read(&meta_path)?;
    let state = torch::load_state_dict(&ckpt_path)?;
    let ckpt = ckpt_path.display().to_string();

    let mut notes = Vec::new();
    let (format, mut out) = match Parts::group(&ckpt, state)? {
        Parts::Sparse(sparse) => {
            let mut out = Vec::new();
            for (module, parts) in &sparse {
                import_sparse(&ckpt, module, parts, base, &mut out, &mut notes)?;
            }
            ("mttl-sparse", out)
        }
        Parts::Lora(lora) => {
            let (rank, alpha) = lora_scale(&meta, &meta_path)?;
            let mut out = Vec::new();
            for (module, parts) in &lora {
                out.push(import_lora(&ckpt, module, parts, rank, alpha, base)?);
            }
            ("mttl-lora", out)
        }
    };
    check_deltas(&ckpt, &out)?;
    sort_like_base(&mut out, base);

    if let Some(name) = &meta.name
        && name != expert
    {
        notes.push(format!(
            "the metadata names the expert `{name}`; its files are `{expert}.ckpt/.meta`"
        ));
    }
    let source = Source {
        format: format.to_string(),
        location: library.display().to_string(),
        revision: None,
        files: digests(&[&ckpt_path, &meta_path], verified)?,
    };
    let mut extra = BTreeMap::new();
    extra.insert("mttl".to_string(), meta.value.to_json());
    let mut imported = Imported::new(
        out.into_iter().map(Pending::ready).collect(),
        source,
        meta.model.clone(),
        extra,
    );
    imported.notes = notes;
    Ok(imported)
}

/// An expert's tensors grouped by module: all sparse layers' parts or all LoRA factors.
enum Parts {
    Sparse(BTreeMap<String, SparseParts>),
    Lora(BTreeMap<String, LoraParts>),
}

impl Parts {
    /// Group a state dict's tensors by module and kind; a key of neither kind, a part given
    /// twice, a mix of kinds or no tensors at all is refused.
    fn group(ckpt: &str, state: Vec<(String, TorchTensor)>) -> Result<Self> {
        let mut sparse: BTreeMap<String, SparseParts> = BTreeMap::new();
        let mut lora: BTreeMap<String, LoraParts> = BTreeMap::new();
        for (key, t) in state {
            if let Some(module) = key.strip_suffix(".lora_a") {
                lora.entry(module.to_string()).or_default().a = Some((key.clone(), t));
            } else if let Some(module) = key.strip_suffix(".lora_b") {
                lora.entry(module.to_string()).or_default().b = Some((key.clone(), t));
            } else if let Some((module, part)) = key.rsplit_once(".sparse_layer.") {
                let p = sparse.entry(module.to_string()).or_default();
                let slot = p.slot(ckpt, &key, part)?;
                if slot.is_some() {
                    return Err(Error::input(
                        format!("`{ckpt}`: two tensors for `{key}` (old and new mttl names)"),
                        Some(KINDS_HINT),
                    ));
                }
                *slot = Some((key, t));
            } else {
                return Err(Error::input(
                    format!("`{ckpt}`: `{key}` is neither a LoRA factor nor a sparse layer's part"),
                    Some(KINDS_HINT),
                ));
            }
        }
        if !sparse.is_empty() && !lora.is_empty() {
            return Err(Error::input(
                format!("`{ckpt}` mixes LoRA factors and sparse layers"),
                Some(KINDS_HINT),
            ));
        }
        if sparse.is_empty() && lora.is_empty() {
            return Err(Error::input(
                format!("`{ckpt}` holds no tensors"),
                Some(KINDS_HINT),
            ));
        }
        Ok(if lora.is_empty() {
            Parts::Sparse(sparse)
        } else {
            Parts::Lora(lora)
        })
    }
}

impl SparseParts {
    /// The slot of `part` (a sparse layer's part, by its old or new mttl name) of `key`.
    fn slot(
        &mut self,
        ckpt: &str,
        key: &str,
        part: &str,
    ) -> Result<&mut Option<(String, TorchTensor)>> {
        Ok(match part {
            "weight" | "sparse_weights" => &mut self.weight,
            "weight_mask" | "binary_mask" => &mut self.mask,
            "bias" | "sparse_bias" => &mut self.bias,
            _ => {
                return Err(Error::input(
                    format!(
                        "`{ckpt}`: `{key}` is not a part of a masked sparse layer \
                         (weight, weight_mask, bias)"
                    ),
                    Some(
                        "xpm imports mttl's dense-masked sparse adapters; the CSR and \
                         block layouts (row_offs, col_idx, idxs) are not supported",
                    ),
                ));
            }
        })
    }
}

/// Every delta well-formed and finite.
fn check_deltas(ckpt: &str, out: &[ImportedTensor]) -> Result<()> {
    for t in out {
        t.data.validate()?;
        if let Some((part, i, v)) = t.data.first_non_finite() {
            return Err(Error::input(
                format!(
                    "`{ckpt}`: the delta of `{}` holds {v} ({part}, position {i})",
                    t.data.name
                ),
                Some("a NaN or ∞ in a delta poisons every merge; the expert's training diverged"),
            ));
        }
    }
    Ok(())
}

/// The base's name order, new tensors last.
fn sort_like_base(out: &mut [ImportedTensor], base: &Checkpoint) {
    let order: BTreeMap<&str, usize> = base.names().enumerate().map(|(i, n)| (n, i)).collect();
    out.sort_by_key(|t| {
        (
            order
                .get(t.data.name.as_str())
                .copied()
                .unwrap_or(usize::MAX),
            t.data.name.clone(),
        )
    });
}

/// The digests of the expert's files, by file name: `verified` ones as given, the others
/// hashed.
fn digests(
    paths: &[&Path],
    verified: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>> {
    let mut files = BTreeMap::new();
    for p in paths {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let digest = match verified.get(&name) {
            Some(d) => d.clone(),
            None => crate::file_digest(p)?,
        };
        files.insert(name, digest);
    }
    Ok(files)
}

/// LoRA's rank and alpha from the metadata.
fn lora_scale(meta: &Meta, path: &Path) -> Result<(u64, f64)> {
    let missing = |key: &str| {
        Error::input(
            format!(
                "`{}` gives no `{key}` (in expert_config or training_config)",
                path.display()
            ),
            Some(
                "a LoRA expert's scale is lora_alpha / lora_rank; without both xpm cannot import it",
            ),
        )
    };
    let rank = meta
        .config("lora_rank")
        .ok_or_else(|| missing("lora_rank"))?;
    let rank = rank
        .as_i64()
        .filter(|&r| r > 0 && r <= u32::MAX as i64)
        .ok_or_else(|| {
            Error::input(
                format!(
                    "`{}`: lora_rank is {rank:?}, not a positive int",
                    path.display()
                ),
                None,
            )
        })? as u64;
    let alpha = meta
        .config("lora_alpha")
        .ok_or_else(|| missing("lora_alpha"))?;
    let alpha = alpha.as_f64().filter(|a| a.is_finite()).ok_or_else(|| {
        Error::input(
            format!(
                "`{}`: lora_alpha is {alpha:?}, not a finite number",
                path.display()
            ),
            None,
        )
    })?;
    Ok((rank, alpha))
}

/// The base tensor `<candidate>.<param>` a module path maps to (see the module docs).
fn base_name(ckpt: &str, module: &str, param: &str, base: &Checkpoint) -> Result<String> {
    let segments: Vec<&str> = module.split('.').collect();
    for skip in 0..segments.len() {
        let candidate = format!("{}.{param}", segments[skip..].join("."));
        if base.info(&candidate).is_some() {
            return Ok(candidate);
        }
    }
    let suffix = format!(".{module}.{param}");
    let found: Vec<&str> = base.names().filter(|n| n.ends_with(&suffix)).collect();
    match found[..] {
        [one] => Ok(one.to_string()),
        [] => Err(Error::input(
            format!(
                "`{ckpt}`: module `{module}` matches no tensor of the base `{}` (tried \
                 `{module}.{param}` and the same with leading segments stripped)",
                base.root().display()
            ),
            Some(
                "check that --base is the model the expert was trained on (the metadata's expert_model)",
            ),
        )),
        _ => Err(Error::input(
            format!(
                "`{ckpt}`: module `{module}` matches {} tensors of the base `{}` ({}, …)",
                found.len(),
                base.root().display(),
                found[..2].join(", ")
            ),
            Some("check that --base is the model the expert was trained on"),
        )),
    }
}

fn base_shape(base: &Checkpoint, name: &str) -> Vec<u64> {
    base.info(name)
        .map(|i| i.shape.iter().map(|&d| d as u64).collect())
        .unwrap_or_default()
}

fn shape_error(
    ckpt: &str,
    key: &str,
    got: &[u64],
    base: &Checkpoint,
    name: &str,
    want: &[u64],
) -> Error {
    Error::input(
        format!(
            "`{ckpt}`: `{key}` has shape {got:?}, which does not fit the base tensor `{name}` \
             {:?} of `{}`",
            want,
            base.root().display()
        ),
        Some(
            "check that --base is the model the expert was trained on (the metadata's expert_model)",
        ),
    )
}

fn float_dtype(ckpt: &str, key: &str, t: &TorchTensor) -> Result<Dtype> {
    t.dtype.to_xpm().ok_or_else(|| {
        Error::input(
            format!(
                "`{ckpt}`: `{key}` is {}, not a float32/float16/bfloat16 tensor",
                t.dtype
            ),
            Some("xpm stores deltas as f32, f16 or bf16"),
        )
    })
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn import_sparse(
    ckpt: &str,
    module: &str,
    parts: &SparseParts,
    base: &Checkpoint,
    out: &mut Vec<ImportedTensor>,
    notes: &mut Vec<String>,
) -> Result<()> {
    match (&parts.weight, &parts.mask) {
        (Some((wkey, w)), Some((mkey, m))) => {
            let name = base_name(ckpt, module, "weight", base)?;
            let want = base_shape(base, &name);
            if w.shape != want || w.shape.len() != 2 {
                return Err(shape_error(ckpt, wkey, &w.shape, base, &name, &want));
            }
            if m.shape != w.shape {
                return Err(shape_error(ckpt, mkey, &m.shape, base, &name, &want));
            }
            float_dtype(ckpt, wkey, w)?;
            let values = w.to_f32();
            let mut indices = Vec::new();
            let mut vals = Vec::new();
            for (i, nz) in m.nonzero().into_iter().enumerate() {
                if nz {
                    indices.push(i as u64);
                    vals.push(values[i]);
                }
            }
            out.push(ImportedTensor {
                data: TensorData {
                    name,
                    shape: want,
                    dtype: Dtype::F32,
                    content: Content::Sparse {
                        indices,
                        values: f32_bytes(&vals),
                        block_size: None,
                    },
                },
                new: false,
            });
        }
        (Some((key, _)), None) | (None, Some((key, _))) => {
            return Err(Error::input(
                format!("`{ckpt}`: `{key}` comes without its weight or mask in module `{module}`"),
                Some(
                    "a masked sparse layer stores both sparse_layer.weight and sparse_layer.weight_mask",
                ),
            ));
        }
        (None, None) => {}
    }
    if let Some((bkey, b)) = &parts.bias {
        float_dtype(ckpt, bkey, b)?;
        let values = b.to_f32();
        if values.iter().all(|&v| v == 0.0) {
            notes.push(format!("`{bkey}` is all zeros: not imported"));
            return Ok(());
        }
        let (name, new) = match base_name(ckpt, module, "bias", base) {
            Ok(n) => (n, false),
            Err(_) => {
                // The base layer has no bias: the trained one is new, whole.
                let w = base_name(ckpt, module, "weight", base)?;
                let n = format!("{}.bias", w.strip_suffix(".weight").unwrap_or(&w));
                notes.push(format!(
                    "the base has no `{n}`: the expert's trained bias is added as a new tensor"
                ));
                (n, true)
            }
        };
        if !new {
            let want = base_shape(base, &name);
            if b.shape != want {
                return Err(shape_error(ckpt, bkey, &b.shape, base, &name, &want));
            }
        } else if b.shape.len() != 1 {
            return Err(Error::input(
                format!("`{ckpt}`: `{bkey}` has shape {:?}, not a vector", b.shape),
                None,
            ));
        }
        out.push(ImportedTensor {
            data: TensorData {
                name,
                shape: b.shape.clone(),
                dtype: Dtype::F32,
                content: Content::Dense {
                    delta: f32_bytes(&values),
                },
            },
            new,
        });
    }
    Ok(())
}

/// `[rows, cols]` row-major elements of `es` bytes → `[cols, rows]`.
fn transpose(bytes: &[u8], rows: usize, cols: usize, es: usize) -> Vec<u8> {
    let mut out = vec![0u8; bytes.len()];
    for r in 0..rows {
        for c in 0..cols {
            let src = (r * cols + c) * es;
            let dst = (c * rows + r) * es;
            out[dst..dst + es].copy_from_slice(&bytes[src..src + es]);
        }
    }
    out
}

fn import_lora(
    ckpt: &str,
    module: &str,
    parts: &LoraParts,
    rank: u64,
    alpha: f64,
    base: &Checkpoint,
) -> Result<ImportedTensor> {
    let (Some((akey, a)), Some((bkey, b))) = (&parts.a, &parts.b) else {
        return Err(Error::input(
            format!("`{ckpt}`: module `{module}` has only one of lora_a and lora_b"),
            Some("a LoRA module stores both factors"),
        ));
    };
    let name = base_name(ckpt, module, "weight", base)?;
    let want = base_shape(base, &name);
    let [out_f, in_f] = want[..] else {
        return Err(shape_error(ckpt, akey, &a.shape, base, &name, &want));
    };
    if a.shape != [in_f, rank] {
        return Err(Error::input(
            format!(
                "`{ckpt}`: `{akey}` has shape {:?}; the base tensor `{name}` {want:?} and \
                 lora_rank {rank} need [{in_f}, {rank}]",
                a.shape
            ),
            Some("check --base and the metadata's lora_rank"),
        ));
    }
    if b.shape != [rank, out_f] {
        return Err(Error::input(
            format!(
                "`{ckpt}`: `{bkey}` has shape {:?}; the base tensor `{name}` {want:?} and \
                 lora_rank {rank} need [{rank}, {out_f}]",
                b.shape
            ),
            Some("check --base and the metadata's lora_rank"),
        ));
    }
    let dtype = float_dtype(ckpt, akey, a)?;
    if b.dtype != a.dtype {
        return Err(Error::input(
            format!(
                "`{ckpt}`: `{akey}` is {} but `{bkey}` is {}",
                a.dtype, b.dtype
            ),
            Some("both LoRA factors should have one dtype"),
        ));
    }
    let es = dtype.size();
    let (r, i, o) = (rank as usize, in_f as usize, out_f as usize);
    Ok(ImportedTensor {
        data: TensorData {
            name,
            shape: want,
            dtype,
            content: Content::Lora {
                rank: rank as u32,
                alpha,
                a: transpose(&a.data, i, r, es),
                b: transpose(&b.data, r, o, es),
            },
        },
        new: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_names_are_checked() {
        for bad in ["", "a/b", "..", "x..y", "a\0", ".hidden", "a\\b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("sst2-sparse_v1").unwrap();
    }

    #[test]
    fn parts_are_grouped_and_odd_state_dicts_refused() {
        let t = || TorchTensor {
            shape: vec![1],
            dtype: torch::TorchDtype::F32,
            data: vec![0; 4],
        };
        let state = |keys: &[&str]| -> Vec<(String, TorchTensor)> {
            keys.iter().map(|k| (k.to_string(), t())).collect()
        };
        let err = |keys: &[&str]| match Parts::group("e.ckpt", state(keys)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{keys:?} grouped"),
        };
        match Parts::group("e.ckpt", state(&["m.lora_a", "m.lora_b", "n.lora_a"])).unwrap() {
            Parts::Lora(l) => {
                assert_eq!(l.keys().collect::<Vec<_>>(), ["m", "n"]);
                assert!(l["n"].a.is_some() && l["n"].b.is_none());
            }
            Parts::Sparse(_) => panic!("sparse"),
        }
        let sparse = [
            "m.sparse_layer.sparse_weights",
            "m.sparse_layer.binary_mask",
        ];
        match Parts::group("e.ckpt", state(&sparse)).unwrap() {
            Parts::Sparse(s) => {
                let p = &s["m"];
                assert!(p.weight.is_some() && p.mask.is_some() && p.bias.is_none());
            }
            Parts::Lora(_) => panic!("lora"),
        }
        assert!(err(&[]).contains("holds no tensors"));
        assert!(err(&["m.lora_a", "n.sparse_layer.weight"]).contains("mixes LoRA"));
        assert!(err(&["m.sparse_layer.row_offs"]).contains("not a part of a masked sparse"));
        let e = err(&["m.sparse_layer.weight", "m.sparse_layer.sparse_weights"]);
        assert!(
            e.contains("two tensors for `m.sparse_layer.sparse_weights`"),
            "{e}"
        );
        assert!(err(&["m.weight"]).contains("neither a LoRA factor"));
    }

    #[test]
    fn transpose_is_exact() {
        let m: Vec<u8> = (0..6u8).collect(); // [[0,1,2],[3,4,5]] of 1-byte elements
        assert_eq!(transpose(&m, 2, 3, 1), vec![0, 3, 1, 4, 2, 5]);
        let m: Vec<u8> = (0..12u8).collect(); // 2 × 3 of 2-byte elements
        assert_eq!(
            transpose(&m, 2, 3, 2),
            vec![0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]
        );
    }

    #[test]
    fn missing_experts_are_listed_with_a_suggestion() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "sst2.ckpt",
            "sst2.meta",
            "mnli.ckpt",
            "mnli.meta",
            "orphan.ckpt",
            "x.lora.bin",
        ] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        assert_eq!(list(dir.path()).unwrap(), vec!["mnli", "sst2"]);
        let e = files(dir.path(), "sst").unwrap_err();
        assert!(e.to_string().contains("has no expert `sst`"), "{e}");
        let hint = e.hint().unwrap();
        assert!(
            hint.contains("did you mean `sst2`?") && hint.contains("mnli, sst2"),
            "{hint}"
        );
        let e = files(dir.path(), "orphan").unwrap_err().to_string();
        assert!(e.contains("no `orphan.meta`"), "{e}");
    }
}
