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
use std::sync::Arc;
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
    /// Sorted flat indices and the values to add there.
    Sparse { indices: Vec<u32>, values: Vec<f32> },
    /// The whole delta, flat.
    Dense { values: Vec<f32> },
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
            if numel > u32::MAX as usize + 1 {
                return Err(Error::input(
                    format!(
                        "tensor `{}` has {numel} entries, more than xpm serve's 32-bit positions",
                        t.name
                    ),
                    Some("serve a model whose tensors have at most 2^32 entries each"),
                ));
            }
            let d = match crate::merge::input::load_input_at(reader, i)? {
                Input::Absent => continue,
                Input::Sparse { indices, values } => {
                    // The mask decoder guarantees both; the in-place restore depends on them
                    // (a repeated index would save an already-changed value), so they are
                    // checked again where they are relied on.
                    if !indices.is_sorted_by(|a, b| a < b)
                        || indices.last().is_some_and(|&i| i >= numel as u64)
                    {
                        return Err(Error::corrupt(
                            reader.path(),
                            format!(
                                "`{}`: the indices are not increasing, or out of the tensor's range",
                                t.name
                            ),
                        ));
                    }
                    let indices: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
                    bytes += indices.len() * 8;
                    DeltaTensor::Sparse { indices, values }
                }
                Input::Dense { values } => {
                    if values.len() != numel {
                        return Err(Error::corrupt(
                            reader.path(),
                            format!("`{}`: the dense delta has the wrong size", t.name),
                        ));
                    }
                    bytes += values.len() * 4;
                    DeltaTensor::Dense { values }
                }
            };
            tensors.push((t.name.clone(), d));
        }
        Ok(Delta { tensors, bytes })
    }
}

/// What a tensor held before the applied delta changed it: the base's values at the sparse
/// delta's indices (in their order), or the whole tensor (a dense delta).
struct Saved(Vec<f32>);

/// The in-place writes of a swap, as a Candle in-place op on a CPU tensor: one pass over the
/// delta's entries, no temporary tensors.
enum Write<'a> {
    /// `saved[k] = w[i[k]]; w[i[k]] = saved[k] + d[k]`
    AddSparse(&'a [u32], &'a [f32]),
    /// `w[i[k]] = base[k]`
    SetSparse(&'a [u32], &'a [f32]),
    /// `saved = w; w = saved + d`
    AddDense(&'a [f32]),
    /// `w = base`
    SetDense(&'a [f32]),
}

struct SwapOp<'a> {
    write: Write<'a>,
    saved: std::cell::RefCell<Vec<f32>>,
}

impl candle_core::InplaceOp1 for SwapOp<'_> {
    fn name(&self) -> &'static str {
        "xpm-swap"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let candle_core::CpuStorage::F32(all) = storage else {
            candle_core::bail!("xpm serve swaps f32 weights only");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("xpm serve swaps contiguous weights only");
        };
        let w = &mut all[start..end];
        let mut saved = self.saved.borrow_mut();
        match self.write {
            Write::AddSparse(idx, d) => {
                // Checked when the delta was loaded: sorted, and in range.
                saved.reserve_exact(idx.len());
                for (&i, &v) in idx.iter().zip(d) {
                    let x = &mut w[i as usize];
                    saved.push(*x);
                    *x += v;
                }
            }
            Write::SetSparse(idx, base) => {
                for (&i, &v) in idx.iter().zip(base) {
                    w[i as usize] = v;
                }
            }
            Write::AddDense(d) => {
                saved.extend_from_slice(w);
                w.iter_mut().zip(d).for_each(|(x, v)| *x += v);
            }
            Write::SetDense(base) => w.copy_from_slice(base),
        }
        Ok(())
    }
}

/// Run one swap write on `w` (in place), returning what it saved. Off the CPU (where Candle
/// has no custom in-place kernels here) the same writes go through Candle's own ops.
fn write(w: &Tensor, op: Write<'_>) -> Result<Vec<f32>> {
    if w.device().is_cpu() {
        let op = SwapOp {
            write: op,
            saved: Default::default(),
        };
        w.inplace_op1(&op).map_err(ce("swap"))?;
        return Ok(op.saved.into_inner());
    }
    let dev = w.device();
    let gpu = ce("swap");
    let flat = w.flatten_all().map_err(&gpu)?;
    match op {
        Write::AddSparse(idx, d) => {
            let i = Tensor::new(idx, dev).map_err(&gpu)?;
            let base = flat.index_select(&i, 0).map_err(&gpu)?;
            let new = (&base + Tensor::new(d, dev).map_err(&gpu)?).map_err(&gpu)?;
            flat.scatter_set(&i, &new, 0).map_err(&gpu)?;
            base.to_vec1().map_err(&gpu)
        }
        Write::SetSparse(idx, base) => {
            let i = Tensor::new(idx, dev).map_err(&gpu)?;
            flat.scatter_set(&i, &Tensor::new(base, dev).map_err(&gpu)?, 0)
                .map_err(&gpu)?;
            Ok(Vec::new())
        }
        Write::AddDense(d) => {
            let base = flat.copy().map_err(&gpu)?;
            let new = (&base + Tensor::new(d, dev).map_err(&gpu)?).map_err(&gpu)?;
            flat.slice_set(&new, 0, 0).map_err(&gpu)?;
            base.to_vec1().map_err(&gpu)
        }
        Write::SetDense(base) => {
            flat.slice_set(&Tensor::new(base, dev).map_err(&gpu)?, 0, 0)
                .map_err(&gpu)?;
            Ok(Vec::new())
        }
    }
}

