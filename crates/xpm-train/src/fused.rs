//! Fused CPU kernels with hand-written backward passes for the element-wise parts of a
//! transformer step: GELU (erf form), layer normalisation with frozen affine parameters, and
//! the scaled, masked softmax of attention scores.
//!
//! Built from Candle's primitive ops each of these is 5–10 passes over the activations, each
//! allocating a new buffer, and as many again backward. Fused, each is one pass forward and
//! one backward. On other devices, or for other dtypes, the callers fall back to the composite
//! versions in [`super::nn`]; tests check both agree (values and gradients).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Whether the fused CPU kernels apply to `t`: an f32 tensor on the CPU.
pub(super) fn cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// Rows per parallel task (enough work to amortise scheduling).
const CHUNK: usize = 16 * 1024;

/// `n` zeros, written by the rayon pool: a buffer reused from the allocator must be cleared,
/// and one thread clearing megabytes is serial time in every step.
pub(super) fn zeroed(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut()
        .par_chunks_mut(CHUNK)
        .for_each(|c| c.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: all `n` elements were initialised above.
    unsafe { v.set_len(n) };
    v
}

/// A copy of `src`, written by the rayon pool (see [`zeroed`]).
pub(super) fn copied(src: &[f32]) -> Vec<f32> {
    let mut v = Vec::with_capacity(src.len());
    v.spare_capacity_mut()
        .par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| {
            for (d, &s) in d.iter_mut().zip(s) {
                d.write(s);
            }
        });
    // SAFETY: all `src.len()` elements were initialised above.
    unsafe { v.set_len(src.len()) };
    v
}

pub(super) fn input<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(d) = s else {
        candle_core::bail!("{op}: f32 input expected")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: contiguous input expected")
    };
    Ok(&d[a..b])
}

/// eˣ in plain arithmetic, so that loops over it vectorise (libm's `expf` is a call per
/// element): x = n·ln 2 + r with |r| ≤ ln 2 / 2, a degree-6 Taylor polynomial for eʳ, and 2ⁿ
/// put in the exponent bits. Relative error below 3e-7 against `f32::exp`. Exactly 0 below
/// −87.3 (where eˣ leaves the normal range), so masked attention scores (f32::MIN) give exact
/// zeros.
#[inline]
pub(super) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.7);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.3 { 0.0 } else { p * scale }
}

/// erf with max absolute error 1.5e-7 (Abramowitz & Stegun 7.1.26).
#[inline]
fn erf(x: f32) -> f32 {
    erf_with_exp(x, exp(-x * x))
}

/// [`erf`] given `e = exp(−x²)`.
#[inline]
fn erf_with_exp(x: f32, e: f32) -> f32 {
    let s = x.signum();
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let y = 1.0
        - (((((1.061_405_4 * t - 1.453_152_1) * t) + 1.421_413_8) * t - 0.284_496_74) * t
            + 0.254_829_6)
            * t
            * e;
    s * y
}

/// The element loops below are compiled for x86-64-v4 (AVX-512) and x86-64-v3 (AVX2 + FMA)
/// besides the baseline, and the best one the CPU runs is chosen at run time
/// (`multiversion`): the default x86-64 target has only SSE2, 4 lanes. The results are the same
/// bit for bit on every version: Rust never fuses a·b + c into an FMA, and the loops keep
/// their order of summation.
macro_rules! simd {
    ($($item:item)*) => {
        $(
            #[multiversion::multiversion(targets(
                "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
                "x86_64+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
            ))]
            $item
        )*
    };
}
pub(super) use simd;

