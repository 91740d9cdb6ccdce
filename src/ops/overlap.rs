//! `xpm overlap E1 E2 …`: how much the experts' masks overlap, whether they agree in sign where
//! they do, and how much each merge strategy would move the entries they share.
//!
//! Merging only disturbs entries that more than one expert changed: on disjoint supports,
//! `sparse-mean` returns every expert's own values exactly. So the overlap of the masks, and the
//! sign conflicts inside it, predict how much of each expert a merge will damage
//! (docs/merging.md, "Mask overlap"). The `--json` output is [`OverlapReport`]
//! (`schemas/overlap.schema.json`).

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::BaseModel;
use crate::merge::engine::{Input, Output, merge_tensor};
use crate::merge::{MergeParams, Strategy};

use crate::merge::input::{ExpertSet, load_input};

/// Version of the `--json` structure.
pub const OVERLAP_SCHEMA_VERSION: u32 = 1;

/// The strategies whose effect on shared entries is reported (deterministic ones, weights 1,
/// default parameters).
pub const REPORTED: [Strategy; 4] = [
    Strategy::SparseMean,
    Strategy::Mean,
    Strategy::TaskArithmetic,
    Strategy::Ties,
];

/// `xpm overlap --json` output.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct OverlapReport {
    pub schema_version: u32,
    /// `name@version` of each expert, in the order given; pairs refer to these positions.
    pub experts: Vec<String>,
    pub base: BaseModel,
    /// Strategies in the order of every `change` list.
    pub strategies: Vec<String>,
    pub tensors: Vec<TensorOverlap>,
    /// All tensors together (sums of counts, not means of ratios).
    pub overall: OverlapStats,
}

/// Overlap of one tensor.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct TensorOverlap {
    pub name: String,
    pub numel: u64,
    #[serde(flatten)]
    pub stats: OverlapStats,
}

/// Counts and ratios for one tensor or for all of them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
pub struct OverlapStats {
    /// Entries in each expert's mask (dense and LoRA experts count every position).
    pub nnz: Vec<u64>,
    /// Positions in at least one mask.
    pub union: u64,
    /// Positions in at least two masks: where experts interfere (strategies that rescale or
    /// prune also change single-expert entries; `change` does not count those).
    pub shared: u64,
    /// One entry per pair of experts.
    pub pairs: Vec<PairOverlap>,
    /// Per strategy: Σ (merged − own)² / Σ own², over every expert's entries at shared
    /// positions; 0 means the merge keeps them exactly, 1 means it moves them as far as zeroing
    /// them would. Absent when nothing is shared.
    pub change: Vec<Option<f64>>,
    #[serde(skip)]
    change_num: Vec<f64>,
    #[serde(skip)]
    change_den: Vec<f64>,
}

/// Overlap of two experts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
pub struct PairOverlap {
    pub a: usize,
    pub b: usize,
    pub intersection: u64,
    pub union: u64,
    /// intersection / union (0 when both masks are empty).
    pub jaccard: f64,
    /// Fraction of the intersection where both deltas have the same sign; absent when the masks
    /// do not intersect.
    pub sign_agreement: Option<f64>,
    #[serde(skip)]
    agree: u64,
}

impl OverlapStats {
    fn add(&mut self, o: &OverlapStats) {
        if self.nnz.is_empty() {
            self.nnz = vec![0; o.nnz.len()];
            self.pairs = o
                .pairs
                .iter()
                .map(|p| PairOverlap {
                    a: p.a,
                    b: p.b,
                    ..Default::default()
                })
                .collect();
            self.change_num = vec![0.0; o.change_num.len()];
            self.change_den = vec![0.0; o.change_den.len()];
        }
        for (a, b) in self.nnz.iter_mut().zip(&o.nnz) {
            *a += b;
        }
        self.union += o.union;
        self.shared += o.shared;
        for (p, q) in self.pairs.iter_mut().zip(&o.pairs) {
            p.intersection += q.intersection;
            p.union += q.union;
            p.agree += q.agree;
        }
        for k in 0..self.change_num.len() {
            self.change_num[k] += o.change_num[k];
            self.change_den[k] += o.change_den[k];
        }
        self.finish();
    }

    fn finish(&mut self) {
        for p in &mut self.pairs {
            p.jaccard = if p.union == 0 {
                0.0
            } else {
                p.intersection as f64 / p.union as f64
            };
            p.sign_agreement = (p.intersection > 0).then(|| p.agree as f64 / p.intersection as f64);
        }
        self.change = self
            .change_num
            .iter()
            .zip(&self.change_den)
            .map(|(n, d)| (*d > 0.0).then(|| n / d))
            .collect();
    }

    /// Mean Jaccard over the pairs.
    pub fn mean_jaccard(&self) -> f64 {
        if self.pairs.is_empty() {
            return 0.0;
        }
        self.pairs.iter().map(|p| p.jaccard).sum::<f64>() / self.pairs.len() as f64
    }

