//! Differentiable building blocks for training.
//!
//! Candle's fused fast paths (`candle_nn::ops::layer_norm`, `softmax_last_dim`, `rms_norm`)
//! have no backward pass: gradients silently stop there. Everything here is written with ops
//! whose backward Candle implements, and `tests` check the forwards against the stock ones.
//!
//! [`AdaptedLinear`] is a frozen base linear layer with one of three trainable adapters:
//! sparse values scattered into the flattened weight with `index_add` (whose backward to the
//! values is a gather), LoRA factors, or a full trainable copy of the weight.

use candle_core::{D, DType, Device, Result, Tensor, Var};
use rayon::prelude::*;

use xpm_core::rng::SplitMix64;

/// Layer normalisation over the last dimension, from differentiable ops.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.broadcast_mul(w)?.broadcast_add(b)
}

/// RMS normalisation over the last dimension (Llama), from differentiable ops.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// Softmax over the last dimension, from differentiable ops (the max is a constant shift).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Mean cross-entropy of `logits` (n × c) against `targets` (n, u32), ignoring rows whose
/// weight is 0 (`weights`: n, f32 of 0/1). Returns the mean over weighted rows.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let m = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    match weights {
        None => picked.mean_all()?.neg(),
        Some(w) => {
            let total = w.sum_all()?.to_scalar::<f32>()?.max(1.0);
            ((picked * w)?.sum_all()? / total as f64)?.neg()
        }
    }
}

/// Inverted dropout with a mask drawn from xpm's seeded generator (Candle's CPU generator
/// cannot be seeded, and runs must be reproducible).
pub fn dropout(x: &Tensor, p: f64, rng: &mut SplitMix64) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let mask = Tensor::from_vec(dropout_mask(x.elem_count(), p, rng), x.shape(), x.device())?;
    x.mul(&mask)
}

/// An inverted-dropout mask of `n` elements: 0 with probability `p`, else 1 / (1 − p). One
/// draw from `rng` seeds a stream whose blocks are filled in parallel
/// ([`SplitMix64::advanced`]); the mask does not depend on the number of threads.
pub fn dropout_mask(n: usize, p: f64, rng: &mut SplitMix64) -> Vec<f32> {
    const BLOCK: usize = 4096;
    let stream = SplitMix64(rng.next_u64());
    let scale = (1.0 / (1.0 - p)) as f32;
    let mut mask = super::fused::zeroed(n);
    mask.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(c, block)| {
            let mut r = stream.advanced((c * BLOCK) as u64);
            for m in block {
                *m = if (r.uniform() as f64) < p { 0.0 } else { scale };
            }
        });
    mask
}

/// `x @ w.T (+ b)` for `x` of any rank ≥ 2 (the last dimension is `in`).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inner = *dims.last().expect("rank >= 1");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().expect("rank >= 1") = w.dim(0)?;
    y.reshape(out)
}

/// [`linear`] with a frozen weight and bias: no gradient is formed for either (on the CPU,
/// through [`super::linear`]'s fused op).
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if super::linear::fusable(x, w) {
        super::linear::frozen_linear(x, w, b)
    } else {
        linear(x, w, b)
    }
}

/// A trainable adapter on a frozen linear weight.
pub enum Adapter {
    /// Not adapted (frozen).
    None,
    /// Sparse values at sorted flat `indices` (u32) of the (out × in) weight.
    Sparse { indices: Tensor, values: Var },
    /// LoRA: ΔW = scale · B · A, A (r × in), B (out × r); dropout on the input of A.
    Lora {
        a: Var,
        b: Var,
        scale: f64,
        dropout: f64,
    },
    /// Full fine-tuning: a trainable copy of the weight.
    Full { w: Var },
    /// Mask scoring: the dense effective weight as a variable, so its gradient can be read.
    Probe { w: Var },
}

