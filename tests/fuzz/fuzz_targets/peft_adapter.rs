//! PEFT adapter directories (`xpm_interop::peft::import`, behind `xpm import peft`): an
//! `adapter_config.json` and an `adapter_model.safetensors` written by someone else, imported
//! against a fixed tiny base (`layer.0.q` weight [4, 6] and bias [4], `emb.weight` [8, 4],
//! `norm.weight` [6]).
//!
//! Input layout: the config's bytes, one 0x00 byte, then the safetensors file's bytes (an
//! input without 0x00 is a config alone, with an empty weights file). Besides "no panic": every
//! imported tensor passes `TensorData::validate` and names a base tensor unless it is new, and
//! its shape is the base's; a LoRA tensor that the writer encodes straight from the mapped
//! file (`Pending::encode`) encodes exactly as its materialised copy does, or both are refused.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use xpm_core::checkpoint::Checkpoint;

static BASE: OnceLock<Checkpoint> = OnceLock::new();

fn base() -> &'static Checkpoint {
    BASE.get_or_init(|| {
        let specs: [(&str, Vec<usize>); 4] = [
            ("layer.0.q.weight", vec![4, 6]),
            ("layer.0.q.bias", vec![4]),
            ("emb.weight", vec![8, 4]),
            ("norm.weight", vec![6]),
        ];
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = specs
            .iter()
            .map(|(n, s)| {
                let len: usize = s.iter().product();
                let bytes = (0..len)
                    .flat_map(|i| (i as f32 * 0.01).to_le_bytes())
                    .collect();
                (n.to_string(), s.clone(), bytes)
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = data
            .iter()
            .map(|(n, s, b)| {
                let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .expect("a valid view");
                (n.clone(), v)
            })
            .collect();
        let dir = xpm_fuzz::fresh_dir("peft-base");
        let path = dir.join("model.safetensors");
        safetensors::serialize_to_file(views, None, &path).expect("write the base");
        Checkpoint::open(&path).expect("open the base")
    })
}

fuzz_target!(
    init: { xpm_fuzz::maybe_write_seeds(); },
    |data: &[u8]| {
        let (config, weights) = match data.iter().position(|&b| b == 0) {
            Some(i) => (&data[..i], &data[i + 1..]),
            None => (data, &[][..]),
        };
        let dir = xpm_fuzz::scratch_dir().join("adapter");
        let _ = std::fs::create_dir_all(&dir);
        std::fs::write(dir.join("adapter_config.json"), config).expect("write");
        std::fs::write(dir.join("adapter_model.safetensors"), weights).expect("write");
        let base = base();
        if let Ok(mut imported) = xpm_interop::peft::import(&dir, base) {
            for p in &imported.tensors {
                // Every tensor that passed the checks materialises, under its planned name.
                let t = p.materialize().expect("a checked tensor materialises");
                if p.kind == xpm_interop::PendingKind::Lora {
                    // LoRA factors are made on demand, so the writer's path can run too.
                    let direct = p.encode(1).map(|e| format!("{e:?}"));
                    let copied = xpm_core::format::encode_tensor(&t.data, 1).map(|e| format!("{e:?}"));
                    assert_eq!(direct.ok(), copied.ok(), "{}", p.name);
                }
                assert_eq!(t.data.name, p.name);
                assert_eq!(t.new, p.new);
                t.data.validate().expect("an imported tensor is consistent");
                if !t.new {
                    let info = base.info(&t.data.name).expect("names a base tensor");
                    let shape: Vec<u64> = info.shape.iter().map(|&d| d as u64).collect();
                    assert_eq!(shape, t.data.shape, "{}", t.data.name);
                }
            }
            // The weights file's digest (hashed on a thread of its own) before the next input
            // overwrites the file.
            let _ = imported.finish_source();
        }
    }
);
