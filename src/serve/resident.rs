//! The resident base model of `xpm serve` and the in-place swap of experts.
//!
//! The base is loaded once. Its network ([`Net`]) and a map of every weight tensor share the
//! same storage, so an expert is applied by writing into the resident tensors:
//!
//! - a sparse delta (k values per tensor) saves the base's k values at its indices, then writes
//!   `W0[i] + Δ[i]` there (a scatter of k values: no copy of the tensor);
//! - a dense delta (a dense expert, or a LoRA expert as (α / r) · B · A, or a merge that
//!   densified) saves the whole tensor, then writes `W0 + Δ`.
//!
//! Removing it writes the saved values back, so the base is bit for bit what it was after every
//! swap ([`Resident::weights_digest`] shows it). `W0 + Δ` is formed in f32 exactly as
//! `xpm apply` forms it, so a served expert gives the logits `xpm eval` gives on the applied
//! model.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::format::ArtifactReader;
use crate::merge::engine::Input;
use crate::rng::SplitMix64;
use crate::train::model::{self, ModelDir, Net, ce};

/// One tensor of an expert's delta, ready to be written into the resident weights.
pub enum DeltaTensor {
    /// Flat indices (u32) and the values to add there.
    Sparse { indices: Tensor, values: Tensor },
    /// The whole delta, flat.
    Dense { values: Tensor },
}

/// An expert's (or a merge's) delta over the base's tensors, loaded into memory.
pub struct Delta {
    pub tensors: Vec<(String, DeltaTensor)>,
    /// Bytes held (for the cache's bound).
    pub bytes: usize,
}

impl Delta {
    /// Read every delta tensor of an artifact (an added tensor, such as a head, is not part of
    /// the delta). Each must name a float tensor of the base with the same shape.
    pub fn load(reader: &ArtifactReader, resident: &Resident) -> Result<Delta> {
        let m = reader.manifest();
        let mut tensors = Vec::new();
        let mut bytes = 0usize;
        for (i, t) in m.tensors.iter().enumerate() {
            if t.new {
                continue;
            }
            let Some(w) = resident.weights.get(&t.name) else {
                return Err(Error::input(
                    format!(
                        "{}@{} changes tensor `{}`, which the served base `{}` does not have",
                        m.name, m.version, t.name, resident.base_id
                    ),
                    Some("serve an expert only with the base model it was made from"),
                ));
            };
            let shape: Vec<u64> = w.dims().iter().map(|&d| d as u64).collect();
            if shape != t.shape {
                return Err(Error::input(
                    format!(
                        "tensor `{}` is {:?} in the base but {:?} in {}@{}",
                        t.name, shape, t.shape, m.name, m.version
                    ),
                    Some("serve an expert only with the base model it was made from"),
                ));
            }
            let numel = w.elem_count();
            let dev = w.device();
            let d = match crate::merge::input::load_input_at(reader, i)? {
                Input::Absent => continue,
                Input::Sparse { indices, values } => {
                    if indices.last().is_some_and(|&i| i >= numel as u64) {
                        return Err(Error::corrupt(
                            reader.path(),
                            format!("`{}`: an index is out of the tensor's range", t.name),
                        ));
                    }
                    let idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
                    bytes += idx.len() * 8;
                    let n = idx.len();
                    DeltaTensor::Sparse {
                        indices: Tensor::from_vec(idx, n, dev).map_err(ce("load a delta"))?,
                        values: Tensor::from_vec(values, n, dev).map_err(ce("load a delta"))?,
                    }
                }
                Input::Dense { values } => {
                    if values.len() != numel {
                        return Err(Error::corrupt(
                            reader.path(),
                            format!("`{}`: the dense delta has the wrong size", t.name),
                        ));
                    }
                    bytes += values.len() * 4;
                    DeltaTensor::Dense {
                        values: Tensor::from_vec(values, numel, dev).map_err(ce("load a delta"))?,
                    }
                }
            };
            tensors.push((t.name.clone(), d));
        }
        Ok(Delta { tensors, bytes })
    }
}

/// What a tensor held before the applied delta changed it.
enum Saved {
    Sparse { indices: Tensor, base: Tensor },
    Dense { base: Tensor },
}

/// The delta applied now: its key and what to write back.
struct Applied {
    key: String,
    saved: Vec<(String, Saved)>,
}

