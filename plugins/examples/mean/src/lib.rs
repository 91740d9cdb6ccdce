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
        for k in 0..t.support.len() {
            let mut s = 0f64;
            for e in 0..t.n_experts() {
                if t.in_mask(e)[k] != 0 {
                    s += t.weights[e] * t.values(e)[k] as f64;
                }
            }
            out.values[k] = if total == 0.0 {
                0.0
            } else {
                (s / total) as f32
            };
        }
        Ok(())
    }
}

xpm_plugin_sdk::export!(Mean);
