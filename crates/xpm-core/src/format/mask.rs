//! Mask codecs: how the sorted flat indices of a sparse tensor are stored.
//!
//! The packer computes the exact size of every applicable encoding and keeps the smallest
//! ([`encode_best`]). All encodings describe the same thing — a strictly increasing list of flat
//! (row-major) indices into a tensor of `n` elements — and decode to it exactly. Byte layouts are
//! specified in `docs/format.md`.
//!
//! Golomb–Rice coding of the gaps is within a few percent of the entropy bound `n·H(d)` for the
//! near-geometric gaps that top-k selection produces, which is why it is the workhorse; bitmaps win
//! above roughly 15 % density and tile lists when the mask is block-structured.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Side of the square tiles used by [`MaskEncoding::Block16`].
pub const BLOCK: u64 = 16;

/// How a tensor's mask (its sorted flat indices) is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MaskEncoding {
    /// Golomb–Rice coded gaps between successive indices: one byte `k`, then the bit stream.
    DeltaRice,
    /// One bit per element, least significant bit first.
    Bitmap,
    /// The mask is a union of 16×16 tiles of a 2-D tensor (clipped at the edges): a LEB128 tile
    /// count, then the Rice-coded gaps between sorted tile ids.
    Block16,
    /// Every element is in the mask; no bytes are stored.
    Full,
}

impl MaskEncoding {
    /// Name as written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            MaskEncoding::DeltaRice => "delta-rice",
            MaskEncoding::Bitmap => "bitmap",
            MaskEncoding::Block16 => "block16",
            MaskEncoding::Full => "full",
        }
    }
}

impl std::fmt::Display for MaskEncoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A mask that cannot be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaskError {
    #[error("index {index} (entry {pos}) is out of range for a tensor of {n} elements")]
    OutOfRange { pos: usize, index: u64, n: u64 },
    #[error("indices are not sorted: entry {pos} is {index} after {prev}")]
    Unsorted { pos: usize, prev: u64, index: u64 },
    #[error("index {index} appears twice (entry {pos})")]
    Duplicate { pos: usize, index: u64 },
    #[error("encoding `{encoding}` does not apply: {why}")]
    NotApplicable {
        encoding: MaskEncoding,
        why: &'static str,
    },
    #[error("malformed `{encoding}` mask: {why}")]
    Malformed { encoding: MaskEncoding, why: String },
}

fn malformed(encoding: MaskEncoding, why: impl Into<String>) -> MaskError {
    MaskError::Malformed {
        encoding,
        why: why.into(),
    }
}

/// Check that `indices` are strictly increasing and below `n`.
pub fn check_indices(indices: &[u64], n: u64) -> Result<(), MaskError> {
    let mut prev: Option<u64> = None;
    for (pos, &index) in indices.iter().enumerate() {
        if let Some(p) = prev {
            if index == p {
                return Err(MaskError::Duplicate { pos, index });
            }
            if index < p {
                return Err(MaskError::Unsorted {
                    pos,
                    prev: p,
                    index,
                });
            }
        }
        if index >= n {
            return Err(MaskError::OutOfRange { pos, index, n });
        }
        prev = Some(index);
    }
    Ok(())
}

/// Encode with the smallest applicable encoding. `indices` must pass [`check_indices`].
pub fn encode_best(indices: &[u64], shape: &[u64]) -> (MaskEncoding, Vec<u8>) {
    let n = numel(shape);
    if indices.len() as u64 == n {
        return (MaskEncoding::Full, Vec::new());
    }
    let (rice_k, rice_bits) = rice_plan(gaps(indices));
    let mut best = (MaskEncoding::DeltaRice, 1 + rice_bits.div_ceil(8));
    let bitmap_bytes = n.div_ceil(8);
    if bitmap_bytes < best.1 {
        best = (MaskEncoding::Bitmap, bitmap_bytes);
    }
    let tiles = tile_ids(indices, shape);
    if let Some(tiles) = &tiles {
        let (_, bits) = rice_plan(gaps(tiles));
        let bytes = leb128_len(tiles.len() as u64) + 1 + bits.div_ceil(8);
        if bytes < best.1 {
            best = (MaskEncoding::Block16, bytes);
        }
    }
    let bytes = match best.0 {
        MaskEncoding::DeltaRice => rice_encode(indices, rice_k),
        MaskEncoding::Bitmap => bitmap_encode(indices, n),
        MaskEncoding::Block16 => {
            let tiles = tiles.expect("tile list exists when block16 was chosen");
            block_encode(&tiles)
        }
        MaskEncoding::Full => unreachable!("handled above"),
    };
    (best.0, bytes)
}

