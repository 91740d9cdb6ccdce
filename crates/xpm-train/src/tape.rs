//! A BERT training step differentiated by hand, on the CPU in f32.
//!
//! Candle's backward pass seeds every gradient it propagates with a fresh zero tensor and adds
//! the contribution to it (`GradStore::or_insert`, then `add`), and runs those adds on the
//! calling thread. On a MiniLM step that was 15–20 % of the samples, all of it serial: the part
//! of the step that does not shrink with more cores (docs/benchmarks.md, "Training").
//!
//! Here the encoder's forward pass keeps what its backward needs (a tape), and the backward
//! walks the layers in reverse with the same fused kernels as the Candle ops
//! ([`super::fused`], [`super::linear`]): gradients are accumulated in place (a residual's
//! gradient is the buffer that the linear layers' input gradients are added into), residual
//! additions are fused into the layer norms, and every element-wise pass runs on the rayon
//! pool. The pooling, the head and the loss stay Candle ops; the encoder's output enters them
//! as a variable, and its gradient comes back as the start of the walk.
//!
//! [`fits`] says where this applies (a BERT encoder whose tensors are f32 on the CPU with the
//! erf GELU); elsewhere the trainer uses Candle's autograd. The tests check that both give the
//! same loss and gradients for every adapter kind.

use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor, Var};
use candle_transformers::models::bert::HiddenAct;

use super::bert::{Bert, Layer};
use super::fused::{
    Attention, LayerNorm, add_product_into, cpu_f32, data, gelu_data, gelu_grad, product, zeroed,
};
use super::linear::{effective, forward, gemm_into, input_grad_into, values_grad, weight_grad};
use super::nn::{AdaptedLinear, Adapter, Head, dropout_mask};
use xpm_core::rng::SplitMix64;

/// Whether the hand-differentiated step applies to `bert`: every weight and adapter tensor is
/// f32 on the CPU, and the activation is BERT's erf GELU.
pub fn fits(bert: &Bert) -> bool {
    let lin = |l: &AdaptedLinear| {
        let adapter = match &l.adapter {
            Adapter::None => true,
            Adapter::Sparse { values, .. } => cpu_f32(values.as_tensor()),
            Adapter::Lora { a, b, .. } => cpu_f32(a.as_tensor()) && cpu_f32(b.as_tensor()),
            Adapter::Full { w } | Adapter::Probe { w } => cpu_f32(w.as_tensor()),
        };
        adapter && cpu_f32(&l.w0) && l.bias.as_ref().is_none_or(cpu_f32)
    };
    bert.config.hidden_act == HiddenAct::Gelu
        && bert
            .config
            .hidden_size
            .is_multiple_of(bert.config.num_attention_heads)
        && bert.linears().into_iter().all(lin)
}

/// What a linear layer's backward needs beyond its input.
enum Saved {
    /// Frozen, full and probe layers.
    Plain,
    /// The effective weight `W0 + scatter(values)`, and the kept flat indices.
    Sparse { w: Vec<f32>, idx: Vec<u32> },
    /// LoRA: the dropout mask and the dropped input (when dropout is on), and
    /// `t = scale · x̃ · Aᵀ` (rows × r).
    Lora {
        dropped: Option<(Vec<f32>, Vec<f32>)>,
        t: Vec<f32>,
    },
}

/// Where a linear layer's input gradient goes.
enum Dx<'a> {
    /// The input needs no gradient.
    Skip,
    /// A new buffer, returned.
    New,
    /// Added into this buffer.
    Into(&'a mut [f32]),
}

