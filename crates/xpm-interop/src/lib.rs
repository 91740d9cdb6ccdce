//! Experts in and out of xpm: PEFT adapter directories (LoRA and SHiRA) and mttl expert
//! libraries come in as xpm tensors ([`Imported`]); any expert goes out as a PEFT directory.
//!
//! Everything read here was written by someone else: every name, shape, dtype, index and
//! number is checked before use, and errors name the file and the tensor or key. Pickles (mttl)
//! are read by a restricted reader that executes nothing and refuses every global other than
//! tensor rebuilds and plain containers ([`torch`]).
//!
//! This crate depends on `xpm-core` only: it turns files into [`TensorData`] and back. Writing
//! the artifact, resolving `--base` and `hf:` sources is the caller's (`xpm-cli`'s `ops`).

pub mod bytes;
pub mod mttl;
pub mod peft;
pub mod peft_export;
pub mod torch;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use xpm_core::format::TensorData;

/// What an importer produced: the tensors of one expert, ready for the artifact writer, and
/// what the manifest should record about their origin.
#[derive(Debug, Clone)]
pub struct Imported {
    /// One entry per base tensor that the expert changes (or adds, with `new`), in the base
    /// checkpoint's name order.
    pub tensors: Vec<ImportedTensor>,
    /// The source, for `provenance.source`.
    pub source: Source,
    /// The base model's Hub id as the source names it (`base_model_name_or_path`,
    /// mttl's `expert_model`), if any.
    pub base_hint: Option<String>,
    /// Source metadata worth keeping (`task_type`, training config), for `extra`.
    pub extra: BTreeMap<String, serde_json::Value>,
    /// Things the user should know that are not errors (e.g. a tied weight).
    pub notes: Vec<String>,
}

/// One imported tensor.
#[derive(Debug, Clone)]
pub struct ImportedTensor {
    pub data: TensorData,
    /// The base has no tensor of this name: `data` is the whole tensor (a task head).
    pub new: bool,
}

/// Where an imported expert came from (recorded as `provenance.source`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    /// `peft-lora`, `peft-shira`, `mttl-sparse`, `mttl-lora`.
    pub format: String,
    /// The directory or file as given, or `hf:ORG/NAME`.
    pub location: String,
    /// The Hub revision, for `hf:` sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// `sha256:<hex>` of each file read, by file name.
    pub files: BTreeMap<String, String>,
}

/// Read a small JSON or text file that someone else wrote, refusing anything over `limit`
/// bytes (a config is a few KiB; a hostile one must not exhaust memory).
pub(crate) fn read_small(path: &std::path::Path, limit: u64) -> xpm_core::error::Result<Vec<u8>> {
    use std::io::Read;
    use xpm_core::error::{Error, IoResultExt};
    let f = std::fs::File::open(path).at("open", path)?;
    let mut buf = Vec::new();
    f.take(limit + 1).read_to_end(&mut buf).at("read", path)?;
    if buf.len() as u64 > limit {
        return Err(Error::input(
            format!("`{}` is larger than {limit} bytes", path.display()),
            Some("this file holds configuration only; is it the right file?"),
        ));
    }
    Ok(buf)
}

/// `sha256:<hex>` of a file.
pub(crate) fn file_digest(path: &std::path::Path) -> xpm_core::error::Result<String> {
    use xpm_core::error::IoResultExt;
    let f = std::fs::File::open(path).at("open", path)?;
    let (d, _) = xpm_core::digest::sha256_reader(std::io::BufReader::new(f)).at("read", path)?;
    Ok(d)
}
