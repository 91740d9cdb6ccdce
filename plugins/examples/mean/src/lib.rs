//! `plugin-mean`: the built-in `mean` (Σ w δ / Σ w over every expert) as a plugin, to measure
//! what crossing the plugin boundary costs (docs/benchmarks.md, "Plugins").

use xpm_plugin_sdk::{Output, Strategy, Tensor, serde_json};

pub struct Mean;

/// Support positions per block: the block's accumulator (64 KiB of f64) stays in the core's
/// L2 cache while every expert adds into it.
const BLOCK: usize = 8192;

thread_local! {
    static ACC: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Strategy for Mean {
    const NAME: &'static str = "plugin-mean";
    const VERSION: &'static str = "1.0.0";

    fn create(_params: serde_json::Value) -> Result<Self, String> {
        Ok(Mean)
    }

    fn merge(&mut self, t: &Tensor<'_>, out: &mut Output<'_>) -> Result<(), String> {
        let total: f64 = t.weights.iter().sum();
        let n_experts = t.n_experts();
        let experts: Vec<(f64, &[u32], &[f32])> = (0..n_experts)
            .map(|e| {
                let (slots, values) = t.entries(e);
                (t.weights[e], slots, values)
            })
            .collect();
        // Where each expert's entries of the next block start (its slots ascend).
        let mut cursor = vec![0usize; n_experts];
        ACC.with_borrow_mut(|acc| {
            // Kept per thread from one tensor to the next (the host calls `merge` for tensor
            // after tensor on the same worker threads).
            acc.resize(BLOCK, 0.0);
            // One block of support positions at a time, every expert's entries there in expert
            // order: each position sums in expert order exactly as the built-in does, and the
            // scattered additions land in a cache-resident block, not in an accumulator the
            // size of the support (whose every addition missed the cache: half the plugin's
            // time, as measured).
            for (b, chunk) in out.values.chunks_mut(BLOCK).enumerate() {
                let (s0, s1) = (b * BLOCK, b * BLOCK + chunk.len());
                for ((w, slots, values), at) in experts.iter().zip(cursor.iter_mut()) {
                    // A linear walk to the block's end (a binary search's probes into entries
                    // not read yet would miss the cache).
                    while let Some(&k) = slots.get(*at)
                        && (k as usize) < s1
                    {
                        acc[(k as usize - s0) % BLOCK] += w * values[*at] as f64;
                        *at += 1;
                    }
                }
                for (o, a) in chunk.iter_mut().zip(acc.iter_mut()) {
                    *o = if total == 0.0 {
                        0.0
                    } else {
                        (*a / total) as f32
                    };
                    *a = 0.0;
                }
            }
        });
        Ok(())
    }
}

xpm_plugin_sdk::export!(Mean);
