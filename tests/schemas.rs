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
