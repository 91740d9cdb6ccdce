//! Exact top-k selection with deterministic tie-breaking.

/// k = ⌊density · n⌋, computed so that decimal densities behave as written: 0.29 of 100 is 29,
/// even though `0.29 * 100.0` is 28.999999999999996 in binary floating point.
pub fn keep_count(density: f64, n: usize) -> usize {
    let x = density * n as f64;
    let r = x.round();
    if (x - r).abs() <= 1e-9 * r.max(1.0) {
        r as usize
    } else {
        x.floor() as usize
    }
}

/// Sorted flat indices of the `k` entries of `values` with the largest magnitude. Ties are broken
/// by the lower index, so the result is a pure function of the input. `values` must be free of
/// NaN (callers check and report which tensor is affected).
pub fn top_k_abs(values: &[f32], k: usize) -> Vec<u64> {
    // |v| bits are monotone in |v| for non-negative floats.
    top_k_by_key(values, k, |v| v.abs().to_bits())
}

/// Sorted flat indices of the `k` largest `values` (signed; NaN counts as −∞), ties to the
/// lower index.
pub fn top_k_signed(values: &[f32], k: usize) -> Vec<u64> {
    top_k_by_key(values, k, |v| {
        if v.is_nan() {
            return 0;
        }
        // A total order on f32 as u32: larger float → larger key.
        let b = v.to_bits();
        if b & 0x8000_0000 != 0 {
            !b
        } else {
            b | 0x8000_0000
        }
    })
}

/// The `k` entries with the largest `key(value)`, ties to the lower index, sorted.
fn top_k_by_key(values: &[f32], k: usize, key: impl Fn(f32) -> u32) -> Vec<u64> {
    let n = values.len();
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    if k == n {
        return (0..n as u64).collect();
    }
    let mut out: Vec<u64> = if n <= u32::MAX as usize {
        // One u64 per entry: the key above the inverted index, so a larger u64 means a larger
        // key, then a lower index.
        let mut keys: Vec<u64> = values
            .iter()
            .enumerate()
            .map(|(i, &v)| ((key(v) as u64) << 32) | (u32::MAX - i as u32) as u64)
            .collect();
        keys.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        keys.truncate(k);
        keys.iter()
            .map(|&key| (u32::MAX - (key as u32)) as u64)
            .collect()
    } else {
        let mut idx: Vec<u64> = (0..n as u64).collect();
        let full = |i: u64| (key(values[i as usize]), std::cmp::Reverse(i));
        idx.select_nth_unstable_by(k - 1, |&a, &b| full(b).cmp(&full(a)));
        idx.truncate(k);
        idx
    };
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ties_go_to_the_lower_index() {
        assert_eq!(top_k_abs(&[1.0, -1.0, 1.0, 0.5], 2), vec![0, 1]);
        assert_eq!(top_k_abs(&[0.0, 0.0, 0.0], 1), vec![0]);
        assert_eq!(top_k_abs(&[0.1, -3.0, 2.0], 2), vec![1, 2]);
    }

    proptest! {
        #[test]
        fn matches_a_full_sort(values in prop::collection::vec(-4i8..4, 0..200), k in 0usize..220) {
            let values: Vec<f32> = values.iter().map(|&v| v as f32 * 0.5).collect();
            let mut order: Vec<usize> = (0..values.len()).collect();
            order.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()).then(a.cmp(&b)));
            let mut want: Vec<u64> = order.iter().take(k).map(|&i| i as u64).collect();
            want.sort_unstable();
            prop_assert_eq!(top_k_abs(&values, k), want);
        }
    }
    #[test]
    fn keep_count_is_floor_of_the_decimal_product() {
        assert_eq!(super::keep_count(0.29, 100), 29);
        assert_eq!(super::keep_count(0.05, 16_777_216), 838_860);
        assert_eq!(super::keep_count(0.5, 3), 1);
        assert_eq!(super::keep_count(1.0, 7), 7);
        assert_eq!(super::keep_count(0.01, 50), 0);
    }
}
