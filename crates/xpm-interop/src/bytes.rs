//! Element-wise helpers on little-endian tensor bytes: transposes (exact: values move, none
//! is computed), scaling and f32 round trips.

use xpm_core::format::Dtype;

/// Transpose a row-major `[rows, cols]` matrix of `elem`-byte elements to `[cols, rows]`.
pub fn transpose(bytes: &[u8], rows: usize, cols: usize, elem: usize) -> Vec<u8> {
    debug_assert_eq!(bytes.len(), rows * cols * elem);
    let mut out = vec![0u8; bytes.len()];
    for r in 0..rows {
        for c in 0..cols {
            let src = (r * cols + c) * elem;
            let dst = (c * rows + r) * elem;
            out[dst..dst + elem].copy_from_slice(&bytes[src..src + elem]);
        }
    }
    out
}

/// The values of `bytes` (in `dtype`) as f32, for arithmetic.
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    dtype.to_f32(bytes)
}

/// f32 values rounded to `dtype` bytes.
pub fn from_f32(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    dtype.from_f32(values)
}

/// Columns `cols` of a row-major `[rows, n_cols]` matrix, as a `[rows, cols.len()]` matrix.
pub fn select_columns(
    bytes: &[u8],
    rows: usize,
    n_cols: usize,
    cols: &[usize],
    elem: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows * cols.len() * elem);
    for r in 0..rows {
        for &c in cols {
            let s = (r * n_cols + c) * elem;
            out.extend_from_slice(&bytes[s..s + elem]);
        }
    }
    out
}

/// Rows `rows` of a row-major `[_, n_cols]` matrix.
pub fn select_rows(bytes: &[u8], n_cols: usize, rows: &[usize], elem: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * n_cols * elem);
    for &r in rows {
        out.extend_from_slice(&bytes[r * n_cols * elem..(r + 1) * n_cols * elem]);
    }
    out
}

/// The bytes of 1.0 in `dtype` (exact in every float type).
pub fn one(dtype: Dtype) -> Vec<u8> {
    dtype.from_f32(&[1.0])
}

/// A `[n_rows, n_cols]` matrix, zero except 1.0 at `(i, picks[i])` for each row i: rows of the
/// identity (a "selection" factor), in `dtype`.
pub fn selection(n_cols: usize, picks: &[usize], dtype: Dtype) -> Vec<u8> {
    let elem = dtype.size();
    let one = one(dtype);
    let mut out = vec![0u8; picks.len() * n_cols * elem];
    for (i, &c) in picks.iter().enumerate() {
        let s = (i * n_cols + c) * elem;
        out[s..s + elem].copy_from_slice(&one);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_moves_every_element() {
        let m: Vec<u8> = (0u8..6).collect(); // [2, 3] of 1-byte elements
        assert_eq!(transpose(&m, 2, 3, 1), vec![0, 3, 1, 4, 2, 5]);
        assert_eq!(transpose(&transpose(&m, 2, 3, 1), 3, 2, 1), m);
        let f: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let t = transpose(&f, 2, 2, 4);
        assert_eq!(Dtype::F32.to_f32(&t), vec![1.0, 3.0, 2.0, 4.0]);
    }

    #[test]
    fn selections_pick_rows_and_columns() {
        let m: Vec<u8> = (0u8..6).collect(); // [2, 3]
        assert_eq!(select_columns(&m, 2, 3, &[0, 2], 1), vec![0, 2, 3, 5]);
        assert_eq!(select_rows(&m, 3, &[1], 1), vec![3, 4, 5]);
        let s = selection(3, &[2, 0], Dtype::F32);
        assert_eq!(Dtype::F32.to_f32(&s), vec![0.0, 0.0, 1.0, 1.0, 0.0, 0.0]);
    }
}