simd! {
    /// GELU (erf form) of every element.
    fn gelu_forward(y: &mut [f32], x: &[f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = 0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2));
        }
    }

    /// `g ⊙ gelu′(x)`: gelu′(x) = Φ(x) + x φ(x); erf and φ share exp(−x²/2).
    fn gelu_backward(d: &mut [f32], x: &[f32], g: &[f32]) {
        for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
            let e = exp(-0.5 * x * x);
            *d = g * (0.5 * (1.0 + erf_with_exp(x * FRAC_1_SQRT_2, e)) + x * INV_SQRT_2PI * e);
        }
    }

    /// `d = a + b`.
    fn add_into(d: &mut [f32], a: &[f32], b: &[f32]) {
        for ((d, &a), &b) in d.iter_mut().zip(a).zip(b) {
            *d = a + b;
        }
    }

    /// `d = a ⊙ b`.
    fn mul_into(d: &mut [f32], a: &[f32], b: &[f32]) {
        for ((d, &a), &b) in d.iter_mut().zip(a).zip(b) {
            *d = a * b;
        }
    }

    /// `d += a ⊙ b`.
    fn add_product(d: &mut [f32], a: &[f32], b: &[f32]) {
        for ((d, &a), &b) in d.iter_mut().zip(a).zip(b) {
            *d += a * b;
        }
    }

    /// Layer norm of each row of `x` (rows of `w.len()`).
    fn layer_norm_rows(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
        let h = w.len();
        for (y, x) in y.chunks_mut(h).zip(x.chunks(h)) {
            let (mean, inv) = stats(x, eps);
            for i in 0..h {
                y[i] = (x[i] - mean) * inv * w[i] + b[i];
            }
        }
    }

    /// The input gradient of a layer norm, row by row:
    /// dx = inv · (gw − mean(gw) − x̂ · mean(gw · x̂)), gw = g ⊙ w.
    fn layer_norm_grad_rows(dx: &mut [f32], x: &[f32], g: &[f32], w: &[f32], eps: f32) {
        let h = w.len();
        let (mut xhat, mut gw) = (vec![0f32; h], vec![0f32; h]);
        for ((dx, x), g) in dx.chunks_mut(h).zip(x.chunks(h)).zip(g.chunks(h)) {
            let (mean, inv) = stats(x, eps);
            for i in 0..h {
                xhat[i] = (x[i] - mean) * inv;
                gw[i] = g[i] * w[i];
            }
            let (m1, m2) = (sum(&gw) / h as f32, dot(&gw, &xhat) / h as f32);
            for i in 0..h {
                dx[i] = inv * (gw[i] - m1 - xhat[i] * m2);
            }
        }
    }

    /// Softmax of `scale · row + mask` in place.
    fn softmax_row(row: &mut [f32], mask: &[f32], scale: f32) {
        for (y, &m) in row.iter_mut().zip(mask) {
            *y = *y * scale + m;
        }
        let max = max(row);
        for v in row.iter_mut() {
            *v = exp(*v - max);
        }
        let inv = 1.0 / sum(row);
        row.iter_mut().for_each(|v| *v *= inv);
    }

    /// The input gradient of `softmax(scale · x + mask)` for one row, in place: `d` holds the
    /// output's gradient g on entry and `scale · y ⊙ (g − Σ g ⊙ y)` on return.
    fn softmax_backward_row(d: &mut [f32], y: &[f32], scale: f32) {
        let dot = dot(d, y);
        for (d, &y) in d.iter_mut().zip(y) {
            *d = scale * y * (*d - dot);
        }
    }
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / √(2π)
const INV_SQRT_2PI: f32 = 0.398_942_3;

struct Gelu;
/// `g ⊙ gelu′(x)`, from (x, g).
struct GeluBackward;

/// GELU of every element of `x`, in parallel.
pub(super) fn gelu_data(x: &[f32]) -> Vec<f32> {
    let mut y = zeroed(x.len());
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| gelu_forward(y, x));
    y
}

/// `g ⊙ gelu′(x)`, in parallel.
pub(super) fn gelu_grad(x: &[f32], g: &[f32]) -> Vec<f32> {
    let mut d = zeroed(x.len());
    d.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
        .for_each(|(d, (x, g))| gelu_backward(d, x, g));
    d
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "xpm-gelu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = input(s, l, self.name())?;
        Ok((CpuStorage::F32(gelu_data(x)), l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let x = arg.contiguous()?;
        Ok(Some(
            x.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)?,
        ))
    }
}

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "xpm-gelu-backward"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (input(xs, xl, self.name())?, input(gs, gl, self.name())?);
        if x.len() != g.len() {
            candle_core::bail!("{}: input and gradient differ in size", self.name())
        }
        Ok((CpuStorage::F32(gelu_grad(x, g)), xl.shape().clone()))
    }
}

/// GELU, erf form (as BERT's `gelu`).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if cpu_f32(x) {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x.gelu_erf()
    }
}

/// Layer norm over the last dimension with frozen `w` and `b` (gradient to `x` only).
pub(super) struct LayerNorm {
    w: Vec<f32>,
    b: Vec<f32>,
    eps: f32,
}

