//! CPU linear layers as custom ops on the operands' own buffers.
//!
//! Through Candle's ops a linear layer `x · Wᵀ + b` is a matmul, a broadcast and an add, and
//! its backward forms the gradients of both matmul operands and of the broadcast bias (each
//! into a fresh zero tensor, then added), whether or not anything is trained. Here:
//!
//! - the frozen layer ([`frozen_linear`]) is one gemm with the bias as its initial output, and
//!   its backward forms only the input's gradient, and only when the input needs one;
//! - the sparse adapter ([`sparse_linear`]) builds `W0 + scatter(values)` inside the op, and its
//!   backward forms the values' gradient only at the kept entries: for each kept (o, i),
//!   `Σ_rows g[row, o] · x[row, i]` (a sampled dense–dense product, SDDMM), `nnz · rows`
//!   multiply–adds instead of the dense `out · in · rows` weight gradient that the composite
//!   `index_add` path forms and then gathers.
//!
//! The callers fall back to the composite ops on other devices and dtypes; the tests check
//! that both agree, values and gradients.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fused::{copied, dot, input, simd, zeroed};

/// `dst = [dst +] a · b` for an m × n result whose row i starts at `dst[i·dst_rs]`, with
/// element (i, l) of `a` at `a[i·a_rs + l·a_cs]` and element (l, j) of `b` at
/// `b[l·b_rs + j·b_cs]`. `parallel` spreads it over the rayon pool (for large products).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_into(
    dst: &mut [f32],
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= (m - 1) * dst_rs + n, "gemm: output too small");
    if k > 0 {
        assert!(
            a.len() > (m - 1) * a_rs + (k - 1) * a_cs,
            "gemm: lhs too small"
        );
        assert!(
            b.len() > (k - 1) * b_rs + (n - 1) * b_cs,
            "gemm: rhs too small"
        );
    }
    let threads = rayon::current_num_threads();
    let par = if parallel && threads > 1 && m * n * k >= 64 * 64 * 64 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the extents of all three operands are checked above; `dst` is exclusively
    // borrowed and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// `x (rows × inner) · wᵀ + bias` for `w` (out × inner).
pub(super) fn forward(x: &[f32], w: &[f32], out: usize, bias: Option<&[f32]>) -> Vec<f32> {
    let inner = w.len() / out.max(1);
    let rows = x.len() / inner.max(1);
    let mut y = zeroed(rows * out);
    if let Some(b) = bias {
        y.par_chunks_mut(out.max(1) * 64)
            .for_each(|c| c.chunks_mut(out.max(1)).for_each(|r| r.copy_from_slice(b)));
    }
    gemm_into(
        &mut y,
        out,
        (rows, out, inner),
        bias.is_some(),
        x,
        (inner, 1),
        w,
        (1, inner),
        true,
    );
    y
}

/// `dx [+]= g (rows × out) · w` for `w` (out × inner): the input's gradient.
pub(super) fn input_grad_into(dx: &mut [f32], accumulate: bool, g: &[f32], w: &[f32], out: usize) {
    let inner = w.len() / out.max(1);
    let rows = g.len() / out.max(1);
    gemm_into(
        dx,
        inner,
        (rows, inner, out),
        accumulate,
        g,
        (out, 1),
        w,
        (inner, 1),
        true,
    );
}

/// `g (rows × out) · w` for `w` (out × inner): the input's gradient.
fn input_grad(g: &[f32], w: &[f32], out: usize) -> Vec<f32> {
    let inner = w.len() / out.max(1);
    let mut dx = zeroed(g.len() / out.max(1) * inner);
    input_grad_into(&mut dx, false, g, w, out);
    dx
}

/// `gᵀ (out × rows) · x (rows × inner)`: a dense weight's gradient.
pub(super) fn weight_grad(g: &[f32], x: &[f32], out: usize, inner: usize) -> Vec<f32> {
    let rows = g.len() / out.max(1);
    let mut dw = zeroed(out * inner);
    gemm_into(
        &mut dw,
        inner,
        (out, inner, rows),
        false,
        g,
        (1, out),
        x,
        (inner, 1),
        true,
    );
    dw
}

