//! Mask decoders (`format::mask::decode`, every `MaskEncoding`) on arbitrary bytes, with the
//! shape and the declared entry count taken from the input (`xpm_fuzz::MaskCase`, at most
//! 2^20 elements). A decode that succeeds must return exactly `nnz` strictly increasing
//! indices below numel, and must survive re-encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xpm_core::format::MaskEncoding;
use xpm_core::format::mask;
use xpm_fuzz::MaskCase;

fuzz_target!(
    init: { xpm_fuzz::maybe_write_seeds(); },
    |data: &[u8]| {
        let Some(c) = MaskCase::parse(data) else { return };
        let n = mask::numel(&c.shape);
        let Ok(indices) = mask::decode(c.encoding, &c.bytes, &c.shape, c.nnz) else { return };
        assert_eq!(indices.len() as u64, c.nnz, "{} decoded a wrong count", c.encoding);
        if let Err(e) = mask::check_indices(&indices, n) {
            panic!("{} decoded invalid indices for shape {:?}: {e}", c.encoding, c.shape);
        }
        // The same encoding writes these indices back, and they decode to the same list.
        // (Exception: the writer never uses block16 for an empty mask, while the reader accepts
        // a tile list of zero tiles; that decodes to the empty list, which is harmless.)
        if c.encoding == MaskEncoding::Block16 && indices.is_empty() {
            return;
        }
        let again = mask::encode(c.encoding, &indices, &c.shape)
            .unwrap_or_else(|e| panic!("{} decoded a mask it cannot encode: {e}", c.encoding));
        assert_eq!(
            mask::decode(c.encoding, &again, &c.shape, c.nnz).as_ref(),
            Ok(&indices),
            "{} does not round-trip", c.encoding
        );
        // Canonical streams are unique for the fixed-layout encodings.
        if matches!(c.encoding, MaskEncoding::Bitmap | MaskEncoding::Full) {
            assert_eq!(again, c.bytes, "{} accepted a non-canonical stream", c.encoding);
        }
        let (best, bytes) = mask::encode_best(&indices, &c.shape);
        assert_eq!(
            mask::decode(best, &bytes, &c.shape, c.nnz).as_ref(),
            Ok(&indices),
            "encode_best ({best}) does not round-trip"
        );
    }
);