/// The delta applied now: its key and what to write back.
struct Applied {
    key: String,
    delta: Arc<Delta>,
    /// Per tensor of `delta`, in its order (`None`: its write failed).
    saved: Vec<Option<Saved>>,
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
    pub fn switch_to(&mut self, key: Option<&str>, delta: Option<&Arc<Delta>>) -> Result<()> {
        if self.applied() == key {
            return Ok(());
        }
        let start = Instant::now();
        match (key, delta) {
            (Some(key), Some(delta)) => self.replace(key, delta)?,
            _ => self.restore()?,
        }
        self.swaps += 1;
        self.swap_time += start.elapsed();
        Ok(())
    }

    /// Remove the applied delta (if any) and apply `delta`, tensor by tensor: where both touch
    /// a tensor, its old entries are written back and the new ones written in one task, while
    /// the tensor is in the cache. Tensors are independent: written in parallel.
    fn replace(&mut self, key: &str, delta: &Arc<Delta>) -> Result<()> {
        use rayon::prelude::*;
        let old = self.applied.take();
        let mut old_at: HashMap<&str, usize> = HashMap::new();
        if let Some(a) = &old {
            for (i, (name, _)) in a.delta.tensors.iter().enumerate() {
                old_at.insert(name.as_str(), i);
            }
        }
        let undo = |i: usize| -> Result<()> {
            let a = old.as_ref().expect("indexed");
            let (name, d) = &a.delta.tensors[i];
            // A tensor whose write failed wrote nothing and saved nothing.
            let Some(Saved(base)) = &a.saved[i] else {
                return Ok(());
            };
            let w = self.weight(name)?;
            match d {
                DeltaTensor::Sparse { indices, .. } => write(w, Write::SetSparse(indices, base)),
                DeltaTensor::Dense { .. } => write(w, Write::SetDense(base)),
            }
            .map(drop)
        };
        let results: Vec<Result<Saved>> = delta
            .tensors
            .par_iter()
            .map(|(name, d)| {
                if let Some(&i) = old_at.get(name.as_str()) {
                    undo(i)?;
                }
                self.apply_one(name, d)
            })
            .collect();
        // The old delta's tensors that the new one does not touch.
        if let Some(a) = &old {
            let new_names: std::collections::HashSet<&str> =
                delta.tensors.iter().map(|(n, _)| n.as_str()).collect();
            (0..a.delta.tensors.len())
                .into_par_iter()
                .filter(|&i| !new_names.contains(a.delta.tensors[i].0.as_str()))
                .map(undo)
                .collect::<Result<Vec<()>>>()?;
        }
        self.finish_apply(key, delta, results)
    }

    /// Record what `results` saved as the applied delta; on an error, restore the plain base.
    fn finish_apply(
        &mut self,
        key: &str,
        delta: &Arc<Delta>,
        results: Vec<Result<Saved>>,
    ) -> Result<()> {
        let mut first_err = None;
        let saved = results
            .into_iter()
            .map(|r| match r {
                Ok(s) => Some(s),
                Err(e) => {
                    first_err = first_err.take().or(Some(e));
                    None
                }
            })
            .collect();
        self.applied = Some(Applied {
            key: key.to_string(),
            delta: Arc::clone(delta),
            saved,
        });
        if let Some(e) = first_err {
            // Leave the plain base, never half an expert.
            self.restore()?;
            return Err(e);
        }
        Ok(())
    }

    fn weight(&self, name: &str) -> Result<&Tensor> {
        self.weights
            .get(name)
            .ok_or_else(|| Error::input(format!("the base has no tensor `{name}`"), None))
    }

    fn apply_one(&self, name: &str, d: &DeltaTensor) -> Result<Saved> {
        let w = self.weight(name)?;
        Ok(Saved(match d {
            DeltaTensor::Sparse { indices, values } => write(w, Write::AddSparse(indices, values))?,
            DeltaTensor::Dense { values } => write(w, Write::AddDense(values))?,
        }))
    }

