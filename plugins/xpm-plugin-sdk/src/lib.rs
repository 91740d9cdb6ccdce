//! Write an xpm merge strategy in safe Rust.
//!
//! ```ignore
//! struct Median;
//! impl xpm_plugin_sdk::Strategy for Median {
//!     const NAME: &'static str = "median";
//!     const VERSION: &'static str = "1.0.0";
//!     fn create(_params: serde_json::Value) -> Result<Self, String> { Ok(Median) }
//!     fn merge(&mut self, t: &Tensor<'_>, out: &mut Output<'_>) -> Result<(), String> { … }
//! }
//! xpm_plugin_sdk::export!(Median);
//! ```
//!
//! `export!` produces the `xpm_merge_plugin_v1` symbol and a static descriptor, turns the raw
//! views into slices, and wraps every entry point in `catch_unwind`: a panic becomes
//! `XPM_PANIC` with its message instead of unwinding into the host (which would be undefined
//! behaviour). Build the crate as a `cdylib`; docs/plugins.md walks through it.

pub use serde_json;
pub use xpm_plugin_api as api;

use api::{XpmBuf, XpmOutputView, XpmStr, XpmTensorView};

/// One target tensor: the union support and every expert's entries on it.
pub struct Tensor<'a> {
    pub name: &'a str,
    pub shape: &'a [u64],
    /// `XPM_DTYPE_*` of the stored deltas (values always arrive as f32).
    pub dtype: u32,
    /// Sorted flat indices of the union of the experts' masks.
    pub support: &'a [u64],
    pub weights: &'a [f64],
    /// One seed per expert for this tensor.
    pub seeds: &'a [u64],
    starts: &'a [usize],
    /// Empty for a strategy that does not use slots ([`Strategy::USES_SLOTS`]).
    slots: &'a [u32],
    uses_slots: bool,
    /// Each expert's values and flat indices (`None`: stored densely, every position), as
    /// the host holds them (ABI 1.1's `expert_values` and `expert_indices`: no copy).
    values: Vec<&'a [f32]>,
    indices: Vec<Option<&'a [u64]>>,
}

impl<'a> Tensor<'a> {
    /// Number of experts.
    pub fn n_experts(&self) -> usize {
        self.weights.len()
    }
    /// Expert `e`'s entries: positions in [`Tensor::support`] (ascending) and values. An entry
    /// is in the expert's mask exactly when it is listed.
    ///
    /// Panics for a strategy that declares [`Strategy::USES_SLOTS`] `false` (the host then
    /// computes no slots): use [`Tensor::positions`].
    pub fn entries(&self, e: usize) -> (&'a [u32], &'a [f32]) {
        self.need_slots();
        (
            &self.slots[self.starts[e]..self.starts[e + 1]],
            self.values[e],
        )
    }
    fn need_slots(&self) {
        assert!(
            self.uses_slots,
            "this strategy declares USES_SLOTS = false: use Tensor::positions"
        );
    }
    /// Expert `e`'s entries as flat indices into the tensor (row-major, ascending) and values:
    /// [`Positions::Indices`], or [`Positions::All`] for an expert that stores the tensor
    /// densely (its entries are every position, in order). Works whether or not the strategy
    /// uses slots; with [`Strategy::USES_SLOTS`] `false` the host skips mapping entries to
    /// slots, and a strategy that walks positions in blocks (`plugins/examples/mean`) needs
    /// none.
    pub fn positions(&self, e: usize) -> (Positions<'a>, &'a [f32]) {
        let values = self.values[e];
        match self.indices[e] {
            Some(ix) => (Positions::Indices(ix), values),
            None => (Positions::All(values.len()), values),
        }
    }
    /// Expert `e`'s values as a dense row over the support (0 outside its mask).
    pub fn dense_row(&self, e: usize) -> Vec<f32> {
        let mut row = vec![0f32; self.support.len()];
        let (s, v) = self.entries(e);
        for (&k, &x) in s.iter().zip(v) {
            row[k as usize] = x;
        }
        row
    }
    /// The entries grouped by support position: for each position, the (expert, value) pairs
    /// in expert order.
    pub fn by_position(&self) -> ByPosition {
        self.need_slots();
        let n = self.support.len();
        let mut start = vec![0u32; n + 1];
        for &k in self.slots {
            start[k as usize + 1] += 1;
        }
        for i in 1..=n {
            start[i] += start[i - 1];
        }
        let mut fill = start[..n].to_vec();
        let mut who = vec![0u32; self.slots.len()];
        let mut val = vec![0f32; self.slots.len()];
        for e in 0..self.n_experts() {
            let (s, v) = self.entries(e);
            for (&k, &x) in s.iter().zip(v) {
                let at = fill[k as usize] as usize;
                who[at] = e as u32;
                val[at] = x;
                fill[k as usize] += 1;
            }
        }
        ByPosition { start, who, val }
    }
}

