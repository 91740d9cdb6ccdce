//! `plugin-mean`: the built-in `mean` (Σ w δ / Σ w over every expert) as a plugin, to measure
//! what crossing the plugin boundary costs (docs/benchmarks.md, "Plugins").

use xpm_plugin_sdk::{Output, Positions, Strategy, Tensor, serde_json};

pub struct Mean;

/// Positions per block: the block's accumulator (64 KiB of f64) stays in the core's L2 cache
/// while every expert adds into it.
const BLOCK: u64 = 8192;

thread_local! {
    static ACC: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Strategy for Mean {
    const NAME: &'static str = "plugin-mean";
    const VERSION: &'static str = "1.0.0";
    /// It works on the experts' positions, so the host maps no entry to a support slot.
    const USES_SLOTS: bool = false;

    fn create(_params: serde_json::Value) -> Result<Self, String> {
        Ok(Mean)
    }

    fn merge(&mut self, t: &Tensor<'_>, out: &mut Output<'_>) -> Result<(), String> {
        let total: f64 = t.weights.iter().sum();
        let experts: Vec<(f64, Positions, &[f32])> = (0..t.n_experts())
            .map(|e| {
                let (positions, values) = t.positions(e);
                (t.weights[e], positions, values)
            })
            .collect();
        // Where each expert's entries of the next block start (its positions ascend).
        let mut cursor = vec![0usize; experts.len()];
        let support = t.support;
        ACC.with_borrow_mut(|acc| {
            // Kept per thread from one tensor to the next (the host calls `merge` for tensor
            // after tensor on the same worker threads).
            acc.resize(BLOCK as usize, 0.0);
            // One block of positions at a time, every expert's entries there in expert order:
            // each position sums in expert order exactly as the built-in does, and the
            // scattered additions land in a cache-resident block, not in an accumulator the
            // size of the support (whose every addition missed the cache: half the plugin's
            // time, as measured). The support, sorted, gives the block's merged positions in
            // order, which are the output's.
            let mut k = 0; // the next support slot
            while let Some(&first) = support.get(k) {
                let c0 = first / BLOCK * BLOCK;
                let c1 = c0 + BLOCK;
                for ((w, positions, values), at) in experts.iter().zip(cursor.iter_mut()) {
                    match *positions {
                        // A linear walk to the block's end (a binary search's probes into
                        // entries not read yet would miss the cache).
                        Positions::Indices(ix) => {
                            while let Some(&i) = ix.get(*at)
                                && i < c1
                            {
                                acc[((i - c0) % BLOCK) as usize] += w * values[*at] as f64;
                                *at += 1;
                            }
                        }
                        // A dense expert: entry j is position j.
                        Positions::All(len) => {
                            let end = len.min(c1 as usize);
                            for j in *at..end {
                                acc[(j - c0 as usize) % BLOCK as usize] += w * values[j] as f64;
                            }
                            *at = end.max(*at);
                        }
                    }
                }
                while let Some(&p) = support.get(k)
                    && p < c1
                {
                    let a = &mut acc[((p - c0) % BLOCK) as usize];
                    out.values[k] = if total == 0.0 {
                        0.0
                    } else {
                        (*a / total) as f32
                    };
                    *a = 0.0;
                    k += 1;
                }
            }
        });
        Ok(())
    }
}

xpm_plugin_sdk::export!(Mean);