/// The input gradient of [`LayerNorm`], from (x, g).
struct LayerNormGrad<'a> {
    ln: &'a LayerNorm,
}

impl LayerNorm {
    pub(super) fn new(w: &Tensor, b: &Tensor, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            w: w.to_vec1()?,
            b: b.to_vec1()?,
            eps: eps as f32,
        })
    }

    /// Elements per parallel task: whole rows.
    fn per(&self) -> usize {
        let h = self.w.len();
        (CHUNK / h).max(1) * h
    }

    /// The layer norm of every row of `x`.
    pub(super) fn fwd(&self, x: &[f32]) -> Vec<f32> {
        let mut y = zeroed(x.len());
        let per = self.per();
        y.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .for_each(|(y, x)| layer_norm_rows(y, x, &self.w, &self.b, self.eps));
        y
    }

    /// A residual connection and the norm in one pass: `(a + x, LN(a + x))`.
    pub(super) fn add_fwd(&self, a: &[f32], x: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (mut sum, mut y) = (zeroed(x.len()), zeroed(x.len()));
        let per = self.per();
        sum.par_chunks_mut(per)
            .zip(y.par_chunks_mut(per))
            .zip(a.par_chunks(per).zip(x.par_chunks(per)))
            .for_each(|((sum, y), (a, x))| {
                add_into(sum, a, x);
                layer_norm_rows(y, sum, &self.w, &self.b, self.eps)
            });
        (sum, y)
    }

    /// The input gradient for the norm's input `x` and output gradient `g`.
    pub(super) fn grad(&self, x: &[f32], g: &[f32]) -> Vec<f32> {
        let mut dx = zeroed(x.len());
        let per = self.per();
        dx.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .zip(g.par_chunks(per))
            .for_each(|((dx, x), g)| layer_norm_grad_rows(dx, x, g, &self.w, self.eps));
        dx
    }
}

/// Mean and 1/σ of one row.
#[inline(always)]
fn stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum(x) / n;
    let var = lanes(x, x, |a, _| (a - mean) * (a - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Σ f(a[i], b[i]) in 16 independent lanes, then the lanes in order. A plain float sum is one
/// serial chain that the compiler may not reorder, so its loop cannot use vector registers;
/// the lanes can. The order of additions is fixed, so results do not depend on the machine.
#[inline(always)]
fn lanes(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..L {
            acc[l] += f(x[l], y[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ a[i]
#[inline(always)]
fn sum(a: &[f32]) -> f32 {
    lanes(a, a, |x, _| x)
}

/// Σ a[i] · b[i]
#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    lanes(a, b, |x, y| x * y)
}

/// max a[i] (−∞ for none), in 16 lanes.
#[inline(always)]
fn max(a: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [f32::NEG_INFINITY; L];
    let c = a.chunks_exact(L);
    let tail = c
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for x in c {
        for l in 0..L {
            acc[l] = acc[l].max(x[l]);
        }
    }
    acc.iter().fold(tail, |m, &x| m.max(x))
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "xpm-layer-norm"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = input(s, l, self.name())?;
        Ok((CpuStorage::F32(self.fwd(x)), l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = LayerNormGrad { ln: self };
        Ok(Some(
            arg.contiguous()?
                .apply_op2_no_bwd(&grad.contiguous()?, &op)?,
        ))
    }
}

impl CustomOp2 for LayerNormGrad<'_> {
    fn name(&self) -> &'static str {
        "xpm-layer-norm-grad"
    }
    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = input(s, l, self.name())?;
        let grad = input(gs, gl, self.name())?;
        if grad.len() != x.len() {
            candle_core::bail!("{}: input and gradient differ in size", self.name())
        }
        Ok((CpuStorage::F32(self.ln.grad(x, grad)), l.shape().clone()))
    }
}

/// Layer norm over the last dimension; `w` and `b` are frozen.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if cpu_f32(x) {
        x.contiguous()?.apply_op1(LayerNorm::new(w, b, eps)?)
    } else {
        super::nn::layer_norm(x, w, b, eps)
    }
}

/// The input gradient of [`MaskedSoftmax`], from (g, y).
struct SoftmaxGrad {
    n: usize,
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
                    y.copy_from_slice(x);
                    softmax_row(y, m, self.scale);
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = SoftmaxGrad {
            n: self.dims[3],
            scale: self.scale,
        };
        Ok(Some(
            grad.contiguous()?
                .apply_op2_no_bwd(&res.contiguous()?, &op)?,
        ))
    }
}

