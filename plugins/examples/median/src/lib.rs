//! `median`: per support entry, the median of the values of the experts whose mask holds it
//! (the mean of the two middle values for an even count). Weights are not used: a median has
//! no natural weighting, and robustness to one outlying expert is the point.

use xpm_plugin_sdk::{Output, Strategy, Tensor, serde_json};

pub struct Median;

impl Strategy for Median {
    const NAME: &'static str = "median";
    const VERSION: &'static str = "1.0.0";

    fn create(params: serde_json::Value) -> Result<Self, String> {
        match params.as_object() {
            Some(o) if o.is_empty() => Ok(Median),
            _ => Err(format!("median takes no parameters, got {params}")),
        }
    }

    fn merge(&mut self, t: &Tensor<'_>, out: &mut Output<'_>) -> Result<(), String> {
        let groups = t.by_position();
        let mut held = Vec::with_capacity(t.n_experts());
        for k in 0..t.support.len() {
            held.clear();
            held.extend(groups.at(k).map(|(_, v)| v));
            held.sort_by(f32::total_cmp);
            let m = held.len();
            out.values[k] = match m {
                0 => 0.0,
                _ if m % 2 == 1 => held[m / 2],
                _ => ((held[m / 2 - 1] as f64 + held[m / 2] as f64) / 2.0) as f32,
            };
        }
        Ok(())
    }
}

xpm_plugin_sdk::export!(Median);
