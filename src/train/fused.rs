//! Fused CPU kernels with hand-written backward passes for the element-wise parts of a
//! transformer step: GELU (erf form), layer normalisation with frozen affine parameters, and
//! the scaled, masked softmax of attention scores.
//!
//! Built from Candle's primitive ops each of these is 5–10 passes over the activations, each
//! allocating a new buffer, and as many again backward. Fused, each is one pass forward and
//! one backward. On other devices, or for other dtypes, the callers fall back to the composite
//! versions in [`super::nn`]; tests check both agree (values and gradients).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows per parallel task (enough work to amortise scheduling).
const CHUNK: usize = 16 * 1024;

fn input<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(d) = s else {
        candle_core::bail!("{op}: f32 input expected")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: contiguous input expected")
    };
    Ok(&d[a..b])
}

/// erf with max absolute error 1.5e-7 (Abramowitz & Stegun 7.1.26).
#[inline]
fn erf(x: f32) -> f32 {
    let s = x.signum();
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let y = 1.0
        - (((((1.061_405_4 * t - 1.453_152_1) * t) + 1.421_413_8) * t - 0.284_496_74) * t
            + 0.254_829_6)
            * t
            * (-a * a).exp();
    s * y
}

/// `f` applied to every element, in parallel chunks.
fn map_par(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = f(x);
            }
        });
    y
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / √(2π)
const INV_SQRT_2PI: f32 = 0.398_942_3;

struct Gelu;
struct GeluGrad;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "xpm-gelu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = map_par(input(s, l, self.name())?, |x| {
            0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = arg.contiguous()?.apply_op1_no_bwd(&GeluGrad)?;
        Ok(Some(grad.mul(&d)?))
    }
}

impl CustomOp1 for GeluGrad {
    fn name(&self) -> &'static str {
        "xpm-gelu-grad"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = map_par(input(s, l, self.name())?, |x| {
            0.5 * (1.0 + erf(x * FRAC_1_SQRT_2)) + x * INV_SQRT_2PI * (-0.5 * x * x).exp()
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
}

/// GELU, erf form (as BERT's `gelu`).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x.gelu_erf()
    }
}

/// Layer norm over the last dimension with frozen `w` and `b` (gradient to `x` only).
struct LayerNorm {
    w: Vec<f32>,
    b: Vec<f32>,
    eps: f32,
}

struct LayerNormGrad<'a> {
    ln: &'a LayerNorm,
    grad: Vec<f32>,
}

impl LayerNorm {
    fn rows(&self) -> usize {
        self.w.len()
    }
}

/// Mean and 1/σ of one row.
#[inline]
fn stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "xpm-layer-norm"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = input(s, l, self.name())?;
        let h = self.rows();
        let mut y = vec![0f32; x.len()];
        let per = (CHUNK / h).max(1) * h;
        y.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .for_each(|(y, x)| {
                for (y, x) in y.chunks_mut(h).zip(x.chunks(h)) {
                    let (mean, inv) = stats(x, self.eps);
                    for i in 0..h {
                        y[i] = (x[i] - mean) * inv * self.w[i] + self.b[i];
                    }
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g: Vec<f32> = grad.contiguous()?.flatten_all()?.to_vec1()?;
        let op = LayerNormGrad { ln: self, grad: g };
        Ok(Some(arg.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

impl CustomOp1 for LayerNormGrad<'_> {
    fn name(&self) -> &'static str {
        "xpm-layer-norm-grad"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        // dx = inv · (gw − mean(gw) − x̂ · mean(gw · x̂)), gw = g ⊙ w.
        let x = input(s, l, self.name())?;
        let h = self.ln.rows();
        let w = &self.ln.w;
        let mut dx = vec![0f32; x.len()];
        let per = (CHUNK / h).max(1) * h;
        dx.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .zip(self.grad.par_chunks(per))
            .for_each(|((dx, x), g)| {
                let mut xhat = vec![0f32; h];
                for ((dx, x), g) in dx.chunks_mut(h).zip(x.chunks(h)).zip(g.chunks(h)) {
                    let (mean, inv) = stats(x, self.ln.eps);
                    let (mut s1, mut s2) = (0f32, 0f32);
                    for i in 0..h {
                        xhat[i] = (x[i] - mean) * inv;
                        let gw = g[i] * w[i];
                        s1 += gw;
                        s2 += gw * xhat[i];
                    }
                    let (m1, m2) = (s1 / h as f32, s2 / h as f32);
                    for i in 0..h {
                        dx[i] = inv * (g[i] * w[i] - m1 - xhat[i] * m2);
                    }
                }
            });
        Ok((CpuStorage::F32(dx), l.shape().clone()))
    }
}

/// Layer norm over the last dimension; `w` and `b` are frozen.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        let op = LayerNorm {
            w: w.to_vec1()?,
            b: b.to_vec1()?,
            eps: eps as f32,
        };
        x.contiguous()?.apply_op1(op)
    } else {
        super::nn::layer_norm(x, w, b, eps)
    }
}

struct SoftmaxGrad {
    n: usize,
    y: Vec<f32>,
    /// The input was scaled by this before the softmax.
    scale: f32,
}