    /// Sign agreement over every pair's intersection together.
    pub fn sign_agreement(&self) -> Option<f64> {
        let inter: u64 = self.pairs.iter().map(|p| p.intersection).sum();
        let agree: u64 = self.pairs.iter().map(|p| p.agree).sum();
        (inter > 0).then(|| agree as f64 / inter as f64)
    }
}

/// An expert's entries as sorted positions and values (dense: every position).
struct Sorted {
    idx: Option<Vec<u64>>,
    val: Vec<f32>,
}

impl Sorted {
    fn from(input: Input) -> Sorted {
        match input {
            Input::Sparse { indices, values } => Sorted {
                idx: Some(indices),
                val: values,
            },
            Input::Dense { values } => Sorted {
                idx: None,
                val: values,
            },
            Input::Absent => Sorted {
                idx: Some(vec![]),
                val: vec![],
            },
        }
    }
    fn len(&self) -> usize {
        self.val.len()
    }
    fn at(&self, k: usize) -> u64 {
        self.idx.as_ref().map_or(k as u64, |i| i[k])
    }
    fn input(&self) -> Input {
        match &self.idx {
            Some(i) => Input::Sparse {
                indices: i.clone(),
                values: self.val.clone(),
            },
            None => Input::Dense {
                values: self.val.clone(),
            },
        }
    }
}

/// Overlap of one tensor across `experts`.
fn tensor_overlap(name: &str, shape: &[u64], experts: &[Sorted]) -> OverlapStats {
    let n = experts.len();
    let mut st = OverlapStats {
        nnz: experts.iter().map(|e| e.len() as u64).collect(),
        ..Default::default()
    };
    for a in 0..n {
        for b in a + 1..n {
            let (x, y) = (&experts[a], &experts[b]);
            let (mut i, mut j, mut inter, mut agree) = (0, 0, 0u64, 0u64);
            while i < x.len() && j < y.len() {
                let (p, q) = (x.at(i), y.at(j));
                if p == q {
                    inter += 1;
                    if (x.val[i] > 0.0) == (y.val[j] > 0.0) && x.val[i] != 0.0 && y.val[j] != 0.0 {
                        agree += 1;
                    }
                    i += 1;
                    j += 1;
                } else if p < q {
                    i += 1;
                } else {
                    j += 1;
                }
            }
            st.pairs.push(PairOverlap {
                a,
                b,
                intersection: inter,
                union: x.len() as u64 + y.len() as u64 - inter,
                agree,
                ..Default::default()
            });
        }
    }
    // Shared positions (in ≥ 2 masks), and each expert's own value there.
    let mut cur = vec![0usize; n];
    let mut shared: Vec<(u64, Vec<(usize, f32)>)> = Vec::new();
    loop {
        let pos = (0..n)
            .filter(|&e| cur[e] < experts[e].len())
            .map(|e| experts[e].at(cur[e]))
            .min();
        let Some(pos) = pos else { break };
        st.union += 1;
        let mut here = Vec::new();
        for e in 0..n {
            if cur[e] < experts[e].len() && experts[e].at(cur[e]) == pos {
                here.push((e, experts[e].val[cur[e]]));
                cur[e] += 1;
            }
        }
        if here.len() >= 2 {
            shared.push((pos, here));
        }
    }
    st.shared = shared.len() as u64;
    let inputs: Vec<Input> = experts.iter().map(Sorted::input).collect();
    let weights = vec![1.0; n];
    let params = MergeParams::default();
    for s in REPORTED {
        let (mut num, mut den) = (0.0f64, 0.0f64);
        if !shared.is_empty() {
            let out = merge_tensor(name, shape, &inputs, &weights, s, &params);
            let merged_at = |pos: u64, k: &mut usize| -> f64 {
                match &out {
                    Output::Dense { values } => values[pos as usize] as f64,
                    Output::Sparse { indices, values } => {
                        while *k < indices.len() && indices[*k] < pos {
                            *k += 1;
                        }
                        if *k < indices.len() && indices[*k] == pos {
                            values[*k] as f64
                        } else {
                            0.0
                        }
                    }
                }
            };
            let mut k = 0usize;
            for (pos, here) in &shared {
                let m = merged_at(*pos, &mut k);
                for (_, v) in here {
                    let v = *v as f64;
                    num += (m - v) * (m - v);
                    den += v * v;
                }
            }
        }
        st.change_num.push(num);
        st.change_den.push(den);
    }
    st.finish();
    st
}

