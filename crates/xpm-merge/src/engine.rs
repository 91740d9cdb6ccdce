//! The merge engine: one target tensor at a time, on the union of the experts' supports.
//!
//! Each expert's delta is first sparsified on its own entries (top-k, DARE, breadcrumbs, DELLA),
//! then the entries are combined position by position, in blocks of positions: each block's
//! entries are added to per-position sums that stay in cache. Sparse inputs stay sparse: memory
//! is proportional to the entries, never to the dense tensor, and a position outside every mask
//! is never touched (so stays exactly zero). Dense inputs take the same path with every
//! position present. Randomness comes from a counter-based stream keyed by (seed, expert,
//! tensor, position), so results are bit-identical whatever the thread count, tensor order or
//! set of other tensors.

use super::params::{Divisor, MergeParams, Rescale, SignRule, Strategy};
use xpm_core::rng::splitmix64;
use xpm_core::select::top_k_abs;

/// One expert's delta for one tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Sorted flat indices (the mask) and the delta's values there.
    Sparse { indices: Vec<u64>, values: Vec<f32> },
    /// The full delta, row-major.
    Dense { values: Vec<f32> },
    /// The expert has no delta for this tensor (a zero delta with an empty mask).
    Absent,
}

impl Input {
    /// Hand the buffers back to [`xpm_core::pool`] (for paths that only borrow the inputs, such
    /// as a plugin's merge; the engine's own path gives them back as it goes).
    pub fn recycle(self) {
        match self {
            Input::Sparse { indices, values } => {
                xpm_core::pool::give(indices);
                xpm_core::pool::give(values);
            }
            Input::Dense { values } => xpm_core::pool::give(values),
            Input::Absent => {}
        }
    }
}

/// The merged delta of one tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Sparse { indices: Vec<u64>, values: Vec<f32> },
    Dense { values: Vec<f32> },
}

impl Output {
    /// Merged entries as an output: dense (scattered into `n` zeros) when an input was dense.
    pub fn from_entries(n: u64, dense: bool, indices: Vec<u64>, values: Vec<f32>) -> Output {
        if dense {
            let mut full = xpm_core::pool::take(n as usize);
            full.resize(n as usize, 0f32);
            for (i, v) in indices.iter().zip(&values) {
                full[*i as usize] = *v;
            }
            xpm_core::pool::give(indices);
            xpm_core::pool::give(values);
            Output::Dense { values: full }
        } else {
            Output::Sparse { indices, values }
        }
    }
}

/// One expert's (possibly sparsified) entries: `indices == None` means every position.
#[derive(Clone)]
struct Entries {
    indices: Option<Vec<u64>>,
    values: Vec<f32>,
}

/// Done with, an expert's entries go back to [`xpm_core::pool`] for the next tensor.
impl Drop for Entries {
    fn drop(&mut self) {
        if let Some(ix) = self.indices.take() {
            xpm_core::pool::give(ix);
        }
        xpm_core::pool::give(std::mem::take(&mut self.values));
    }
}

impl Entries {
    fn index(&self, k: usize) -> u64 {
        self.indices.as_ref().map_or(k as u64, |ix| ix[k])
    }
}

/// Merge one tensor. `weights[i]` belongs to `inputs[i]`; `tensor` names the tensor for the
/// random streams.
pub fn merge_tensor(
    tensor: &str,
    shape: &[u64],
    inputs: &[Input],
    weights: &[f64],
    strategy: Strategy,
    p: &MergeParams,
) -> Output {
    merge_tensor_owned(tensor, shape, inputs.to_vec(), weights, strategy, p)
}

/// [`merge_tensor`] consuming its inputs (no copy of the experts' entries).
pub fn merge_tensor_owned(
    tensor: &str,
    shape: &[u64],
    inputs: Vec<Input>,
    weights: &[f64],
    strategy: Strategy,
    p: &MergeParams,
) -> Output {
    let mut inputs = inputs.into_iter();
    let merged = merge_tensor_loading(tensor, shape, weights, strategy, p, |_| {
        Ok::<_, std::convert::Infallible>(inputs.next().unwrap_or(Input::Absent))
    });
    match merged {
        Ok(out) => out,
        Err(never) => match never {},
    }
}

/// Merge one tensor whose inputs `load(e)` reads one expert at a time (`weights.len()` of
/// them), in expert order; the first error stops the merge. Each input is sparsified as it
/// arrives, so a strategy that trims (`magnitude-prune`, the TIES family, DARE, breadcrumbs,
/// DELLA) never holds more than one expert's dense delta: on dense experts that is one
/// tensor's worth of memory instead of one per expert, and the buffer that held it takes the
/// next expert's. The other strategies sum a tensor whose first expert is dense as they read
/// ([`sum_streaming`]).
pub fn merge_tensor_loading<E>(
    tensor: &str,
    shape: &[u64],
    weights: &[f64],
    strategy: Strategy,
    p: &MergeParams,
    mut load: impl FnMut(usize) -> Result<Input, E>,
) -> Result<Output, E> {
    let n: u64 = shape.iter().product();
    let k = Kernel::new(strategy, p, weights.iter().sum());
    let mut dense = false;
    let mut entries: Vec<Entries> = Vec::with_capacity(weights.len());
    for e in 0..weights.len() {
        let input = load(e)?;
        if e == 0
            && !strategy.trims()
            && let Input::Dense { values } = input
        {
            return sum_streaming(values, n, weights, &k, load);
        }
        dense |= matches!(input, Input::Dense { .. });
        entries.push(sparsify(strategy, p, tensor, e as u64, shape, n, input));
    }
    // Dense inputs take the same sweep, with every position present.
    let (out_idx, out_val) = combine_union(&entries, n, weights, &k);
    drop(entries);
    Ok(Output::from_entries(n, dense, out_idx, out_val))
}