/// A linear layer: frozen `w0` (out × in) and `bias`, plus an [`Adapter`].
pub struct AdaptedLinear {
    /// The base tensor name of the weight (e.g. `encoder.layer.0.attention.self.query.weight`).
    pub name: String,
    pub w0: Tensor,
    pub bias: Option<Tensor>,
    pub adapter: Adapter,
}

impl AdaptedLinear {
    pub fn new(name: String, w0: Tensor, bias: Option<Tensor>) -> Self {
        AdaptedLinear {
            name,
            w0,
            bias,
            adapter: Adapter::None,
        }
    }

    pub fn out_dim(&self) -> usize {
        self.w0.dims()[0]
    }

    pub fn in_dim(&self) -> usize {
        self.w0.dims()[1]
    }

    /// The effective weight W0 + ΔW (sparse, full and probe adapters).
    pub fn effective_weight(&self) -> Result<Tensor> {
        match &self.adapter {
            Adapter::Sparse { indices, values } => {
                let shape = self.w0.shape().clone();
                self.w0
                    .flatten_all()?
                    .index_add(indices, values.as_tensor(), 0)?
                    .reshape(shape)
            }
            Adapter::Full { w } | Adapter::Probe { w } => Ok(w.as_tensor().clone()),
            Adapter::None | Adapter::Lora { .. } => Ok(self.w0.clone()),
        }
    }

    pub fn forward(&self, x: &Tensor, rng: Option<&mut SplitMix64>) -> Result<Tensor> {
        match &self.adapter {
            Adapter::None => frozen_linear(x, &self.w0, self.bias.as_ref()),
            Adapter::Lora {
                a,
                b,
                scale,
                dropout: p,
            } => {
                let base = frozen_linear(x, &self.w0, self.bias.as_ref())?;
                let xd = match rng {
                    Some(rng) => dropout(x, *p, rng)?,
                    None => x.clone(),
                };
                let low = linear(&linear(&xd, a.as_tensor(), None)?, b.as_tensor(), None)?;
                base + (low * *scale)?
            }
            Adapter::Sparse { indices, values } if super::linear::fusable(x, &self.w0) => {
                super::linear::sparse_linear(
                    x,
                    &self.w0,
                    self.bias.as_ref(),
                    indices,
                    values.as_tensor(),
                )
            }
            _ => linear(x, &self.effective_weight()?, self.bias.as_ref()),
        }
    }

    /// The trainable variables of this layer.
    pub fn vars(&self) -> Vec<Var> {
        match &self.adapter {
            Adapter::None => Vec::new(),
            Adapter::Sparse { values, .. } => vec![values.clone()],
            Adapter::Lora { a, b, .. } => vec![a.clone(), b.clone()],
            Adapter::Full { w } | Adapter::Probe { w } => vec![w.clone()],
        }
    }
}

/// A dense trainable linear head (`classifier.weight`, `classifier.bias`).
pub struct Head {
    pub w: Var,
    pub b: Var,
}