/// `W0 + scatter(values)` at the sorted flat `indices`.
pub(super) fn effective(w0: &[f32], indices: &[u32], values: &[f32]) -> Vec<f32> {
    let mut w = copied(w0);
    for (&i, &v) in indices.iter().zip(values) {
        w[i as usize] += v;
    }
    w
}

/// `src` (rows × cols, row-major) transposed, through 16 × 16 tiles held in registers.
fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const T: usize = 16;
    let mut dst = zeroed(src.len());
    if rows == 0 {
        return dst;
    }
    dst.par_chunks_mut(T * rows)
        .enumerate()
        .for_each(|(cb, block)| {
            let c0 = cb * T;
            let nc = block.len() / rows;
            for r0 in (0..rows).step_by(T) {
                let rn = T.min(rows - r0);
                if rn == T && nc == T {
                    let mut tile = [[0f32; T]; T];
                    for (i, t) in tile.iter_mut().enumerate() {
                        t.copy_from_slice(&src[(r0 + i) * cols + c0..][..T]);
                    }
                    for j in 0..T {
                        let d = &mut block[j * rows + r0..][..T];
                        for (d, t) in d.iter_mut().zip(&tile) {
                            *d = t[j];
                        }
                    }
                } else {
                    for i in 0..rn {
                        for j in 0..nc {
                            block[j * rows + r0 + i] = src[(r0 + i) * cols + c0 + j];
                        }
                    }
                }
            }
        });
    dst
}

simd! {
    /// dv[t] = gt[o] · xt[i] for each flat index idx[t] = o · inner + i, over rows of `rows`.
    fn values_grad_chunk(dv: &mut [f32], idx: &[u32], gt: &[f32], xt: &[f32], rows: usize, inner: usize) {
        for (d, &f) in dv.iter_mut().zip(idx) {
            let (o, i) = (f as usize / inner, f as usize % inner);
            *d = dot(&gt[o * rows..(o + 1) * rows], &xt[i * rows..(i + 1) * rows]);
        }
    }
}

/// dvalues[t] = Σ_rows g[row, o] · x[row, i] for indices[t] = o · inner + i.
pub(super) fn values_grad(
    g: &[f32],
    x: &[f32],
    out: usize,
    inner: usize,
    indices: &[u32],
) -> Vec<f32> {
    let rows = g.len() / out.max(1);
    let gt = transpose(g, rows, out);
    let xt = transpose(x, rows, inner);
    let mut dv = vec![0f32; indices.len()];
    dv.par_chunks_mut(256)
        .zip(indices.par_chunks(256))
        .for_each(|(dv, idx)| values_grad_chunk(dv, idx, &gt, &xt, rows, inner));
    dv
}

fn matrix(l: &Layout, op: &str) -> Result<(usize, usize)> {
    match l.dims() {
        &[r, c] => Ok((r, c)),
        d => candle_core::bail!("{op}: a matrix expected, got shape {d:?}"),
    }
}

/// `x · wᵀ + b` with frozen `w` (out × in) and `b`.
struct Frozen {
    bias: Option<Vec<f32>>,
}

/// `g · w`: the input gradient of a linear layer.
struct InputGrad;

impl CustomOp2 for Frozen {
    fn name(&self) -> &'static str {
        "xpm-frozen-linear"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, _) = matrix(xl, self.name())?;
        let (out, _) = matrix(wl, self.name())?;
        let (x, w) = (input(xs, xl, self.name())?, input(ws, wl, self.name())?);
        let y = forward(x, w, out, self.bias.as_deref());
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = if x.track_op() {
            Some(grad.contiguous()?.apply_op2_no_bwd(w, &InputGrad)?)
        } else {
            None
        };
        Ok((dx, None))
    }
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "xpm-linear-input-grad"
    }
    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, _) = matrix(gl, self.name())?;
        let (out, inner) = matrix(wl, self.name())?;
        let (g, w) = (input(gs, gl, self.name())?, input(ws, wl, self.name())?);
        let dx = input_grad(g, w, out);
        Ok((CpuStorage::F32(dx), Shape::from((rows, inner))))
    }
}