/// The base model, loaded once, with at most one delta applied in place.
pub struct Resident {
    pub md: ModelDir,
    pub net: Net,
    pub base_id: String,
    /// `sha256:` digest of the base checkpoint (what experts record as their base).
    pub base_digest: String,
    pub device: Device,
    /// Every float tensor of the base, sharing storage with `net`.
    weights: HashMap<String, Tensor>,
    applied: Option<Applied>,
    /// Swaps done, and the time they took in all.
    pub swaps: u64,
    pub swap_time: Duration,
}

impl Resident {
    /// Load the base model directory onto `device`.
    pub fn load(
        md: ModelDir,
        base_id: String,
        base_digest: String,
        device: Device,
    ) -> Result<Self> {
        let weights = md.weights(&device)?;
        // The network gets clones: same storage, so writes through `weights` reach it. A
        // classifier gets its head per request (from the task's expert): a placeholder here.
        let net =
            model::build_net_from(&md, weights.clone(), &device, 1, None, &mut SplitMix64(0))?;
        Ok(Resident {
            md,
            net,
            base_id,
            base_digest,
            device,
            weights,
            applied: None,
            swaps: 0,
            swap_time: Duration::ZERO,
        })
    }

    /// The key of the delta applied now (`None`: the plain base).
    pub fn applied(&self) -> Option<&str> {
        self.applied.as_ref().map(|a| a.key.as_str())
    }

    /// Make `delta` (known by `key`) the applied one: nothing to do when it already is; else
    /// the current one is removed first. `None` leaves the plain base.
    pub fn switch_to(&mut self, key: Option<&str>, delta: Option<&Delta>) -> Result<()> {
        if self.applied() == key {
            return Ok(());
        }
        let start = Instant::now();
        self.restore()?;
        if let (Some(key), Some(delta)) = (key, delta) {
            self.apply(key, delta)?;
        }
        self.swaps += 1;
        self.swap_time += start.elapsed();
        Ok(())
    }

    fn apply(&mut self, key: &str, delta: &Delta) -> Result<()> {
        let mut saved = Vec::with_capacity(delta.tensors.len());
        let mut result = Ok(());
        for (name, d) in &delta.tensors {
            match self.apply_one(name, d) {
                Ok(s) => saved.push((name.clone(), s)),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.applied = Some(Applied {
            key: key.to_string(),
            saved,
        });
        if result.is_err() {
            // Leave the plain base, never half an expert.
            self.restore()?;
        }
        result
    }

    fn apply_one(&self, name: &str, d: &DeltaTensor) -> Result<Saved> {
        let w = self
            .weights
            .get(name)
            .ok_or_else(|| Error::input(format!("the base has no tensor `{name}`"), None))?;
        // A contiguous tensor's flat view shares its storage.
        let flat = w.flatten_all().map_err(ce("swap"))?;
        Ok(match d {
            DeltaTensor::Sparse { indices, values } => {
                let base = flat.index_select(indices, 0).map_err(ce("swap"))?;
                let new = (&base + values).map_err(ce("swap"))?;
                flat.scatter_set(indices, &new, 0).map_err(ce("swap"))?;
                Saved::Sparse {
                    indices: indices.clone(),
                    base,
                }
            }
            DeltaTensor::Dense { values } => {
                let base = flat.copy().map_err(ce("swap"))?;
                let new = (&base + values).map_err(ce("swap"))?;
                flat.slice_set(&new, 0, 0).map_err(ce("swap"))?;
                Saved::Dense { base }
            }
        })
    }

    /// Write the saved base values back: the plain base again, bit for bit.
    pub fn restore(&mut self) -> Result<()> {
        let Some(applied) = self.applied.take() else {
            return Ok(());
        };
        for (name, s) in applied.saved.iter().rev() {
            let flat = self.weights[name].flatten_all().map_err(ce("restore"))?;
            match s {
                Saved::Sparse { indices, base } => flat.scatter_set(indices, base, 0),
                Saved::Dense { base } => flat.slice_set(base, 0, 0),
            }
            .map_err(ce("restore"))?;
        }
        Ok(())
    }

    /// `sha256:` over every resident tensor's name and f32 bytes, in name order: equal before
    /// and after any number of swaps when the plain base is resident.
    pub fn weights_digest(&self) -> Result<String> {
        let mut names: Vec<&String> = self.weights.keys().collect();
        names.sort();
        let mut h = Sha256::new();
        for n in names {
            let v: Vec<f32> = self.weights[n]
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .map_err(ce("hash the weights"))?;
            h.update((n.len() as u64).to_le_bytes());
            h.update(n.as_bytes());
            for x in v {
                h.update(x.to_le_bytes());
            }
        }
        Ok(crate::digest::format_digest(&h.finalize()))
    }
}