/// The merge of a tensor whose first expert's delta is dense, for a strategy that does not
/// trim (the linear family and the means): every position is in the union, so the experts are
/// summed one after another into whole-tensor f64 sums and each delta is given back before the
/// next is read. A thread holds 8 bytes per position and one delta, instead of every expert's
/// delta (4 bytes per position each). Per position the sums add the same values in the same
/// order as [`combine_union`]'s, so the result is bit for bit the same (tested). The weight
/// sum is one number while the inputs are dense or absent; a sparse input after the first
/// makes it a sum per position.
fn sum_streaming<E>(
    first: Vec<f32>,
    n: u64,
    weights: &[f64],
    k: &Kernel,
    mut load: impl FnMut(usize) -> Result<Input, E>,
) -> Result<Output, E> {
    let n = n as usize;
    let mut num: Vec<f64> = xpm_core::pool::take(n);
    num.resize(n, 0.0);
    let mut den_all = 0f64;
    let mut den: Option<Vec<f64>> = None;
    let mut add = |e: usize, input: Input, num: &mut Vec<f64>| {
        let w = weights[e];
        match input {
            Input::Dense { values } => {
                for (s, &v) in num.iter_mut().zip(&values) {
                    *s += w * v as f64;
                }
                match den.as_mut() {
                    Some(d) => d.iter_mut().for_each(|d| *d += w),
                    None => den_all += w,
                }
                xpm_core::pool::give(values);
            }
            Input::Sparse { indices, values } => {
                let d = den.get_or_insert_with(|| {
                    let mut d = xpm_core::pool::take(n);
                    d.resize(n, den_all);
                    d
                });
                for (&i, &v) in indices.iter().zip(&values) {
                    // Indices are below n: the artifact reader checked them against the shape.
                    num[i as usize] += w * v as f64;
                    d[i as usize] += w;
                }
                xpm_core::pool::give(indices);
                xpm_core::pool::give(values);
            }
            Input::Absent => {}
        }
    };
    add(0, Input::Dense { values: first }, &mut num);
    for e in 1..weights.len() {
        let input = load(e)?;
        add(e, input, &mut num);
    }
    let mut out: Vec<f32> = xpm_core::pool::take(n);
    out.extend(num.iter().enumerate().map(|(j, &s)| {
        let v = k.finish(s, den.as_ref().map_or(den_all, |d| d[j]));
        if k.keep(v) { v as f32 } else { 0.0 }
    }));
    xpm_core::pool::give(num);
    if let Some(d) = den {
        xpm_core::pool::give(d);
    }
    Ok(Output::Dense { values: out })
}

/// How a strategy combines the contributions at one position, in f64 and in expert order: an
/// optional sign vote (the TIES family), then sums `num` and `den` of what passes it, then a
/// final formula. The block sweep keeps these sums in arrays, the reference walk (in tests) on
/// the stack; both run the same operations in the same order, so they agree bit for bit (tested).
struct Kernel<'a> {
    p: &'a MergeParams,
    total_w: f64,
    keeps_union: bool,
    form: Form,
}

/// The strategies' final formulas, one per group of strategies that share one
/// ([`Kernel::finish_as`]). The output pass is compiled once per form, so that choosing the
/// formula is not a jump per output position.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Form {
    /// `sparse-mean`: λ num / den, 0 where den is 0.
    SparseMean,
    /// `mean`: num / Σ w, 0 when Σ w is 0.
    Mean,
    /// The linear family: λ num, divided by Σ w under `normalize`.
    Linear,
    /// `cat` and `svd` on non-LoRA tensors: num.
    Sum,
    /// The TIES family: λ num over the divisor.
    Ties,
}

impl Form {
    fn of(strategy: Strategy) -> Form {
        match strategy {
            Strategy::SparseMean => Form::SparseMean,
            Strategy::Mean => Form::Mean,
            Strategy::Linear
            | Strategy::TaskArithmetic
            | Strategy::MagnitudePrune
            | Strategy::DareLinear
            | Strategy::Breadcrumbs => Form::Linear,
            Strategy::Cat | Strategy::Svd => Form::Sum,
            Strategy::Ties | Strategy::DareTies | Strategy::BreadcrumbsTies | Strategy::Della => {
                Form::Ties
            }
        }
    }
}

impl<'a> Kernel<'a> {
    fn new(strategy: Strategy, p: &'a MergeParams, total_w: f64) -> Self {
        Kernel {
            p,
            total_w,
            keeps_union: strategy.keeps_union(),
            form: Form::of(strategy),
        }
    }

    /// Whether the strategy elects a sign (the TIES family).
    #[inline]
    fn ties(&self) -> bool {
        self.form == Form::Ties
    }

    /// [`Kernel::vote_with`] under the merge's sign rule.
    #[cfg(test)]
    fn vote(&self, w: f64, v: f64) -> f64 {
        self.vote_with(self.p.sign, w, v)
    }

    /// What `(w, δ)` adds to the sign vote under `rule`: non-zero values vote, with δ (peft's
    /// `total`), w·δ (mergekit's weighted rule) or sgn δ (`frequency`).
    #[inline(always)]
    fn vote_with(&self, rule: SignRule, w: f64, v: f64) -> f64 {
        if v == 0.0 {
            return 0.0;
        }
        match rule {
            SignRule::Total => v,
            SignRule::Weighted => w * v,
            SignRule::Frequency => v.signum(),
        }
    }

    /// Add `(w, δ)` to the sums; `positive` is the elected sign (sgn⁺ of the vote, ties go to
    /// +1), used by the TIES family only. The reference for the block sweep, which splits the
    /// sums by sign instead ([`combine_union`]).
    #[cfg(test)]
    fn add(&self, num: &mut f64, den: &mut f64, positive: bool, w: f64, v: f64) {
        if self.ties() {
            // Agreement is judged on what voted: w·δ under the weighted rule (mergekit), δ
            // otherwise (peft).
            let signed = if self.p.sign == SignRule::Weighted {
                w * v
            } else {
                v
            };
            if signed != 0.0 && (signed > 0.0) == positive {
                *num += w * v;
                *den += match self.p.divisor {
                    Divisor::Count => 1.0,
                    Divisor::Weights => w,
                    Divisor::None => 0.0,
                };
            }
        } else {
            *num += w * v;
            // `sparse-mean` divides by the weight of the experts whose mask holds the position
            // (membership, not a non-zero value).
            *den += w;
        }
    }

    /// The merged value from the sums.
    #[inline]
    fn finish(&self, num: f64, den: f64) -> f64 {
        self.finish_as(self.form, num, den)
    }

    /// The merged value from the sums under `form`, which must be this kernel's: inlined with a
    /// constant `form`, the choice of formula disappears from the caller's loop.
    #[inline(always)]
    fn finish_as(&self, form: Form, num: f64, den: f64) -> f64 {
        debug_assert_eq!(form, self.form);
        let p = self.p;
        match form {
            Form::SparseMean => {
                if den == 0.0 {
                    0.0
                } else {
                    p.lambda * num / den
                }
            }
            Form::Mean => {
                if self.total_w == 0.0 {
                    0.0
                } else {
                    num / self.total_w
                }
            }
            // The linear family: λ Σ w δ, divided by Σ w under `normalize` (mergekit's
            // `normalize`; a |Σ w| below 1e-8 divides by 1, as mergekit does).
            Form::Linear => {
                let s = p.lambda * num;
                if p.normalize && self.total_w.abs() >= 1e-8 {
                    s / self.total_w
                } else {
                    s
                }
            }
            // LoRA-space merges reach the engine only for non-LoRA tensors of the set; on
            // densified deltas `cat` and full-rank `svd` are exactly Σ w ΔW.
            Form::Sum => num,
            // The mean of the agreeing values: λ Σ w δ over the count, the weights, or 1.
            Form::Ties => p.lambda * num / ties_divisor(p.divisor, den),
        }
    }

    /// Combine the contributions at one position.
    #[cfg(test)]
    fn combine(&self, here: &[(f64, f64)]) -> f64 {
        let positive =
            !self.ties() || here.iter().fold(0.0, |a, (w, v)| a + self.vote(*w, *v)) >= 0.0;
        let (mut num, mut den) = (0.0, 0.0);
        for &(w, v) in here {
            self.add(&mut num, &mut den, positive, w, v);
        }
        self.finish(num, den)
    }