/// softmax(scale · x + mask) over the last dimension, for attention scores x (b, h, q, k) and
/// an additive mask (b, 1, 1 or q, k) that is a constant.
pub fn masked_softmax(x: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, q, k) = x.dims4()?;
    let (mb, _, mq, mk) = mask.dims4()?;
    if cpu_f32(x) && mb == b && mk == k {
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

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "xpm-softmax-grad"
    }
    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // dx = y ⊙ (g − Σ g ⊙ y)
        let g = input(s, l, self.name())?;
        let y = input(ys, yl, self.name())?;
        if y.len() != g.len() {
            candle_core::bail!("{}: output and gradient differ in size", self.name())
        }
        let n = self.n;
        let mut dx = vec![0f32; g.len()];
        let per = (CHUNK / n).max(1) * n;
        dx.par_chunks_mut(per)
            .zip(g.par_chunks(per))
            .zip(y.par_chunks(per))
            .for_each(|((dx, g), y)| {
                for ((dx, g), y) in dx.chunks_mut(n).zip(g.chunks(n)).zip(y.chunks(n)) {
                    dx.copy_from_slice(g);
                    softmax_backward_row(dx, y, self.scale);
                }
            });
        Ok((CpuStorage::F32(dx), l.shape().clone()))
    }
}

/// The f32 data of a contiguous CPU tensor, borrowed (a read lock on its storage).
pub(super) struct Data<'a> {
    guard: candle_core::StorageRef<'a>,
    range: std::ops::Range<usize>,
}

impl std::ops::Deref for Data<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &*self.guard {
            candle_core::Storage::Cpu(CpuStorage::F32(d)) => &d[self.range.clone()],
            _ => unreachable!("checked by `data`"),
        }
    }
}

/// Borrow the data of `t`, which must be a contiguous f32 CPU tensor.
pub(super) fn data(t: &Tensor) -> Result<Data<'_>> {
    let (guard, layout) = t.storage_and_layout();
    let Some((a, b)) = layout.contiguous_offsets() else {
        candle_core::bail!("a contiguous tensor expected")
    };
    if !matches!(&*guard, candle_core::Storage::Cpu(CpuStorage::F32(_))) {
        candle_core::bail!("an f32 CPU tensor expected")
    }
    Ok(Data { guard, range: a..b })
}

/// `a ⊙ b`, in parallel.
pub(super) fn product(a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut d = zeroed(a.len());
    d.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(d, (a, b))| mul_into(d, a, b));
    d
}

/// `d += a ⊙ b`, in parallel.
pub(super) fn add_product_into(d: &mut [f32], a: &[f32], b: &[f32]) {
    d.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(d, (a, b))| add_product(d, a, b));
}

/// Multi-head attention `softmax(scale · Q Kᵀ + mask) V` for every (batch, head), on q, k, v
/// laid out as (b, s, h) with the heads side by side in the last dimension, writing the
/// context in the same layout. One op instead of head transposes, two batched matmuls, the
/// softmax and the context transpose, each with its own backward; the probabilities are kept
/// from the forward for the backward.
pub(super) struct Attention {
    /// batch, sequence, hidden, heads
    dims: [usize; 4],
    mask: Vec<f32>,
    mask_rows: usize,
    scale: f32,
    probs: std::sync::Mutex<Vec<f32>>,
}

impl Attention {
    /// The op for q, k, v of shape (b, s, h) with `heads` heads and an additive `mask`
    /// (b, 1, 1 or s, s); `None` where the fused kernel does not apply.
    pub(super) fn new(
        (b, s, h): (usize, usize, usize),
        mask: &Tensor,
        heads: usize,
        scale: f64,
    ) -> Result<Option<Self>> {
        let (mb, _, mq, mk) = mask.dims4()?;
        if !(cpu_f32(mask) && mb == b && mk == s && (mq == 1 || mq == s) && h % heads == 0) {
            return Ok(None);
        }
        Ok(Some(Attention {
            dims: [b, s, h, heads],
            mask: mask.flatten_all()?.to_vec1()?,
            mask_rows: mq,
            scale: scale as f32,
            probs: std::sync::Mutex::new(Vec::new()),
        }))
    }

