//! `.xpm` artifacts: `ArtifactReader::open`, `read_tensor` of every tensor, `read_values_part`
//! of every values part (how `xpm export` streams LoRA factors), `verify_file_digest`, and
//! `format::verify::verify`, on the raw input and on the input with its checksums fixed
//! (`xpm_fuzz::fix_digests`), so mutations reach the parsing behind the sha256 checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xpm_core::format::manifest::PartRole;
use xpm_core::format::verify::verify;
use xpm_core::format::{ArtifactReader, Content, Delta};
use xpm_core::printer::Printer;

fn check(bytes: &[u8]) {
    let path = xpm_fuzz::scratch_file("input", bytes);
    let opened = ArtifactReader::open(&path);
    if let Ok(r) = &opened {
        let m = r.manifest();
        for i in 0..m.tensors.len() {
            // Part by part: what comes back has the manifest's size, in finite values.
            let e = &m.tensors[i];
            for p in e.stored.iter().filter(|p| p.role != PartRole::Mask) {
                if let Ok(v) = r.read_values_part(i, p.role) {
                    assert_eq!(v.len() as u64, p.raw_size);
                    assert!(e.dtype.first_non_finite(&v).is_none());
                }
            }
            if let Ok(t) = r.read_tensor(i) {
                // What the reader returns must agree with the manifest that described it.
                let e = &m.tensors[i];
                assert_eq!((&t.name, &t.shape, t.dtype), (&e.name, &e.shape, e.dtype));
                match (&t.content, &e.delta) {
                    (Content::Sparse { indices, .. }, Delta::Sparse { nnz, .. }) => {
                        assert_eq!(indices.len() as u64, *nnz);
                        assert!(indices.windows(2).all(|w| w[0] < w[1]));
                        assert!(indices.last().is_none_or(|&i| i < e.numel()));
                    }
                    (Content::Lora { rank, .. }, Delta::Lora { rank: r2, .. }) => {
                        assert_eq!(rank, r2)
                    }
                    (Content::Dense { .. }, Delta::Dense) => {}
                    (c, d) => panic!("read_tensor returned {c:?} for a {d:?} entry"),
                }
                t.content.recycle();
            }
        }
        let _ = r.verify_file_digest();
    }
    let verified = verify(&path, &Printer::silent());
    // verify() opens the file the same way: it cannot succeed where open failed.
    if verified.is_ok() {
        assert!(opened.is_ok(), "verify accepted a file that open refused");
    }
}

fuzz_target!(
    init: { xpm_fuzz::maybe_write_seeds(); },
    |data: &[u8]| {
        check(data);
        if let Some(fixed) = xpm_fuzz::fix_digests(data) {
            check(&fixed);
        }
    }
);