    /// Whether a merged value is stored: always for the strategies that keep the union, else
    /// when non-zero.
    #[inline]
    fn keep(&self, v: f64) -> bool {
        self.keeps_union || v != 0.0
    }
}

/// Positions per block of [`combine_union`]: its sums and bitmaps (about 330 KiB) stay in the
/// core's L2 cache.
const BLOCK: u64 = 8192;
const B: usize = BLOCK as usize;

/// [`combine_union`]'s per-position sums, vote and union bitmap for one block. All zero between
/// blocks (the finish pass clears what the block touched), so a thread keeps one for every
/// tensor it merges. Fixed sizes: offsets masked with `B − 1` need no bounds checks.
struct Sums {
    num: Box<[f64; 2 * B]>,
    den: Box<[f64; 2 * B]>,
    vote: Box<[f64; B]>,
    union: Box<[u64; B / 64]>,
}

impl Sums {
    fn new() -> Box<Sums> {
        fn zeros<T: Copy + Default, const N: usize>() -> Box<[T; N]> {
            vec![T::default(); N]
                .into_boxed_slice()
                .try_into()
                .unwrap_or_else(|_| unreachable!("N elements"))
        }
        Box::new(Sums {
            num: zeros(),
            den: zeros(),
            vote: zeros(),
            union: zeros(),
        })
    }
}

thread_local! {
    /// This thread's [`Sums`], taken while a tensor is merged (a panic drops it, clean or not).
    static SUMS: std::cell::Cell<Option<Box<Sums>>> = const { std::cell::Cell::new(None) };
}

/// Hand `f` every entry of one expert in `from..` below position `c1` (a contiguous run of
/// its sorted indices) with its offset in the block that starts at `c0` and its value, after
/// marking its position in the block's `union` bitmap. Returns where the run ends.
#[inline(always)]
fn sweep_expert(
    en: &Entries,
    from: usize,
    c0: u64,
    c1: u64,
    union: &mut [u64; B / 64],
    mut f: impl FnMut(usize, f64),
) -> usize {
    // Offsets are below c1 − c0 ≤ B: the masks change nothing but drop the bounds checks.
    match &en.indices {
        Some(ix) => {
            // A linear walk, not a binary search for the run's end: the search's probes into
            // entries not yet read missed the cache (a quarter of the merge's time). Over
            // slices zipped once: indexing both vectors per entry reloaded their lengths
            // (the stores into the sums may alias them, as far as the compiler knows).
            let (ix, vals) = (&ix[from..], &en.values[from..ix.len()]);
            let mut n = 0;
            for (&i, &v) in ix.iter().zip(vals) {
                if i >= c1 {
                    break;
                }
                let o = (i - c0) as usize & (B - 1);
                union[o / 64] |= 1 << (o % 64);
                f(o, v as f64);
                n += 1;
            }
            from + n
        }
        None => {
            let to = en.values.len().min(c1 as usize).max(from);
            for (j, &v) in en.values[from..to].iter().enumerate() {
                let o = (from + j - c0 as usize) & (B - 1);
                union[o / 64] |= 1 << (o % 64);
                f(o, v as f64);
            }
            to
        }
    }
}

/// Where [`combine_union`] writes the merged values: the output's reserved capacity, every
/// union position at the next free slot `n`, which only a kept value then claims (no branch on
/// whether a value is kept, zero or not, unpredictable, and no capacity check per value).
struct Emit<'o> {
    idx: &'o mut [std::mem::MaybeUninit<u64>],
    val: &'o mut [std::mem::MaybeUninit<f32>],
    n: usize,
}

impl Emit<'_> {
    /// The output pass over one block that starts at `c0`: every position of the union, in
    /// order, gets its merged value from the sums under `form` (`k`'s), and the block's sums,
    /// vote and bitmap are cleared for the next.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn block(
        &mut self,
        k: &Kernel,
        form: Form,
        c0: u64,
        union: &mut [u64; B / 64],
        num: &mut [f64; 2 * B],
        den: &mut [f64; 2 * B],
        vote: &mut [f64; B],
    ) {
        for (wi, word) in union.iter_mut().enumerate() {
            let mut b = *word;
            while b != 0 {
                let o = (wi * 64 + b.trailing_zeros() as usize) & (B - 1);
                let l = if form == Form::Ties {
                    // The elected sign: sgn⁺ of the vote (ties go to +1).
                    let l = (2 * o + if vote[o] >= 0.0 { 0 } else { 1 }) & (2 * B - 1);
                    vote[o] = 0.0;
                    (num[l ^ 1], den[l ^ 1]) = (0.0, 0.0);
                    l
                } else {
                    o
                };
                let v = k.finish_as(form, num[l], den[l]);
                // n counts kept positions among those seen, fewer than the union's size,
                // which is at most the reserved capacity.
                self.idx[self.n].write(c0 + o as u64);
                self.val[self.n].write(v as f32);
                self.n += usize::from(k.keep(v));
                (num[l], den[l]) = (0.0, 0.0);
                b &= b - 1;
            }
            *word = 0;
        }
    }
}

