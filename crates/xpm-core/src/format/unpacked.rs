//! The unpacked layout: `manifest.json` plus one plain `tensors.safetensors` that any safetensors
//! reader (Python included) can load.
//!
//! Tensor names in `tensors.safetensors`, for a manifest tensor `W`:
//!
//! | kind   | tensors                                                        |
//! |--------|----------------------------------------------------------------|
//! | sparse | `W.indices` (i64, `[nnz]`, sorted flat row-major), `W.values` (`[nnz]`) |
//! | lora   | `W.lora_A` (`[rank, in]`), `W.lora_B` (`[out, rank]`)          |
//! | dense  | `W.delta` (the tensor's shape)                                 |

use std::path::{Path, PathBuf};

use safetensors::tensor::Metadata;

use super::artifact::ArtifactReader;
use super::manifest::{Delta, Manifest, PartRole};
use super::mask;
use super::st::{PlannedTensor, SafetensorsWriter};
use super::tensor::{Content, TensorData};
use crate::error::{Error, IoResultExt, Result};
use crate::fsutil;
use crate::printer::Progress;

/// The manifest file of an unpacked expert.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The tensor file of an unpacked expert.
pub const TENSORS_FILE: &str = "tensors.safetensors";

/// Suffix of the indices tensor of a sparse delta in the unpacked layout.
pub const INDICES_SUFFIX: &str = "indices";

/// The unpacked tensors of entry `t`: (role, name, dtype, shape). `role == Mask` stands for the
/// indices tensor.
fn planned(m: &Manifest) -> Vec<(usize, PartRole, PlannedTensor)> {
    let mut out = Vec::new();
    for (i, t) in m.tensors.iter().enumerate() {
        let vdt = t.dtype.to_safetensors();
        for (role, shape) in super::tensor::part_shapes(t) {
            let (suffix, dtype, shape) = match role {
                PartRole::Mask => match &t.delta {
                    Delta::Sparse { nnz, .. } => {
                        (INDICES_SUFFIX, safetensors::Dtype::I64, vec![*nnz as usize])
                    }
                    _ => unreachable!("only sparse tensors have masks"),
                },
                _ => (
                    role.suffix(),
                    vdt,
                    shape.iter().map(|&d| d as usize).collect(),
                ),
            };
            out.push((
                i,
                role,
                PlannedTensor {
                    name: format!("{}.{suffix}", t.name),
                    dtype,
                    shape,
                },
            ));
        }
    }
    out
}

/// Unpack an artifact into `out` (which must not exist or be empty), atomically.
/// `progress` advances by one after each stored tensor part is written.
///
/// Two threads: one reads, verifies and decodes part `k + 1` while the other writes part `k`;
/// buffers are recycled, so memory stays at a small multiple of the largest part, whatever the
/// size of the expert.
pub fn unpack(reader: &ArtifactReader, out: &Path, progress: &dyn Progress) -> Result<()> {
    let manifest = reader.manifest();
    let plan = planned(manifest);
    let tensors: Vec<PlannedTensor> = plan.iter().map(|(_, _, p)| p.clone()).collect();
    fsutil::build_dir_atomic(out, |dir| {
        let json = serde_json::to_vec_pretty(&manifest.without_storage()).expect("serializes");
        fsutil::write_atomic(&dir.join(MANIFEST_FILE), &json)?;
        let mut w = SafetensorsWriter::create(&dir.join(TENSORS_FILE), tensors, None)?;
        let order = w.order().to_vec();
        let produce = |k: usize, scratch: &mut Vec<u8>, buf: &mut Vec<u8>| -> Result<()> {
            let (i, role, _) = &plan[k];
            match role {
                PartRole::Mask => {
                    let t = &manifest.tensors[*i];
                    let Delta::Sparse { nnz, encoding, .. } = &t.delta else {
                        unreachable!("masks belong to sparse tensors")
                    };
                    let mut raw = Vec::new();
                    reader.read_part_into(*i, PartRole::Mask, scratch, &mut raw)?;
                    let enc = encoding.unwrap_or(mask::MaskEncoding::DeltaRice);
                    let idx = mask::decode(enc, &raw, &t.shape, *nnz).map_err(|e| {
                        Error::corrupt(reader.path(), format!("tensor `{}`: {e}", t.name))
                    })?;
                    buf.clear();
                    buf.extend(idx.iter().flat_map(|&v| (v as i64).to_le_bytes()));
                    Ok(())
                }
                role => reader.read_part_into(*i, *role, scratch, buf),
            }
        };
        // A reader thread verifies and decodes part k + 1 while this thread writes part k; the
        // two buffers in flight are recycled through `free`.
        std::thread::scope(|s| -> Result<()> {
            let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Result<Vec<u8>>>(1);
            let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
            let _ = free_tx.send(Vec::new());
            let _ = free_tx.send(Vec::new());
            s.spawn(move || {
                let mut scratch = Vec::new();
                for &k in &order {
                    let mut buf = free_rx.recv().unwrap_or_default();
                    let r = produce(k, &mut scratch, &mut buf).map(|()| buf);
                    let failed = r.is_err();
                    if full_tx.send(r).is_err() || failed {
                        break;
                    }
                }
            });
            for _ in 0..plan.len() {
                let buf = full_rx
                    .recv()
                    .expect("the reader thread sends one result per part")?;
                w.write_next(&buf)?;
                let _ = free_tx.send(buf);
                progress.inc(1);
            }
            Ok(())
        })?;
        w.finish()
    })
}

