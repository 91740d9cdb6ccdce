//! `plugin-mean`: the built-in `mean` (Σ w δ / Σ w over every expert) as a plugin, to measure
//! what crossing the plugin boundary costs (docs/benchmarks.md, "Plugins").

use xpm_plugin_sdk::{Output, Strategy, Tensor, serde_json};

pub struct Mean;

impl Strategy for Mean {
    const NAME: &'static str = "plugin-mean";
    const VERSION: &'static str = "1.0.0";

    fn create(_params: serde_json::Value) -> Result<Self, String> {
        Ok(Mean)
    }

    fn merge(&mut self, t: &Tensor<'_>, out: &mut Output<'_>) -> Result<(), String> {
        let total: f64 = t.weights.iter().sum();
        // Expert by expert over its own entries (O(entries)), summing in expert order per
        // position exactly as the built-in does.
        let mut acc = vec![0f64; t.support.len()];
        for e in 0..t.n_experts() {
            let w = t.weights[e];
            let (slots, values) = t.entries(e);
            for (&k, &v) in slots.iter().zip(values) {
                acc[k as usize] += w * v as f64;
            }
        }
        for (o, a) in out.values.iter_mut().zip(acc) {
            *o = if total == 0.0 {
                0.0
            } else {
                (a / total) as f32
            };
        }
        Ok(())
    }
}

xpm_plugin_sdk::export!(Mean);