/// Combine over the union of the entries' positions, in ascending order, one block of
/// positions at a time. Within a block every expert's entries there (a contiguous run of its
/// sorted indices) are added, in expert order, to per-position sums and the block's union
/// bitmap, which then gives the output positions in order. Blocks that no expert touches are
/// skipped.
///
/// The TIES family needs the elected sign before it knows which values agree with it, so the
/// entries of a block are added to two sums per position, one for each sign, beside the vote;
/// the sign the vote elects picks one. That is one pass over the entries instead of a vote pass
/// and a second pass for the agreeing values, and no branch on a value's sign. Each sum still
/// adds the same values in the same order as [`Kernel::combine`] does, so the result is bit for
/// bit the same (tested against the k-way walk).
///
/// O(total entries + touched blocks × experts). Besides the entries and the output it needs
/// 40 bytes per block position ([`Sums`], 330 KiB, kept per thread), whatever the tensor's
/// size.
fn combine_union(entries: &[Entries], n: u64, weights: &[f64], k: &Kernel) -> (Vec<u64>, Vec<f32>) {
    let c = BLOCK.min(n.max(1));
    let mut sums = SUMS.take().unwrap_or_else(Sums::new);
    // Lane 2·o + 0: values with a positive sign at position o; 2·o + 1: the others. Other
    // strategies use lane o only.
    let Sums {
        num,
        den,
        vote,
        union,
    } = &mut *sums;
    let mut cursor = vec![0usize; entries.len()];
    // The union has at most as many positions as there are entries.
    let bound = (entries.iter().map(|e| e.values.len()).sum::<usize>()).min(n as usize);
    let (mut out_idx, mut out_val) = (xpm_core::pool::take(bound), xpm_core::pool::take(bound));
    let weighted = k.p.sign == SignRule::Weighted;
    // The output is written into the reserved capacity, every union position at the next
    // free slot, which only a kept value then claims: no branch on whether a value is kept
    // (zero or not, unpredictable) and no capacity check per value.
    let mut n_out = 0usize;
    let (idx_room, val_room) = (out_idx.spare_capacity_mut(), out_val.spare_capacity_mut());
    let mut c0 = 0u64;
    loop {
        // Skip to the block of the lowest position not yet merged.
        let next = entries
            .iter()
            .zip(&cursor)
            .filter(|(en, at)| **at < en.values.len())
            .map(|(en, at)| en.index(*at))
            .min();
        let Some(next) = next else { break };
        c0 = c0.max(next / c * c);
        let c1 = (c0 + c).min(n);
        for (e, en) in entries.iter().enumerate() {
            let w = weights[e];
            cursor[e] = if k.ties() {
                // What an agreeing value adds to the divisor.
                let d = match k.p.divisor {
                    Divisor::Count => 1.0,
                    Divisor::Weights => w,
                    Divisor::None => 0.0,
                };
                // The sign rule is chosen once per expert, not per entry: each arm below is
                // its own loop.
                macro_rules! sweep_ties {
                    ($rule:expr) => {
                        sweep_expert(en, cursor[e], c0, c1, union, |o, v| {
                            vote[o] += k.vote_with($rule, w, v);
                            // Agreement is judged on what voted: w·δ under the weighted rule
                            // (mergekit), δ otherwise (peft); a zero agrees with neither sign.
                            let signed = if weighted { w * v } else { v };
                            if signed != 0.0 {
                                let l = (2 * o + if signed > 0.0 { 0 } else { 1 }) & (2 * B - 1);
                                num[l] += w * v;
                                den[l] += d;
                            }
                        })
                    };
                }
                match k.p.sign {
                    SignRule::Total => sweep_ties!(SignRule::Total),
                    SignRule::Weighted => sweep_ties!(SignRule::Weighted),
                    SignRule::Frequency => sweep_ties!(SignRule::Frequency),
                }
            } else {
                sweep_expert(en, cursor[e], c0, c1, union, |o, v| {
                    num[o] += w * v;
                    // `sparse-mean` divides by the weight of the experts whose mask holds the
                    // position (membership, not a non-zero value).
                    den[o] += w;
                })
            };
        }
        let mut out = Emit {
            idx: &mut *idx_room,
            val: &mut *val_room,
            n: n_out,
        };
        // One copy of the output pass per formula (see `Form`).
        match k.form {
            Form::SparseMean => out.block(k, Form::SparseMean, c0, union, num, den, vote),
            Form::Mean => out.block(k, Form::Mean, c0, union, num, den, vote),
            Form::Linear => out.block(k, Form::Linear, c0, union, num, den, vote),
            Form::Sum => out.block(k, Form::Sum, c0, union, num, den, vote),
            Form::Ties => out.block(k, Form::Ties, c0, union, num, den, vote),
        }
        n_out = out.n;
        c0 = c1;
    }
    // SAFETY: the first n_out slots of both were written above (each kept position's slot
    // before n_out moved past it), within their capacity (indexing checked the bound).
    unsafe {
        out_idx.set_len(n_out);
        out_val.set_len(n_out);
    }
    SUMS.set(Some(sums));
    (out_idx, out_val)
}

/// The k-way walk over the experts' sorted entries: at each position, the minimum over the
/// cursors, O(union × experts). The reference `combine_union` is tested against (the engine
/// used it for dense inputs until the block sweep proved faster there too).
#[cfg(test)]
fn combine_walk(
    entries: &[Entries],
    weights: &[f64],
    mut f: impl FnMut(&[(f64, f64)]) -> Option<f64>,
) -> (Vec<u64>, Vec<f32>) {
    let mut cursor = vec![0usize; entries.len()];
    let (mut oi, mut ov) = (Vec::new(), Vec::new());
    let mut here = Vec::with_capacity(entries.len());
    loop {
        let mut pos = u64::MAX;
        for (e, en) in entries.iter().enumerate() {
            if cursor[e] < en.values.len() {
                pos = pos.min(en.index(cursor[e]));
            }
        }
        if pos == u64::MAX {
            break;
        }
        here.clear();
        for (e, en) in entries.iter().enumerate() {
            if cursor[e] < en.values.len() && en.index(cursor[e]) == pos {
                here.push((weights[e], en.values[cursor[e]] as f64));
                cursor[e] += 1;
            }
        }
        if let Some(v) = f(&here) {
            oi.push(pos);
            ov.push(v as f32);
        }
    }
    (oi, ov)
}

/// The TIES family's divisor, from `den`: the count of agreeing contributions (`Count`) or
/// their total weight (`Weights`).
fn ties_divisor(divisor: Divisor, den: f64) -> f64 {
    match divisor {
        Divisor::Count => den.max(1.0),
        Divisor::Weights if den == 0.0 => 1.0,
        Divisor::Weights => den,
        Divisor::None => 1.0,
    }
}

/// One expert's entries after the strategy's per-expert sparsification.
fn sparsify(
    strategy: Strategy,
    p: &MergeParams,
    tensor: &str,
    expert: u64,
    shape: &[u64],
    n: u64,
    input: Input,
) -> Entries {
    let (indices, values): (Option<Vec<u64>>, Vec<f32>) = match input {
        Input::Sparse { indices, values } => (Some(indices), values),
        Input::Dense { values } => (None, values),
        Input::Absent => (Some(Vec::new()), Vec::new()),
    };
    let e = Entries { indices, values };
    let count = |d: f64| {
        if p.truncate_k {
            (d * n as f64) as usize
        } else {
            xpm_core::select::keep_count(d, n as usize)
        }
    };
    let k = count(p.density);
    match strategy {
        // Keeping every stored entry changes nothing (and the L1 rescale is then 1).
        Strategy::MagnitudePrune | Strategy::Ties if k >= e.values.len() => e,
        Strategy::MagnitudePrune | Strategy::Ties => {
            let keep = top_k_abs(&e.values, k);
            l1_rescale(p, &e, subset(&e, keep))
        }
        Strategy::DareLinear | Strategy::DareTies => {
            let rng = Stream::new(p.seed, expert, tensor);
            let keep: Vec<u64> = (0..e.values.len() as u64)
                .filter(|&j| rng.uniform(e.index(j as usize)) < p.density)
                .collect();
            let kept = subset(&e, keep);
            rescale(p, &e, kept, |_| p.density)
        }
        Strategy::Breadcrumbs | Strategy::BreadcrumbsTies => {
            // When γ + d > 1, fewer outliers are dropped so that k entries stay (mergekit's
            // `n_bot < 0` rule).
            let drop_top = count(p.gamma).min((n as usize).saturating_sub(k));
            // Order by descending magnitude, ties to the lower index; skip the outliers,
            // keep the next k.
            let mut order: Vec<usize> = (0..e.values.len()).collect();
            order.sort_by(|&a, &b| {
                e.values[b]
                    .abs()
                    .total_cmp(&e.values[a].abs())
                    .then(a.cmp(&b))
            });
            let mut keep: Vec<u64> = order
                .iter()
                .skip(drop_top)
                .take(k)
                .map(|&j| j as u64)
                .collect();
            keep.sort_unstable();
            l1_rescale(p, &e, subset(&e, keep))
        }
        Strategy::Della => della(p, tensor, expert, shape, n, &e),
        _ => e,
    }
}