/// Encode with a given encoding; fails if the encoding does not apply to this mask.
pub fn encode(
    encoding: MaskEncoding,
    indices: &[u64],
    shape: &[u64],
) -> Result<Vec<u8>, MaskError> {
    let n = numel(shape);
    match encoding {
        MaskEncoding::DeltaRice => Ok(rice_encode(indices, rice_plan(gaps(indices)).0)),
        MaskEncoding::Bitmap => Ok(bitmap_encode(indices, n)),
        MaskEncoding::Block16 => match tile_ids(indices, shape) {
            Some(tiles) => Ok(block_encode(&tiles)),
            None => Err(MaskError::NotApplicable {
                encoding,
                why: "the mask is not a union of 16×16 tiles of a 2-D tensor",
            }),
        },
        MaskEncoding::Full if indices.len() as u64 == n => Ok(Vec::new()),
        MaskEncoding::Full => Err(MaskError::NotApplicable {
            encoding,
            why: "the mask does not hold every element",
        }),
    }
}

/// Decode `bytes` into exactly `nnz` sorted indices of a tensor with `shape`.
///
/// Never allocates more than `nnz` indices, and rejects every malformed input (wrong count,
/// indices out of range, trailing bits) with [`MaskError::Malformed`].
pub fn decode(
    encoding: MaskEncoding,
    bytes: &[u8],
    shape: &[u64],
    nnz: u64,
) -> Result<Vec<u64>, MaskError> {
    let n = numel(shape);
    if nnz > n {
        return Err(malformed(
            encoding,
            format!("{nnz} entries declared for a tensor of {n} elements"),
        ));
    }
    match encoding {
        MaskEncoding::DeltaRice => rice_decode(bytes, n, nnz),
        MaskEncoding::Bitmap => bitmap_decode(bytes, n, nnz),
        MaskEncoding::Block16 => block_decode(bytes, shape, nnz),
        MaskEncoding::Full => {
            if !bytes.is_empty() {
                return Err(malformed(encoding, "a full mask stores no bytes"));
            }
            if nnz != n {
                return Err(malformed(
                    encoding,
                    format!("a full mask has {n} entries, {nnz} declared"),
                ));
            }
            Ok((0..n).collect())
        }
    }
}

/// The largest number of elements a tensor may have, for writers and readers alike (2^56: flat
/// indices, byte sizes and their sums stay far from u64 overflow).
pub const MAX_NUMEL: u64 = 1 << 56;

/// Number of elements of a shape (1 for a scalar), or `None` when the product overflows or
/// exceeds [`MAX_NUMEL`].
pub fn checked_numel(shape: &[u64]) -> Option<u64> {
    shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= MAX_NUMEL)
}

/// Number of elements of a shape (1 for a scalar); saturates for shapes that
/// [`checked_numel`] refuses (every reader and writer checks that first).
pub fn numel(shape: &[u64]) -> u64 {
    checked_numel(shape).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Golomb–Rice coded gaps.

/// Gaps between successive indices, each minus one (the first is the first index itself).
fn gaps(indices: &[u64]) -> impl Iterator<Item = u64> + Clone + '_ {
    let mut prev: Option<u64> = None;
    indices.iter().map(move |&i| {
        let g = match prev {
            None => i,
            Some(p) => i - p - 1,
        };
        prev = Some(i);
        g
    })
}