/// Number of tensors `unpack` writes (for progress bars).
pub fn unpacked_tensor_count(m: &Manifest) -> usize {
    planned(m).len()
}

/// An unpacked expert directory, opened for packing.
pub struct UnpackedDir {
    dir: PathBuf,
    tensors_path: PathBuf,
    manifest: Manifest,
    file: std::fs::File,
    data_start: u64,
    meta: Metadata,
}

impl UnpackedDir {
    /// Open `dir`: parse `manifest.json`, map `tensors.safetensors`, and check that the two name
    /// the same tensors.
    pub fn open(dir: &Path) -> Result<Self> {
        let mpath = dir.join(MANIFEST_FILE);
        let tpath = dir.join(TENSORS_FILE);
        let bytes = std::fs::read(&mpath).at("read", &mpath)?;
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
            Error::input(
                format!("`{}` is not a valid expert manifest: {e}", mpath.display()),
                Some("see schemas/manifest.schema.json, or start from `xpm unpack` output"),
            )
        })?;
        let file = std::fs::File::open(&tpath).at("open", &tpath)?;
        // Read with positional reads rather than a memory map, so memory use stays at one
        // tensor per worker however large the file is.
        let (data_start, meta) = read_safetensors_header(&file, &tpath)?;
        let me = UnpackedDir {
            dir: dir.to_path_buf(),
            tensors_path: tpath,
            manifest,
            file,
            data_start,
            meta,
        };
        me.check_names()?;
        Ok(me)
    }

    fn check_names(&self) -> Result<()> {
        let plan = planned(&self.manifest);
        let expected: std::collections::HashSet<&str> =
            plan.iter().map(|(_, _, p)| p.name.as_str()).collect();
        for name in self.meta.tensors().keys() {
            if !expected.contains(name.as_str()) {
                return Err(Error::input(
                    format!(
                        "`{}` holds tensor `{name}`, which `{}` does not describe",
                        self.tensors_path.display(),
                        self.dir.join(MANIFEST_FILE).display()
                    ),
                    Some("list every tensor in manifest.json, or remove the extra tensor"),
                ));
            }
        }
        Ok(())
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn raw(&self, name: &str) -> Result<(Vec<u8>, &safetensors::tensor::TensorInfo)> {
        let info = self.meta.info(name).ok_or_else(|| {
            Error::input(
                format!(
                    "`{}` has no tensor `{name}`, which the manifest needs",
                    self.tensors_path.display()
                ),
                Some("sparse tensors need `NAME.indices` and `NAME.values`; see docs/format.md"),
            )
        })?;
        let (a, b) = info.data_offsets;
        let mut buf = vec![0u8; b - a];
        fsutil::read_exact_at(&self.file, &mut buf, self.data_start + a as u64)
            .at("read", &self.tensors_path)?;
        Ok((buf, info))
    }

    /// Load tensor `index` of the manifest, checking dtypes, shapes and counts.
    pub fn tensor(&self, index: usize) -> Result<TensorData> {
        let t = &self.manifest.tensors[index];
        let bad = |what: String| {
            Error::input(
                format!("`{}`: tensor `{}`: {what}", self.dir.display(), t.name),
                Some("make manifest.json and tensors.safetensors agree"),
            )
        };
        let values = |suffix: &str, shape: &[u64]| -> Result<Vec<u8>> {
            let (bytes, info) = self.raw(&format!("{}.{suffix}", t.name))?;
            if info.dtype != t.dtype.to_safetensors() {
                return Err(bad(format!(
                    "`{suffix}` is {:?}, the manifest says {}",
                    info.dtype, t.dtype
                )));
            }
            let want: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            if info.shape != want {
                return Err(bad(format!(
                    "`{suffix}` has shape {:?}, expected {want:?}",
                    info.shape
                )));
            }
            Ok(bytes)
        };
        let content = match &t.delta {
            Delta::Sparse {
                nnz, block_size, ..
            } => {
                let (bytes, info) = self.raw(&format!("{}.{INDICES_SUFFIX}", t.name))?;
                let indices = read_indices(&bytes, info).map_err(bad)?;
                if indices.len() as u64 != *nnz {
                    return Err(bad(format!(
                        "the manifest says nnz {nnz}, `indices` holds {}",
                        indices.len()
                    )));
                }
                Content::Sparse {
                    values: values("values", &[*nnz])?,
                    indices,
                    block_size: *block_size,
                }
            }
            Delta::Lora { rank, alpha } => {
                let [out, inp] = t.shape[..] else {
                    return Err(bad(format!("LoRA needs a 2-D shape, got {:?}", t.shape)));
                };
                let r = *rank as u64;
                Content::Lora {
                    rank: *rank,
                    alpha: *alpha,
                    a: values("lora_A", &[r, inp])?,
                    b: values("lora_B", &[out, r])?,
                }
            }
            Delta::Dense => Content::Dense {
                delta: values("delta", &t.shape)?,
            },
        };
        // Sizes and indices are validated by `encode_tensor`, once.
        Ok(TensorData {
            name: t.name.clone(),
            shape: t.shape.clone(),
            dtype: t.dtype,
            content,
        })
    }
}