    /// Write the saved base values back: the plain base again, bit for bit.
    pub fn restore(&mut self) -> Result<()> {
        use rayon::prelude::*;
        let Some(applied) = self.applied.take() else {
            return Ok(());
        };
        applied
            .delta
            .tensors
            .par_iter()
            .zip(applied.saved.par_iter())
            .map(|((name, d), saved)| {
                // A tensor whose write failed wrote nothing and saved nothing.
                let Some(Saved(base)) = saved else {
                    return Ok(());
                };
                let w = self.weight(name)?;
                match d {
                    DeltaTensor::Sparse { indices, .. } => {
                        write(w, Write::SetSparse(indices, base))
                    }
                    DeltaTensor::Dense { .. } => write(w, Write::SetDense(base)),
                }
                .map(drop)
            })
            .collect::<Result<Vec<()>>>()?;
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::Device;

    use super::{Delta, DeltaTensor, Resident};
    use crate::rng::SplitMix64;
    use crate::train::model::ModelDir;

    fn resident() -> (tempfile::TempDir, Resident) {
        let dir = tempfile::tempdir().unwrap();
        crate::train::toy::write_tiny_bert(dir.path(), 3).unwrap();
        let md = ModelDir::open(dir.path()).unwrap();
        let r = Resident::load(md, "tiny".into(), "sha256:x".into(), Device::Cpu).unwrap();
        (dir, r)
    }

    /// A random delta over the linear weights: sparse at `density`, or dense.
    fn delta(r: &Resident, seed: u64, density: f64, dense: bool) -> Arc<Delta> {
        let mut rng = SplitMix64(seed);
        let mut names: Vec<&String> = r
            .weights
            .iter()
            .filter(|(n, w)| w.dims().len() == 2 && !n.contains("embeddings"))
            .map(|(n, _)| n)
            .collect();
        names.sort();
        let tensors = names
            .into_iter()
            .map(|n| {
                let numel = r.weights[n].elem_count();
                let d = if dense {
                    DeltaTensor::Dense {
                        values: (0..numel).map(|_| rng.normal()).collect(),
                    }
                } else {
                    let indices: Vec<u32> = (0..numel as u32)
                        .filter(|_| (rng.uniform() as f64) < density)
                        .collect();
                    let values = indices.iter().map(|_| rng.normal()).collect();
                    DeltaTensor::Sparse { indices, values }
                };
                (n.clone(), d)
            })
            .collect();
        Arc::new(Delta { tensors, bytes: 0 })
    }

    fn value(r: &Resident, name: &str, i: usize) -> f32 {
        r.weights[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[i]
    }

    #[test]
    fn swaps_write_w0_plus_delta_and_restore_the_base_bit_for_bit() {
        let (_dir, mut r) = resident();
        let base = r.weights_digest().unwrap();
        let a = delta(&r, 1, 0.05, false);
        let b = delta(&r, 2, 0.05, false); // overlaps `a` on some positions
        let d = delta(&r, 3, 0.0, true);
        let (name, DeltaTensor::Sparse { indices, values }) = &a.tensors[0] else {
            unreachable!()
        };
        let (i, v) = (indices[0] as usize, values[0]);
        let w0 = value(&r, name, i);
        for (key, x) in [("a", &a), ("b", &b), ("d", &d), ("a", &a), ("b", &b)] {
            r.switch_to(Some(key), Some(x)).unwrap();
            assert_eq!(r.applied(), Some(key));
            if key == "a" {
                assert_eq!(value(&r, name, i), w0 + v, "W0 + Δ, in f32");
            }
            assert_ne!(r.weights_digest().unwrap(), base);
        }
        // The same key again changes nothing.
        let before = r.weights_digest().unwrap();
        r.switch_to(Some("b"), Some(&b)).unwrap();
        assert_eq!(r.weights_digest().unwrap(), before);
        r.switch_to(None, None).unwrap();
        assert_eq!(r.weights_digest().unwrap(), base);
        assert_eq!(r.swaps, 6);
    }

    #[test]
    fn a_delta_that_fails_midway_leaves_the_plain_base() {
        let (_dir, mut r) = resident();
        let base = r.weights_digest().unwrap();
        let a = delta(&r, 1, 0.05, false);
        r.switch_to(Some("a"), Some(&a)).unwrap();
        // A delta whose middle tensor the base does not have.
        let mut bad = delta(&r, 2, 0.05, false);
        let n = bad.tensors.len();
        Arc::get_mut(&mut bad).unwrap().tensors.insert(
            n / 2,
            (
                "no.such.weight".into(),
                DeltaTensor::Sparse {
                    indices: vec![0],
                    values: vec![1.0],
                },
            ),
        );
        let err = r.switch_to(Some("bad"), Some(&bad)).unwrap_err();
        assert!(err.to_string().contains("no.such.weight"), "{err}");
        assert_eq!(r.applied(), None, "never half an expert");
        assert_eq!(r.weights_digest().unwrap(), base);
        // And it still swaps afterwards.
        r.switch_to(Some("a"), Some(&a)).unwrap();
        r.switch_to(None, None).unwrap();
        assert_eq!(r.weights_digest().unwrap(), base);
    }
}