/// Where an expert's entries are (see [`Tensor::positions`]).
#[derive(Debug, Clone, Copy)]
pub enum Positions<'a> {
    /// Flat indices, ascending, one per entry.
    Indices(&'a [u64]),
    /// Every position 0, 1, …, n − 1 (the expert stores the tensor densely).
    All(usize),
}

/// Entries grouped by support position (see [`Tensor::by_position`]).
pub struct ByPosition {
    start: Vec<u32>,
    who: Vec<u32>,
    val: Vec<f32>,
}

impl ByPosition {
    /// The (expert, value) pairs at support position `k`, in expert order.
    pub fn at(&self, k: usize) -> impl Iterator<Item = (usize, f32)> + '_ {
        let r = self.start[k] as usize..self.start[k + 1] as usize;
        self.who[r.clone()]
            .iter()
            .map(|&e| e as usize)
            .zip(self.val[r].iter().copied())
    }
}

/// Where the merged values go: one per support entry; clear `keep[k]` to drop entry k.
pub struct Output<'a> {
    pub values: &'a mut [f32],
    pub keep: &'a mut [u8],
}

/// A merge strategy.
pub trait Strategy: Sized + Send + 'static {
    /// The name users pass to `xpm merge --strategy`.
    const NAME: &'static str;
    /// The plugin's version (semver).
    const VERSION: &'static str;
    /// JSON Schema of the parameters; xpm validates `--param`s against it before any work.
    const PARAMS_SCHEMA: &'static str = r#"{"type": "object", "additionalProperties": false}"#;
    /// `api::XPM_CAP_*` bits.
    const CAPABILITIES: u64 = 0;
    /// Whether `merge` reads slots ([`Tensor::entries`], [`Tensor::by_position`],
    /// [`Tensor::dense_row`]). `false` declares `XPM_CAP_NO_SLOTS`: the host skips mapping
    /// every entry to its support slot, and the strategy works on [`Tensor::positions`].
    const USES_SLOTS: bool = true;
    /// Build the strategy from its parameters (a JSON object).
    fn create(params: serde_json::Value) -> Result<Self, String>;
    /// Merge one tensor.
    fn merge(&mut self, tensor: &Tensor<'_>, out: &mut Output<'_>) -> Result<(), String>;
}

/// `&'static str` as an [`XpmStr`] (usable in statics).
pub const fn xpm_str(s: &'static str) -> XpmStr {
    XpmStr {
        ptr: s.as_ptr(),
        len: s.len(),
    }
}

#[doc(hidden)]
pub mod __rt {
    use super::*;
    use std::ffi::c_void;
    use std::panic::{AssertUnwindSafe, catch_unwind};

    fn set_err(err: *mut XpmBuf, msg: &str) {
        if err.is_null() {
            return;
        }
        let b: Box<[u8]> = msg.as_bytes().into();
        let len = b.len();
        let ptr = Box::into_raw(b) as *mut u8;
        // SAFETY: the host passes a valid out-pointer for the duration of the call.
        unsafe { *err = XpmBuf { ptr, len } };
    }

    fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
        if let Some(s) = p.downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = p.downcast_ref::<String>() {
            s.clone()
        } else {
            "panic with a non-string payload".to_string()
        }
    }

    /// Run `f`, mapping `Err` to `XPM_ERR` and a panic to `XPM_PANIC`, both with a message.
    fn guard(err: *mut XpmBuf, f: impl FnOnce() -> Result<(), String>) -> i32 {
        // The plugin links its own copy of std, so this hook only silences the plugin's panics
        // (the host reports them, with the message, instead of a second report on stderr).
        static QUIET: std::sync::Once = std::sync::Once::new();
        QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(())) => api::XPM_OK,
            Ok(Err(m)) => {
                set_err(err, &m);
                api::XPM_ERR
            }
            Err(p) => {
                set_err(err, &panic_message(p));
                api::XPM_PANIC
            }
        }
    }

    pub unsafe extern "C" fn params_schema<S: Strategy>() -> XpmStr {
        xpm_str(S::PARAMS_SCHEMA)
    }

    /// # Safety
    /// Called by the host with a valid UTF-8 view and valid out-pointers.
    pub unsafe extern "C" fn create<S: Strategy>(
        params: XpmStr,
        state: *mut *mut c_void,
        err: *mut XpmBuf,
    ) -> i32 {
        guard(err, || {
            // SAFETY: the host guarantees `params` points at `len` readable bytes.
            let bytes = unsafe { std::slice::from_raw_parts(params.ptr, params.len) };
            let v: serde_json::Value = serde_json::from_slice(bytes)
                .map_err(|e| format!("parameters are not valid JSON: {e}"))?;
            let s = S::create(v)?;
            // SAFETY: valid out-pointer for the call.
            unsafe { *state = Box::into_raw(Box::new(s)) as *mut c_void };
            Ok(())
        })
    }

    /// # Safety
    /// `state` came from `create::<S>`; the views are valid for the call.
    pub unsafe extern "C" fn merge<S: Strategy>(
        state: *mut c_void,
        tensor: *const XpmTensorView,
        out: *mut XpmOutputView,
        err: *mut XpmBuf,
    ) -> i32 {
        guard(err, || {
            // SAFETY: per the ABI contract every pointer is valid for its stated length.
            let (s, t, o) = unsafe { (&mut *(state as *mut S), &*tensor, &mut *out) };
            let n = t.support_len;
            let e = t.n_experts;
            // SAFETY: the ABI contract: `name.ptr` points at `name.len` readable bytes for the
            // call (the only pointer this closure is given).
            let slice = |p: *const u8, len: usize| unsafe { std::slice::from_raw_parts(p, len) };
            // SAFETY: the ABI contract: `entries_start` has `n_experts + 1` entries, `shape`
            // `ndim`, `support` `support_len`, `weights`, `seeds`, `expert_values` and
            // `expert_indices` `n_experts`, `entry_slot` (unless NULL under XPM_CAP_NO_SLOTS)
            // `entries_start[n_experts]`, and expert i's values and non-NULL indices
            // `entries_start[i + 1] − entries_start[i]`, all readable for the duration of the
            // call. The descriptor declares XPM_CAP_EXPERT_VALUES, so the host is 1.1 or later
            // (a 1.0 host refuses the plugin) and both per-expert arrays are set.
            let tensor = unsafe {
                let starts = std::slice::from_raw_parts(t.entries_start, e + 1);
                let total = starts[e];
                let per_expert = std::slice::from_raw_parts(t.expert_values, e);
                let per_expert_ix = std::slice::from_raw_parts(t.expert_indices, e);
                let count = |i: usize| starts[i + 1] - starts[i];
                Tensor {
                    name: std::str::from_utf8(slice(t.name.ptr, t.name.len))
                        .map_err(|e| e.to_string())?,
                    shape: std::slice::from_raw_parts(t.shape, t.ndim),
                    dtype: t.dtype,
                    support: std::slice::from_raw_parts(t.support, n),
                    weights: std::slice::from_raw_parts(t.weights, e),
                    seeds: std::slice::from_raw_parts(t.seeds, e),
                    starts,
                    // No slots when the strategy declared it uses none (entry_slot is NULL).
                    uses_slots: S::USES_SLOTS,
                    slots: if S::USES_SLOTS {
                        std::slice::from_raw_parts(t.entry_slot, total)
                    } else {
                        &[]
                    },
                    values: (0..e)
                        .map(|i| std::slice::from_raw_parts(per_expert[i], count(i)))
                        .collect(),
                    indices: (0..e)
                        .map(|i| {
                            let p = per_expert_ix[i];
                            (!p.is_null()).then(|| std::slice::from_raw_parts(p, count(i)))
                        })
                        .collect(),
                }
            };
            // SAFETY: the ABI contract: the host's output arrays hold `capacity` writable
            // elements, not aliased by any input, for the duration of the call.
            let mut output = unsafe {
                Output {
                    values: std::slice::from_raw_parts_mut(o.values, o.capacity),
                    keep: std::slice::from_raw_parts_mut(o.keep, o.capacity),
                }
            };
            s.merge(&tensor, &mut output)?;
            o.written = o.capacity;
            Ok(())
        })
    }

    /// # Safety
    /// `state` came from `create::<S>` and is not used afterwards.
    pub unsafe extern "C" fn destroy<S: Strategy>(state: *mut c_void) {
        if !state.is_null() {
            let _ = catch_unwind(AssertUnwindSafe(|| {
                // SAFETY: `state` came from `Box::into_raw` in `create::<S>` and the host
                // never uses it again (the caller's contract).
                drop(unsafe { Box::from_raw(state as *mut S) })
            }));
        }
    }

    /// # Safety
    /// `buf` came from this plugin's `set_err`.
    pub unsafe extern "C" fn free_buf(buf: XpmBuf) {
        if !buf.ptr.is_null() {
            // SAFETY: `buf` is a boxed slice of `len` bytes leaked by `set_err`, freed once.
            drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(buf.ptr, buf.len)) });
        }
    }
}

