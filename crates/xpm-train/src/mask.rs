//! Mask selection for sparse adapters (METHOD.md, "Mask selection").
//!
//! Scores are dense per layer (transient); the kept set is exactly k = ⌊keep · numel⌋ entries
//! per layer, ties broken towards the lower flat index, or, with blocks, the ⌊k / b²⌋ true
//! b × b tiles of the (out × in) matrix with the largest summed score.

use xpm_core::rng::SplitMix64;

/// How entries are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScoreRule {
    /// |∂L/∂W ⊙ W| (connection sensitivity; W = W0 + ΔW).
    Snip,
    /// −∂L/∂M at M = 1, i.e. −(∂L/∂W) ⊙ ΔW: the first-order loss decrease from keeping the
    /// entry (the reference code's rule). Needs a trained ΔW: periodic schedule only.
    GradDelta,
    /// |ΔW|.
    Magnitude,
    /// |∂L/∂W|.
    Gradient,
    /// Uniform random (ablations).
    Random,
}

impl ScoreRule {
    pub fn as_str(self) -> &'static str {
        match self {
            ScoreRule::Snip => "snip",
            ScoreRule::GradDelta => "grad-delta",
            ScoreRule::Magnitude => "magnitude",
            ScoreRule::Gradient => "gradient",
            ScoreRule::Random => "random",
        }
    }

    /// Whether the rule needs gradients (a scoring pass over training batches).
    pub fn needs_gradient(self) -> bool {
        matches!(
            self,
            ScoreRule::Snip | ScoreRule::GradDelta | ScoreRule::Gradient
        )
    }

    /// Whether the rule needs a trained delta (zero before training).
    pub fn needs_delta(self) -> bool {
        matches!(self, ScoreRule::GradDelta | ScoreRule::Magnitude)
    }
}

/// Score every entry of one layer. `grad` is the accumulated ∂L/∂W (empty when the rule needs
/// none), `w` the effective weight, `delta` the dense ΔW.
pub fn score(
    rule: ScoreRule,
    grad: &[f32],
    w: &[f32],
    delta: &[f32],
    rng: &mut SplitMix64,
) -> Vec<f32> {
    match rule {
        ScoreRule::Snip => grad.iter().zip(w).map(|(g, w)| (g * w).abs()).collect(),
        ScoreRule::GradDelta => grad.iter().zip(delta).map(|(g, d)| -(g * d)).collect(),
        ScoreRule::Magnitude => delta.iter().map(|d| d.abs()).collect(),
        ScoreRule::Gradient => grad.iter().map(|g| g.abs()).collect(),
        ScoreRule::Random => (0..w.len()).map(|_| rng.uniform()).collect(),
    }
}

/// Sorted flat indices of the `k` largest scores (signed), ties to the lower index.
pub fn top_k(scores: &[f32], k: usize) -> Vec<u32> {
    xpm_core::select::top_k_signed(scores, k)
        .into_iter()
        .map(|i| i as u32)
        .collect()
}

/// Select the kept entries of an (out × in) layer: exactly `k` entries, or with `block` the
/// top ⌊k / block²⌋ tiles (edge tiles of non-multiple shapes are partial and score their
/// entries only).
pub fn select(scores: &[f32], out: usize, inn: usize, k: usize, block: Option<usize>) -> Vec<u32> {
    debug_assert_eq!(scores.len(), out * inn);
    let Some(bs) = block else {
        return top_k(scores, k);
    };
    let (tr, tc) = (out.div_ceil(bs), inn.div_ceil(bs));
    let mut tiles = vec![0f32; tr * tc];
    for r in 0..out {
        let row = &scores[r * inn..(r + 1) * inn];
        let trow = &mut tiles[(r / bs) * tc..(r / bs + 1) * tc];
        for (c, s) in row.iter().enumerate() {
            trow[c / bs] += s;
        }
    }
    let keep = top_k(&tiles, k / (bs * bs));
    let mut idx = Vec::with_capacity(keep.len() * bs * bs);
    for t in keep {
        let (ti, tj) = (t as usize / tc, t as usize % tc);
        for r in ti * bs..((ti + 1) * bs).min(out) {
            for c in tj * bs..((tj + 1) * bs).min(inn) {
                idx.push((r * inn + c) as u32);
            }
        }
    }
    idx.sort_unstable();
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_k_with_ties() {
        let s = [1.0, 1.0, 1.0, 1.0, 0.5, 2.0];
        assert_eq!(top_k(&s, 3), vec![0, 1, 5]);
        assert_eq!(top_k(&[0.0; 10], 4), vec![0, 1, 2, 3]);
        // Signed: the largest values, not magnitudes.
        assert_eq!(top_k(&[-5.0, 1.0, -0.5, 0.0], 2), vec![1, 3]);
        assert_eq!(top_k(&[f32::NAN, -1.0], 1), vec![1]);
        assert_eq!(top_k(&[3.0, 2.0], 5), vec![0, 1]);
    }

    #[test]
    fn blocks_are_true_tiles_of_out_by_in() {
        // A 4 × 6 matrix in 2 × 2 tiles: 2 tile rows, 3 tile columns. Make tile (1, 2) — rows
        // 2..4, columns 4..6 — the best.
        let (out, inn) = (4, 6);
        let mut s = vec![0.0f32; out * inn];
        for r in 2..4 {
            for c in 4..6 {
                s[r * inn + c] = 1.0;
            }
        }
        let idx = select(&s, out, inn, 4, Some(2));
        assert_eq!(idx, vec![16, 17, 22, 23]);
        // A transposed tiling would pick flat indices of a 6 × 4 matrix instead.
    }

    #[test]
    fn blocks_on_non_multiple_shapes_use_partial_edge_tiles() {
        // 3 × 5 in 2 × 2 tiles: the bottom-right tile is 1 × 1.
        let (out, inn) = (3, 5);
        let mut s = vec![0.0f32; out * inn];
        s[2 * inn + 4] = 10.0;
        let idx = select(&s, out, inn, 4, Some(2));
        assert_eq!(idx, vec![14]);
        // k smaller than one tile keeps nothing.
        assert!(select(&s, out, inn, 3, Some(2)).is_empty());
    }

    #[test]
    fn scores_follow_their_definitions() {
        let g = [1.0, -2.0, 0.5];
        let w = [2.0, 1.0, -4.0];
        let d = [0.0, 1.0, 1.0];
        let mut r = SplitMix64(1);
        assert_eq!(
            score(ScoreRule::Snip, &g, &w, &d, &mut r),
            vec![2.0, 2.0, 2.0]
        );
        assert_eq!(
            score(ScoreRule::GradDelta, &g, &w, &d, &mut r),
            vec![-0.0, 2.0, -0.5]
        );
        assert_eq!(
            score(ScoreRule::Magnitude, &g, &w, &d, &mut r),
            vec![0.0, 1.0, 1.0]
        );
        assert_eq!(
            score(ScoreRule::Gradient, &g, &w, &d, &mut r),
            vec![1.0, 2.0, 0.5]
        );
    }
}