impl Head {
    /// Normal(0, 0.02) weights and zero bias, as BERT initialises classifiers.
    pub fn init(classes: usize, hidden: usize, rng: &mut SplitMix64, dev: &Device) -> Result<Self> {
        let w: Vec<f32> = (0..classes * hidden).map(|_| rng.normal() * 0.02).collect();
        Ok(Head {
            w: Var::from_tensor(&Tensor::from_vec(w, (classes, hidden), dev)?)?,
            b: Var::from_tensor(&Tensor::zeros(classes, DType::F32, dev)?)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, self.w.as_tensor(), Some(self.b.as_tensor()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// max |a − b| (test helper shared by the train module's tests).
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Standard normal entries from a seeded generator, scaled.
    pub(crate) fn randn_scaled(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        let mut r = SplitMix64(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| r.normal() * scale).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        randn_scaled(shape, seed, 1.0)
    }

    #[test]
    fn layer_norm_and_softmax_match_candle_nn() {
        let x = randn(&[3, 5, 16], 1);
        let w = randn(&[16], 2);
        let b = randn(&[16], 3);
        let stock = candle_nn::ops::layer_norm(&x, &w, &b, 1e-12).unwrap();
        assert!(max_diff(&layer_norm(&x, &w, &b, 1e-12).unwrap(), &stock) < 1e-5);
        let stock = candle_nn::ops::softmax_last_dim(&x).unwrap();
        assert!(max_diff(&softmax(&x).unwrap(), &stock) < 1e-6);
        let stock = candle_nn::ops::rms_norm(&x, &w, 1e-6).unwrap();
        assert!(max_diff(&rms_norm(&x, &w, 1e-6).unwrap(), &stock) < 1e-5);
    }

    #[test]
    fn layer_norm_gradient_matches_finite_differences() {
        let x = Var::from_tensor(&randn(&[2, 8], 4)).unwrap();
        let w = randn(&[8], 5);
        let b = randn(&[8], 6);
        let probe = randn(&[2, 8], 7);
        let f = |x: &Tensor| {
            (layer_norm(x, &w, &b, 1e-5).unwrap() * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let grads = f(x.as_tensor()).backward().unwrap();
        let g: Vec<f32> = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let x0: Vec<f32> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for i in [0usize, 5, 11] {
            let h = 1e-2f32;
            let mut xp = x0.clone();
            xp[i] += h;
            let mut xm = x0.clone();
            xm[i] -= h;
            let t = |v: Vec<f32>| Tensor::from_vec(v, (2, 8), &Device::Cpu).unwrap();
            let fd = (f(&t(xp)).to_scalar::<f32>().unwrap()
                - f(&t(xm)).to_scalar::<f32>().unwrap())
                / (2.0 * h);
            assert!(
                (fd - g[i]).abs() < 2e-2,
                "entry {i}: fd {fd} vs autograd {}",
                g[i]
            );
        }
    }

    #[test]
    fn frozen_linear_matches_linear_with_the_input_gradient() {
        let x = Var::from_tensor(&randn(&[2, 3, 5], 11)).unwrap();
        let w = randn(&[4, 5], 12);
        let b = randn(&[4], 13);
        let want = linear(x.as_tensor(), &w, Some(&b)).unwrap();
        let got = frozen_linear(x.as_tensor(), &w, Some(&b)).unwrap();
        assert!(max_diff(&want, &got) < 1e-6);
        let gw = want.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gg = got.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (
            gw.get(x.as_tensor()).unwrap(),
            gg.get(x.as_tensor()).unwrap(),
        );
        assert!(max_diff(a, b) < 1e-5);
    }

    #[test]
    fn sparse_adapter_gradient_reaches_only_the_values() {
        let w0 = randn(&[4, 6], 8);
        let mut l = AdaptedLinear::new("w".into(), w0.clone(), None);
        let idx = Tensor::new(&[1u32, 7, 20], &Device::Cpu).unwrap();
        let values =
            Var::from_tensor(&Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap()).unwrap();
        l.adapter = Adapter::Sparse {
            indices: idx,
            values: values.clone(),
        };
        let x = randn(&[3, 6], 9);
        let y = l.forward(&x, None).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let gv: Vec<f32> = grads.get(values.as_tensor()).unwrap().to_vec1().unwrap();
        // dL/dW[o, i] = Σ_rows x[row, i]; for flat index f = o*6 + i.
        let xs: Vec<Vec<f32>> = x.to_vec2().unwrap();
        for (k, f) in [1usize, 7, 20].iter().enumerate() {
            let i = f % 6;
            let want: f32 = xs.iter().map(|r| r[i]).sum();
            assert!((gv[k] - want).abs() < 1e-5);
        }
        // The effective weight differs from W0 exactly at the three indices.
        let eff: Vec<f32> = l
            .effective_weight()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f32> = w0.flatten_all().unwrap().to_vec1().unwrap();
        let changed: Vec<usize> = (0..24).filter(|&i| eff[i] != base[i]).collect();
        assert_eq!(changed, vec![1, 7, 20]);
    }
}