/// softmax(scale · x + mask) over the last dimension of attention scores x (b, h, q, k), with
/// an additive mask (b, 1, mq, k), mq ∈ {1, q}, that gets no gradient.
struct MaskedSoftmax {
    dims: [usize; 4],
    mask: Vec<f32>,
    mask_rows: usize,
    scale: f32,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "xpm-masked-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = input(s, l, self.name())?;
        let [_, h, q, k] = self.dims;
        let mut y = vec![0f32; x.len()];
        let per = (CHUNK / k).max(1) * k;
        y.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .enumerate()
            .for_each(|(c, (y, x))| {
                let first = c * per / k;
                for (r, (y, x)) in y.chunks_mut(k).zip(x.chunks(k)).enumerate() {
                    let row = first + r;
                    let (bi, qi) = (row / (h * q), row % q);
                    let mrow = if self.mask_rows == 1 { 0 } else { qi };
                    let m = &self.mask[(bi * self.mask_rows + mrow) * k..][..k];
                    let mut max = f32::NEG_INFINITY;
                    for j in 0..k {
                        y[j] = x[j] * self.scale + m[j];
                        max = max.max(y[j]);
                    }
                    let mut sum = 0f32;
                    for v in y.iter_mut() {
                        *v = (*v - max).exp();
                        sum += *v;
                    }
                    let inv = 1.0 / sum;
                    y.iter_mut().for_each(|v| *v *= inv);
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = SoftmaxGrad {
            n: self.dims[3],
            y: res.flatten_all()?.to_vec1()?,
            scale: self.scale,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// softmax(scale · x + mask) over the last dimension, for attention scores x (b, h, q, k) and
/// an additive mask (b, 1, 1 or q, k) that is a constant.
pub fn masked_softmax(x: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, q, k) = x.dims4()?;
    let (mb, _, mq, mk) = mask.dims4()?;
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && mb == b && mk == k {
        let op = MaskedSoftmax {
            dims: [b, h, q, k],
            mask: mask.flatten_all()?.to_vec1()?,
            mask_rows: mq,
            scale: scale as f32,
        };
        x.contiguous()?.apply_op1(op)
    } else {
        super::nn::softmax(&(x * scale)?.broadcast_add(mask)?)
    }
}

impl CustomOp1 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "xpm-softmax-grad"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        // dx = y ⊙ (g − Σ g ⊙ y)
        let g = input(s, l, self.name())?;
        let n = self.n;
        let mut dx = vec![0f32; g.len()];
        let per = (CHUNK / n).max(1) * n;
        dx.par_chunks_mut(per)
            .zip(g.par_chunks(per))
            .zip(self.y.par_chunks(per))
            .for_each(|((dx, g), y)| {
                for ((dx, g), y) in dx.chunks_mut(n).zip(g.chunks(n)).zip(y.chunks(n)) {
                    let dot: f32 = g.iter().zip(y).map(|(a, b)| a * b).sum();
                    for i in 0..n {
                        dx[i] = self.scale * y[i] * (g[i] - dot);
                    }
                }
            });
        Ok((CpuStorage::F32(dx), l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::train::nn::tests::{max_diff, randn_scaled as randn};

    /// Forward and input gradient (against a random probe) of fused vs composite.
    fn check(
        fused: impl Fn(&Tensor) -> Result<Tensor>,
        composite: impl Fn(&Tensor) -> Result<Tensor>,
        x: Tensor,
        tol: f32,
    ) {
        let x = Var::from_tensor(&x).unwrap();
        let probe = randn(x.dims(), 99, 1.0);
        let (a, b) = (
            fused(x.as_tensor()).unwrap(),
            composite(x.as_tensor()).unwrap(),
        );
        assert!(
            max_diff(&a, &b) < tol,
            "forward differs by {}",
            max_diff(&a, &b)
        );
        let ga = (a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let (ga, gb) = (
            ga.get(x.as_tensor()).unwrap(),
            gb.get(x.as_tensor()).unwrap(),
        );
        assert!(
            max_diff(ga, gb) < tol * 10.0,
            "gradient differs by {}",
            max_diff(ga, gb)
        );
    }

    #[test]
    fn fused_ops_match_the_composite_ones() {
        check(gelu, |x| x.gelu_erf(), randn(&[7, 33], 1, 3.0), 1e-6);
        let w = randn(&[33], 2, 1.0);
        let b = randn(&[33], 3, 1.0);
        check(
            |x| layer_norm(x, &w, &b, 1e-12),
            |x| super::super::nn::layer_norm(x, &w, &b, 1e-12),
            randn(&[2, 7, 33], 4, 2.0),
            1e-5,
        );
        let none = Tensor::zeros((3, 1, 1, 17), candle_core::DType::F32, &Device::Cpu).unwrap();
        check(
            |x| masked_softmax(x, &none, 1.0),
            super::super::nn::softmax,
            randn(&[3, 2, 5, 17], 5, 4.0),
            1e-6,
        );
        // Scaled and masked attention scores, with a per-key (BERT) and a per-query (causal) mask.
        for mq in [1usize, 4] {
            let mut m: Vec<f32> = vec![0.0; 2 * mq * 4];
            m[1] = f32::MIN;
            m[2 * mq * 4 - 1] = f32::MIN;
            let mask = Tensor::from_vec(m, (2, 1, mq, 4), &Device::Cpu).unwrap();
            check(
                |x| masked_softmax(x, &mask, 0.35),
                |x| super::super::nn::softmax(&(x * 0.35)?.broadcast_add(&mask)?),
                randn(&[2, 3, 4, 4], 7, 2.0),
                1e-6,
            );
        }
        // Masked scores (f32::MIN) give exact zeros, as the composite does.
        let mut v: Vec<f32> = randn(&[2, 6], 6, 1.0)
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        v[5] = f32::MIN;
        let x = Tensor::from_vec(v, (2, 1, 1, 6), &Device::Cpu).unwrap();
        let none = Tensor::zeros((2, 1, 1, 6), candle_core::DType::F32, &Device::Cpu).unwrap();
        let y: Vec<f32> = masked_softmax(&x, &none, 1.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y[5], 0.0);
    }
}