/// The Rice parameter with the fewest bits, and that bit count.
fn rice_plan(gaps: impl Iterator<Item = u64> + Clone) -> (u8, u64) {
    let (count, sum) = gaps
        .clone()
        .fold((0u64, 0u128), |(c, s), g| (c + 1, s + g as u128));
    if count == 0 {
        return (0, 0);
    }
    let mean = (sum / count as u128) as f64;
    // Near-optimal for geometric gaps: 2^k ≈ mean · ln 2; refine exactly around it.
    let guess = if mean * std::f64::consts::LN_2 >= 1.0 {
        (mean * std::f64::consts::LN_2).log2().floor() as i32
    } else {
        0
    };
    // One pass for the three candidate parameters around the guess.
    let ks: Vec<u32> = (guess - 1..=guess + 1)
        .filter(|k| (0..=56).contains(k))
        .map(|k| k as u32)
        .collect();
    let mut quotients = [0u64; 3];
    for g in gaps {
        for (q, &k) in quotients.iter_mut().zip(&ks) {
            *q += g >> k;
        }
    }
    ks.iter()
        .zip(quotients)
        .map(|(&k, q)| (k as u8, q + count * (k as u64 + 1)))
        .min_by_key(|&(k, bits)| (bits, k))
        .expect("at least one candidate")
}

fn rice_encode(indices: &[u64], k: u8) -> Vec<u8> {
    let mut w = BitWriter::with_capacity(indices.len() * (k as usize + 2) / 8 + 2);
    w.out.push(k);
    rice_write(&mut w, gaps(indices), k);
    w.finish()
}

fn rice_write(w: &mut BitWriter, gaps: impl Iterator<Item = u64>, k: u8) {
    let mask = if k == 0 { 0 } else { u64::MAX >> (64 - k) };
    for g in gaps {
        w.put_unary(g >> k);
        if k > 0 {
            w.put(g & mask, k as u32);
        }
    }
}