/// `y = x · Wᵀ + b` for `x` (rows × in) through `l`'s adapter; LoRA's dropout draws from `rng`.
fn linear_fwd(
    l: &AdaptedLinear,
    x: &[f32],
    rng: Option<&mut SplitMix64>,
) -> Result<(Vec<f32>, Saved)> {
    let out = l.out_dim();
    let inner = l.in_dim();
    let w0 = data(&l.w0)?;
    let bias = l.bias.as_ref().map(data).transpose()?;
    let bias = bias.as_deref();
    Ok(match &l.adapter {
        Adapter::None => (forward(x, &w0, out, bias), Saved::Plain),
        Adapter::Full { w } | Adapter::Probe { w } => {
            (forward(x, &data(w.as_tensor())?, out, bias), Saved::Plain)
        }
        Adapter::Sparse { indices, values } => {
            let idx = indices.to_vec1::<u32>()?;
            let w = effective(&w0, &idx, &data(values.as_tensor())?);
            (forward(x, &w, out, bias), Saved::Sparse { w, idx })
        }
        Adapter::Lora {
            a,
            b,
            scale,
            dropout,
        } => {
            let (a, b) = (data(a.as_tensor())?, data(b.as_tensor())?);
            let r = a.len() / inner.max(1);
            let rows = x.len() / inner.max(1);
            let dropped = match rng {
                Some(rng) if *dropout > 0.0 => {
                    let mask = dropout_mask(x.len(), *dropout, rng);
                    let xd = product(x, &mask);
                    Some((mask, xd))
                }
                _ => None,
            };
            let xd = dropped.as_ref().map_or(x, |(_, xd)| xd);
            // t = scale · x̃ · Aᵀ (rows × r), then y = x · W0ᵀ + b + t · Bᵀ.
            let mut t = vec![0f32; rows * r];
            gemm_into(
                &mut t,
                r,
                (rows, r, inner),
                false,
                xd,
                (inner, 1),
                &a,
                (1, inner),
                true,
            );
            let scale = *scale as f32;
            t.iter_mut().for_each(|v| *v *= scale);
            let mut y = forward(x, &w0, out, bias);
            gemm_into(
                &mut y,
                out,
                (rows, out, r),
                true,
                &t,
                (r, 1),
                &b,
                (1, r),
                true,
            );
            (y, Saved::Lora { dropped, t })
        }
    })
}

fn grad_tensor(v: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(v, like.shape(), &Device::Cpu)
}

/// The backward of [`linear_fwd`] for output gradient `g`: the adapter's gradients go into
/// `grads`, the input's gradient where `dx` says.
fn linear_bwd(
    l: &AdaptedLinear,
    saved: &Saved,
    x: &[f32],
    g: &[f32],
    dx: Dx<'_>,
    grads: &mut GradStore,
) -> Result<Option<Vec<f32>>> {
    let out = l.out_dim();
    let inner = l.in_dim();
    let rows = g.len() / out.max(1);
    let w0 = data(&l.w0)?;
    // The input gradient through weight `w`, and LoRA's extra term after it.
    let input = |w: &[f32], extra: &dyn Fn(&mut [f32])| -> Option<Vec<f32>> {
        match dx {
            Dx::Skip => None,
            Dx::New => {
                let mut d = zeroed(rows * inner);
                input_grad_into(&mut d, false, g, w, out);
                extra(&mut d);
                Some(d)
            }
            Dx::Into(d) => {
                input_grad_into(d, true, g, w, out);
                extra(d);
                None
            }
        }
    };
    let none = |_: &mut [f32]| {};
    Ok(match (&l.adapter, saved) {
        (Adapter::None, _) => input(&w0, &none),
        (Adapter::Full { w } | Adapter::Probe { w }, _) => {
            let dw = weight_grad(g, x, out, inner);
            grads.insert(w.as_tensor(), grad_tensor(dw, w.as_tensor())?);
            input(&data(w.as_tensor())?, &none)
        }
        (Adapter::Sparse { values, .. }, Saved::Sparse { w, idx }) => {
            let dv = values_grad(g, x, out, inner, idx);
            grads.insert(values.as_tensor(), grad_tensor(dv, values.as_tensor())?);
            input(w, &none)
        }
        (Adapter::Lora { a, b, scale, .. }, Saved::Lora { dropped, t }) => {
            let (ad, bd) = (data(a.as_tensor())?, data(b.as_tensor())?);
            let r = ad.len() / inner.max(1);
            let scale = *scale as f32;
            // dB = gᵀ · t; gs = scale · g · B; dA = gsᵀ · x̃; dx += (gs · A) ⊙ mask.
            let mut db = vec![0f32; out * r];
            gemm_into(
                &mut db,
                r,
                (out, r, rows),
                false,
                g,
                (1, out),
                t,
                (r, 1),
                true,
            );
            let mut gs = vec![0f32; rows * r];
            gemm_into(
                &mut gs,
                r,
                (rows, r, out),
                false,
                g,
                (out, 1),
                &bd,
                (r, 1),
                true,
            );
            gs.iter_mut().for_each(|v| *v *= scale);
            let xd = dropped.as_ref().map_or(x, |(_, xd)| xd);
            let mut da = vec![0f32; r * inner];
            gemm_into(
                &mut da,
                inner,
                (r, inner, rows),
                false,
                &gs,
                (1, r),
                xd,
                (inner, 1),
                true,
            );
            grads.insert(a.as_tensor(), grad_tensor(da, a.as_tensor())?);
            grads.insert(b.as_tensor(), grad_tensor(db, b.as_tensor())?);
            let lora = |d: &mut [f32]| match dropped {
                None => gemm_into(
                    d,
                    inner,
                    (rows, inner, r),
                    true,
                    &gs,
                    (r, 1),
                    &ad,
                    (inner, 1),
                    true,
                ),
                Some((mask, _)) => {
                    let mut u = zeroed(rows * inner);
                    gemm_into(
                        &mut u,
                        inner,
                        (rows, inner, r),
                        false,
                        &gs,
                        (r, 1),
                        &ad,
                        (inner, 1),
                        true,
                    );
                    add_product_into(d, &u, mask);
                }
            };
            input(&w0, &lora)
        }
        _ => candle_core::bail!("tape: `{}` changed its adapter between passes", l.name),
    })
}

