//! Apply an expert to its base model: write base + Δ as a model directory.
//!
//! Used by `xpm apply` and `xpm merge --apply-to` (and by evaluation: there is one
//! implementation of W0 + Δ). The output is what the base was — `model.safetensors`, or shards
//! with a `model.safetensors.index.json` when it exceeds the shard size — plus every other file
//! of the base directory (config, tokenizer, …), so it loads in Python's `safetensors` and
//! `transformers` like the base did. One tensor at a time: peak memory follows the largest
//! tensor. Δ is added in f32 and rounded once to the base tensor's dtype, so for f32 the result
//! is exactly `W0 + Δ`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::engine::Input;
use xpm_core::checkpoint::{Checkpoint, is_float};
use xpm_core::error::{Error, IoResultExt, Result};
use xpm_core::format::ArtifactReader;
use xpm_core::format::st::{PlannedTensor, write_safetensors};
use xpm_core::fsutil::build_dir_atomic;
use xpm_core::home::XpmHome;
use xpm_core::printer::{Printer, Progress};

/// Hugging Face's default shard size (`max_shard_size="5GB"`).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// What `apply` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ApplyReport {
    pub out: PathBuf,
    /// Tensors that received a delta.
    pub changed: usize,
    /// Tensors copied from the base unchanged.
    pub copied: usize,
    /// Number of safetensors files written.
    pub shards: usize,
    /// Other files copied from the base directory.
    pub files: Vec<String>,
}

/// Write `base` + the deltas of `expert` to the new directory `out`.
pub fn apply(
    base: &Path,
    expert: &Path,
    out: &Path,
    max_shard_bytes: u64,
    home: &XpmHome,
    printer: &Printer,
) -> Result<ApplyReport> {
    let ck = Checkpoint::open(base)?;
    let reader = ArtifactReader::open(expert)?;
    let m = reader.manifest().clone();
    check_base_digest(&ck, &m, base, home, printer)?;
    let (delta_of, new_tensors) = match_tensors(&ck, &m, base)?;
    let names: Vec<String> = ck.names().map(str::to_string).collect();
    let shards = plan_shards(&ck, &names, &m, &new_tensors, max_shard_bytes);
    let n_shards = shards.len();
    printer.status(
        "Applying",
        format!(
            "{}@{} to `{}` → {}",
            m.name,
            m.version,
            base.display(),
            out.display()
        ),
    );
    let pb = printer.progress(names.len() as u64, "Applying");
    let sum = Sum {
        ck: &ck,
        reader: &reader,
        expert,
        delta_of: &delta_of,
        new_tensors: &new_tensors,
        progress: &pb,
    };
    let files = build_dir_atomic(out, |dir| {
        sum.write_shards(dir, &shards)?;
        let copied = if base.is_dir() {
            copy_side_files(base, dir)?
        } else {
            Vec::new()
        };
        write_applied_note(dir, &m, &reader)?;
        Ok(copied)
    })?;
    pb.finish_and_clear();
    printer.status(
        "Wrote",
        format!("{} ({n_shards} safetensors file(s))", out.display()),
    );
    Ok(ApplyReport {
        out: out.to_path_buf(),
        changed: delta_of.len() + new_tensors.len(),
        copied: names.len() - delta_of.len(),
        shards: n_shards,
        files,
    })
}

/// The expert must have been made from this base: compare the base's digest with the one the
/// manifest records.
fn check_base_digest(
    ck: &Checkpoint,
    m: &xpm_core::format::Manifest,
    base: &Path,
    home: &XpmHome,
    printer: &Printer,
) -> Result<()> {
    printer.status("Hashing", format!("base model `{}`", base.display()));
    let digest = ck.digest(Some(&home.cache))?;
    if digest != m.base.digest {
        return Err(Error::input(
            format!(
                "{}@{} was made from base `{}` ({}), but `{}` is {digest}",
                m.name,
                m.version,
                m.base.id,
                m.base.digest,
                base.display()
            ),
            Some("apply an expert only to the base model it was made from"),
        ));
    }
    Ok(())
}

/// The base and the expert's tensors, matched: what each output tensor is made of.
struct Sum<'a> {
    ck: &'a Checkpoint,
    reader: &'a ArtifactReader,
    expert: &'a Path,
    /// Base tensor name → index of its delta in the manifest.
    delta_of: &'a BTreeMap<&'a str, usize>,
    /// Added tensor name → its index in the manifest.
    new_tensors: &'a BTreeMap<String, usize>,
    /// Advances by one per base tensor written.
    progress: &'a dyn Progress,
}

