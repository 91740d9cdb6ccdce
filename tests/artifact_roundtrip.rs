//! Property test: any set of valid tensors (random kinds, shapes, densities, dtypes) written to
//! an artifact reads back identically, and verifies.

use proptest::prelude::*;
use xpm::format::manifest::{BaseModel, ExpertKind, Manifest};
use xpm::format::{ArtifactReader, ArtifactWriter, Content, Dtype, TensorData, encode_tensor};

fn dtype() -> impl Strategy<Value = Dtype> {
    prop_oneof![Just(Dtype::F32), Just(Dtype::F16), Just(Dtype::BF16)]
}

fn tensor(i: usize) -> impl Strategy<Value = TensorData> {
    (
        prop::collection::vec(1u64..40, 1..=3),
        dtype(),
        0u8..3,
        0.0f64..=1.0,
        any::<u64>(),
    )
        .prop_map(move |(mut shape, dtype, kind, density, seed)| {
            let mut s = seed | 1;
            let mut rnd = move || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s
            };
            let n: u64 = shape.iter().product();
            // Any bit pattern of a finite value (xpm refuses NaN and ±∞ deltas): random bytes,
            // with the exponent's top bit cleared where all exponent bits came out set.
            let bytes = |count: u64, rnd: &mut dyn FnMut() -> u64| -> Vec<u8> {
                let mut b: Vec<u8> = (0..count * dtype.size() as u64)
                    .map(|_| rnd() as u8)
                    .collect();
                for v in b.chunks_exact_mut(dtype.size()) {
                    if dtype.first_non_finite(v).is_some() {
                        *v.last_mut().unwrap() &= !0x40;
                    }
                }
                b
            };
            let content = match kind {
                0 => {
                    let indices: Vec<u64> = (0..n)
                        .filter(|_| (rnd() % 1000) as f64 / 1000.0 < density)
                        .collect();
                    let values = bytes(indices.len() as u64, &mut rnd);
                    Content::Sparse {
                        indices,
                        values,
                        block_size: None,
                    }
                }
                1 => {
                    shape.truncate(2);
                    if shape.len() < 2 {
                        shape.push(3);
                    }
                    let rank = 1 + (rnd() % 4) as u32;
                    let (o, inp) = (shape[0], shape[1]);
                    Content::Lora {
                        rank,
                        alpha: 8.0,
                        a: bytes(rank as u64 * inp, &mut rnd),
                        b: bytes(o * rank as u64, &mut rnd),
                    }
                }
                _ => Content::Dense {
                    delta: bytes(n, &mut rnd),
                },
            };
            TensorData {
                name: format!("t{i}.weight"),
                shape,
                dtype,
                content,
            }
        })
}

fn tensors() -> impl Strategy<Value = Vec<TensorData>> {
    (1usize..6).prop_flat_map(|n| (0..n).map(tensor).collect::<Vec<_>>())
}

fn manifest() -> Manifest {
    Manifest {
        format_version: String::new(),
        name: "prop".into(),
        version: semver::Version::new(1, 0, 0),
        description: None,
        license: None,
        authors: vec![],
        base: BaseModel {
            id: "b".into(),
            digest: format!("sha256:{}", "0".repeat(64)),
        },
        kind: ExpertKind::Sparse,
        tensors: vec![],
        selection: None,
        training: None,
        provenance: None,
        payload: None,
        extra: Default::default(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn artifacts_round_trip(ts in tensors(), level in 1i32..6) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.xpm");
        let mut w = ArtifactWriter::create(&path, level).unwrap();
        for t in &ts {
            w.push(encode_tensor(t, level).unwrap()).unwrap();
        }
        let written = w.finish(manifest()).unwrap();
        let r = ArtifactReader::open(&path).unwrap();
        prop_assert_eq!(r.manifest(), &written);
        r.verify_file_digest().unwrap();
        for (i, t) in ts.iter().enumerate() {
            prop_assert_eq!(&r.read_tensor(i).unwrap(), t);
        }
        // Only the artifact is left in the directory.
        prop_assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