/// One encoder layer's tape: its input, and each intermediate its backward reads.
struct LayerTape {
    x: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    ctx: Vec<f32>,
    /// The attention block's residual sum (the first norm's input).
    s1: Vec<f32>,
    x1: Vec<f32>,
    /// The intermediate layer's output before and after the GELU.
    i: Vec<f32>,
    gi: Vec<f32>,
    /// The second residual sum.
    s2: Vec<f32>,
    /// query, key, value, attention output, intermediate, output.
    saved: [Saved; 6],
}

fn layer_fwd(
    l: &Layer,
    att: &Attention,
    eps: f64,
    x: Vec<f32>,
    mut rng: Option<&mut SplitMix64>,
) -> Result<(Vec<f32>, LayerTape)> {
    let (q, sq) = linear_fwd(&l.query, &x, rng.as_deref_mut())?;
    let (k, sk) = linear_fwd(&l.key, &x, rng.as_deref_mut())?;
    let (v, sv) = linear_fwd(&l.value, &x, rng.as_deref_mut())?;
    let (ctx, probs) = att.fwd(&q, &k, &v)?;
    let (a, sa) = linear_fwd(&l.attn_out, &ctx, rng.as_deref_mut())?;
    let (s1, x1) = LayerNorm::new(&l.attn_norm.w, &l.attn_norm.b, eps)?.add_fwd(&a, &x);
    drop(a);
    let (i, si) = linear_fwd(&l.inter, &x1, rng.as_deref_mut())?;
    let gi = gelu_data(&i);
    let (o, so) = linear_fwd(&l.out, &gi, rng)?;
    let (s2, x2) = LayerNorm::new(&l.out_norm.w, &l.out_norm.b, eps)?.add_fwd(&o, &x1);
    let tape = LayerTape {
        x,
        q,
        k,
        v,
        probs,
        ctx,
        s1,
        x1,
        i,
        gi,
        s2,
        saved: [sq, sk, sv, sa, si, so],
    };
    Ok((x2, tape))
}

/// The backward of [`layer_fwd`] for the output gradient `g`; the input's gradient unless
/// `first` (the embeddings are frozen).
fn layer_bwd(
    l: &Layer,
    att: &Attention,
    eps: f64,
    t: &LayerTape,
    g: &[f32],
    first: bool,
    grads: &mut GradStore,
) -> Result<Option<Vec<f32>>> {
    let [sq, sk, sv, sa, si, so] = &t.saved;
    // The second norm; its input's gradient reaches both the output layer and x1.
    let mut dx1 = LayerNorm::new(&l.out_norm.w, &l.out_norm.b, eps)?.grad(&t.s2, g);
    let dgi = linear_bwd(&l.out, so, &t.gi, &dx1, Dx::New, grads)?.expect("Dx::New");
    let di = gelu_grad(&t.i, &dgi);
    drop(dgi);
    linear_bwd(&l.inter, si, &t.x1, &di, Dx::Into(&mut dx1), grads)?;
    drop(di);
    // The first norm; its input's gradient reaches the attention output layer and x.
    let mut dx = LayerNorm::new(&l.attn_norm.w, &l.attn_norm.b, eps)?.grad(&t.s1, &dx1);
    drop(dx1);
    let dctx = linear_bwd(&l.attn_out, sa, &t.ctx, &dx, Dx::New, grads)?.expect("Dx::New");
    let [dq, dk, dv] = att.grad((&t.q, &t.k, &t.v), &dctx, &t.probs)?;
    drop(dctx);
    for (lin, saved, d) in [(&l.query, sq, &dq), (&l.key, sk, &dk), (&l.value, sv, &dv)] {
        let to = if first { Dx::Skip } else { Dx::Into(&mut dx) };
        linear_bwd(lin, saved, &t.x, d, to, grads)?;
    }
    Ok((!first).then_some(dx))
}

