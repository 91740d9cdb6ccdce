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
/// First the k-th largest key `t` and how many keys equal to it the top k hold: from one pass
/// where a sample brackets it ([`threshold_sampled`]), else by radix selection
/// ([`threshold_radix`], three passes). Then one pass in index order takes every key above `t`
/// and the first keys equal to it, so the indices come out sorted and ties go to the lower
/// index. No copy of the values: selecting among (key, index) pairs, as before, needed 8 bytes
/// per value, fresh memory for every expert and tensor of a merge of dense experts, or 8 bytes
/// per weight of the largest tensor in `xpm extract`. On 2²⁰ values with warm buffers,
/// keeping a fifth of uniform values: 1.9 ms (the pairs: 3.1–3.5 ms); a fiftieth: 1.8 ms
/// (1.2 ms); a fifth of a delta that is 95 % zeros: 1.3 ms (3.6–4.0 ms); a fiftieth: 1.7 ms
/// (1.5 ms). In the merge benchmark's densified `ties` merge: 11.6 s → 9.9 s with the radix
/// passes alone, and 4.4–4.6 s → 3.3–3.4 s with the sample, once the buffers were reused
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
    let key = &key;
    let (prefix, mut need) =
        threshold_sampled(values, k, key).unwrap_or_else(|| threshold_radix(values, k, key));
    // `prefix` is now the k-th largest key: take every key above it and the first `need` keys
    // equal to it. Per 64 values, two bit masks (above, equal) computed without branches, the
    // equal ones cut to the ties still needed, then the taken indices written in order.
    let mut out: Vec<u64> = crate::pool::take(k);
    let room = &mut out.spare_capacity_mut()[..k];
    let mut len = 0;
    for (c, chunk) in values.chunks(64).enumerate() {
        let (mut above, mut equal) = (0u64, 0u64);
        for (j, &v) in chunk.iter().enumerate() {
            let key = key(v);
            above |= u64::from(key > prefix) << j;
            equal |= u64::from(key == prefix) << j;
        }
        if equal.count_ones() as usize > need {
            // Only the lowest `need` ties.
            let mut keep = 0u64;
            for _ in 0..need {
                keep |= equal & equal.wrapping_neg();
                equal &= equal - 1;
            }
            equal = keep;
        }
        need -= equal.count_ones() as usize;
        let mut taken = above | equal;
        while taken != 0 {
            // Exactly k are taken (the invariant): `room` has a slot for each.
            room[len].write((c * 64) as u64 + u64::from(taken.trailing_zeros()));
            len += 1;
            taken &= taken - 1;
        }
    }
    assert_eq!(len, k, "top-k selection took {len} of {k}");
    // SAFETY: the first k slots were written above.
    unsafe { out.set_len(k) };
    out
}

/// The k-th largest key `t` (1 ≤ k < n) and how many keys equal to `t` the top k hold, by
/// radix selection: three histogram passes over the keys' digits (11, 11 and 10 bits, from the
/// top), each keeping the keys that match the digits fixed so far.
fn threshold_radix(values: &[f32], k: usize, key: &impl Fn(f32) -> u32) -> (u32, usize) {
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
    (prefix, need)
}