impl Sum<'_> {
    /// Write the planned shards into `dir` (`model.safetensors`, or numbered shards and their
    /// index).
    fn write_shards(&self, dir: &Path, shards: &[Vec<PlannedTensor>]) -> Result<()> {
        let n_shards = shards.len();
        let mut weight_map = BTreeMap::new();
        let mut total = 0u64;
        for (k, planned) in shards.iter().enumerate() {
            let fname = shard_file_name(k, n_shards);
            let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
            write_safetensors(&dir.join(&fname), planned, Some(meta), |i| {
                let t = &planned[i];
                weight_map.insert(t.name.clone(), fname.clone());
                self.tensor_bytes(&t.name, &mut total)
            })?;
        }
        if n_shards > 1 {
            let index = serde_json::json!({
                "metadata": { "total_size": total },
                "weight_map": weight_map,
            });
            xpm_core::fsutil::write_atomic(
                &dir.join("model.safetensors.index.json"),
                &serde_json::to_vec_pretty(&index).expect("index"),
            )?;
        }
        Ok(())
    }

    /// The output bytes of tensor `name`: an added tensor as f32, else the base tensor with its
    /// delta added if it has one; `total` counts the bytes read.
    fn tensor_bytes(&self, name: &str, total: &mut u64) -> Result<Vec<u8>> {
        if let Some(&idx) = self.new_tensors.get(name) {
            let Input::Dense { values } = crate::input::load_input_at(self.reader, idx)? else {
                return Err(Error::corrupt(
                    self.expert,
                    format!("new tensor `{name}` is not dense"),
                ));
            };
            *total += 4 * values.len() as u64;
            return Ok(xpm_core::format::Dtype::F32.from_f32(&values));
        }
        let raw = self.ck.bytes(name).expect("listed");
        *total += raw.len() as u64;
        self.progress.inc(1);
        match self.delta_of.get(name) {
            None => Ok(raw.to_vec()),
            Some(&idx) => add_delta(self.ck, self.reader, name, idx),
        }
    }
}

/// The name of safetensors file `k` of `n_shards`, as Hugging Face names them.
fn shard_file_name(k: usize, n_shards: usize) -> String {
    if n_shards == 1 {
        "model.safetensors".to_string()
    } else {
        format!("model-{:05}-of-{n_shards:05}.safetensors", k + 1)
    }
}

/// Which base tensor each expert tensor changes (index into the manifest), and the tensors it
/// adds (a task head). Every delta must target a float tensor of the same shape; an added
/// tensor must not shadow a base tensor.
#[allow(clippy::type_complexity)]
fn match_tensors<'m>(
    ck: &Checkpoint,
    m: &'m xpm_core::format::Manifest,
    base: &Path,
) -> Result<(BTreeMap<&'m str, usize>, BTreeMap<String, usize>)> {
    let mut delta_of: BTreeMap<&str, usize> = BTreeMap::new();
    let mut new_tensors: BTreeMap<String, usize> = BTreeMap::new();
    for (i, t) in m.tensors.iter().enumerate() {
        if t.new {
            // A task head: added whole, and it must not shadow a base tensor.
            if ck.info(&t.name).is_some() {
                return Err(Error::input(
                    format!(
                        "the expert adds tensor `{}`, but `{}` already has one",
                        t.name,
                        base.display()
                    ),
                    None,
                ));
            }
            new_tensors.insert(t.name.clone(), i);
            continue;
        }
        let info = ck.info(&t.name).ok_or_else(|| {
            Error::input(
                format!(
                    "the expert changes `{}`, which `{}` does not have",
                    t.name,
                    base.display()
                ),
                None,
            )
        })?;
        let shape: Vec<u64> = info.shape.iter().map(|&d| d as u64).collect();
        if shape != t.shape {
            return Err(Error::input(
                format!(
                    "tensor `{}` is {:?} in the base but the expert's delta is {:?}",
                    t.name, info.shape, t.shape
                ),
                Some("apply an expert only to the base model it was made from"),
            ));
        }
        if !is_float(info.dtype) || xpm_core::format::Dtype::from_safetensors(info.dtype).is_none()
        {
            return Err(Error::input(
                format!(
                    "tensor `{}` is {:?} in the base; xpm applies deltas to f32, f16 and bf16 tensors",
                    t.name, info.dtype
                ),
                Some("convert the base model to f32 (or f16/bf16) first"),
            ));
        }
        delta_of.insert(&t.name, i);
    }
    Ok((delta_of, new_tensors))
}

