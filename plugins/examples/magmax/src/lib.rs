//! `magmax`: per support entry, keep the weighted delta w·δ of largest magnitude among the
//! experts holding it (ties go to the earlier expert), scaled by `lambda`.

use xpm_plugin_sdk::{Output, Strategy, Tensor, serde_json};

pub struct MagMax {
    lambda: f64,
}

impl Strategy for MagMax {
    const NAME: &'static str = "magmax";
    const VERSION: &'static str = "1.0.0";
    const PARAMS_SCHEMA: &'static str = r#"{
  "type": "object",
  "properties": { "lambda": { "type": "number", "description": "scale of the merged delta", "default": 1.0 } },
  "additionalProperties": false
}"#;

    fn create(params: serde_json::Value) -> Result<Self, String> {
        let lambda = params.get("lambda").and_then(|v| v.as_f64()).unwrap_or(1.0);
        Ok(MagMax { lambda })
    }

    fn merge(&mut self, t: &Tensor<'_>, out: &mut Output<'_>) -> Result<(), String> {
        // Expert by expert over its own entries; a later expert replaces the best only when
        // strictly larger, so ties go to the earlier expert.
        let mut best = vec![0f64; t.support.len()];
        for e in 0..t.n_experts() {
            let w = t.weights[e];
            let (slots, values) = t.entries(e);
            for (&k, &v) in slots.iter().zip(values) {
                let x = w * v as f64;
                if x.abs() > best[k as usize].abs() {
                    best[k as usize] = x;
                }
            }
        }
        for (o, b) in out.values.iter_mut().zip(best) {
            *o = (self.lambda * b) as f32;
        }
        Ok(())
    }
}

xpm_plugin_sdk::export!(MagMax);