/// [`threshold_radix`]'s result in one pass over the keys where a sample predicts it: 4096
/// keys at hashed positions, sorted, bracket the k-th largest with a margin of a few standard
/// deviations of its rank; one pass counts the keys above the bracket and collects those in
/// it (at most an eighth of them), and the k-th largest is selected among those. `None` when
/// the bracket missed or held too many keys: the caller falls back to the radix passes. A
/// bracket of one key (a mostly zero delta: zero) needs no collection: the pass counts the
/// keys above it and equal to it.
fn threshold_sampled(values: &[f32], k: usize, key: &impl Fn(f32) -> u32) -> Option<(u32, usize)> {
    const SAMPLE: usize = 4096;
    let n = values.len();
    if n < 16 * SAMPLE {
        return None;
    }
    // At positions from a fixed hash (a stride would alias with periodic data: rows).
    let mut sample: Vec<u32> = (0..SAMPLE as u64)
        .map(|j| key(values[(crate::rng::splitmix64(j) % n as u64) as usize]))
        .collect();
    sample.sort_unstable_by(|a, b| b.cmp(a));
    // The k-th largest's rank in the sample, and ± 4 standard deviations of it.
    let q = k as f64 / n as f64;
    let r = q * SAMPLE as f64;
    let margin = 4.0 * (SAMPLE as f64 * q * (1.0 - q)).sqrt() + 4.0;
    // Open-ended where the margin runs past the sample's ends.
    let hi = if r - margin < 0.0 {
        u32::MAX
    } else {
        sample[((r - margin) as usize).min(SAMPLE - 1)]
    };
    let lo = if r + margin >= (SAMPLE - 1) as f64 {
        0
    } else {
        sample[(r + margin) as usize]
    };
    let (mut above, mut inside) = (0usize, 0usize);
    if lo == hi {
        for &v in values {
            let key = key(v);
            above += usize::from(key > hi);
            inside += usize::from(key == hi);
        }
        return (above < k && k <= above + inside).then_some((hi, k - above));
    }
    // Keys in [lo, hi], written without a branch: each key at the next free slot, which only
    // a key in the bracket claims; checked per 64 keys against the room.
    let cap = n / 8;
    let mut bracket: Vec<u32> = Vec::with_capacity(cap + 64);
    let room = &mut bracket.spare_capacity_mut()[..cap + 64];
    for chunk in values.chunks(64) {
        for &v in chunk {
            let key = key(v);
            above += usize::from(key > hi);
            room[inside].write(key);
            inside += usize::from(lo <= key && key <= hi);
        }
        if inside > cap {
            return None;
        }
    }
    if !(above < k && k <= above + inside) {
        return None;
    }
    // SAFETY: the first `inside` slots were written (each kept key's before `inside` passed it).
    unsafe { bracket.set_len(inside) };
    // Among the bracket's keys, the (k − above)-th largest, and how many of the top k equal it.
    let want = k - above;
    let (_, &mut t, _) = bracket.select_nth_unstable_by(want - 1, |a, b| b.cmp(a));
    let greater = bracket.iter().filter(|&&b| b > t).count();
    Some((t, want - greater))
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Long enough for the sampled threshold (and its fallbacks: a bracket that misses or
        /// holds too many keys), on floats from a few values to every bit pattern.
        #[test]
        fn sampled_selection_matches_pairs(
            seed in any::<u64>(),
            n in 65_536usize..90_000,
            alphabet in 0usize..4,
            zeros in 0usize..3,
            k_frac in 0.0f64..1.0,
        ) {
            let mut g = seed;
            let mut next = || {
                g = crate::rng::splitmix64(g);
                g
            };
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    let r = next();
                    if zeros > 0 && r % 100 < [0, 60, 97][zeros] {
                        return 0.0;
                    }
                    match alphabet {
                        0 => f32::from_bits((r >> 32) as u32 & 0x7f7f_ffff) * if r & 1 == 0 { 1.0 } else { -1.0 },
                        1 => ((r >> 40) % 5) as f32 - 2.0,
                        2 => ((r >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32,
                        _ => ((r >> 40) % 3) as f32 * 1e-3,
                    }
                })
                .collect();
            let k = ((k_frac * k_frac) * n as f64) as usize;
            prop_assert_eq!(top_k_abs(&values, k), by_pairs(&values, k, |v| v.abs().to_bits()));
            let signed = |v: f32| {
                let b = v.to_bits();
                if b & 0x8000_0000 != 0 { !b } else { b | 0x8000_0000 }
            };
            prop_assert_eq!(top_k_signed(&values, k), by_pairs(&values, k, signed));
        }
    }

    #[test]
    fn the_sample_brackets_uniform_and_mostly_zero_deltas() {
        let mut g = 7u64;
        let mut uniform = || {
            g = crate::rng::splitmix64(g);
            ((g >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        };
        let dense: Vec<f32> = (0..1 << 20).map(|_| uniform()).collect();
        let sparse: Vec<f32> = dense
            .iter()
            .enumerate()
            .map(|(i, &v)| if i % 20 == 3 { v } else { 0.0 })
            .collect();
        let abs = |v: f32| v.abs().to_bits();
        for values in [&dense, &sparse] {
            for k in [1, 1 << 10, 1 << 14, 209_715, 1 << 19, (1 << 20) - 1] {
                let got = threshold_sampled(values, k, &abs);
                assert!(got.is_some(), "k = {k}: the sample's bracket missed");
                assert_eq!(got, Some(threshold_radix(values, k, &abs)), "k = {k}");
            }
        }
        // Too short to sample.
        assert_eq!(threshold_sampled(&dense[..1000], 10, &abs), None);
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
