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
        for k in 0..t.support.len() {
            let mut best = 0f64;
            for e in 0..t.n_experts() {
                if t.in_mask(e)[k] != 0 {
                    let v = t.weights[e] * t.values(e)[k] as f64;
                    if v.abs() > best.abs() {
                        best = v;
                    }
                }
            }
            out.values[k] = (self.lambda * best) as f32;
        }
        Ok(())
    }
}

xpm_plugin_sdk::export!(MagMax);
