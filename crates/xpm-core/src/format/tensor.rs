//! Decoded tensor deltas, as the packer takes them and the reader returns them.

use super::dtype::Dtype;
use super::manifest::{Delta, PartRole, TensorEntry};
use super::mask::{self, MaskError};
use crate::error::{Error, Result};

/// One tensor's delta in memory: what `pack` encodes and what a reader decodes.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    pub name: String,
    pub shape: Vec<u64>,
    pub dtype: Dtype,
    pub content: Content,
}

/// The kind-specific contents of a [`TensorData`]. Byte buffers are little-endian `dtype`.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Sparse {
        indices: Vec<u64>,
        values: Vec<u8>,
        block_size: Option<u32>,
    },
    Lora {
        rank: u32,
        alpha: f64,
        a: Vec<u8>,
        b: Vec<u8>,
    },
    Dense {
        delta: Vec<u8>,
    },
}

impl Content {
    /// Hand the buffers back to [`crate::pool`] for the next tensor on this thread.
    pub fn recycle(self) {
        match self {
            Content::Sparse {
                indices, values, ..
            } => {
                crate::pool::give(indices);
                crate::pool::give(values);
            }
            Content::Lora { a, b, .. } => {
                crate::pool::give(a);
                crate::pool::give(b);
            }
            Content::Dense { delta } => crate::pool::give(delta),
        }
    }
}

impl TensorData {
    /// A borrowed view of this tensor, for the checks and the encoder.
    pub fn view(&self) -> TensorView<'_> {
        let content = match &self.content {
            Content::Sparse {
                indices,
                values,
                block_size,
            } => ContentView::Sparse {
                indices,
                values,
                block_size: *block_size,
            },
            Content::Lora { rank, alpha, a, b } => ContentView::Lora {
                rank: *rank,
                alpha: *alpha,
                a,
                b,
            },
            Content::Dense { delta } => ContentView::Dense { delta },
        };
        TensorView {
            name: &self.name,
            shape: &self.shape,
            dtype: self.dtype,
            content,
        }
    }

    /// Number of elements of the dense delta.
    pub fn numel(&self) -> u64 {
        mask::numel(&self.shape)
    }

    /// The manifest entry describing this tensor (without storage details).
    pub fn entry(&self) -> TensorEntry {
        self.view().entry()
    }

    /// See [`TensorView::first_non_finite`].
    pub fn first_non_finite(&self) -> Option<(&'static str, usize, f32)> {
        self.view().first_non_finite()
    }

    /// See [`TensorView::validate`].
    pub fn validate(&self) -> Result<()> {
        self.view().validate()
    }
}

/// A [`TensorData`] whose buffers are borrowed: what the encoder reads. An importer can hand
/// the writer bytes straight out of a mapped source file this way, without a copy.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub shape: &'a [u64],
    pub dtype: Dtype,
    pub content: ContentView<'a>,
}

/// The borrowed form of [`Content`].
#[derive(Debug, Clone, Copy)]
pub enum ContentView<'a> {
    Sparse {
        indices: &'a [u64],
        values: &'a [u8],
        block_size: Option<u32>,
    },
    Lora {
        rank: u32,
        alpha: f64,
        a: &'a [u8],
        b: &'a [u8],
    },
    Dense {
        delta: &'a [u8],
    },
}

