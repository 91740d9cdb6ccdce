//! Experts as merge inputs: opening a set of experts for merging (same base, agreeing shapes
//! and dtypes) and reading one tensor's delta as an engine [`Input`]. Shared by `xpm merge`,
//! `xpm overlap` and evaluation.

use std::collections::BTreeMap;

use xpm_core::error::{Error, Result};
use xpm_core::format::{ArtifactReader, Content, Dtype};

use crate::engine::Input;
use crate::lora;

/// Experts opened for merging: same base digest, agreeing tensor shapes.
pub struct ExpertSet {
    pub readers: Vec<ArtifactReader>,
    /// Every tensor of any expert, in first-seen order.
    pub names: Vec<String>,
    /// Shape and dtype per tensor.
    pub info: BTreeMap<String, (Vec<u64>, Dtype)>,
}

impl ExpertSet {
    /// Open `paths`; refuse experts on different bases or with disagreeing shapes.
    pub fn open(paths: &[std::path::PathBuf]) -> Result<ExpertSet> {
        let readers: Vec<ArtifactReader> = paths
            .iter()
            .map(ArtifactReader::open)
            .collect::<Result<_>>()?;
        let first = readers[0].manifest();
        for r in &readers[1..] {
            let m = r.manifest();
            if m.base.digest != first.base.digest {
                return Err(Error::input(
                    format!(
                        "`{}` ({}@{}) targets base `{}` ({}), but `{}` ({}@{}) targets `{}` ({})",
                        r.path().display(),
                        m.name,
                        m.version,
                        m.base.id,
                        m.base.digest,
                        readers[0].path().display(),
                        first.name,
                        first.version,
                        first.base.id,
                        first.base.digest
                    ),
                    Some("experts can only be merged when they were made from the same base model"),
                ));
            }
        }
        // The tensor set: every tensor of any expert, in first-seen order; shapes and dtypes must agree.
        let mut names: Vec<String> = Vec::new();
        let mut info: BTreeMap<String, (Vec<u64>, Dtype)> = BTreeMap::new();
        for r in &readers {
            // Task heads (`new` tensors) belong to one task: they are not merged.
            for t in r.manifest().tensors.iter().filter(|t| !t.new) {
                match info.get(&t.name) {
                    None => {
                        names.push(t.name.clone());
                        info.insert(t.name.clone(), (t.shape.clone(), t.dtype));
                    }
                    Some((shape, _)) if *shape != t.shape => {
                        return Err(Error::input(
                            format!(
                                "tensor `{}` is {:?} in `{}` but {:?} in an earlier expert",
                                t.name,
                                t.shape,
                                r.path().display(),
                                shape
                            ),
                            Some(
                                "experts of one base model have the same tensor shapes; is one of them corrupt or for another model?",
                            ),
                        ));
                    }
                    Some((_, dtype)) if *dtype != t.dtype => {
                        return Err(Error::input(
                            format!(
                                "tensor `{}` is stored as {} in `{}` but as {} in an earlier expert",
                                t.name,
                                t.dtype.as_str(),
                                r.path().display(),
                                dtype.as_str()
                            ),
                            Some(
                                "merge experts stored in one dtype (re-extract with `--values-dtype`, or pack them alike)",
                            ),
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(ExpertSet {
            readers,
            names,
            info,
        })
    }
}

/// One expert's delta for a tensor as an engine input; `true` when it is not sparse.
pub fn load_input(r: &ArtifactReader, name: &str) -> Result<(Input, bool)> {
    let Some(i) = r.manifest().tensors.iter().position(|t| t.name == name) else {
        return Ok((Input::Absent, false));
    };
    let input = load_input_at(r, i)?;
    let dense = !matches!(input, Input::Sparse { .. });
    Ok((input, dense))
}

/// Tensor `i` of `r` as an engine input (LoRA densified to (α / r) · B · A).
pub fn load_input_at(r: &ArtifactReader, i: usize) -> Result<Input> {
    let t = r.read_tensor(i)?;
    Ok(match t.content {
        Content::Sparse {
            indices, values, ..
        } => Input::Sparse {
            indices,
            values: to_f32_pooled(t.dtype, values),
        },
        Content::Dense { delta } => Input::Dense {
            values: to_f32_pooled(t.dtype, delta),
        },
        Content::Lora { rank, alpha, a, b } => {
            // ΔW = (α / r) · B · A, formed densely (the caller reports it to the user).
            let (out, inp) = (t.shape[0] as usize, t.shape[1] as usize);
            let (a, b) = (t.dtype.to_f32(&a), t.dtype.to_f32(&b));
            Input::Dense {
                values: lora::dense_f32(rank as usize, alpha, &a, &b, out, inp),
            }
        }
    })
}

/// `bytes` as f32s, in a buffer from [`xpm_core::pool`] (the engine gives it back); `bytes`
/// goes back to the pool at once.
fn to_f32_pooled(dtype: Dtype, bytes: Vec<u8>) -> Vec<f32> {
    let mut out = xpm_core::pool::take(bytes.len() / dtype.size());
    dtype.to_f32_into(&bytes, &mut out);
    xpm_core::pool::give(bytes);
    out
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use xpm_core::format::manifest::{BaseModel, ExpertKind, Manifest};
    use xpm_core::format::{ArtifactWriter, Content, Dtype, TensorData, encode_tensor};

    use super::{ExpertSet, Input, load_input};

    fn write(dir: &Path, name: &str, base: &str, tensors: Vec<TensorData>) -> PathBuf {
        let path = dir.join(format!("{name}.xpm"));
        let mut w = ArtifactWriter::create(&path, 1).unwrap();
        let kind = match tensors[0].content {
            Content::Sparse { .. } => ExpertKind::Sparse,
            Content::Dense { .. } => ExpertKind::Dense,
            Content::Lora { .. } => ExpertKind::Lora,
        };
        for t in &tensors {
            w.push(encode_tensor(t, 1).unwrap()).unwrap();
        }
        let base = BaseModel {
            id: base.into(),
            digest: xpm_core::digest::sha256(base.as_bytes()),
        };
        w.finish(Manifest::new(name, "1.0.0".parse().unwrap(), base, kind))
            .unwrap();
        path
    }

    fn sparse(name: &str, shape: Vec<u64>, indices: Vec<u64>, values: &[f32]) -> TensorData {
        TensorData {
            name: name.into(),
            shape,
            dtype: Dtype::F32,
            content: Content::Sparse {
                indices,
                values: Dtype::F32.from_f32(values),
                block_size: None,
            },
        }
    }

    #[test]
    fn an_expert_set_takes_the_union_of_tensors_in_first_seen_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(
            dir.path(),
            "a",
            "base",
            vec![sparse("w1", vec![2, 2], vec![0], &[1.0])],
        );
        let b = write(
            dir.path(),
            "b",
            "base",
            vec![
                sparse("w2", vec![3], vec![2], &[2.0]),
                sparse("w1", vec![2, 2], vec![3], &[-1.0]),
            ],
        );
        let set = ExpertSet::open(&[a, b]).unwrap();
        assert_eq!(set.names, ["w1", "w2"]);
        assert_eq!(set.info["w2"].0, [3]);
        // `w2` is absent from the first expert: an absent input, not an error.
        let (input, dense) = load_input(&set.readers[0], "w2").unwrap();
        assert!(matches!(input, Input::Absent) && !dense);
        let (input, dense) = load_input(&set.readers[1], "w1").unwrap();
        match input {
            Input::Sparse { indices, values } => {
                assert_eq!((indices, values), (vec![3], vec![-1.0]));
            }
            _ => panic!("a sparse tensor loads as a sparse input"),
        }
        assert!(!dense);
    }

    #[test]
    fn an_expert_set_refuses_other_bases_and_disagreeing_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(
            dir.path(),
            "a",
            "base",
            vec![sparse("w", vec![4], vec![0], &[1.0])],
        );
        let other = write(
            dir.path(),
            "o",
            "other",
            vec![sparse("w", vec![4], vec![0], &[1.0])],
        );
        let e = ExpertSet::open(&[a.clone(), other])
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("targets base `other`") && e.contains("`base`"),
            "{e}"
        );
        let wide = write(
            dir.path(),
            "w",
            "base",
            vec![sparse("w", vec![5], vec![0], &[1.0])],
        );
        let e = ExpertSet::open(&[a, wide]).err().unwrap().to_string();
        assert!(e.contains("tensor `w` is [5]"), "{e}");
    }

    #[test]
    fn a_lora_tensor_loads_as_its_dense_product() {
        let dir = tempfile::tempdir().unwrap();
        // A: 1 × 3, B: 2 × 1, α = 2, r = 1: ΔW = 2 · B · A.
        let t = TensorData {
            name: "w".into(),
            shape: vec![2, 3],
            dtype: Dtype::F32,
            content: Content::Lora {
                rank: 1,
                alpha: 2.0,
                a: Dtype::F32.from_f32(&[1.0, 2.0, 3.0]),
                b: Dtype::F32.from_f32(&[1.0, -0.5]),
            },
        };
        let p = write(dir.path(), "l", "base", vec![t]);
        let set = ExpertSet::open(&[p]).unwrap();
        let (input, dense) = load_input(&set.readers[0], "w").unwrap();
        match input {
            Input::Dense { values } => assert_eq!(values, [2.0, 4.0, 6.0, -1.0, -2.0, -3.0]),
            _ => panic!("a LoRA tensor loads densely"),
        }
        assert!(dense);
    }
}