/// Export `$strategy` (a type implementing [`Strategy`]) as an xpm merge plugin.
#[macro_export]
macro_rules! export {
    ($strategy:ty) => {
        #[unsafe(no_mangle)]
        pub extern "C" fn xpm_merge_plugin_v1() -> *const $crate::api::XpmPluginDescriptorV1 {
            static DESCRIPTOR: $crate::api::XpmPluginDescriptorV1 =
                $crate::api::XpmPluginDescriptorV1 {
                    size: ::core::mem::size_of::<$crate::api::XpmPluginDescriptorV1>(),
                    abi_major: $crate::api::XPM_PLUGIN_ABI_MAJOR,
                    abi_minor: $crate::api::XPM_PLUGIN_ABI_MINOR,
                    name: $crate::xpm_str(<$strategy as $crate::Strategy>::NAME),
                    version: $crate::xpm_str(<$strategy as $crate::Strategy>::VERSION),
                    // The SDK reads each expert's values where the host holds them (ABI 1.1).
                    capabilities: <$strategy as $crate::Strategy>::CAPABILITIES
                        | $crate::api::XPM_CAP_EXPERT_VALUES
                        | if <$strategy as $crate::Strategy>::USES_SLOTS {
                            0
                        } else {
                            $crate::api::XPM_CAP_NO_SLOTS
                        },
                    params_schema: Some($crate::__rt::params_schema::<$strategy>),
                    create: Some($crate::__rt::create::<$strategy>),
                    merge: Some($crate::__rt::merge::<$strategy>),
                    destroy: Some($crate::__rt::destroy::<$strategy>),
                    free_buf: Some($crate::__rt::free_buf),
                };
            &DESCRIPTOR
        }
    };
}
