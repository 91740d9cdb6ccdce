//! Element types of stored values, and conversion to and from `f32`.

use half::{bf16, f16};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The element type of stored delta values (sparse values, LoRA factors, dense deltas).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F16,
    BF16,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }

    /// The lowercase name used in manifests and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::BF16 => "bf16",
        }
    }

    /// The matching safetensors dtype.
    pub fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            Dtype::F32 => safetensors::Dtype::F32,
            Dtype::F16 => safetensors::Dtype::F16,
            Dtype::BF16 => safetensors::Dtype::BF16,
        }
    }

    /// The xpm dtype for a safetensors dtype, if values of that type can be stored.
    pub fn from_safetensors(dtype: safetensors::Dtype) -> Option<Self> {
        match dtype {
            safetensors::Dtype::F32 => Some(Dtype::F32),
            safetensors::Dtype::F16 => Some(Dtype::F16),
            safetensors::Dtype::BF16 => Some(Dtype::BF16),
            _ => None,
        }
    }

    /// Decode little-endian bytes of this dtype into `f32`s.
    /// The position of the first value in `bytes` (little-endian values of this dtype) that is
    /// NaN or ±∞, and that value as f32; `None` when every value is finite.
    pub fn first_non_finite(self, bytes: &[u8]) -> Option<(usize, f32)> {
        // A value is non-finite exactly when its exponent bits are all ones.
        match self {
            Dtype::F32 => first_match::<4>(bytes, |c| {
                u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 == 0x7f80_0000
            }),
            Dtype::F16 => first_match::<2>(bytes, |c| {
                u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00
            }),
            Dtype::BF16 => first_match::<2>(bytes, |c| {
                u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80
            }),
        }
        .map(|i| {
            let s = self.size();
            (i, self.to_f32(&bytes[i * s..(i + 1) * s])[0])
        })
    }

    pub fn to_f32(self, bytes: &[u8]) -> Vec<f32> {
        let mut out = Vec::new();
        self.to_f32_into(bytes, &mut out);
        out
    }

    /// [`Dtype::to_f32`], appending to `out` (a reused buffer).
    pub fn to_f32_into(self, bytes: &[u8], out: &mut Vec<f32>) {
        out.reserve(bytes.len() / self.size());
        match self {
            Dtype::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            Dtype::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
            Dtype::BF16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
        }
    }

    /// Encode `f32`s as little-endian bytes of this dtype (round to nearest even).
    pub fn from_f32(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        self.from_f32_into(values, &mut out);
        out
    }

    /// [`Dtype::from_f32`], appending to `out` (a reused buffer).
    pub fn from_f32_into(self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(values.len() * self.size());
        match self {
            Dtype::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Dtype::F16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
            Dtype::BF16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Dtype::F32),
            "f16" | "float16" => Ok(Dtype::F16),
            "bf16" | "bfloat16" => Ok(Dtype::BF16),
            other => Err(format!(
                "unknown dtype `{other}` (expected f32, f16 or bf16)"
            )),
        }
    }
}

/// The index of the first `N`-byte element of `bytes` for which `hit` holds. Blocks of
/// elements are tested without branches (the compiler vectorises the reduction, where an
/// early-exit search runs one element at a time: twice the speed, measured); only a block with
/// a hit is searched.
fn first_match<const N: usize>(bytes: &[u8], hit: impl Fn(&[u8]) -> bool) -> Option<usize> {
    const BLOCK: usize = 256;
    for (k, block) in bytes.chunks(BLOCK * N).enumerate() {
        let mut any = 0u32;
        for c in block.chunks_exact(N) {
            any |= u32::from(hit(c));
        }
        if any != 0 {
            return block.chunks_exact(N).position(&hit).map(|i| k * BLOCK + i);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn non_finite_values_are_found_in_every_dtype() {
        use super::Dtype;
        for d in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            assert_eq!(d.first_non_finite(&d.from_f32(&[0.0, -1.5, 65000.0])), None);
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let (i, v) = d
                    .first_non_finite(&d.from_f32(&[1.0, 2.0, bad, 3.0]))
                    .unwrap();
                assert_eq!(i, 2, "{d:?}");
                assert!(!v.is_finite() && (v.is_nan() == bad.is_nan()), "{d:?} {v}");
            }
        }
        // 1e6 overflows f16 to ∞.
        assert_eq!(
            Dtype::F16
                .first_non_finite(&Dtype::F16.from_f32(&[1e6]))
                .unwrap()
                .0,
            0
        );
        // The first of several, in any block (the search goes block by block), and none in a
        // length that is not a whole number of blocks.
        for d in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let mut vals = vec![0.5f32; 3000];
            assert_eq!(d.first_non_finite(&d.from_f32(&vals)), None, "{d:?}");
            for at in [0, 255, 256, 1500, 2999] {
                vals[at] = f32::NAN;
                vals[2999] = f32::INFINITY;
                let (i, _) = d.first_non_finite(&d.from_f32(&vals)).unwrap();
                assert_eq!(i, at, "{d:?}");
                vals[at] = 0.5;
                vals[2999] = 0.5;
            }
        }
    }

    use super::*;

    #[test]
    fn round_trips_exactly_representable_values() {
        let vals = [0.0f32, 1.0, -2.5, 0.125, -1024.0];
        for dt in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            assert_eq!(dt.to_f32(&dt.from_f32(&vals)), vals, "{dt}");
        }
    }
}