impl Bert {
    /// The embeddings' output (b × s × h), frozen, and the attention op for `mask`.
    fn embed(&self, ids: &Tensor, mask: &Tensor) -> Result<(Vec<f32>, Attention)> {
        let (b, s) = ids.dims2()?;
        let h = self.config.hidden_size;
        let x = self
            .word
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, s, h))?
            .broadcast_add(&self.position.narrow(0, 0, s)?)?
            .broadcast_add(&self.token_type.narrow(0, 0, 1)?)?
            .contiguous()?;
        let ln = LayerNorm::new(
            &self.emb_norm.w,
            &self.emb_norm.b,
            self.config.layer_norm_eps,
        )?;
        let x = ln.fwd(&data(&x)?);
        let ext = ((mask.ones_like()? - mask)? * f32::MIN as f64)?
            .unsqueeze(1)?
            .unsqueeze(1)?;
        let nh = self.config.num_attention_heads;
        let scale = 1.0 / ((h / nh) as f64).sqrt();
        let Some(att) = Attention::new((b, s, h), &ext, nh, scale)? else {
            candle_core::bail!("tape: the attention mask does not fit the fused kernel")
        };
        Ok((x, att))
    }

    /// Hidden states (b × s × h), as [`Self::forward`] without dropout gives them, for
    /// evaluation and serving: no graph is built, residual additions are fused into the norms,
    /// and every pass runs on the rayon pool where [`fits`] holds.
    pub fn infer(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        if !fits(self) {
            return self.forward(ids, mask, None);
        }
        let (b, s) = ids.dims2()?;
        let (mut x, att) = self.embed(ids, mask)?;
        for l in &self.layers {
            x = layer_fwd(l, &att, self.config.layer_norm_eps, x, None)?.0;
        }
        Tensor::from_vec(x, (b, s, self.config.hidden_size), &Device::Cpu)
    }

    /// The classification loss for one batch and the gradients of every trainable variable
    /// (the adapters' and the head's) of `scale · loss`, as [`Self::forward`], the pooling,
    /// the head and the cross-entropy give them through Candle's autograd. `rng` enables LoRA's
    /// dropout. Check [`fits`] first.
    pub fn classifier_step(
        &self,
        head: &Head,
        batch: &super::model::Batch,
        rng: Option<&mut SplitMix64>,
        scale: f64,
    ) -> Result<(f32, GradStore)> {
        let (b, s) = batch.ids.dims2()?;
        let h = self.config.hidden_size;
        let eps = self.config.layer_norm_eps;
        let (mut x, att) = self.embed(&batch.ids, &batch.mask)?;
        let mut rng = rng;
        let mut tapes = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let (next, tape) = layer_fwd(l, &att, eps, x, rng.as_deref_mut())?;
            tapes.push(tape);
            x = next;
        }
        let hidden = Var::from_vec(x, (b, s, h), &Device::Cpu)?;
        let (loss, _) = super::model::classifier_loss(head, hidden.as_tensor(), batch)?;
        let value = loss.to_scalar::<f32>()?;
        let mut grads = (loss * scale)?.backward()?;
        let Some(g) = grads.remove(hidden.as_tensor()) else {
            candle_core::bail!("tape: the loss does not depend on the encoder")
        };
        let mut g = g.flatten_all()?.to_vec1::<f32>()?;
        for (i, (l, t)) in self.layers.iter().zip(&tapes).enumerate().rev() {
            match layer_bwd(l, &att, eps, t, &g, i == 0, &mut grads)? {
                Some(next) => g = next,
                None => break,
            }
        }
        Ok((value, grads))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bert::tests::{tiny_config, tiny_weights};
    use crate::model::{Batch, Net};
    use crate::nn::tests::randn_scaled;

    /// The tiny BERT with a mix of adapters: layer linear `j` gets kind `kinds[j % kinds.len()]`
    /// (0 none, 1 sparse, 2 LoRA, 3 full, 4 probe).
    fn net(kinds: &[usize], dropout: f64) -> Net {
        let mut bert = Bert::load(tiny_weights(3), tiny_config()).unwrap();
        for (j, l) in bert.linears_mut().into_iter().enumerate() {
            let (out, inner) = (l.out_dim(), l.in_dim());
            let seed = 100 + j as u64;
            let var = |shape: &[usize], s: u64, scale: f32| {
                Var::from_tensor(&randn_scaled(shape, s, scale)).unwrap()
            };
            l.adapter = match kinds[j % kinds.len()] {
                0 => Adapter::None,
                1 => {
                    let idx: Vec<u32> = (0..(out * inner) as u32).step_by(7).collect();
                    let n = idx.len();
                    Adapter::Sparse {
                        indices: Tensor::new(idx, &Device::Cpu).unwrap(),
                        values: var(&[n], seed, 0.05),
                    }
                }
                2 => Adapter::Lora {
                    a: var(&[4, inner], seed, 0.2),
                    b: var(&[out, 4], seed + 50, 0.2),
                    scale: 2.0,
                    dropout,
                },
                k => {
                    let w = (&l.w0 + randn_scaled(&[out, inner], seed, 0.01)).unwrap();
                    let w = Var::from_tensor(&w).unwrap();
                    if k == 3 {
                        Adapter::Full { w }
                    } else {
                        Adapter::Probe { w }
                    }
                }
            };
        }
        let mut rng = SplitMix64(5);
        let head = Head::init(3, bert.hidden_size(), &mut rng, &Device::Cpu).unwrap();
        Net::Classifier { bert, head }
    }

    fn batch() -> Batch {
        let dev = Device::Cpu;
        let ids = [
            [3u32, 7, 9, 2, 5, 1, 0],
            [4, 5, 6, 8, 0, 0, 0],
            [2, 2, 3, 4, 5, 6, 7],
        ];
        let mask: Vec<Vec<f32>> = ids
            .iter()
            .map(|r| r.iter().map(|&t| if t == 0 { 0.0 } else { 1.0 }).collect())
            .collect();
        Batch {
            ids: Tensor::new(&ids, &dev).unwrap(),
            mask: Tensor::new(mask, &dev).unwrap(),
            targets: Tensor::new(&[0u32, 2, 1], &dev).unwrap(),
            weights: None,
            size: 3,
        }
    }

    /// The hand-differentiated step equals Candle's autograd: loss and every gradient.
    fn check(kinds: &[usize], dropout: f64) {
        let net = net(kinds, dropout);
        let Net::Classifier { bert, head } = &net else {
            unreachable!()
        };
        assert!(fits(bert));
        let b = batch();
        let (loss, grads) = bert
            .classifier_step(head, &b, Some(&mut SplitMix64(9)), 0.5)
            .unwrap();
        let (want_loss, _) = net.loss(&b, Some(&mut SplitMix64(9))).unwrap();
        let want = (&want_loss * 0.5).unwrap().backward().unwrap();
        let want_loss = want_loss.to_scalar::<f32>().unwrap();
        assert!((loss - want_loss).abs() < 1e-5, "{loss} vs {want_loss}");
        let mut vars: Vec<Var> = bert.linears().iter().flat_map(|l| l.vars()).collect();
        vars.extend([head.w.clone(), head.b.clone()]);
        assert!(vars.len() > 2);
        for v in &vars {
            let (got, want) = (grads.get(v.as_tensor()), want.get(v.as_tensor()));
            let (got, want) = (
                got.expect("tape gradient"),
                want.expect("autograd gradient"),
            );
            let scale = crate::nn::tests::max_diff(want, &want.zeros_like().unwrap());
            assert!(scale > 0.0, "{:?}: no gradient", v.shape());
            let diff = crate::nn::tests::max_diff(got, want);
            assert!(
                diff <= 1e-4 * scale,
                "{:?}: {diff} (scale {scale})",
                v.shape()
            );
        }
    }

    #[test]
    fn inference_matches_the_candle_forward() {
        let net = net(&[0, 1, 2, 3], 0.0);
        let Net::Classifier { bert, .. } = &net else {
            unreachable!()
        };
        let b = batch();
        let want = bert.forward(&b.ids, &b.mask, None).unwrap();
        let got = bert.infer(&b.ids, &b.mask).unwrap();
        assert_eq!(want.dims(), got.dims());
        let diff = crate::nn::tests::max_diff(&want, &got);
        assert!(diff < 1e-5, "max |forward − infer| = {diff}");
    }

    #[test]
    fn every_adapter_kind_matches_candle_autograd() {
        check(&[0, 1, 2, 3, 4], 0.0);
        check(&[1], 0.0);
        check(&[3, 4], 0.0);
    }

    #[test]
    fn lora_with_dropout_matches_candle_autograd() {
        check(&[2], 0.25);
        check(&[2, 0, 1], 0.1);
    }
}