/// `x · (W0 + scatter(values))ᵀ + b`: a sparse adapter on a frozen weight and bias.
struct Sparse {
    indices: Vec<u32>,
    bias: Option<Vec<f32>>,
}

/// The sparse layer's input gradient `g · (W0 + scatter(values))`.
struct SparseInputGrad<'a>(&'a [u32]);

/// The sparse layer's values gradient at the kept entries.
struct SparseValuesGrad<'a> {
    indices: &'a [u32],
    out: usize,
}

impl CustomOp3 for Sparse {
    fn name(&self) -> &'static str {
        "xpm-sparse-linear"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, _) = matrix(xl, self.name())?;
        let (out, _) = matrix(wl, self.name())?;
        let x = input(xs, xl, self.name())?;
        let v = input(vs, vl, self.name())?;
        let w = effective(input(ws, wl, self.name())?, &self.indices, v);
        let y = forward(x, &w, out, self.bias.as_deref());
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        values: &Tensor,
        w0: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let dv = g.apply_op2_no_bwd(
            x,
            &SparseValuesGrad {
                indices: &self.indices,
                out: w0.dim(0)?,
            },
        )?;
        let dx = if x.track_op() {
            Some(g.apply_op3_no_bwd(values, w0, &SparseInputGrad(&self.indices))?)
        } else {
            None
        };
        Ok((dx, Some(dv), None))
    }
}

impl CustomOp3 for SparseInputGrad<'_> {
    fn name(&self) -> &'static str {
        "xpm-sparse-linear-input-grad"
    }
    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, _) = matrix(gl, self.name())?;
        let (out, inner) = matrix(wl, self.name())?;
        let g = input(gs, gl, self.name())?;
        let v = input(vs, vl, self.name())?;
        let w = effective(input(ws, wl, self.name())?, self.0, v);
        let dx = input_grad(g, &w, out);
        Ok((CpuStorage::F32(dx), Shape::from((rows, inner))))
    }
}

impl CustomOp2 for SparseValuesGrad<'_> {
    fn name(&self) -> &'static str {
        "xpm-sparse-linear-values-grad"
    }
    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, inner) = matrix(xl, self.name())?;
        let g = input(gs, gl, self.name())?;
        let x = input(xs, xl, self.name())?;
        let dv = values_grad(g, x, self.out, inner, self.indices);
        Ok((CpuStorage::F32(dv), Shape::from(self.indices.len())))
    }
}

/// Whether the custom ops apply: f32 tensors on the CPU.
pub(crate) fn fusable(x: &Tensor, w: &Tensor) -> bool {
    super::fused::cpu_f32(x) && w.dtype() == x.dtype()
}

/// Rows of `x` as a contiguous matrix, and the output shape for `out` features.
fn rows_of(x: &Tensor, out: usize) -> Result<(Tensor, Vec<usize>)> {
    let mut dims = x.dims().to_vec();
    let inner = *dims.last().expect("rank >= 1");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    *dims.last_mut().expect("rank >= 1") = out;
    Ok((x.reshape((rows, inner))?.contiguous()?, dims))
}

fn bias_vec(b: Option<&Tensor>) -> Result<Option<Vec<f32>>> {
    b.map(|b| b.flatten_all()?.to_vec1::<f32>()).transpose()
}

/// `x · wᵀ + b` with frozen `w` and `b` (CPU, f32; see [`fusable`]).
pub(crate) fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (x2, dims) = rows_of(x, w.dim(0)?)?;
    let op = Frozen { bias: bias_vec(b)? };
    x2.apply_op2(&w.contiguous()?, op)?.reshape(dims)
}

