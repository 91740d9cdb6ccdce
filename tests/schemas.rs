//! The committed JSON Schemas in `schemas/` must equal what the Rust types generate.
//! Regenerate with `XPM_BLESS=1 cargo test --test schemas`.

use std::path::Path;

#[test]
fn committed_schemas_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let bless = std::env::var_os("XPM_BLESS").is_some();
    let mut stale = Vec::new();
    for (file, schema) in xpm::schema::all() {
        let path = dir.join(file);
        let want = serde_json::to_string_pretty(&schema).unwrap() + "\n";
        if bless {
            std::fs::write(&path, &want).unwrap();
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(have) if have == want => {}
            _ => stale.push(file),
        }
    }
    assert!(
        stale.is_empty(),
        "schemas/{{{}}} drifted from the Rust types; run `XPM_BLESS=1 cargo test --test schemas` and commit",
        stale.join(",")
    );
}

#[test]
fn a_written_manifest_validates_against_its_schema() {
    // A manifest round-trips through serde, and every property it writes is declared in the
    // schema (a guard against fields added without regenerating the schema).
    let schema = &xpm::schema::all()[0].1;
    let text = schema.to_string();
    for field in [
        "format_version",
        "base",
        "kind",
        "tensors",
        "stored",
        "payload",
        "selection",
        "provenance",
        "raw_size",
        "sha256",
    ] {
        assert!(
            text.contains(&format!("\"{field}\"")),
            "schema lacks `{field}`"
        );
    }
}

#[test]
fn the_committed_experiment_and_its_results_validate() {
    let all = xpm::schema::all();
    let schema = |name: &str| {
        let s = &all.iter().find(|(f, _)| *f == name).unwrap().1;
        jsonschema::validator_for(s).unwrap()
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("docs/results/merge-six.json")).unwrap())
            .unwrap();
    let errors: Vec<String> = schema("experiment-results.schema.json")
        .iter_errors(&results)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    let cfg = xpm::experiment::Config::load(&root.join("experiments/merge-six.toml")).unwrap();
    let cfg = serde_json::to_value(&cfg).unwrap();
    let errors: Vec<String> = schema("experiment.schema.json")
        .iter_errors(&cfg)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    // The results were made from this very file.
    assert_eq!(results["config"], cfg);
}
