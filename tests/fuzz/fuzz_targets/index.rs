//! Registry index files (`registry::index::parse_index`) and the other JSON a registry or a
//! store hands the client: `config.json` (`RegistryConfig`), a manifest (`Manifest`), plus the
//! requirement and location strings a project or a lockfile carries.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xpm_core::format::Manifest;
use xpm_core::registry::Location;
use xpm_core::registry::index::{
    IndexLine, RegistryConfig, blob_rel_path, index_rel_path, parse_index, render_index,
    search_hit, search_matches,
};
use xpm_core::resolve::Requirement;

/// Everything but `density` (f64 JSON parsing is not guaranteed to round-trip to the bit).
fn key(l: &IndexLine) -> String {
    let mut l = l.clone();
    l.density = 0.0;
    serde_json::to_string(&l).unwrap()
}

fuzz_target!(
    init: { xpm_fuzz::maybe_write_seeds(); },
    |data: &[u8]| {
        if let Ok(lines) = parse_index(data, "fuzz") {
            for l in &lines {
                // Names and digests were validated at read: they must make paths.
                index_rel_path(&l.name).expect("a validated name has an index path");
                let blob = blob_rel_path(&l.cksum);
                assert!(!blob.contains(".."), "{blob}");
                let _ = (l.id(), l.sha_hex());
                let _ = search_matches(&l.name, &l.name, l.description.as_deref());
            }
            let _ = search_hit(&lines);
            // What the registry writes back, it reads back.
            let again = parse_index(&render_index(&lines), "fuzz").expect("rendered index parses");
            assert_eq!(again.len(), lines.len());
            for (a, b) in again.iter().zip(&lines) {
                assert_eq!(key(a), key(b));
            }
        }
        if let Ok(cfg) = serde_json::from_slice::<RegistryConfig>(data) {
            let _ = cfg.blob_location(&xpm_core::digest::sha256(data));
            let _ = cfg.blob_location("");
        }
        if let Ok(m) = serde_json::from_slice::<Manifest>(data) {
            let _ = m.format();
            let stripped = m.without_storage();
            let json = serde_json::to_vec(&stripped).expect("manifest serializes");
            serde_json::from_slice::<Manifest>(&json).expect("a written manifest reads back");
        }
        if let Ok(s) = std::str::from_utf8(data) {
            if let Ok(r) = Requirement::parse(s) {
                let shown = r.to_string();
                Requirement::parse(&shown).expect("a shown requirement parses");
            }
            if let Ok(loc) = Location::parse(s) {
                // A location is recorded in lockfiles as shown: it must parse back to itself.
                if !matches!(loc, Location::Dir(_)) {
                    assert_eq!(
                        Location::parse(&loc.to_string()).expect("a shown location parses"),
                        loc
                    );
                }
                let _ = loc.resolved_against(std::path::Path::new("/base"));
            }
        }
    }
);
