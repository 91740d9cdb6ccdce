//! `plugin-mean`: the built-in `mean` (Σ w δ / Σ w over every expert) as a plugin, to measure
//! what crossing the plugin boundary costs (docs/benchmarks.md, "Plugins").

use xpm_plugin_sdk::{Output, Strategy, Tensor, serde_json};

pub struct Mean;

/// The largest accumulator kept for the next tensor (entries); larger ones are freed.
const MAX_KEPT: usize = 8 << 20;

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
        ACC.with_borrow_mut(|acc| {
            // The accumulator is kept per thread from one tensor to the next: the host calls
            // `merge` for tensor after tensor on the same worker threads, and a fresh
            // multi-megabyte buffer per tensor would have its pages faulted in and zeroed by
            // the kernel every time.
            acc.clear();
            acc.resize(t.support.len(), 0.0);
            // Expert by expert over its own entries (O(entries)), summing in expert order per
            // position exactly as the built-in does.
            for e in 0..t.n_experts() {
                let w = t.weights[e];
                let (slots, values) = t.entries(e);
                for (&k, &v) in slots.iter().zip(values) {
                    acc[k as usize] += w * v as f64;
                }
            }
            for (o, &a) in out.values.iter_mut().zip(acc.iter()) {
                *o = if total == 0.0 {
                    0.0
                } else {
                    (a / total) as f32
                };
            }
            if acc.capacity() > MAX_KEPT {
                *acc = Vec::new();
            }
        });
        Ok(())
    }
}

xpm_plugin_sdk::export!(Mean);