/// Shards in name order, filled greedily up to `max_shard_bytes`; new tensors (a head) go in the
/// last one.
fn plan_shards(
    ck: &Checkpoint,
    names: &[String],
    m: &xpm_core::format::Manifest,
    new_tensors: &BTreeMap<String, usize>,
    max_shard_bytes: u64,
) -> Vec<Vec<PlannedTensor>> {
    let mut shards: Vec<Vec<PlannedTensor>> = vec![Vec::new()];
    let mut size = 0u64;
    for n in names {
        let info = ck.info(n).expect("listed");
        let bytes = (info.data_offsets.1 - info.data_offsets.0) as u64;
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        shards.last_mut().expect("one shard").push(PlannedTensor {
            name: n.clone(),
            dtype: info.dtype,
            shape: info.shape.clone(),
        });
    }
    for (n, &i) in new_tensors {
        let t = &m.tensors[i];
        shards.last_mut().expect("one shard").push(PlannedTensor {
            name: n.clone(),
            dtype: safetensors::Dtype::F32,
            shape: t.shape.iter().map(|&d| d as usize).collect(),
        });
    }
    shards
}

/// `xpm-applied.json`: which expert made this model, from which base, and its provenance.
fn write_applied_note(
    dir: &Path,
    m: &xpm_core::format::Manifest,
    reader: &ArtifactReader,
) -> Result<()> {
    let note = serde_json::json!({
        "applied_by": format!("xpm {}", env!("CARGO_PKG_VERSION")),
        "expert": format!("{}@{}", m.name, m.version),
        "expert_sha256": reader.verify_file_digest()?,
        "base": m.base,
        // The expert's provenance: for a merge, its inputs, strategy and recipe.
        "provenance": m.provenance,
    });
    xpm_core::fsutil::write_atomic(
        &dir.join("xpm-applied.json"),
        &serde_json::to_vec_pretty(&note).expect("note"),
    )
}

/// W0 + Δ for one tensor, in the base tensor's dtype.
fn add_delta(ck: &Checkpoint, reader: &ArtifactReader, name: &str, idx: usize) -> Result<Vec<u8>> {
    let info = ck.info(name).expect("checked");
    let mut w = ck.to_f32(name)?;
    match crate::input::load_input_at(reader, idx)? {
        Input::Sparse { indices, values } => {
            for (i, v) in indices.iter().zip(values) {
                w[*i as usize] += v;
            }
        }
        Input::Dense { values } => {
            for (x, d) in w.iter_mut().zip(values) {
                *x += d;
            }
        }
        Input::Absent => {}
    }
    let dtype = xpm_core::format::Dtype::from_safetensors(info.dtype).ok_or_else(|| {
        Error::input(
            format!("cannot write tensor `{name}` as {:?}", info.dtype),
            None,
        )
    })?;
    Ok(dtype.from_f32(&w))
}

/// Copy every file of the base directory except weights (recursively): config, tokenizer,
/// pooling configs…. Other weight formats would be stale next to the new weights; they are
/// skipped.
fn copy_side_files(base: &Path, dest: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    copy_rec(base, dest, Path::new(""), &mut out)?;
    out.sort();
    Ok(out)
}

fn copy_rec(root: &Path, dest: &Path, rel: &Path, out: &mut Vec<String>) -> Result<()> {
    let dir = root.join(rel);
    for e in std::fs::read_dir(&dir).at("read directory", &dir)? {
        let e = e.at("read directory", &dir)?;
        let name = e.file_name().to_string_lossy().to_string();
        let rel_path = rel.join(&name);
        // Follow symbolic links (a Hugging Face cache snapshot is made of them).
        let ty = std::fs::metadata(e.path())
            .at("read", e.path())?
            .file_type();
        if name.starts_with('.') {
            continue;
        }
        if ty.is_dir() {
            std::fs::create_dir_all(dest.join(&rel_path)).at("create directory", dest)?;
            copy_rec(root, dest, &rel_path, out)?;
        } else if ty.is_file() && !is_weight_file(&name) {
            std::fs::copy(e.path(), dest.join(&rel_path)).at("copy", e.path())?;
            out.push(rel_path.display().to_string());
        }
    }
    Ok(())
}

fn is_weight_file(name: &str) -> bool {
    name == "model.safetensors.index.json"
        || name == "pytorch_model.bin.index.json"
        || [
            ".safetensors",
            ".bin",
            ".pt",
            ".pth",
            ".h5",
            ".msgpack",
            ".ckpt",
            ".onnx",
            ".gguf",
        ]
        .iter()
        .any(|x| name.ends_with(x))
}
