//! The registry server's upload validation (registry/src/api.rs, `publish`): the bytes as an
//! upload, then what the handler runs on its blocking thread — `format::verify::verify`,
//! `ArtifactReader::open`, `validate_name`, `IndexLine::for_artifact` and the store's publish
//! (`LocalRegistry::publish`, what `DiskStorage::publish` calls) into a fresh registry. An
//! accepted upload must leave an index that reads back with the line it published. Run on the
//! raw input and with checksums fixed (`xpm_fuzz::fix_digests`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use xpm_core::format::ArtifactReader;
use xpm_core::format::manifest::validate_name;
use xpm_core::format::verify::verify;
use xpm_core::printer::Printer;
use xpm_core::registry::{IndexLine, LocalRegistry};

fn upload(bytes: &[u8]) {
    let root = xpm_fuzz::fresh_dir("registry");
    let reg = LocalRegistry::open_or_init(&root).expect("init a registry");
    let path = root.join("tmp-upload");
    std::fs::write(&path, bytes).unwrap();
    let digest = xpm_core::digest::sha256(bytes);
    if verify(&path, &Printer::silent()).is_err() {
        return;
    }
    let manifest = ArtifactReader::open(&path)
        .expect("open succeeds after verify did")
        .manifest()
        .clone();
    if validate_name(&manifest.name).is_err() {
        return;
    }
    let line = IndexLine::for_artifact(&manifest, &digest, bytes.len() as u64);
    if reg.publish(&path, &line, true).is_err() {
        return;
    }
    let lines = reg
        .read_index(&line.name)
        .unwrap_or_else(|e| panic!("the registry cannot read the index it wrote: {e}"))
        .expect("the index exists after publish");
    assert!(
        lines
            .iter()
            .any(|l| l.vers == line.vers && l.cksum == line.cksum)
    );
    let stored = std::fs::read(reg.blob_path(&line.cksum)).expect("the blob is stored");
    assert_eq!(stored, bytes);
}

fuzz_target!(
    init: { xpm_fuzz::maybe_write_seeds(); },
    |data: &[u8]| {
        upload(data);
        if let Some(fixed) = xpm_fuzz::fix_digests(data) {
            upload(&fixed);
        }
    }
);
