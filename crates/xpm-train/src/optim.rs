//! AdamW with linear warm-up and linear decay, global gradient-norm clipping and gradient
//! accumulation. Moments have the shape of each variable: for a sparse layer, length nnz.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// One optimised variable and its moments.
#[derive(Clone)]
pub struct Param {
    pub var: Var,
    pub m: Tensor,
    pub v: Tensor,
    /// Apply weight decay (off for biases and norms; on for everything else).
    pub decay: bool,
    /// This variable's learning rate relative to the schedule's (the head learns faster).
    pub lr_scale: f64,
}

impl Param {
    pub fn new(var: Var, decay: bool, lr_scale: f64) -> Result<Self> {
        let m = var.as_tensor().zeros_like()?;
        let v = var.as_tensor().zeros_like()?;
        Ok(Param {
            var,
            m,
            v,
            decay,
            lr_scale,
        })
    }

    /// Bytes held by the optimizer for this variable (two f32 moments).
    pub fn state_bytes(&self) -> u64 {
        2 * 4 * self.var.as_tensor().elem_count() as u64
    }
}

/// Hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = off).
    pub clip: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl AdamW {
    /// Learning rate at optimizer step `step` (0-based): linear warm-up, then linear decay to 0.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let rest = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let done = step - self.warmup_steps;
        self.lr * (1.0 - done as f64 / rest as f64).max(0.0)
    }
}

/// Accumulated gradients of the params, in param order.
pub struct Accum {
    grads: Vec<Option<Tensor>>,
}

impl Accum {
    pub fn new(n: usize) -> Self {
        Accum {
            grads: vec![None; n],
        }
    }

    /// Add this micro-batch's gradients.
    pub fn add(&mut self, params: &[Param], store: &GradStore) -> Result<()> {
        for (slot, p) in self.grads.iter_mut().zip(params) {
            if let Some(g) = store.get(p.var.as_tensor()) {
                *slot = Some(match slot.take() {
                    None => g.clone(),
                    Some(acc) => (acc + g)?,
                });
            }
        }
        Ok(())
    }

    /// The accumulated gradient of param `i` (None if it received none).
    pub fn get(&self, i: usize) -> Option<&Tensor> {
        self.grads[i].as_ref()
    }

    /// The global L2 norm of all gradients.
    pub fn norm(&self) -> Result<f64> {
        let mut sq = 0f64;
        for g in self.grads.iter().flatten() {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        Ok(sq.sqrt())
    }
}

/// One AdamW update at optimizer step `step` (0-based). Returns the pre-clip gradient norm.
pub fn step(opt: &AdamW, params: &mut [Param], acc: &Accum, step: usize) -> Result<f64> {
    let norm = acc.norm()?;
    let clip_scale = if opt.clip > 0.0 && norm > opt.clip {
        opt.clip / (norm + 1e-6)
    } else {
        1.0
    };
    let lr = opt.lr_at(step);
    let t = (step + 1) as i32;
    let bc1 = 1.0 - opt.beta1.powi(t);
    let bc2 = 1.0 - opt.beta2.powi(t);
    for (i, p) in params.iter_mut().enumerate() {
        let Some(g) = acc.get(i) else { continue };
        let g = if clip_scale != 1.0 {
            (g * clip_scale)?
        } else {
            g.clone()
        };
        p.m = ((&p.m * opt.beta1)? + (&g * (1.0 - opt.beta1))?)?;
        p.v = ((&p.v * opt.beta2)? + (g.sqr()? * (1.0 - opt.beta2))?)?;
        let mhat = (&p.m / bc1)?;
        let vhat = (&p.v / bc2)?;
        let mut update = (mhat / (vhat.sqrt()? + opt.eps)?)?;
        let w = p.var.as_tensor();
        if p.decay && opt.weight_decay > 0.0 {
            update = (update + (w * opt.weight_decay)?)?;
        }
        let next = (w - (update * (lr * p.lr_scale))?)?;
        p.var.set(&next)?;
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let o = AdamW {
            lr: 1.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            clip: 0.0,
            warmup_steps: 2,
            total_steps: 6,
        };
        let lrs: Vec<f64> = (0..6).map(|s| o.lr_at(s)).collect();
        assert_eq!(lrs, vec![0.5, 1.0, 1.0, 0.75, 0.5, 0.25]);
    }

    #[test]
    fn minimises_a_quadratic_and_clips() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::new(&[3f32, -2.0], &dev).unwrap()).unwrap();
        let mut params = vec![Param::new(x.clone(), true, 1.0).unwrap()];
        let o = AdamW {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            clip: 1.0,
            warmup_steps: 0,
            total_steps: 400,
        };
        for s in 0..300 {
            let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            let mut acc = Accum::new(1);
            acc.add(&params, &g).unwrap();
            let n = step(&o, &mut params, &acc, s).unwrap();
            assert!(n.is_finite());
        }
        let v: Vec<f32> = x.as_tensor().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.abs() < 0.05), "{v:?}");
    }
}
