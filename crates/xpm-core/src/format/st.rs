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

/// Writes a safetensors file tensor by tensor, in the order [`SafetensorsWriter::order`]
/// gives, to a temporary file that `finish` renames into place.
pub struct SafetensorsWriter {
    path: std::path::PathBuf,
    tmp: tempfile::NamedTempFile,
    out: BufWriter<std::fs::File>,
    tensors: Vec<PlannedTensor>,
    order: Vec<usize>,
    next: usize,
}

impl SafetensorsWriter {
    /// Plan the file and write its header. `metadata` becomes the `__metadata__` map.
    pub fn create(
        path: &Path,
        tensors: Vec<PlannedTensor>,
        metadata: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Self> {
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
        let (tmp, mut out) = crate::fsutil::temp_file_beside(path)?;
        out.write_all(&(header.len() as u64).to_le_bytes())
            .at("write", path)?;
        out.write_all(&header).at("write", path)?;
        Ok(SafetensorsWriter {
            path: path.to_path_buf(),
            tmp,
            out,
            tensors,
            order,
            next: 0,
        })
    }

    /// Indices into the planned tensors, in the order their bytes must be written.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// Write the bytes of the next tensor in [`SafetensorsWriter::order`].
    pub fn write_next(&mut self, data: &[u8]) -> Result<()> {
        let t = &self.tensors[self.order[self.next]];
        if data.len() != t.byte_len() {
            return Err(Error::input(
                format!(
                    "tensor `{}` has {} bytes, its shape needs {}",
                    t.name,
                    data.len(),
                    t.byte_len()
                ),
                None,
            ));
        }
        self.out.write_all(data).at("write", &self.path)?;
        self.next += 1;
        Ok(())
    }

    /// Flush, fsync and rename into place; every tensor must have been written.
    pub fn finish(self) -> Result<()> {
        assert_eq!(self.next, self.order.len(), "every tensor written");
        let file = self
            .out
            .into_inner()
            .map_err(|e| Error::io("write", &self.path, e.into_error()))?;
        file.sync_all().at("write", &self.path)?;
        self.tmp
            .persist(&self.path)
            .map_err(|e| Error::io("write", &self.path, e.error))?;
        Ok(())
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
    let mut w = SafetensorsWriter::create(path, tensors.to_vec(), metadata)?;
    for k in 0..tensors.len() {
        let i = w.order()[k];
        w.write_next(&bytes(i)?)?;
    }
    w.finish()
}