fn rice_decode(bytes: &[u8], n: u64, nnz: u64) -> Result<Vec<u64>, MaskError> {
    let enc = MaskEncoding::DeltaRice;
    let (&k, stream) = bytes
        .split_first()
        .ok_or_else(|| malformed(enc, "empty stream (missing the Rice parameter byte)"))?;
    if k > 56 {
        return Err(malformed(enc, format!("Rice parameter {k} is above 56")));
    }
    let mut r = BitReader::new(stream);
    let mut out = crate::pool::take(nnz as usize);
    let mut next = 0u64; // smallest value the next index may take
    for _ in 0..nnz {
        let g = r
            .rice(k as u32)
            .ok_or_else(|| malformed(enc, format!("stream ends after {} indices", out.len())))?;
        let index = next.checked_add(g).filter(|&i| i < n).ok_or_else(|| {
            malformed(
                enc,
                format!("index out of range after {} indices", out.len()),
            )
        })?;
        out.push(index);
        next = index + 1;
    }
    r.finish().map_err(|why| malformed(enc, why))?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Bitmap.

fn bitmap_encode(indices: &[u64], n: u64) -> Vec<u8> {
    let mut out = vec![0u8; n.div_ceil(8) as usize];
    for &i in indices {
        out[(i / 8) as usize] |= 1 << (i % 8);
    }
    out
}

fn bitmap_decode(bytes: &[u8], n: u64, nnz: u64) -> Result<Vec<u64>, MaskError> {
    let enc = MaskEncoding::Bitmap;
    if bytes.len() as u64 != n.div_ceil(8) {
        return Err(malformed(
            enc,
            format!(
                "{} bytes for {n} elements (expected {})",
                bytes.len(),
                n.div_ceil(8)
            ),
        ));
    }
    if !n.is_multiple_of(8) {
        let last = *bytes.last().expect("n > 0 when n % 8 != 0");
        if last >> (n % 8) != 0 {
            return Err(malformed(enc, "bits set past the end of the tensor"));
        }
    }
    let mut out = crate::pool::take(nnz as usize);
    for (chunk_no, chunk) in bytes.chunks(8).enumerate() {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        let mut w = u64::from_le_bytes(word);
        while w != 0 {
            if out.len() as u64 == nnz {
                return Err(malformed(
                    enc,
                    format!("more than the {nnz} declared entries"),
                ));
            }
            out.push(chunk_no as u64 * 64 + w.trailing_zeros() as u64);
            w &= w - 1;
        }
    }
    if out.len() as u64 != nnz {
        return Err(malformed(
            enc,
            format!("{} entries, {nnz} declared", out.len()),
        ));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// 16×16 tile lists.

/// Rows and columns of a 2-D shape, and tiles per row.
fn tile_grid(shape: &[u64]) -> Option<(u64, u64, u64)> {
    match shape {
        [rows, cols] if *rows > 0 && *cols > 0 => Some((*rows, *cols, cols.div_ceil(BLOCK))),
        _ => None,
    }
}

/// Number of elements of tile `t` (edge tiles are clipped).
fn tile_area(t: u64, rows: u64, cols: u64, per_row: u64) -> u64 {
    let (tr, tc) = (t / per_row, t % per_row);
    let h = BLOCK.min(rows - tr * BLOCK);
    let w = BLOCK.min(cols - tc * BLOCK);
    h * w
}

/// Sorted tile ids if the mask is exactly a union of tiles.
fn tile_ids(indices: &[u64], shape: &[u64]) -> Option<Vec<u64>> {
    let (rows, cols, per_row) = tile_grid(shape)?;
    if indices.is_empty() || !runs_fit_tiles(indices, cols) {
        return None;
    }
    let mut tiles: Vec<u64> = indices
        .iter()
        .map(|&i| (i / cols / BLOCK) * per_row + (i % cols) / BLOCK)
        .collect();
    tiles.sort_unstable();
    tiles.dedup();
    let covered: u64 = tiles
        .iter()
        .map(|&t| tile_area(t, rows, cols, per_row))
        .sum();
    // Indices are distinct and each lies in one of the tiles, so equal counts mean equal sets.
    (covered == indices.len() as u64).then_some(tiles)
}

/// A cheap necessary condition for a union of tiles, so unstructured masks are rejected after
/// looking at a handful of indices: within each row, every run of consecutive indices starts on
/// a tile boundary and ends on one (or at the end of the row).
fn runs_fit_tiles(indices: &[u64], cols: u64) -> bool {
    let mut start = 0;
    while start < indices.len() {
        let first = indices[start];
        let (row, col) = (first / cols, first % cols);
        if !col.is_multiple_of(BLOCK) {
            return false;
        }
        let mut end = start + 1;
        while end < indices.len()
            && indices[end] == indices[end - 1] + 1
            && indices[end] / cols == row
        {
            end += 1;
        }
        let last_col = col + (end - start) as u64 - 1;
        if !(last_col + 1).is_multiple_of(BLOCK) && last_col + 1 != cols {
            return false;
        }
        start = end;
    }
    true
}

fn block_encode(tiles: &[u64]) -> Vec<u8> {
    let (k, _) = rice_plan(gaps(tiles));
    let mut w = BitWriter::with_capacity(tiles.len() * (k as usize + 2) / 8 + 12);
    leb128_write(&mut w.out, tiles.len() as u64);
    w.out.push(k);
    rice_write(&mut w, gaps(tiles), k);
    w.finish()
}

fn block_decode(bytes: &[u8], shape: &[u64], nnz: u64) -> Result<Vec<u64>, MaskError> {
    let enc = MaskEncoding::Block16;
    let (rows, cols, per_row) =
        tile_grid(shape).ok_or_else(|| malformed(enc, "tile lists need a non-empty 2-D tensor"))?;
    let n_tiles = rows.div_ceil(BLOCK) * per_row;
    let (count, used) = leb128_read(bytes).ok_or_else(|| malformed(enc, "bad tile count"))?;
    if count > n_tiles {
        return Err(malformed(
            enc,
            format!("{count} tiles, the tensor has {n_tiles}"),
        ));
    }
    let tiles = rice_decode(&bytes[used..], n_tiles, count)
        .map_err(|e| malformed(enc, format!("tile list: {e}")))?;
    let covered: u64 = tiles
        .iter()
        .map(|&t| tile_area(t, rows, cols, per_row))
        .sum();
    if covered != nnz {
        return Err(malformed(
            enc,
            format!("the tiles cover {covered} entries, {nnz} declared"),
        ));
    }
    let mut out = crate::pool::take(nnz as usize);
    let mut start = 0;
    while start < tiles.len() {
        // All tiles of one tile row, in column order.
        let tr = tiles[start] / per_row;
        let end = start + tiles[start..].partition_point(|&t| t / per_row == tr);
        let group = &tiles[start..end];
        for r in tr * BLOCK..(tr * BLOCK + BLOCK).min(rows) {
            for &t in group {
                let c0 = (t % per_row) * BLOCK;
                out.extend((c0..(c0 + BLOCK).min(cols)).map(|c| r * cols + c));
            }
        }
        start = end;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Bit I/O (least significant bit first) and LEB128.

struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    bits: u32,
}

impl BitWriter {
    fn with_capacity(bytes: usize) -> Self {
        BitWriter {
            out: Vec::with_capacity(bytes),
            acc: 0,
            bits: 0,
        }
    }

    /// Append the low `n` bits of `value` (n ≤ 64).
    fn put(&mut self, value: u64, n: u32) {
        if n > 32 {
            self.put(value & 0xffff_ffff, 32);
            self.put(value >> 32, n - 32);
            return;
        }
        self.acc |= value << self.bits;
        self.bits += n;
        if self.bits >= 32 {
            self.out.extend_from_slice(&(self.acc as u32).to_le_bytes());
            self.acc >>= 32;
            self.bits -= 32;
        }
    }

    /// `q` zero bits, then a one bit.
    fn put_unary(&mut self, mut q: u64) {
        while q >= 31 {
            self.put(0, 31);
            q -= 31;
        }
        self.put(1 << q, q as u32 + 1);
    }

    fn finish(mut self) -> Vec<u8> {
        while self.bits > 0 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.bits = self.bits.saturating_sub(8);
        }
        self.out
    }
}

struct BitReader<'a> {
    bytes: &'a [u8],
    pos: u64, // in bits
}

impl<'a> BitReader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        BitReader { bytes, pos: 0 }
    }

    fn len_bits(&self) -> u64 {
        self.bytes.len() as u64 * 8
    }

    /// 64 bits starting at `pos` (zeros past the end); at least 57 of them are real bits.
    #[inline]
    fn peek(&self) -> u64 {
        let byte = (self.pos / 8) as usize;
        let word = if byte + 8 <= self.bytes.len() {
            u64::from_le_bytes(self.bytes[byte..byte + 8].try_into().expect("8 bytes"))
        } else {
            let mut buf = [0u8; 8];
            let tail = self.bytes.get(byte..).unwrap_or(&[]);
            buf[..tail.len()].copy_from_slice(tail);
            u64::from_le_bytes(buf)
        };
        word >> (self.pos % 8)
    }

    /// One Rice-coded value, or `None` if the stream ends first.
    #[inline]
    fn rice(&mut self, k: u32) -> Option<u64> {
        let mut q = 0u64;
        loop {
            let w = self.peek();
            if w != 0 {
                let tz = w.trailing_zeros() as u64;
                // tz < 57 always holds here because at least 57 real bits were peeked.
                q += tz;
                self.pos += tz + 1;
                break;
            }
            q += 56;
            self.pos += 56;
            if self.pos >= self.len_bits() {
                return None;
            }
        }
        if self.pos > self.len_bits() {
            return None;
        }
        let low = if k == 0 {
            0
        } else {
            let v = self.peek() & (u64::MAX >> (64 - k));
            self.pos += k as u64;
            v
        };
        if self.pos > self.len_bits() {
            return None;
        }
        q.checked_shl(k).filter(|v| v >> k == q).map(|v| v | low)
    }

    /// Check that only zero padding (< 8 bits) is left.
    fn finish(&self) -> Result<(), String> {
        let total = self.len_bits();
        if total - self.pos >= 8 {
            return Err(format!(
                "{} unused bytes after the last index",
                (total - self.pos) / 8
            ));
        }
        if self.peek() != 0 {
            return Err("non-zero padding bits after the last index".into());
        }
        Ok(())
    }
}

