//! Merge recipes (`merge.toml`): `xpm_merge::recipe::Recipe::read`, then `plan`, per-tensor
//! lookups, `to_toml` (a merge embeds the recipe in its result) and `params_json`. A recipe
//! that reads must write back to TOML that reads to the same recipe.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xpm_merge::recipe::Recipe;

fuzz_target!(
    init: { xpm_fuzz::maybe_write_seeds(); },
    |data: &[u8]| {
        let path = xpm_fuzz::scratch_file("merge.toml", data);
        let Ok(r) = Recipe::read(&path) else { return };
        if let Ok(plan) = r.plan() {
            for name in ["layer.0.attn.query.weight", "", "a.b"] {
                let _ = plan.for_tensor(name);
            }
            for o in &r.overrides {
                let _ = plan.for_tensor(&o.tensors);
            }
        }
        let _ = r.params_json();
        let text = r.to_toml();
        let path = xpm_fuzz::scratch_file("merge-again.toml", text.as_bytes());
        let again = Recipe::read(&path)
            .unwrap_or_else(|e| panic!("a written recipe does not read back: {e}\n{text}"));
        // Debug, not PartialEq: NaN weights are legal TOML and never equal themselves.
        assert_eq!(format!("{again:?}"), format!("{r:?}"), "the recipe does not round-trip");
        if let Ok(s) = std::str::from_utf8(data) {
            let _ = xpm_merge::recipe::parse_override(s);
        }
    }
);
