//! Merging LoRA experts in LoRA space, without forming any dense ΔW.
//!
//! Each expert i contributes ΔW_i = s_i · B_i · A_i with s_i = α_i / r_i, weighted by w_i.
//! `cat` stacks the factors: B = [B_1 … B_n] (out × R), A = [c_1 A_1; …; c_n A_n] (R × in) with
//! c_i = w_i s_i and R = Σ r_i; then B · A = Σ w_i s_i B_i A_i exactly, stored with α = R
//! (scale 1). `svd` recompresses that product to rank k: thin QR of B and of Aᵀ, an SVD of the
//! small core R_B R_Aᵀ, and B' = Q_B U_k Σ_k, A' = V_kᵀ Q_Aᵀ — the best rank-k approximation of
//! the sum, exact when k ≥ its rank. Time O((out + in) · R² + R³), memory O((out + in) · R + R²).

use nalgebra::DMatrix;

/// LoRA factors of one tensor: ΔW = (alpha / rank) · B · A.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraFactors {
    pub rank: usize,
    pub alpha: f64,
    /// rank × in, row-major.
    pub a: Vec<f32>,
    /// out × rank, row-major.
    pub b: Vec<f32>,
}

/// Stack weighted factors (see the module docs). `inputs` are (weight, factors); every A has
/// `inp` columns and every B `out` rows.
pub fn cat(inputs: &[(f64, &LoraFactors)], out: usize, inp: usize) -> LoraFactors {
    let rank: usize = inputs.iter().map(|(_, f)| f.rank).sum();
    let mut a = Vec::with_capacity(rank * inp);
    let mut b = vec![0f32; out * rank];
    let mut col = 0;
    for (w, f) in inputs {
        let c = w * f.alpha / f.rank as f64;
        a.extend(f.a.iter().map(|&x| (c * x as f64) as f32));
        for o in 0..out {
            b[o * rank + col..o * rank + col + f.rank]
                .copy_from_slice(&f.b[o * f.rank..(o + 1) * f.rank]);
        }
        col += f.rank;
    }
    LoraFactors {
        rank,
        alpha: rank as f64,
        a,
        b,
    }
}

/// The best rank-`k` LoRA of Σ w_i s_i B_i A_i (`k` defaults to the largest input rank, as
/// peft's `svd` does; it is capped at the rank of the sum's factors).
pub fn svd(
    inputs: &[(f64, &LoraFactors)],
    out: usize,
    inp: usize,
    k: Option<usize>,
) -> LoraFactors {
    let c = cat(inputs, out, inp);
    let r = c.rank;
    let b = DMatrix::<f64>::from_row_iterator(out, r, c.b.iter().map(|&x| x as f64));
    let at = DMatrix::<f64>::from_row_iterator(r, inp, c.a.iter().map(|&x| x as f64)).transpose();
    let qr_b = b.qr();
    let qr_a = at.qr();
    let (qb, rb) = (qr_b.q(), qr_b.r()); // out × m, m × r
    let (qa, ra) = (qr_a.q(), qr_a.r()); // in × n, n × r
    let core = &rb * ra.transpose(); // m × n
    let s = core.svd(true, true);
    let (u, vt) = (s.u.expect("u requested"), s.v_t.expect("v_t requested"));
    let max_rank = s.singular_values.len();
    let want = k.unwrap_or_else(|| inputs.iter().map(|(_, f)| f.rank).max().unwrap_or(1));
    let k = want.clamp(1, max_rank.max(1));
    // B' = Q_B U_k Σ_k (out × k), A' = V_kᵀ Q_Aᵀ (k × in).
    let mut us = u.columns(0, k).into_owned();
    for j in 0..k {
        let sj = s.singular_values[j];
        us.column_mut(j).scale_mut(sj);
    }
    let b2 = &qb * us;
    let a2 = vt.rows(0, k) * qa.transpose();
    LoraFactors {
        rank: k,
        alpha: k as f64,
        a: (0..k)
            .flat_map(|i| (0..inp).map(move |j| (i, j)))
            .map(|(i, j)| a2[(i, j)] as f32)
            .collect(),
        b: (0..out)
            .flat_map(|i| (0..k).map(move |j| (i, j)))
            .map(|(i, j)| b2[(i, j)] as f32)
            .collect(),
    }
}