    fn mask_row(&self, bi: usize, qi: usize) -> &[f32] {
        let s = self.dims[1];
        let mrow = if self.mask_rows == 1 { 0 } else { qi };
        &self.mask[(bi * self.mask_rows + mrow) * s..][..s]
    }

    /// The context and the attention probabilities (kept for the backward pass).
    pub(super) fn fwd(&self, q: &[f32], k: &[f32], v: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        use super::linear::gemm_into;
        let [b, s, h, nh] = self.dims;
        let hd = h / nh;
        if [q.len(), k.len(), v.len()] != [b * s * h; 3] {
            candle_core::bail!("xpm-attention: q, k and v must be {b} × {s} × {h}")
        }
        let mut probs = zeroed(b * nh * s * s);
        let mut ctx = zeroed(b * s * h);
        probs
            .par_chunks_mut(nh * s * s)
            .zip(ctx.par_chunks_mut(s * h))
            .enumerate()
            .for_each(|(bi, (probs, ctx))| {
                let base = bi * s * h;
                for (hi, p) in probs.chunks_mut(s * s).enumerate() {
                    let at = base + hi * hd;
                    gemm_into(
                        p,
                        s,
                        (s, s, hd),
                        false,
                        &q[at..],
                        (h, 1),
                        &k[at..],
                        (1, h),
                        false,
                    );
                    for (qi, row) in p.chunks_mut(s).enumerate() {
                        softmax_row(row, self.mask_row(bi, qi), self.scale);
                    }
                    let out = &mut ctx[hi * hd..];
                    gemm_into(
                        out,
                        h,
                        (s, hd, s),
                        false,
                        p,
                        (s, 1),
                        &v[at..],
                        (h, 1),
                        false,
                    );
                }
            });
        Ok((ctx, probs))
    }

    /// The gradients of q, k and v for the context's gradient `g`, given the forward's `probs`.
    pub(super) fn grad(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        g: &[f32],
        probs: &[f32],
    ) -> Result<[Vec<f32>; 3]> {
        use super::linear::gemm_into;
        let [b, s, h, nh] = self.dims;
        let hd = h / nh;
        if probs.len() != b * nh * s * s || g.len() != b * s * h {
            candle_core::bail!("xpm-attention: backward without a matching forward")
        }
        let (mut dq, mut dk, mut dv) = (zeroed(b * s * h), zeroed(b * s * h), zeroed(b * s * h));
        dq.par_chunks_mut(s * h)
            .zip(dk.par_chunks_mut(s * h))
            .zip(dv.par_chunks_mut(s * h))
            .enumerate()
            .for_each(|(bi, ((dq, dk), dv))| {
                let base = bi * s * h;
                let mut ds = vec![0f32; s * s];
                for hi in 0..nh {
                    let at = base + hi * hd;
                    let p = &probs[(bi * nh + hi) * s * s..][..s * s];
                    let o = hi * hd;
                    // dP = G Vᵀ; dV = Pᵀ G
                    let (g, v) = (&g[at..], &v[at..]);
                    gemm_into(&mut ds, s, (s, s, hd), false, g, (h, 1), v, (1, h), false);
                    gemm_into(
                        &mut dv[o..],
                        h,
                        (s, hd, s),
                        false,
                        p,
                        (1, s),
                        g,
                        (h, 1),
                        false,
                    );
                    // dS from dP, row by row
                    for (d, p) in ds.chunks_mut(s).zip(p.chunks(s)) {
                        softmax_backward_row(d, p, self.scale);
                    }
                    // dQ = dS K; dK = dSᵀ Q
                    let (k, q) = (&k[at..], &q[at..]);
                    gemm_into(
                        &mut dq[o..],
                        h,
                        (s, hd, s),
                        false,
                        &ds,
                        (s, 1),
                        k,
                        (h, 1),
                        false,
                    );
                    gemm_into(
                        &mut dk[o..],
                        h,
                        (s, hd, s),
                        false,
                        &ds,
                        (1, s),
                        q,
                        (h, 1),
                        false,
                    );
                }
            });
        Ok([dq, dk, dv])
    }
}

