//! Model checkpoints on disk: one safetensors file, or a directory with `model.safetensors`,
//! a sharded set with `model.safetensors.index.json`, or any `*.safetensors` files.
//!
//! Files are memory-mapped; tensors are read on demand. The **base digest** identifies a model
//! by content: sha256 over the canonical list of (name, dtype, shape, sha256 of bytes), sorted by
//! name (docs/format.md, "Base digest"). It is cached under `$XPM_HOME/cache/base-digests-v1`,
//! keyed by the files' paths, sizes and modification times.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::{Metadata, TensorInfo};
use serde::{Deserialize, Serialize};

use crate::digest;
use crate::error::{Error, IoResultExt, Result};
use crate::fsutil;

/// Index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Single-file checkpoint name in a model directory.
pub const SINGLE_FILE: &str = "model.safetensors";

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    meta: Metadata,
}

/// An opened checkpoint.
pub struct Checkpoint {
    root: PathBuf,
    shards: Vec<Shard>,
    /// name → shard index
    tensors: BTreeMap<String, usize>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("root", &self.root)
            .finish()
    }
}

#[derive(Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Open a safetensors file or a model directory.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).at("open", path)?;
        let files: Vec<PathBuf>;
        let mut expected: Option<BTreeMap<String, String>> = None;
        if meta.is_file() {
            files = vec![path.to_path_buf()];
        } else if path.join(INDEX_FILE).is_file() {
            let ip = path.join(INDEX_FILE);
            let bytes = std::fs::read(&ip).at("read", &ip)?;
            let index: IndexFile = serde_json::from_slice(&bytes).map_err(|e| {
                Error::input(
                    format!("`{}` is not a valid safetensors index: {e}", ip.display()),
                    Some("it needs a `weight_map` object from tensor name to shard file"),
                )
            })?;
            let mut names: Vec<&String> = index.weight_map.values().collect();
            names.sort();
            names.dedup();
            for n in &names {
                if n.contains('/') || n.contains('\\') || n.starts_with('.') {
                    return Err(Error::input(
                        format!(
                            "`{}` names shard `{n}` outside the model directory",
                            ip.display()
                        ),
                        None,
                    ));
                }
            }
            files = names.iter().map(|n| path.join(n)).collect();
            expected = Some(index.weight_map);
        } else if path.join(SINGLE_FILE).is_file() {
            files = vec![path.join(SINGLE_FILE)];
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .at("read directory", path)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(Error::input(
                    format!("`{}` holds no safetensors files", path.display()),
                    Some(
                        "a model directory needs `model.safetensors`, or shards listed in `model.safetensors.index.json`",
                    ),
                ));
            }
            files = found;
        }
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            let file = std::fs::File::open(f).at("open", f)?;
            // SAFETY: read-only map of a checkpoint xpm does not modify; contents are validated
            // by the safetensors header parse below and by length checks on every access.
            let mmap = unsafe { Mmap::map(&file) }.at("map", f)?;
            let (header_len, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
                Error::input(
                    format!("`{}` is not a valid safetensors file: {e}", f.display()),
                    Some("checkpoints must be safetensors (pickle files are not read, by design)"),
                )
            })?;
            for name in meta.tensors().keys() {
                if tensors.insert(name.clone(), i).is_some() {
                    return Err(Error::input(
                        format!(
                            "tensor `{name}` appears in more than one file of `{}`",
                            path.display()
                        ),
                        None,
                    ));
                }
            }
            shards.push(Shard {
                path: f.clone(),
                mmap,
                header_len,
                meta,
            });
        }
        if let Some(map) = expected {
            for (name, file) in &map {
                match tensors.get(name) {
                    Some(&i)
                        if shards[i]
                            .path
                            .file_name()
                            .is_some_and(|f| f == file.as_str()) => {}
                    _ => {
                        return Err(Error::input(
                            format!(
                                "`{}` places tensor `{name}` in `{file}`, but it is not there",
                                path.join(INDEX_FILE).display()
                            ),
                            None,
                        ));
                    }
                }
            }
        }
        Ok(Checkpoint {
            root: path.to_path_buf(),
            shards,
            tensors,
        })
    }

    /// The path this checkpoint was opened from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the checkpoint holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Dtype and shape of a tensor.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        let &i = self.tensors.get(name)?;
        self.shards[i].meta.info(name)
    }

    /// `sha256:<hex>` of each of the checkpoint's files, from their mappings (no copies
    /// through read buffers; the pages are the ones the tensors are read from).
    pub fn file_digests(&self) -> Vec<(&Path, String)> {
        self.shards
            .iter()
            .map(|s| (s.path.as_path(), crate::digest::sha256(&s.mmap)))
            .collect()
    }

    /// Raw little-endian bytes of a tensor.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        let &i = self.tensors.get(name)?;
        let s = &self.shards[i];
        let info = s.meta.info(name)?;
        let base = 8 + s.header_len;
        Some(&s.mmap[base + info.data_offsets.0..base + info.data_offsets.1])
    }

    /// A floating-point tensor converted to `f32`.
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.info(name).ok_or_else(|| {
            Error::input(
                format!("`{}` has no tensor `{name}`", self.root.display()),
                None,
            )
        })?;
        let bytes = self.bytes(name).expect("info implies bytes");
        to_f32(info.dtype, bytes).ok_or_else(|| {
            Error::input(
                format!(
                    "tensor `{name}` in `{}` is {:?}, not a floating-point type",
                    self.root.display(),
                    info.dtype
                ),
                None,
            )
        })
    }

    /// The base digest: `sha256:` over the canonical tensor list. Uses and fills the cache in
    /// `cache_dir` when given.
    pub fn digest(&self, cache_dir: Option<&Path>) -> Result<String> {
        let key = self.cache_key()?;
        let cache_file = cache_dir.map(|d| d.join(BASE_DIGEST_BUCKET).join(format!("{key}.json")));
        if let Some(cf) = &cache_file
            && let Ok(bytes) = std::fs::read(cf)
            && let Ok(entry) = serde_json::from_slice::<DigestCacheEntry>(&bytes)
            && digest::is_digest(&entry.digest)
        {
            return Ok(entry.digest);
        }
        let names: Vec<&String> = self.tensors.keys().collect();
        let lines: Vec<String> = names
            .par_iter()
            .map(|name| {
                let info = self.info(name).expect("listed");
                let shape: Vec<String> = info.shape.iter().map(|d| d.to_string()).collect();
                let h = digest::sha256(self.bytes(name).expect("listed"));
                format!(
                    "{name}\t{:?}\t{}\t{}\n",
                    info.dtype,
                    shape.join(","),
                    h.trim_start_matches(digest::PREFIX)
                )
            })
            .collect();
        let d = digest::sha256(lines.concat().as_bytes());
        if let Some(cf) = &cache_file {
            let entry = DigestCacheEntry {
                digest: d.clone(),
                root: self.root.display().to_string(),
            };
            // A cache write failure only costs a recomputation next time.
            let _ = fsutil::write_atomic(cf, &serde_json::to_vec(&entry).expect("serializes"));
        }
        Ok(d)
    }

    /// Key of the digest cache: the files' canonical paths, sizes and modification times.
    fn cache_key(&self) -> Result<String> {
        let mut s = String::new();
        for sh in &self.shards {
            let m = std::fs::metadata(&sh.path).at("read", &sh.path)?;
            let canon = sh.path.canonicalize().unwrap_or_else(|_| sh.path.clone());
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            s.push_str(&format!("{}\t{}\t{mtime}\n", canon.display(), m.len()));
        }
        Ok(digest::sha256(s.as_bytes())
            .trim_start_matches(digest::PREFIX)
            .to_string())
    }
}

/// Cache bucket for base digests (versioned: a layout change bumps the suffix).
pub const BASE_DIGEST_BUCKET: &str = "base-digests-v1";

#[derive(Serialize, Deserialize)]
struct DigestCacheEntry {
    digest: String,
    root: String,
}

/// Convert little-endian float bytes to `f32` (F32, F16, BF16, F64); `None` for other dtypes.
pub fn to_f32(dtype: safetensors::Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    if let Some(dt) = crate::format::Dtype::from_safetensors(dtype) {
        return Some(dt.to_f32(bytes));
    }
    (dtype == safetensors::Dtype::F64).then(|| {
        bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8")) as f32)
            .collect()
    })
}

/// Whether a safetensors dtype is a floating-point type xpm can diff.
pub fn is_float(dtype: safetensors::Dtype) -> bool {
    use safetensors::Dtype as D;
    matches!(dtype, D::F32 | D::F16 | D::BF16 | D::F64)
}
