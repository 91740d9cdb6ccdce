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
use xpm_core::format::{EncodedTensor, TensorData};

/// What an importer produced: the tensors of one expert, ready for the artifact writer, and
/// what the manifest should record about their origin.
#[derive(Debug)]
pub struct Imported {
    /// One entry per base tensor that the expert changes (or adds, with `new`), in the base
    /// checkpoint's name order. Names, shapes and kinds are checked; the values are copied out
    /// of the source when the writer asks for them ([`Pending::materialize`]).
    pub tensors: Vec<Pending>,
    /// The source, for `provenance.source` (see [`Imported::finish_source`]).
    pub source: Source,
    /// The base model's Hub id as the source names it (`base_model_name_or_path`,
    /// mttl's `expert_model`), if any.
    pub base_hint: Option<String>,
    /// Source metadata worth keeping (`task_type`, training config), for `extra`.
    pub extra: BTreeMap<String, serde_json::Value>,
    /// Things the user should know that are not errors (e.g. a tied weight).
    pub notes: Vec<String>,
    /// Digests of source files still being computed on threads of their own (a large weights
    /// file is hashed while its tensors are converted and written).
    pending_files: Vec<(
        String,
        std::thread::JoinHandle<xpm_core::error::Result<String>>,
    )>,
}

impl Imported {
    pub fn new(
        tensors: Vec<Pending>,
        source: Source,
        base_hint: Option<String>,
        extra: BTreeMap<String, serde_json::Value>,
    ) -> Self {
        Imported {
            tensors,
            source,
            base_hint,
            extra,
            notes: Vec::new(),
            pending_files: Vec::new(),
        }
    }

    /// Whether a source file is still being hashed on a thread of its own.
    pub fn hashing(&self) -> bool {
        self.pending_files.iter().any(|(_, h)| !h.is_finished())
    }

    /// The source with every file digest, waiting for those still being computed.
    pub fn finish_source(&mut self) -> xpm_core::error::Result<Source> {
        for (name, hashing) in self.pending_files.drain(..) {
            let digest = hashing.join().expect("the hashing thread does not panic")?;
            self.source.files.insert(name, digest);
        }
        Ok(self.source.clone())
    }
}

/// One imported tensor.
#[derive(Debug, Clone)]
pub struct ImportedTensor {
    pub data: TensorData,
    /// The base has no tensor of this name: `data` is the whole tensor (a task head).
    pub new: bool,
}

/// What an imported tensor holds, known before its values are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingKind {
    Lora,
    Sparse,
    Dense,
}

/// One tensor of an import: its name, kind and checks are settled when the source is read;
/// its values are copied out of the source (and transposed or converted) by
/// [`Pending::materialize`], on the writer's worker just before it is encoded. An import of a
/// 1 GB adapter therefore holds a few tensors at a time rather than a second copy of the whole
/// adapter.
pub struct Pending {
    pub name: String,
    pub new: bool,
    pub kind: PendingKind,
    make: Box<dyn Fn() -> xpm_core::error::Result<ImportedTensor> + Send + Sync>,
    /// Encodes the tensor straight from the source's bytes, without materialising it (LoRA
    /// factors that PEFT stores as xpm does, read from the mapped weights file).
    encode: Option<Encoder>,
}

type Encoder = Box<dyn Fn(i32) -> xpm_core::error::Result<EncodedTensor> + Send + Sync>;

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("name", &self.name)
            .field("new", &self.new)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Pending {
    /// A tensor whose values are already in memory; they are handed over on the first
    /// [`Pending::materialize`] (without a copy), so there must be no second.
    pub fn ready(t: ImportedTensor) -> Pending {
        let kind = match t.data.content {
            xpm_core::format::Content::Lora { .. } => PendingKind::Lora,
            xpm_core::format::Content::Sparse { .. } => PendingKind::Sparse,
            _ => PendingKind::Dense,
        };
        let (name, new) = (t.data.name.clone(), t.new);
        let held = std::sync::Mutex::new(Some(t));
        Pending {
            name,
            new,
            kind,
            make: Box::new(move || {
                held.lock().expect("not poisoned").take().ok_or_else(|| {
                    xpm_core::error::Error::compute(
                        "import",
                        "an imported tensor was materialised twice",
                    )
                })
            }),
            encode: None,
        }
    }

    /// A tensor whose values `make` produces on demand; `make` must give a tensor named `name`.
    pub fn lazy(
        name: String,
        new: bool,
        kind: PendingKind,
        make: impl Fn() -> xpm_core::error::Result<ImportedTensor> + Send + Sync + 'static,
    ) -> Pending {
        Pending {
            name,
            new,
            kind,
            make: Box::new(make),
            encode: None,
        }
    }

    /// Let the writer encode this tensor with `encode` (at the zstd level it is given) instead
    /// of materialising it first: for values that can be compressed where they lie.
    /// `encode` must give the tensor that [`Pending::materialize`] gives, encoded.
    pub fn with_encoder(
        mut self,
        encode: impl Fn(i32) -> xpm_core::error::Result<EncodedTensor> + Send + Sync + 'static,
    ) -> Pending {
        self.encode = Some(Box::new(encode));
        self
    }

    /// The tensor, checked, encoded and compressed at zstd `level`, ready for the writer.
    pub fn encode(&self, level: i32) -> xpm_core::error::Result<EncodedTensor> {
        let encoded = match &self.encode {
            Some(encode) => encode(level)?,
            None => xpm_core::format::encode_tensor(&self.materialize()?.data, level)?,
        };
        debug_assert_eq!(encoded.entry().name, self.name);
        if self.new {
            encoded.mark_new()
        } else {
            Ok(encoded)
        }
    }

    /// The tensor's values.
    pub fn materialize(&self) -> xpm_core::error::Result<ImportedTensor> {
        let t = (self.make)()?;
        debug_assert_eq!(t.data.name, self.name);
        Ok(t)
    }
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