/// Compute the overlap report for `paths` (at least two experts of one base).
pub fn overlap(paths: &[PathBuf]) -> Result<OverlapReport> {
    if paths.len() < 2 {
        return Err(Error::input(
            "overlap compares at least two experts",
            Some("give two or more experts: `xpm overlap a.xpm b.xpm`"),
        ));
    }
    let set = ExpertSet::open(paths)?;
    let mut tensors = Vec::with_capacity(set.names.len());
    crate::parallel::map_ordered(
        &set.names,
        |name| {
            let (shape, _) = set.info[name].clone();
            let mut experts = Vec::with_capacity(set.readers.len());
            for r in &set.readers {
                experts.push(Sorted::from(load_input(r, name)?.0));
            }
            let stats = tensor_overlap(name, &shape, &experts);
            Ok(TensorOverlap {
                name: name.clone(),
                numel: shape.iter().product(),
                stats,
            })
        },
        |t| {
            tensors.push(t);
            Ok(())
        },
    )?;
    let mut overall = OverlapStats::default();
    for t in &tensors {
        overall.add(&t.stats);
    }
    let m0 = set.readers[0].manifest();
    Ok(OverlapReport {
        schema_version: OVERLAP_SCHEMA_VERSION,
        experts: set
            .readers
            .iter()
            .map(|r| format!("{}@{}", r.manifest().name, r.manifest().version))
            .collect(),
        base: m0.base.clone(),
        strategies: REPORTED.iter().map(|s| s.as_str().to_string()).collect(),
        tensors,
        overall,
    })
}

fn pct(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{:.1}%", v * 100.0))
}

/// The human tables: one row per tensor and overall, then the pairwise matrix.
pub fn render(r: &OverlapReport) -> String {
    let mut out = format!(
        "overlap of {} experts on base {}: {}\n\n",
        r.experts.len(),
        r.base.id,
        r.experts.join(", ")
    );
    let w = r
        .tensors
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(6)
        .max(7);
    let mut head = format!(
        "{:<w$}  {:>9}  {:>9}  {:>8}  {:>10}",
        "tensor", "union", "shared", "jaccard", "sign-agree"
    );
    for s in &r.strategies {
        head.push_str(&format!("  {:>16}", format!("Δ {s}")));
    }
    out.push_str(&head);
    out.push('\n');
    let row = |name: &str, st: &OverlapStats| {
        let mut l = format!(
            "{name:<w$}  {:>9}  {:>9}  {:>8.4}  {:>10}",
            st.union,
            st.shared,
            st.mean_jaccard(),
            pct(st.sign_agreement())
        );
        for c in &st.change {
            l.push_str(&format!("  {:>16}", pct(*c)));
        }
        l
    };
    for t in &r.tensors {
        out.push_str(&row(&t.name, &t.stats));
        out.push('\n');
    }
    out.push_str(&row("overall", &r.overall));
    out.push_str("\n\npairwise, all tensors (jaccard / sign agreement on shared entries):\n");
    for p in &r.overall.pairs {
        out.push_str(&format!(
            "  {} × {}: jaccard {:.4} ({} shared of {}), sign agreement {}\n",
            r.experts[p.a],
            r.experts[p.b],
            p.jaccard,
            p.intersection,
            p.union,
            pct(p.sign_agreement)
        ));
    }
    out.push_str(
        "\njaccard: mean over pairs of |A∩B| / |A∪B|. Δ strategy: how far the merge moves the experts' \
         own values on shared entries (Σ(m−v)²/Σv²; 0 = untouched, 100% = as far as zeroing them).\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(idx: &[u64], val: &[f32]) -> Sorted {
        Sorted {
            idx: Some(idx.to_vec()),
            val: val.to_vec(),
        }
    }

    #[test]
    fn counts_and_changes() {
        // a: {0:+1, 1:+2, 2:-1}; b: {1:+4, 2:+1, 5:+1}
        let st = tensor_overlap(
            "t",
            &[8],
            &[
                sp(&[0, 1, 2], &[1.0, 2.0, -1.0]),
                sp(&[1, 2, 5], &[4.0, 1.0, 1.0]),
            ],
        );
        assert_eq!(st.union, 4);
        assert_eq!(st.shared, 2);
        let p = &st.pairs[0];
        assert_eq!((p.intersection, p.union), (2, 4));
        assert_eq!(p.jaccard, 0.5);
        assert_eq!(p.sign_agreement, Some(0.5));
        // sparse-mean on shared: pos1 → 3, pos2 → 0. own: (2,4), (-1,1).
        // Σ(m−v)² = 1 + 1 + 1 + 1 = 4; Σv² = 4 + 16 + 1 + 1 = 22.
        assert!((st.change[0].unwrap() - 4.0 / 22.0).abs() < 1e-12);
    }

    #[test]
    fn disjoint_masks_do_not_interfere() {
        let st = tensor_overlap(
            "t",
            &[8],
            &[sp(&[0, 2], &[1.0, 1.0]), sp(&[1, 3], &[1.0, -1.0])],
        );
        assert_eq!(st.shared, 0);
        assert_eq!(st.pairs[0].jaccard, 0.0);
        assert_eq!(st.pairs[0].sign_agreement, None);
        assert!(st.change.iter().all(Option::is_none));
    }
}