impl TensorView<'_> {
    /// Number of elements of the dense delta.
    pub fn numel(&self) -> u64 {
        mask::numel(self.shape)
    }

    /// The manifest entry describing this tensor (without storage details).
    pub fn entry(&self) -> TensorEntry {
        let delta = match self.content {
            ContentView::Sparse {
                indices,
                block_size,
                ..
            } => Delta::Sparse {
                nnz: indices.len() as u64,
                density: density(indices.len() as u64, self.numel()),
                encoding: None,
                block_size,
            },
            ContentView::Lora { rank, alpha, .. } => Delta::Lora { rank, alpha },
            ContentView::Dense { .. } => Delta::Dense,
        };
        TensorEntry {
            name: self.name.to_string(),
            shape: self.shape.to_vec(),
            dtype: self.dtype,
            delta,
            stored: Vec::new(),
            new: false,
        }
    }

    /// The first non-finite stored value: which buffer (`values`, `delta`, `lora_a`,
    /// `lora_b`), its position there and the value. xpm refuses to write such a tensor and to
    /// read one (a NaN or ∞ in a delta poisons every merge and every applied model).
    pub fn first_non_finite(&self) -> Option<(&'static str, usize, f32)> {
        let parts: Vec<(&'static str, &[u8])> = match self.content {
            ContentView::Sparse { values, .. } => vec![("values", values)],
            ContentView::Dense { delta } => vec![("delta", delta)],
            ContentView::Lora { a, b, .. } => vec![("lora_a", a), ("lora_b", b)],
        };
        parts.into_iter().find_map(|(part, bytes)| {
            self.dtype
                .first_non_finite(bytes)
                .map(|(i, v)| (part, i, v))
        })
    }

    /// Check that sizes, shapes and indices are consistent.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String, hint: &str| {
            Err(Error::input(
                format!("tensor `{}`: {what}", self.name),
                Some(hint),
            ))
        };
        if self.name.is_empty() {
            return bad("empty tensor name".into(), "every tensor needs a name");
        }
        let Some(n) = mask::checked_numel(self.shape) else {
            return bad(
                format!(
                    "shape {:?} has more than {} elements",
                    self.shape,
                    mask::MAX_NUMEL
                ),
                "a tensor may have at most 2^56 elements",
            );
        };
        let es = self.dtype.size() as u64;
        match self.content {
            ContentView::Sparse {
                indices, values, ..
            } => {
                if let Err(e) = mask::check_indices(indices, n) {
                    let hint = match e {
                        MaskError::OutOfRange { .. } => {
                            "indices are flat row-major positions in 0..numel(shape)"
                        }
                        _ => "indices must be sorted in increasing order without repeats",
                    };
                    return bad(e.to_string(), hint);
                }
                let want = indices.len() as u64 * es;
                if values.len() as u64 != want {
                    return bad(
                        format!(
                            "{} indices but {} bytes of {} values (expected {want} bytes)",
                            indices.len(),
                            values.len(),
                            self.dtype
                        ),
                        "give one value per index",
                    );
                }
            }
            ContentView::Lora { rank, a, b, .. } => {
                let [out, inp] = self.shape[..] else {
                    return bad(
                        format!("LoRA needs a 2-D shape, got {:?}", self.shape),
                        "LoRA applies to matrices (out × in)",
                    );
                };
                let r = rank as u64;
                if r == 0 {
                    return bad("LoRA rank 0".into(), "rank must be at least 1");
                }
                let bytes = |x: u64, y: u64| x.checked_mul(y).and_then(|v| v.checked_mul(es));
                if bytes(r, inp) != Some(a.len() as u64) || bytes(out, r) != Some(b.len() as u64) {
                    return bad(
                        format!(
                            "LoRA factors have {} and {} bytes; rank {r} and shape [{out}, {inp}] need A = [{r}, {inp}] and B = [{out}, {r}]",
                            a.len(),
                            b.len()
                        ),
                        "A is rank × in and B is out × rank",
                    );
                }
            }
            ContentView::Dense { delta } => {
                if delta.len() as u64 != n * es {
                    return bad(
                        format!(
                            "dense delta has {} bytes, shape {:?} of {} needs {}",
                            delta.len(),
                            self.shape,
                            self.dtype,
                            n * es
                        ),
                        "the delta must have the tensor's full shape",
                    );
                }
            }
        }
        Ok(())
    }
}

/// `nnz / n`, 0 for an empty tensor.
pub fn density(nnz: u64, n: u64) -> f64 {
    if n == 0 { 0.0 } else { nnz as f64 / n as f64 }
}

/// The parts an entry is stored as, in order, with their element shapes (the mask's length is
/// only known once encoded, so it is given as `[0]`).
pub fn part_shapes(entry: &TensorEntry) -> Vec<(PartRole, Vec<u64>)> {
    match &entry.delta {
        Delta::Sparse { nnz, .. } => {
            vec![(PartRole::Mask, vec![0]), (PartRole::Values, vec![*nnz])]
        }
        Delta::Lora { rank, .. } => {
            let (out, inp) = match entry.shape[..] {
                [o, i] => (o, i),
                _ => (0, 0),
            };
            vec![
                (PartRole::LoraA, vec![*rank as u64, inp]),
                (PartRole::LoraB, vec![out, *rank as u64]),
            ]
        }
        Delta::Dense => vec![(PartRole::Delta, entry.shape.clone())],
    }
}