/// Integer index tensor (i64, u64, i32 or u32, one dimension) to `u64`s.
fn read_indices(bytes: &[u8], info: &safetensors::tensor::TensorInfo) -> Result<Vec<u64>, String> {
    use safetensors::Dtype as D;
    if info.shape.len() != 1 {
        return Err(format!("`indices` must be 1-D, has shape {:?}", info.shape));
    }
    let neg = || "`indices` holds a negative value".to_string();
    Ok(match info.dtype {
        D::I64 => bytes
            .chunks_exact(8)
            .map(|c| u64::try_from(i64::from_le_bytes(c.try_into().expect("8"))).map_err(|_| neg()))
            .collect::<Result<_, _>>()?,
        D::U64 => bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
            .collect(),
        D::I32 => bytes
            .chunks_exact(4)
            .map(|c| u64::try_from(i32::from_le_bytes(c.try_into().expect("4"))).map_err(|_| neg()))
            .collect::<Result<_, _>>()?,
        D::U32 => bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4")) as u64)
            .collect(),
        other => {
            return Err(format!(
                "`indices` has dtype {other:?}; use an integer type (i64)"
            ));
        }
    })
}

/// Parse the header of a safetensors file without reading its data: the data section's offset
/// and the validated metadata.
pub fn read_safetensors_header(file: &std::fs::File, path: &Path) -> Result<(u64, Metadata)> {
    let bad = |why: String| {
        Error::input(
            format!(
                "`{}` is not a valid safetensors file: {why}",
                path.display()
            ),
            None,
        )
    };
    let len = file.metadata().at("read", path)?.len();
    let mut n = [0u8; 8];
    if len < 8 {
        return Err(bad("shorter than 8 bytes".into()));
    }
    fsutil::read_exact_at(file, &mut n, 0).at("read", path)?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || n > len - 8 {
        return Err(bad(format!(
            "header length {n} is invalid for a {len}-byte file"
        )));
    }
    let mut header = vec![0u8; n as usize];
    fsutil::read_exact_at(file, &mut header, 8).at("read", path)?;
    let meta: Metadata = serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
    if 8 + n + meta.data_len() as u64 != len {
        return Err(bad(format!(
            "the header describes {} data bytes, the file holds {}",
            meta.data_len(),
            len - 8 - n
        )));
    }
    Ok((8 + n, meta))
}
