//! JSON Schemas of every document xpm writes, generated from the Rust types.
//!
//! The committed copies live in `schemas/`; `tests/schemas.rs` fails when they drift from what
//! these functions generate (run it with `XPM_BLESS=1` to rewrite them).

use schemars::JsonSchema;

/// `(file name in schemas/, schema)` for every published schema.
pub fn all() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        (
            "manifest.schema.json",
            schema::<crate::format::Manifest>("xpm expert manifest"),
        ),
        (
            "inspect.schema.json",
            schema::<crate::ops::inspect::InspectReport>("xpm inspect --json output"),
        ),
        (
            "recipe.schema.json",
            schema::<crate::merge::Recipe>("xpm merge recipe (merge.toml, described as JSON)"),
        ),
        (
            "overlap.schema.json",
            schema::<crate::ops::overlap::OverlapReport>("xpm overlap --json output"),
        ),
        (
            "index-line.schema.json",
            schema::<crate::registry::IndexLine>("xpm registry index line"),
        ),
        (
            "registry-config.schema.json",
            schema::<crate::registry::RegistryConfig>("xpm registry config.json"),
        ),
        (
            "search.schema.json",
            schema::<crate::registry::SearchResults>(
                "xpm registry search response (and xpm search --json)",
            ),
        ),
        (
            "lockfile.schema.json",
            schema::<crate::project::Lockfile>("xpm.lock (TOML, described as JSON)"),
        ),
        (
            "train.schema.json",
            schema::<crate::train::TrainReport>("xpm train --json output"),
        ),
        (
            "eval.schema.json",
            schema::<crate::train::eval::EvalReport>("xpm eval --json output"),
        ),
        (
            "experiment.schema.json",
            schema::<crate::experiment::Config>(
                "xpm experiment file (experiments/*.toml, described as JSON)",
            ),
        ),
        (
            "experiment-results.schema.json",
            schema::<crate::experiment::Results>("xpm experiment results (NAME.json)"),
        ),
        (
            "installed.schema.json",
            schema::<Vec<crate::store::Installed>>("xpm list --json output"),
        ),
    ]
}

fn schema<T: JsonSchema>(title: &str) -> serde_json::Value {
    let mut s = serde_json::to_value(schemars::schema_for!(T)).expect("schema serializes");
    if let Some(obj) = s.as_object_mut() {
        obj.insert("title".into(), title.into());
    }
    s
}