/// Entries at `keep` (sorted offsets into `e`). `keep` becomes the subset's indices in place
/// (for a dense `e` offsets are positions already), so trimming allocates only the values.
fn subset(e: &Entries, mut keep: Vec<u64>) -> Entries {
    let mut values = xpm_core::pool::take(keep.len());
    values.extend(keep.iter().map(|&j| e.values[j as usize]));
    if let Some(ix) = &e.indices {
        keep.iter_mut().for_each(|j| *j = ix[*j as usize]);
    }
    Entries {
        indices: Some(keep),
        values,
    }
}

/// Deterministic trimming (top-k, breadcrumbs) keeps its values, unless `rescale=l1` asks to
/// scale them back to the untrimmed L1 norm (mergekit's `rescale` option).
fn l1_rescale(p: &MergeParams, all: &Entries, kept: Entries) -> Entries {
    match p.rescale {
        Rescale::L1 => rescale(p, all, kept, |_| 1.0),
        Rescale::Bernoulli => kept,
    }
}

/// DARE rescaling of the kept entries: divide by the keep probability (`Bernoulli`), or scale
/// to the undropped L1 norm (`L1`).
fn rescale(
    p: &MergeParams,
    all: &Entries,
    mut kept: Entries,
    prob: impl Fn(u64) -> f64,
) -> Entries {
    match p.rescale {
        Rescale::Bernoulli => {
            let ix = kept.indices.clone().unwrap_or_default();
            for (v, i) in kept.values.iter_mut().zip(ix) {
                *v = (*v as f64 / prob(i)) as f32;
            }
        }
        Rescale::L1 => {
            let before: f64 = all.values.iter().map(|v| v.abs() as f64).sum();
            let after: f64 = kept.values.iter().map(|v| v.abs() as f64).sum();
            // mergekit leaves the values as they are when either norm is (nearly) zero.
            let s = if before < 1e-7 || after < 1e-7 {
                1.0
            } else {
                before / after
            };
            kept.values
                .iter_mut()
                .for_each(|v| *v = (*v as f64 * s) as f32);
        }
    }
    kept
}

/// DELLA: per row, rank entries by ascending magnitude among all the row's positions
/// (positions outside the mask are zeros and take the lowest ranks), keep entry of rank r with
/// probability p_r = d − ε + 2εr/(L − 1) (0-based r), rescale by 1/p_r (or to the L1 norm).
///
/// A "row" is what mergekit's `argsort(dim=1)` ranks: for a 2-D weight the entries of one
/// output row; for ≥ 3-D tensors the fibre along dimension 1 (every other index fixed); a 1-D
/// tensor is one row. At d ≥ 1 the expert is kept as it is, as mergekit does.
fn della(
    p: &MergeParams,
    tensor: &str,
    expert: u64,
    shape: &[u64],
    n: u64,
    e: &Entries,
) -> Entries {
    if p.density >= 1.0 {
        return e.clone();
    }
    // Fibre of flat index i: (i / (L·inner), i mod inner), with L = shape[1] and inner the
    // product of the dimensions after it.
    let (row_len, inner) = match shape {
        [] | [_] => (n.max(1), 1),
        [_, l, rest @ ..] => ((*l).max(1), rest.iter().product::<u64>().max(1)),
    };
    let fibre = |i: u64| (i / (row_len * inner), i % inner);
    let rng = Stream::new(p.seed, expert, tensor);
    let mut groups: std::collections::BTreeMap<(u64, u64), Vec<usize>> = Default::default();
    for j in 0..e.values.len() {
        groups.entry(fibre(e.index(j))).or_default().push(j);
    }
    let mut probs: Vec<(u64, f64)> = Vec::new(); // (offset into e, p)
    for mut order in groups.into_values() {
        order.sort_by(|&a, &b| {
            e.values[a]
                .abs()
                .total_cmp(&e.values[b].abs())
                .then(a.cmp(&b))
        });
        let below = row_len - order.len() as u64; // out-of-mask zeros rank lowest
        for (r0, &j) in order.iter().enumerate() {
            let r = below + r0 as u64; // 0-based rank
            let prob = if row_len > 1 {
                p.density - p.epsilon + 2.0 * p.epsilon * r as f64 / (row_len - 1) as f64
            } else {
                p.density
            };
            probs.push((j as u64, prob));
        }
    }
    probs.sort_unstable_by_key(|&(j, _)| j);
    let keep: Vec<(u64, f64)> = probs
        .into_iter()
        .filter(|&(j, prob)| prob > 0.0 && rng.uniform(e.index(j as usize)) < prob)
        .collect();
    let offsets: Vec<u64> = keep.iter().map(|&(j, _)| j).collect();
    let kept = subset(e, offsets);
    let by_index: std::collections::HashMap<u64, f64> = keep
        .iter()
        .map(|&(j, prob)| (e.index(j as usize), prob))
        .collect();
    rescale(p, e, kept, |i| by_index[&i])
}

/// A counter-based random stream for one (seed, expert, tensor): `uniform(position)` is a pure
/// function, so no draw depends on the order in which positions are visited.
pub struct Stream {
    key: u64,
}

impl Stream {
    pub fn new(seed: u64, expert: u64, tensor: &str) -> Self {
        let mut key = splitmix64(seed ^ 0x5851_f42d_4c95_7f2d);
        key = splitmix64(key ^ expert.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for chunk in tensor.as_bytes().chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            key = splitmix64(key ^ u64::from_le_bytes(b));
        }
        Stream { key }
    }

    /// The stream's key: the seed a plugin gets for this (expert, tensor).
    pub fn key(&self) -> u64 {
        self.key
    }