impl candle_core::CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "xpm-attention"
    }
    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [b, s, h, _] = self.dims;
        let (ctx, probs) = self.fwd(
            input(qs, ql, self.name())?,
            input(ks, kl, self.name())?,
            input(vs, vl, self.name())?,
        )?;
        *self.probs.lock().expect("attention probabilities") = probs;
        Ok((CpuStorage::F32(ctx), Shape::from((b, s, h))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [b, s, h, _] = self.dims;
        let grad = grad.contiguous()?;
        let probs = self.probs.lock().expect("attention probabilities");
        let [dq, dk, dv] = self.grad((&data(q)?, &data(k)?, &data(v)?), &data(&grad)?, &probs)?;
        let dev = q.device();
        let wrap = |t: &Tensor, d: Vec<f32>| -> Result<Option<Tensor>> {
            Ok(if t.track_op() {
                Some(Tensor::from_vec(d, (b, s, h), dev)?)
            } else {
                None
            })
        };
        Ok((wrap(q, dq)?, wrap(k, dk)?, wrap(v, dv)?))
    }
}

/// Multi-head attention over q, k, v (b, s, h) with `heads` heads and an additive mask
/// (b, 1, 1 or s, s) that is a constant: `softmax(scale · Q Kᵀ + mask) V` per head, returned
/// as (b, s, h). Fused on the CPU for f32; elsewhere head transposes, matmuls and
/// [`masked_softmax`].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, s, h) = q.dims3()?;
    if cpu_f32(q)
        && let Some(op) = Attention::new((b, s, h), mask, heads, scale)?
    {
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    let hd = h / heads;
    let split = |t: &Tensor| -> Result<Tensor> {
        t.reshape((b, s, heads, hd))?.transpose(1, 2)?.contiguous()
    };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let probs = masked_softmax(&q.matmul(&k.t()?)?, mask, scale)?;
    probs
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, s, h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::nn::tests::{max_diff, randn_scaled as randn};

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

    /// The fused attention equals the composite (head transposes, matmuls, softmax): output
    /// and the gradients of q, k and v, with per-key and per-query masks.
    #[test]
    fn fused_attention_matches_the_composite() {
        let (b, s, h, nh) = (2, 5, 12, 3);
        let hd = h / nh;
        for mq in [1usize, s] {
            let mut m: Vec<f32> = vec![0.0; b * mq * s];
            m[s - 1] = f32::MIN;
            m[b * mq * s - 2] = f32::MIN;
            let mask = Tensor::from_vec(m, (b, 1, mq, s), &Device::Cpu).unwrap();
            let vars: Vec<Var> = (0..3)
                .map(|i| Var::from_tensor(&randn(&[b, s, h], 20 + i, 1.0)).unwrap())
                .collect();
            let (q, k, v) = (
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
            );
            let scale = 1.0 / (hd as f64).sqrt();
            let fused = attention(q, k, v, &mask, nh, scale).unwrap();
            let split = |t: &Tensor| {
                t.reshape((b, s, nh, hd))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let scores = split(q).matmul(&split(k).t().unwrap()).unwrap();
            let probs =
                crate::nn::softmax(&(scores * scale).unwrap().broadcast_add(&mask).unwrap())
                    .unwrap();
            let composite = probs
                .matmul(&split(v))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((b, s, h))
                .unwrap();
            assert!(max_diff(&fused, &composite) < 1e-5);
            let probe = randn(&[b, s, h], 30, 1.0);
            let ga = (fused * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gb = (composite * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for t in [q, k, v] {
                let d = max_diff(ga.get(t).unwrap(), gb.get(t).unwrap());
                assert!(d < 1e-4, "gradient differs by {d}");
            }
        }
    }

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::MIN), 0.0);
        assert_eq!(exp(-100.0), 0.0);
    }

    #[test]
    fn fused_ops_match_the_composite_ones() {
        check(gelu, |x| x.gelu_erf(), randn(&[7, 33], 1, 3.0), 1e-6);
        let w = randn(&[33], 2, 1.0);
        let b = randn(&[33], 3, 1.0);
        check(
            |x| layer_norm(x, &w, &b, 1e-12),
            |x| crate::nn::layer_norm(x, &w, &b, 1e-12),
            randn(&[2, 7, 33], 4, 2.0),
            1e-5,
        );
        let none = Tensor::zeros((3, 1, 1, 17), candle_core::DType::F32, &Device::Cpu).unwrap();
        check(
            |x| masked_softmax(x, &none, 1.0),
            crate::nn::softmax,
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
                |x| crate::nn::softmax(&(x * 0.35)?.broadcast_add(&mask)?),
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