/// ΔW = (alpha / rank) · B · A in f32, dense and row-major (`a` is rank × inp, `b` is
/// out × rank): how a LoRA input enters a densified merge or a dense view of an expert.
pub fn dense_f32(
    rank: usize,
    alpha: f64,
    a: &[f32],
    b: &[f32],
    out: usize,
    inp: usize,
) -> Vec<f32> {
    let scale = (alpha / rank as f64) as f32;
    let mut w = vec![0f32; out * inp];
    for o in 0..out {
        for k in 0..rank {
            let bk = b[o * rank + k] * scale;
            let row = &a[k * inp..(k + 1) * inp];
            for (x, &av) in w[o * inp..(o + 1) * inp].iter_mut().zip(row) {
                *x += bk * av;
            }
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use xpm_core::rng::SplitMix64;

    /// (alpha / rank) · B · A in f64: the reference the tests compare with.
    fn dense(f: &LoraFactors, out: usize, inp: usize) -> Vec<f64> {
        let s = f.alpha / f.rank as f64;
        let mut w = vec![0f64; out * inp];
        for o in 0..out {
            for k in 0..f.rank {
                let bk = f.b[o * f.rank + k] as f64 * s;
                for j in 0..inp {
                    w[o * inp + j] += bk * f.a[k * inp + j] as f64;
                }
            }
        }
        w
    }

    fn random(rank: usize, alpha: f64, out: usize, inp: usize, seed: u64) -> LoraFactors {
        let mut g = SplitMix64(seed);
        LoraFactors {
            rank,
            alpha,
            a: (0..rank * inp).map(|_| g.uniform() - 0.5).collect(),
            b: (0..out * rank).map(|_| g.uniform() - 0.5).collect(),
        }
    }

    fn target(inputs: &[(f64, &LoraFactors)], out: usize, inp: usize) -> Vec<f64> {
        let mut t = vec![0f64; out * inp];
        for (w, f) in inputs {
            for (x, d) in t.iter_mut().zip(dense(f, out, inp)) {
                *x += w * d;
            }
        }
        t
    }

    fn max_err(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn dense_f32_matches_the_f64_product() {
        let (out, inp) = (7, 5);
        let f = random(3, 12.0, out, inp, 11);
        let got = dense_f32(f.rank, f.alpha, &f.a, &f.b, out, inp);
        let want = dense(&f, out, inp);
        assert!(max_err(&got.iter().map(|&x| x as f64).collect::<Vec<_>>(), &want) < 1e-5);
    }

    #[test]
    fn cat_and_full_rank_svd_reproduce_the_weighted_sum() {
        let (out, inp) = (24, 40);
        let e1 = random(4, 16.0, out, inp, 1);
        let e2 = random(8, 8.0, out, inp, 2);
        let e3 = random(2, 2.0, out, inp, 3);
        let inputs = [(1.0, &e1), (-0.5, &e2), (0.25, &e3)];
        let want = target(&inputs, out, inp);
        let c = cat(&inputs, out, inp);
        assert_eq!(c.rank, 14);
        assert!(max_err(&dense(&c, out, inp), &want) < 1e-5);
        let s = svd(&inputs, out, inp, Some(14));
        assert!(
            max_err(&dense(&s, out, inp), &want) < 1e-5,
            "{}",
            max_err(&dense(&s, out, inp), &want)
        );
    }

    #[test]
    fn truncated_svd_is_the_best_low_rank_approximation() {
        let (out, inp) = (16, 12);
        let e1 = random(4, 4.0, out, inp, 5);
        let e2 = random(4, 4.0, out, inp, 6);
        let inputs = [(1.0, &e1), (1.0, &e2)];
        let want = target(&inputs, out, inp);
        let s4 = svd(&inputs, out, inp, None); // default: max input rank = 4
        assert_eq!(s4.rank, 4);
        let s8 = svd(&inputs, out, inp, Some(8));
        let err = |f: &LoraFactors| {
            dense(f, out, inp)
                .iter()
                .zip(&want)
                .map(|(x, y)| (x - y).powi(2))
                .sum::<f64>()
        };
        assert!(err(&s8) < 1e-8);
        assert!(err(&s4) > err(&s8));
        // Eckart–Young: no rank-4 cut of the concatenation beats the SVD's.
        let c = cat(&[(1.0, &e1)], out, inp);
        assert!(err(&s4) <= err(&c) + 1e-9);
    }
}
