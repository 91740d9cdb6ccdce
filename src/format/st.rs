//! Streaming safetensors output with bounded memory.
//!
//! The safetensors crate's writer wants every tensor's bytes through an infallible `View`; here a
//! fallible callback produces each tensor's bytes when its turn comes, so a decode error aborts
//! the write cleanly. The header comes from the crate's own `Metadata` (which validates it), and
//! tensors are ordered as the crate orders them (descending alignment, then name) so every tensor
//! is aligned for zero-copy readers.

use std::io::{BufWriter, Write};
use std::path::Path;

use safetensors::tensor::{Metadata, TensorInfo};

use crate::error::{Error, IoResultExt, Result};

/// A tensor to write: name, dtype and shape; its bytes come from the callback.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Write `tensors` to `path` atomically (temp file + rename). `bytes(i)` is called once per
/// tensor, in file order, with the index into `tensors`; it must return exactly the tensor's
/// byte length. `metadata` becomes the `__metadata__` map.
pub fn write_safetensors(
    path: &Path,
    tensors: &[PlannedTensor],
    metadata: Option<std::collections::HashMap<String, String>>,
    mut bytes: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        tensors[b]
            .dtype
            .cmp(&tensors[a].dtype)
            .then(tensors[a].name.cmp(&tensors[b].name))
    });
    let mut infos = Vec::with_capacity(tensors.len());
    let mut off = 0;
    for &i in &order {
        let t = &tensors[i];
        let end = off + t.byte_len();
        infos.push((
            t.name.clone(),
            TensorInfo {
                dtype: t.dtype,
                shape: t.shape.clone(),
                data_offsets: (off, end),
            },
        ));
        off = end;
    }
    let meta = Metadata::new(metadata, infos).map_err(|e| {
        Error::input(
            format!(
                "cannot build a safetensors header for `{}`: {e}",
                path.display()
            ),
            None,
        )
    })?;
    let mut header = serde_json::to_vec(&meta).expect("metadata serializes");
    header.resize(header.len().next_multiple_of(8), b' ');

    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".xpm-tmp-")
        .tempfile_in(dir)
        .at("create a temporary file in", dir)?;
    {
        let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
        w.write_all(&(header.len() as u64).to_le_bytes())
            .at("write", path)?;
        w.write_all(&header).at("write", path)?;
        for &i in &order {
            let data = bytes(i)?;
            if data.len() != tensors[i].byte_len() {
                return Err(Error::input(
                    format!(
                        "tensor `{}` has {} bytes, its shape needs {}",
                        tensors[i].name,
                        data.len(),
                        tensors[i].byte_len()
                    ),
                    None,
                ));
            }
            w.write_all(&data).at("write", path)?;
        }
        w.flush().at("write", path)?;
    }
    tmp.as_file().sync_all().at("write", path)?;
    tmp.persist(path)
        .map_err(|e| Error::io("write", path, e.error))?;
    Ok(())
}