fn leb128_len(mut v: u64) -> u64 {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn leb128_write(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn leb128_read(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        v |= ((b & 0x7f) as u64).checked_shl(7 * i as u32)?;
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all_encodings() -> [MaskEncoding; 4] {
        [
            MaskEncoding::DeltaRice,
            MaskEncoding::Bitmap,
            MaskEncoding::Block16,
            MaskEncoding::Full,
        ]
    }

    /// A random shape of rank 1–3 and a random sorted subset of its indices.
    fn shape_and_mask() -> impl Strategy<Value = (Vec<u64>, Vec<u64>)> {
        (
            prop::collection::vec(1u64..70, 1..=3),
            0.0f64..=1.0,
            any::<u64>(),
        )
            .prop_map(|(shape, density, seed)| {
                let n = numel(&shape);
                let mut state = seed | 1;
                let indices = (0..n)
                    .filter(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        (state % 10_000) as f64 / 10_000.0 < density
                    })
                    .collect();
                (shape, indices)
            })
    }

    proptest! {
        #[test]
        fn every_applicable_encoding_round_trips((shape, indices) in shape_and_mask()) {
            for enc in all_encodings() {
                if let Ok(bytes) = encode(enc, &indices, &shape) {
                    let back = decode(enc, &bytes, &shape, indices.len() as u64).unwrap();
                    prop_assert_eq!(&back, &indices, "{}", enc);
                }
            }
            let (enc, bytes) = encode_best(&indices, &shape);
            prop_assert_eq!(decode(enc, &bytes, &shape, indices.len() as u64).unwrap(), indices.clone());
            // The chosen encoding is never larger than any other applicable one.
            for other in all_encodings() {
                if let Ok(b) = encode(other, &indices, &shape) {
                    prop_assert!(bytes.len() <= b.len(), "{} ({}) > {} ({})", enc, bytes.len(), other, b.len());
                }
            }
        }

        #[test]
        fn tile_masks_round_trip(rows in 1u64..60, cols in 1u64..60, seed in any::<u64>()) {
            let per_row = cols.div_ceil(BLOCK);
            let n_tiles = rows.div_ceil(BLOCK) * per_row;
            let chosen: Vec<u64> = (0..n_tiles).filter(|t| (seed >> (t % 64)) & 1 == 1).collect();
            let mut indices: Vec<u64> = (0..rows * cols)
                .filter(|&i| chosen.contains(&((i / cols / BLOCK) * per_row + (i % cols) / BLOCK)))
                .collect();
            indices.sort_unstable();
            if !indices.is_empty() {
                let bytes = encode(MaskEncoding::Block16, &indices, &[rows, cols]).unwrap();
                let back = decode(MaskEncoding::Block16, &bytes, &[rows, cols], indices.len() as u64).unwrap();
                prop_assert_eq!(back, indices);
            }
        }

        #[test]
        fn truncated_or_garbage_streams_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64), nnz in 0u64..100) {
            for enc in all_encodings() {
                let _ = decode(enc, &bytes, &[37, 11], nnz);
            }
        }
    }

    #[test]
    fn rice_handles_huge_gaps() {
        let indices = [0u64, 1 << 40, (1 << 41) + 5];
        let shape = [1u64 << 42];
        let bytes = encode(MaskEncoding::DeltaRice, &indices, &shape).unwrap();
        assert_eq!(
            decode(MaskEncoding::DeltaRice, &bytes, &shape, 3).unwrap(),
            indices
        );
    }

    #[test]
    fn decode_rejects_wrong_counts_and_padding() {
        let indices = [3u64, 9, 10, 40];
        let shape = [64u64];
        let bytes = encode(MaskEncoding::DeltaRice, &indices, &shape).unwrap();
        assert!(decode(MaskEncoding::DeltaRice, &bytes, &shape, 5).is_err());
        assert!(decode(MaskEncoding::DeltaRice, &bytes, &shape, 3).is_err());
        let bitmap = encode(MaskEncoding::Bitmap, &indices, &shape).unwrap();
        assert!(decode(MaskEncoding::Bitmap, &bitmap, &shape, 3).is_err());
        // Wrong length for the shape, and a bit set past the end of the tensor.
        assert!(decode(MaskEncoding::Bitmap, &bitmap, &[41], 4).is_err());
        let padded = encode(MaskEncoding::Bitmap, &[3, 43], &[48]).unwrap();
        assert!(decode(MaskEncoding::Bitmap, &padded, &[42], 2).is_err());
        assert_eq!(
            decode(MaskEncoding::Bitmap, &padded, &[44], 2).unwrap(),
            vec![3, 43]
        );
    }

    #[test]
    fn check_indices_names_the_problem() {
        assert_eq!(
            check_indices(&[1, 1], 4),
            Err(MaskError::Duplicate { pos: 1, index: 1 })
        );
        assert_eq!(
            check_indices(&[2, 1], 4),
            Err(MaskError::Unsorted {
                pos: 1,
                prev: 2,
                index: 1
            })
        );
        assert_eq!(
            check_indices(&[4], 4),
            Err(MaskError::OutOfRange {
                pos: 0,
                index: 4,
                n: 4
            })
        );
    }
}