    /// Uniform in [0, 1) for a position.
    pub fn uniform(&self, position: u64) -> f64 {
        (splitmix64(self.key ^ splitmix64(position)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Preset;
    use proptest::prelude::{Strategy as _, prop, prop_assert, prop_assert_eq, proptest};

    fn dense(v: &[f32]) -> Input {
        Input::Dense { values: v.to_vec() }
    }

    fn run(strategy: Strategy, p: &MergeParams, inputs: &[Input], w: &[f64]) -> Vec<f32> {
        match merge_tensor("t", &[4], inputs, w, strategy, p) {
            Output::Dense { values } => values,
            Output::Sparse { indices, values } => {
                let mut full = vec![0.0; 4];
                for (i, v) in indices.iter().zip(values) {
                    full[*i as usize] = v;
                }
                full
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn union_walk_matches_the_reference(
            masks in proptest::collection::vec(proptest::collection::btree_map(0u64..200, -2.0f32..2.0, 0..60), 1..6),
            dense_one in proptest::bool::ANY,
            s in 0usize..11,
            rules in (0usize..3, 0usize..3),
            shape in (0usize..3, proptest::bool::ANY),
        ) {
            let sign = [SignRule::Total, SignRule::Weighted, SignRule::Frequency][rules.0];
            let divisor = [Divisor::Count, Divisor::Weights, Divisor::None][rules.1];
            // A long tensor with entries at its start only; a weight that is zero or negative.
            let n = if shape.1 { 20_000u64 } else { 200 };
            let mut entries: Vec<Entries> = masks
                .iter()
                .map(|m| Entries { indices: Some(m.keys().copied().collect()), values: m.values().copied().collect() })
                .collect();
            if dense_one {
                entries[0] = Entries { indices: None, values: (0..n).map(|i| (i as f32 * 0.37).sin()).collect() };
            }
            let weights: Vec<f64> = (0..entries.len())
                .map(|i| match (shape.0, i) {
                    (1, 0) => 0.0,
                    (2, 0) => -0.75,
                    _ => 0.5 + i as f64,
                })
                .collect();
            let strategy = Strategy::ALL[s];
            let p = MergeParams { sign, divisor, ..MergeParams::default() };
            let k = Kernel::new(strategy, &p, weights.iter().sum());
            let got = combine_union(&entries, n, &weights, &k);
            let want = combine_walk(&entries, &weights, |here| {
                let v = k.combine(here);
                k.keep(v).then_some(v)
            });
            proptest::prop_assert_eq!(got.0, want.0);
            proptest::prop_assert_eq!(
                got.1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.1.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    fn worked() -> Vec<Input> {
        // MERGING.md: τ1 = [1, −2, 0.5, 0], τ2 = [−0.5, −1, 2, 0.1], τ3 = [0.2, 3, −1, 0]
        vec![
            dense(&[1.0, -2.0, 0.5, 0.0]),
            dense(&[-0.5, -1.0, 2.0, 0.1]),
            dense(&[0.2, 3.0, -1.0, 0.0]),
        ]
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    /// The kernel knows the TIES family by its formula: the same strategies as elect a sign.
    #[test]
    fn the_ties_form_is_the_sign_electing_family() {
        for s in Strategy::ALL
            .into_iter()
            .chain([Strategy::Cat, Strategy::Svd])
        {
            assert_eq!(Form::of(s) == Form::Ties, s.elects_sign(), "{s}");
        }
    }

    #[test]
    fn merging_md_task_arithmetic() {
        let got = run(
            Strategy::TaskArithmetic,
            &MergeParams::default(),
            &worked(),
            &[1.0, 2.0, 0.5],
        );
        assert!(close(&got, &[0.1, -2.5, 4.0, 0.2]), "{got:?}");
    }

    #[test]
    fn merging_md_magnitude_prune() {
        let p = MergeParams {
            density: 0.5,
            ..MergeParams::default()
        };
        let got = run(Strategy::MagnitudePrune, &p, &worked(), &[1.0, 2.0, 0.5]);
        assert!(close(&got, &[1.0, -2.5, 3.5, 0.0]), "{got:?}");
    }

    #[test]
    fn merging_md_ties_peft_and_mergekit_agree() {
        for preset in [Preset::Peft, Preset::Mergekit] {
            let p = MergeParams {
                density: 0.5,
                ..MergeParams::preset(preset, Strategy::Ties)
            };
            let got = run(Strategy::Ties, &p, &worked(), &[1.0, 1.0, 1.0]);
            assert!(close(&got, &[1.0, 3.0, 2.0, 0.0]), "{preset:?}: {got:?}");
        }
    }

    /// Upstream values worked by hand from peft's merge_utils and mergekit's generalized task
    /// arithmetic (docs/merging-presets-review.md, T1–T3 and dare-ties at d = 1).
    #[test]
    fn presets_reproduce_peft_and_mergekit() {
        let ties = |preset, w: &[f64], extra: &[(&str, &str)]| {
            let mut p = MergeParams {
                density: 0.5,
                ..MergeParams::preset(preset, Strategy::Ties)
            };
            let o: std::collections::BTreeMap<String, String> = extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            p.apply(&o).unwrap();
            run(Strategy::Ties, &p, &worked(), w)
        };
        type Case<'a> = (Preset, &'a [f64], &'a [(&'a str, &'a str)], [f32; 4]);
        let cases: [Case; 6] = [
            (Preset::Peft, &[1.0, 2.0, 0.5], &[], [1.0, 1.5, 4.0, 0.0]),
            (
                Preset::Peft,
                &[1.0, 2.0, 0.5],
                &[("sign", "frequency")],
                [1.0, -2.0, 4.0, 0.0],
            ),
            (
                Preset::Peft,
                &[1.0, 1.0, 1.0],
                &[("sign", "frequency")],
                [1.0, -1.5, 2.0, 0.0],
            ),
            (
                Preset::Mergekit,
                &[1.0, 2.0, 0.5],
                &[],
                [1.0, -4.0 / 3.0, 2.0, 0.0],
            ),
            (Preset::Peft, &[1.0, -1.0, 1.0], &[], [1.0, 3.0, -2.0, 0.0]),
            (
                Preset::Mergekit,
                &[1.0, -1.0, 1.0],
                &[],
                [1.0, 4.0, -3.0, 0.0],
            ),
        ];
        for (preset, w, extra, want) in cases {
            let got = ties(preset, w, extra);
            assert!(
                close(&got, &want),
                "{preset:?} {w:?} {extra:?}: {got:?} != {want:?}"
            );
        }
        // dare-ties at d = 1 keeps everything: only the combination differs.
        for (preset, want) in [
            (Preset::Peft, [0.55, 1.5, 2.25, 0.2]),
            (Preset::Mergekit, [1.1, -4.0, 4.5, 0.2]),
        ] {
            let p = MergeParams {
                density: 1.0,
                ..MergeParams::preset(preset, Strategy::DareTies)
            };
            let got = run(Strategy::DareTies, &p, &worked(), &[1.0, 2.0, 0.5]);
            assert!(close(&got, &want), "{preset:?}: {got:?}");
        }
        // Upstream counts int(d·n): 0.29 · 100 = 28.999… → 28 (xpm's own count is 29).
        let v: Vec<f32> = (1..=100).map(|x| x as f32).collect();
        let kept = |p: &MergeParams| match merge_tensor(
            "t",
            &[100],
            &[dense(&v)],
            &[1.0],
            Strategy::MagnitudePrune,
            p,
        ) {
            Output::Dense { values } => values.iter().filter(|x| **x != 0.0).count(),
            Output::Sparse { values, .. } => values.iter().filter(|x| **x != 0.0).count(),
        };
        let d = |preset: Option<Preset>| MergeParams {
            density: 0.29,
            ..preset.map_or_else(MergeParams::default, |pr| {
                MergeParams::preset(pr, Strategy::MagnitudePrune)
            })
        };
        assert_eq!(kept(&d(None)), 29);
        assert_eq!(kept(&d(Some(Preset::Peft))), 28);
    }

    #[test]
    fn merging_md_sparse_mean_counts_membership_not_nonzero() {
        let inputs = vec![
            Input::Sparse {
                indices: vec![0, 1, 2, 3],
                values: vec![1.0, -2.0, 0.5, 0.0],
            },
            Input::Sparse {
                indices: vec![0, 1, 2, 3],
                values: vec![-0.5, -1.0, 2.0, 0.1],
            },
            Input::Sparse {
                indices: vec![1, 2],
                values: vec![3.0, -1.0],
            },
        ];
        let got = run(
            Strategy::SparseMean,
            &MergeParams::default(),
            &inputs,
            &[1.0, 1.0, 1.0],
        );
        assert!(close(&got, &[0.25, 0.0, 0.5, 0.05]), "{got:?}");
    }

    #[test]
    fn dare_is_deterministic_and_keeps_about_d() {
        let n = 20_000;
        let v: Vec<f32> = (0..n)
            .map(|i| ((i % 7) as f32 - 3.0) * 0.1 + 0.05)
            .collect();
        let p = MergeParams {
            density: 0.3,
            seed: 7,
            ..MergeParams::default()
        };
        let a = merge_tensor(
            "w",
            &[n as u64],
            &[dense(&v)],
            &[1.0],
            Strategy::DareLinear,
            &p,
        );
        let b = merge_tensor(
            "w",
            &[n as u64],
            &[dense(&v)],
            &[1.0],
            Strategy::DareLinear,
            &p,
        );
        assert_eq!(a, b);
        let Output::Dense { values } = a else {
            panic!()
        };
        let kept = values.iter().filter(|x| **x != 0.0).count() as f64 / n as f64;
        assert!((kept - 0.3).abs() < 0.02, "{kept}");
        // Kept entries are rescaled by 1/d.
        let i = values.iter().position(|x| *x != 0.0).unwrap();
        assert!((values[i] - v[i] / 0.3).abs() < 1e-5);
        // Another seed draws another mask.
        let c = merge_tensor(
            "w",
            &[n as u64],
            &[dense(&v)],
            &[1.0],
            Strategy::DareLinear,
            &MergeParams {
                seed: 8,
                ..p.clone()
            },
        );
        assert_ne!(
            c,
            merge_tensor(
                "w",
                &[n as u64],
                &[dense(&v)],
                &[1.0],
                Strategy::DareLinear,
                &p
            )
        );
    }

    /// `normalize` divides every strategy of the linear family by Σ w (P2.6 of the presets
    /// review); |Σ w| < 1e-8 divides by 1.
    #[test]
    fn normalize_applies_to_the_linear_family() {
        let w = [1.0, 2.0, 0.5];
        let p = MergeParams {
            normalize: true,
            lambda: 2.0,
            density: 1.0,
            ..MergeParams::default()
        };
        // Σ w τ = [0.1, -2.5, 4, 0.2] (worked()), Σ w = 3.5, λ = 2.
        let want: Vec<f32> = [0.1f32, -2.5, 4.0, 0.2]
            .iter()
            .map(|x| 2.0 * x / 3.5)
            .collect();
        for s in [
            Strategy::Linear,
            Strategy::TaskArithmetic,
            Strategy::MagnitudePrune,
            Strategy::DareLinear,
        ] {
            let got = run(s, &p, &worked(), &w);
            assert!(close(&got, &want), "{s:?}: {got:?}");
        }
        let zero = run(Strategy::TaskArithmetic, &p, &worked(), &[1.0, -1.0, 0.0]);
        let plain = run(
            Strategy::TaskArithmetic,
            &MergeParams {
                normalize: false,
                ..p.clone()
            },
            &worked(),
            &[1.0, -1.0, 0.0],
        );
        assert_eq!(zero, plain, "Σ w = 0 divides by 1");
    }

    /// `rescale=l1` scales what top-k and breadcrumbs keep back to the untrimmed L1 norm.
    #[test]
    fn l1_rescale_applies_to_deterministic_trimming() {
        let v = [4.0f32, -2.0, 1.0, 1.0];
        let p = MergeParams {
            density: 0.5,
            rescale: Rescale::L1,
            ..MergeParams::default()
        };
        // Top 2 by magnitude: [4, -2], ‖τ‖₁ = 8, ‖kept‖₁ = 6.
        let want = [4.0 * 8.0 / 6.0, -2.0 * 8.0 / 6.0, 0.0, 0.0];
        for s in [Strategy::MagnitudePrune, Strategy::Ties] {
            let got = run(s, &p, &[dense(&v)], &[1.0]);
            assert!(close(&got, &want), "{s:?}: {got:?}");
        }
        let none = run(
            Strategy::Ties,
            &MergeParams {
                rescale: Rescale::Bernoulli,
                ..p.clone()
            },
            &[dense(&v)],
            &[1.0],
        );
        assert_eq!(none, vec![4.0, -2.0, 0.0, 0.0], "no rescale by default");
        let v: Vec<f32> = (1..=100).map(|i| i as f32).collect();
        let p = MergeParams {
            density: 0.1,
            gamma: 0.05,
            rescale: Rescale::L1,
            ..MergeParams::default()
        };
        let Output::Dense { values } =
            merge_tensor("w", &[100], &[dense(&v)], &[1.0], Strategy::Breadcrumbs, &p)
        else {
            panic!()
        };
        let l1: f32 = values.iter().map(|x| x.abs()).sum();
        assert!((l1 - 5050.0).abs() < 1e-2, "{l1}");
    }

    /// DELLA ranks along dimension 1 (mergekit's `argsort(dim=1)`), and keeps everything at
    /// d = 1.
    #[test]
    fn della_ranks_fibres_along_dim_1_and_keeps_all_at_d_1() {
        // Shape [1, 4, 2]: fibres are the even and the odd flat positions. With ε at its
        // largest strict value the smallest magnitude of each fibre has p ≈ 0 and the largest
        // p ≈ 1, so over many seeds the largest is always kept and the smallest almost never.
        let v = [1.0f32, 40.0, 2.0, 30.0, 3.0, 20.0, 4.0, 10.0];
        let p = |seed| MergeParams {
            density: 0.5,
            epsilon: 0.4999,
            rescale: Rescale::L1,
            seed,
            ..MergeParams::default()
        };
        let (mut kept_big, mut kept_small) = ([0; 2], [0; 2]);
        for seed in 0..200 {
            let Output::Dense { values } = merge_tensor(
                "t",
                &[1, 4, 2],
                &[dense(&v)],
                &[1.0],
                Strategy::Della,
                &p(seed),
            ) else {
                panic!()
            };
            // Even fibre: largest |v| at 6 (4.0), smallest at 0; odd fibre: largest at 1, smallest at 7.
            kept_big[0] += usize::from(values[6] != 0.0);
            kept_big[1] += usize::from(values[1] != 0.0);
            kept_small[0] += usize::from(values[0] != 0.0);
            kept_small[1] += usize::from(values[7] != 0.0);
        }
        assert_eq!(kept_big, [200, 200], "the top of each fibre along dim 1");
        assert!(kept_small[0] < 5 && kept_small[1] < 5, "{kept_small:?}");
        let all = MergeParams {
            density: 1.0,
            ..MergeParams::default()
        };
        all.validate_for(Strategy::Della).unwrap();
        assert_eq!(
            run(
                Strategy::Della,
                &all,
                &[dense(&[1.0, -2.0, 3.0, 0.5])],
                &[1.0]
            ),
            vec![1.0, -2.0, 3.0, 0.5]
        );
    }

    /// γ + d > 1: breadcrumbs drops fewer outliers so that k entries stay.
    #[test]
    fn breadcrumbs_cuts_the_outliers_when_gamma_plus_density_exceeds_one() {
        let v: Vec<f32> = (1..=10).map(|i| i as f32).collect();
        let p = MergeParams {
            density: 0.9,
            gamma: 0.2,
            ..MergeParams::default()
        };
        p.validate_for(Strategy::Breadcrumbs).unwrap();
        let Output::Dense { values } =
            merge_tensor("w", &[10], &[dense(&v)], &[1.0], Strategy::Breadcrumbs, &p)
        else {
            panic!()
        };
        let kept: Vec<f32> = values.into_iter().filter(|x| *x != 0.0).collect();
        assert_eq!(kept, (1..=9).map(|i| i as f32).collect::<Vec<_>>());
    }

    #[test]
    fn breadcrumbs_drops_outliers_and_keeps_the_band() {
        let v: Vec<f32> = (1..=100).map(|i| i as f32).collect();
        let p = MergeParams {
            density: 0.1,
            gamma: 0.05,
            ..MergeParams::default()
        };
        let Output::Dense { values } =
            merge_tensor("w", &[100], &[dense(&v)], &[1.0], Strategy::Breadcrumbs, &p)
        else {
            panic!()
        };
        let kept: Vec<f32> = values.into_iter().filter(|x| *x != 0.0).collect();
        assert_eq!(kept, (86..=95).map(|i| i as f32).collect::<Vec<_>>());
    }

    proptest! {
        /// A dense first expert under a strategy that does not trim takes the streaming sum;
        /// its result is the block sweep's, bit for bit, whatever the other inputs are.
        #[test]
        fn streaming_sums_match_the_sweep(
            first in prop::collection::vec(-3i8..3, 64),
            rest in prop::collection::vec((0usize..3, sparse_input(), prop::collection::vec(-3i8..3, 64)), 0..5),
            s in 0usize..4,
            odd_weight in 0usize..3,
        ) {
            let strategy = [Strategy::SparseMean, Strategy::Mean, Strategy::Linear, Strategy::TaskArithmetic][s];
            let val = |x: &i8| *x as f32 * 0.37;
            let mut inputs = vec![Input::Dense { values: first.iter().map(val).collect() }];
            for (kind, (i, v), d) in &rest {
                inputs.push(match kind {
                    0 => Input::Dense { values: d.iter().map(val).collect() },
                    1 => Input::Sparse { indices: i.clone(), values: v.clone() },
                    _ => Input::Absent,
                });
            }
            let weights: Vec<f64> = (0..inputs.len())
                .map(|i| match (odd_weight, i) {
                    (1, 1) => 0.0,
                    (2, 1) => -0.6,
                    _ => 0.25 + i as f64 * 0.7,
                })
                .collect();
            let p = MergeParams { normalize: s == 2, ..MergeParams::default() };
            let got = merge_tensor("t", &[8, 8], &inputs, &weights, strategy, &p);
            let k = Kernel::new(strategy, &p, weights.iter().sum());
            let entries: Vec<Entries> = inputs
                .iter()
                .cloned()
                .map(|i| match i {
                    Input::Sparse { indices, values } => Entries { indices: Some(indices), values },
                    Input::Dense { values } => Entries { indices: None, values },
                    Input::Absent => Entries { indices: Some(Vec::new()), values: Vec::new() },
                })
                .collect();
            let (oi, ov) = combine_union(&entries, 64, &weights, &k);
            let want = Output::from_entries(64, true, oi, ov);
            let bits = |o: &Output| match o {
                Output::Dense { values } => values.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                Output::Sparse { .. } => panic!("a dense input gives a dense output"),
            };
            prop_assert_eq!(bits(&got), bits(&want));
        }
    }

    fn sparse_input() -> impl proptest::strategy::Strategy<Value = (Vec<u64>, Vec<f32>)> {
        prop::collection::btree_map(0u64..64, -4i8..4, 0..40).prop_map(|m| {
            let (i, v): (Vec<u64>, Vec<i8>) = m.into_iter().unzip();
            (i, v.into_iter().map(|x| x as f32 * 0.25).collect())
        })
    }

    proptest! {
        #[test]
        fn properties(experts in prop::collection::vec(sparse_input(), 1..5), s in 0usize..11, seed in 0u64..4) {
            let strategy = Strategy::ALL[s];
            let p = MergeParams { density: 0.5, seed, ..MergeParams::default() };
            let inputs: Vec<Input> = experts.iter().map(|(i, v)| Input::Sparse { indices: i.clone(), values: v.clone() }).collect();
            let w = vec![1.0; inputs.len()];
            let out = merge_tensor("t", &[8, 8], &inputs, &w, strategy, &p);
            let Output::Sparse { indices, values } = &out else { panic!("sparse in, sparse out") };
            // Support ⊆ union of supports; sorted.
            let union: std::collections::BTreeSet<u64> = experts.iter().flat_map(|(i, _)| i.iter().copied()).collect();
            prop_assert!(indices.iter().all(|i| union.contains(i)));
            prop_assert!(indices.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(values.iter().all(|v| v.is_finite()));
            // An extra expert of weight 0 changes nothing (for strategies whose divisor ignores it).
            if !strategy.elects_sign() {
                let mut more = inputs.clone();
                more.push(Input::Sparse { indices: (0..64).collect(), values: vec![1.0; 64] });
                let mut w0 = w.clone();
                w0.push(0.0);
                let out0 = merge_tensor("t", &[8, 8], &more, &w0, strategy, &p);
                let (Output::Sparse { values: a, indices: ia }, Output::Sparse { values: b, indices: ib }) = (&out, &out0) else { panic!() };
                let nz = |ix: &[u64], v: &[f32]| ix.iter().zip(v).filter(|(_, v)| **v != 0.0).map(|(i, v)| (*i, *v)).collect::<Vec<_>>();
                prop_assert_eq!(nz(ia, a), nz(ib, b));
            }
            // One expert under `mean` / identical experts under `sparse-mean` return the expert.
            let (i0, v0) = &experts[0];
            let one = merge_tensor("t", &[8, 8], &inputs[..1], &[1.0], Strategy::Mean, &p);
            prop_assert_eq!(one, Output::Sparse { indices: i0.clone(), values: v0.clone() });
            let twins = vec![inputs[0].clone(), inputs[0].clone(), inputs[0].clone()];
            let sm = merge_tensor("t", &[8, 8], &twins, &[1.0, 2.0, 0.5], Strategy::SparseMean, &p);
            prop_assert_eq!(sm, Output::Sparse { indices: i0.clone(), values: v0.clone() });
        }
    }
}
