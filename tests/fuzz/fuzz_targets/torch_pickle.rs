//! torch.save files (`xpm_interop::torch`, the restricted pickle reader behind `xpm import
//! mttl`). Each input runs three ways:
//!
//! 1. as a whole file: `torch::load` and `torch::load_state_dict` (a torch zip, or anything);
//! 2. as a `data.pkl`: `torch::load_pickle_with`, with storages `"0"`…`"7"` served from a table
//!    (deterministic bytes, up to 4 KiB each; other keys and sizes are refused);
//! 3. the same `data.pkl` inside a well-formed torch zip holding exactly the storages pass 2
//!    asked for, read with `torch::load` (this gets past the zip's CRCs, which a mutated zip
//!    almost never matches).
//!
//! Checked besides "no panic": every tensor produced has `numel × dtype size` bytes; a pickle
//! that reads in pass 2 reads to the same value in pass 3.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use xpm_interop::torch::{self, PyValue};

fn check(v: &PyValue) {
    match v {
        PyValue::Tensor(t) => {
            assert_eq!(
                t.data.len() as u64,
                t.numel() * t.dtype.size() as u64,
                "{t:?}"
            );
            let _ = (t.to_f32(), t.nonzero());
        }
        PyValue::List(items) | PyValue::Tuple(items) => items.iter().for_each(check),
        PyValue::Dict(items) => items.iter().for_each(|(k, v)| {
            check(k);
            check(v);
        }),
        _ => {}
    }
}

fn storage_bytes(key: &str, n: u64) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(37).wrapping_add(key.len() as u8))
        .collect()
}

fuzz_target!(
    init: { xpm_fuzz::maybe_write_seeds(); },
    |data: &[u8]| {
        // 1. The whole file.
        let path = xpm_fuzz::scratch_file("input.pt", data);
        if let Ok(v) = torch::load(&path) {
            check(&v);
            let _ = v.to_json();
        }
        if let Ok(sd) = torch::load_state_dict(&path) {
            for (_, t) in &sd {
                assert_eq!(t.data.len() as u64, t.numel() * t.dtype.size() as u64);
            }
        }

        // 2. A data.pkl with storages from a table.
        let mut asked: Vec<(String, u64)> = Vec::new();
        let mut table = |key: &str, n: u64| -> xpm_core::Result<Vec<u8>> {
            let known = key.len() == 1 && (b'0'..=b'7').contains(&key.as_bytes()[0]);
            if !known || n > 4096 {
                return Err(xpm_core::Error::input(format!("no storage {key} of {n} bytes"), None));
            }
            asked.push((key.to_string(), n));
            Ok(storage_bytes(key, n))
        };
        let direct = torch::load_pickle_with(data, "fuzz", 1 << 20, &mut table);
        if let Ok(v) = &direct {
            check(v);
            let _ = v.to_json();
        }

        // 3. The same pickle in a torch zip with the storages it asked for.
        let zpath = xpm_fuzz::scratch_dir().join("wrapped.pt");
        {
            let mut z = zip::ZipWriter::new(std::fs::File::create(&zpath).unwrap());
            let o = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored);
            z.start_file("archive/data.pkl", o).unwrap();
            z.write_all(data).unwrap();
            z.start_file("archive/byteorder", o).unwrap();
            z.write_all(b"little").unwrap();
            for (key, n) in &asked {
                z.start_file(format!("archive/data/{key}"), o).unwrap();
                z.write_all(&storage_bytes(key, *n)).unwrap();
            }
            z.finish().unwrap();
        }
        let wrapped = torch::load(&zpath);
        if let Ok(v) = &direct {
            let w = wrapped.unwrap_or_else(|e| panic!("reads bare but not in a zip: {e}"));
            assert_eq!(format!("{w:?}"), format!("{v:?}"));
        }
    }
);
