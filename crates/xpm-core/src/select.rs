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
///
/// A radix selection: three histogram passes over the keys' digits (11, 11 and 10 bits, from
/// the top) find the k-th largest key `t`, then one pass in index order takes every key above
/// `t` and the first keys equal to it, so the indices come out sorted and ties go to the lower
/// index. Four streaming passes and 32 KiB of counts on the stack. Selecting among (key,
/// index) pairs, as before, needed an 8-byte copy of every value: fresh memory for every expert
/// and tensor of a merge of dense experts, or 8 bytes per weight of the largest tensor in
/// `xpm extract`. On 2²⁰ values with warm buffers the two take about as long (2.3–3.0 ms
/// against 3.2–3.8 ms keeping a fifth, 2.4–2.6 ms against 1.2–1.6 ms keeping a fiftieth);
/// in the merge benchmark's densified `ties` merge the radix selection saved 1.7 s of 11.6 s
/// (docs/benchmarks.md, "Merge", seventh session).
fn top_k_by_key(values: &[f32], k: usize, key: impl Fn(f32) -> u32) -> Vec<u64> {
    let n = values.len();
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    if k == n {
        return (0..n as u64).collect();
    }
    // Invariant: at least `need` keys match `prefix` on the digits fixed so far, and the keys
    // above those fixed digits number k − need.
    let (mut prefix, mut fixed, mut need) = (0u32, 0u32, k);
    for (shift, bits) in [(21u32, 11u32), (10, 11), (0, 10)] {
        let digit_mask = (1u32 << bits) - 1;
        // Four histograms filled in turn, so that runs of equal digits (a mostly zero delta)
        // do not chain every increment through one counter; keys that do not match the prefix
        // are counted in a spare bin instead of branching on them.
        const SPARE: usize = 1 << 11;
        let mut hists = [[0u32; SPARE + 1]; 4];
        let bin = |v: f32| {
            let key = key(v);
            if key & fixed == prefix {
                ((key >> shift) & digit_mask) as usize
            } else {
                SPARE
            }
        };
        let mut quads = values.chunks_exact(4);
        for q in &mut quads {
            for (h, &v) in hists.iter_mut().zip(q) {
                h[bin(v)] += 1;
            }
        }
        for &v in quads.remainder() {
            hists[0][bin(v)] += 1;
        }
        let mut hist = [0u32; SPARE];
        for (d, c) in hist.iter_mut().enumerate() {
            *c = hists.iter().map(|h| h[d]).sum();
        }
        // The highest digit at which the counts from the top reach `need`.
        let mut d = digit_mask as usize;
        while (hist[d] as usize) < need {
            need -= hist[d] as usize;
            d -= 1;
        }
        prefix |= (d as u32) << shift;
        fixed |= digit_mask << shift;
    }
    // `prefix` is now the k-th largest key: take every key above it and the first `need` keys
    // equal to it.
    // Without a branch on whether an index is taken (a coin flip for a random delta): every
    // index is written at the next free slot, which only a taken one claims. Exactly k are
    // taken (the invariant), so writes stay within k + 1 slots.
    let mut out = crate::pool::take(k + 1);
    let room = &mut out.spare_capacity_mut()[..k + 1];
    let mut len = 0;
    for (i, &v) in values.iter().enumerate() {
        let key = key(v);
        let tie = key == prefix && need > 0;
        need -= usize::from(tie);
        room[len.min(k)].write(i as u64);
        len += usize::from(key > prefix || tie);
    }
    assert_eq!(len, k, "top-k selection took {len} of {k}");
    // SAFETY: the first k slots were written (each taken index's slot before len moved past it).
    unsafe { out.set_len(k) };
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
    /// The selection before the radix one: (key, inverted index) pairs, `select_nth`, sort.
    fn by_pairs(values: &[f32], k: usize, key: impl Fn(f32) -> u32) -> Vec<u64> {
        let k = k.min(values.len());
        let mut keys: Vec<u64> = values
            .iter()
            .enumerate()
            .map(|(i, &v)| ((key(v) as u64) << 32) | (u32::MAX - i as u32) as u64)
            .collect();
        keys.sort_unstable_by(|a, b| b.cmp(a));
        let mut out: Vec<u64> = keys[..k]
            .iter()
            .map(|&key| (u32::MAX - (key as u32)) as u64)
            .collect();
        out.sort_unstable();
        out
    }

    proptest! {
        #[test]
        fn radix_selection_matches_pairs_on_any_floats(
            bits in prop::collection::vec(any::<u32>(), 0..300),
            k in 0usize..320,
            repeat in 0usize..4,
        ) {
            // Arbitrary bit patterns (NaN too, for the signed order), some repeated to make ties.
            let mut values: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
            for j in 0..values.len().min(repeat * 20) {
                values[j] = values[j / 3];
            }
            let finite: Vec<f32> = values.iter().map(|v| if v.is_nan() { 1.5 } else { *v }).collect();
            prop_assert_eq!(top_k_abs(&finite, k), by_pairs(&finite, k, |v| v.abs().to_bits()));
            let signed = |v: f32| {
                if v.is_nan() {
                    return 0;
                }
                let b = v.to_bits();
                if b & 0x8000_0000 != 0 { !b } else { b | 0x8000_0000 }
            };
            prop_assert_eq!(top_k_signed(&values, k), by_pairs(&values, k, signed));
        }
    }

    #[test]
    fn a_mostly_zero_tensor_keeps_its_values_then_the_first_zeros() {
        let mut values = vec![0f32; 10_000];
        values[9_000] = -2.0;
        values[17] = 1.0;
        let got = top_k_abs(&values, 5);
        assert_eq!(got, vec![0, 1, 2, 17, 9_000]);
        // Every key the same.
        assert_eq!(top_k_abs(&vec![3f32; 64], 3), vec![0, 1, 2]);
        assert_eq!(top_k_signed(&[f32::NAN, -1.0, f32::NAN], 2), vec![0, 1]);
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