/// `x · (w0 + scatter(values at indices))ᵀ + b`; only `values` (and `x`) get gradients
/// (CPU, f32; see [`fusable`]).
pub(crate) fn sparse_linear(
    x: &Tensor,
    w0: &Tensor,
    b: Option<&Tensor>,
    indices: &Tensor,
    values: &Tensor,
) -> Result<Tensor> {
    let (x2, dims) = rows_of(x, w0.dim(0)?)?;
    let op = Sparse {
        indices: indices.to_vec1::<u32>()?,
        bias: bias_vec(b)?,
    };
    x2.apply_op3(&values.contiguous()?, &w0.contiguous()?, op)?
        .reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::tests::{max_diff, randn_scaled as randn};
    use crate::nn::{AdaptedLinear, Adapter, linear};
    use candle_core::{Device, Var};

    #[test]
    fn transpose_and_values_grad_match_the_dense_product() {
        let (rows, cols) = (37, 70);
        let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let t = transpose(&src, rows, cols);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(t[c * rows + r], src[r * cols + c]);
            }
        }
        let (out, inner) = (5, 70);
        let g: Vec<f32> = (0..rows * out).map(|i| (i % 7) as f32 - 3.0).collect();
        let idx = [0u32, 3, 71, 140, 349];
        let dv = values_grad(&g, &src, out, inner, &idx);
        for (t, &f) in idx.iter().enumerate() {
            let (o, i) = (f as usize / inner, f as usize % inner);
            let want: f32 = (0..rows).map(|r| g[r * out + o] * src[r * inner + i]).sum();
            assert!((dv[t] - want).abs() <= 1e-3 * want.abs().max(1.0), "{t}");
        }
    }

    /// The fused layers equal the composite ones: output, input gradient, values gradient.
    #[test]
    fn fused_linears_match_the_composite_ops() {
        let dev = Device::Cpu;
        // 3-D input so that the reshape to rows is exercised; sizes past one gemm block.
        let x = Var::from_tensor(&randn(&[3, 41, 70], 1, 1.0)).unwrap();
        let w0 = randn(&[33, 70], 2, 0.2);
        let b = randn(&[33], 3, 1.0);
        let probe = randn(&[3, 41, 33], 4, 1.0);
        let loss = |y: Tensor| (y * &probe).unwrap().sum_all().unwrap();

        let want = linear(x.as_tensor(), &w0, Some(&b)).unwrap();
        let got = frozen_linear(x.as_tensor(), &w0, Some(&b)).unwrap();
        assert!(max_diff(&want, &got) < 1e-5);
        let (gw, gg) = (
            loss(want).backward().unwrap(),
            loss(got).backward().unwrap(),
        );
        let xg = |g: &candle_core::backprop::GradStore| g.get(x.as_tensor()).unwrap().clone();
        assert!(max_diff(&xg(&gw), &xg(&gg)) < 1e-4);

        let idx = Tensor::new(&[0u32, 5, 69, 70, 700, 1000, 33 * 70 - 1], &dev).unwrap();
        let values = Var::from_tensor(&randn(&[7], 5, 1.0)).unwrap();
        let mut l = AdaptedLinear::new("w".into(), w0.clone(), Some(b.clone()));
        l.adapter = Adapter::Sparse {
            indices: idx.clone(),
            values: values.clone(),
        };
        let want = linear(x.as_tensor(), &l.effective_weight().unwrap(), Some(&b)).unwrap();
        let got = sparse_linear(x.as_tensor(), &w0, Some(&b), &idx, values.as_tensor()).unwrap();
        assert!(max_diff(&want, &got) < 1e-5);
        let (gw, gg) = (
            loss(want).backward().unwrap(),
            loss(got).backward().unwrap(),
        );
        assert!(max_diff(&xg(&gw), &xg(&gg)) < 1e-4);
        let vg = |g: &candle_core::backprop::GradStore| g.get(values.as_tensor()).unwrap().clone();
        assert!(max_diff(&vg(&gw), &vg(&gg)) < 1e-3);
        // W0 and the bias are constants: no gradient, and W0 is unchanged.
        assert!(gg.get(&w0).is_none() && gg.get(&b).is_none());

        // An input that needs no gradient gets none (and the values still get theirs).
        let xc = randn(&[4, 70], 6, 1.0);
        let g = sparse_linear(&xc, &w0, None, &idx, values.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&xc).is_none() && g.get(values.as_tensor()).is_some());
    }
}
