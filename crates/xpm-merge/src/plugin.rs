//! Merge strategies from dynamic libraries (the C ABI of `plugins/xpm-plugin-api`).
//!
//! Discovery: `--plugin PATH` (files), then `$XPM_PLUGIN_PATH` (files or directories,
//! `:`-separated), then `$XPM_HOME/plugins`; in those directories only the file named for the
//! strategy (`libxpm_plugin_<name>.so`) is loaded. A library is loaded with `libloading`, its
//! `xpm_merge_plugin_v1` descriptor checked (size, ABI major) before anything else is read, and
//! it is never unloaded while xpm runs (code from it may still be referenced). A plugin runs
//! with your privileges: panics are caught by the SDK and reported; crashes are not containable.

use std::ffi::c_void;
use std::path::{Path, PathBuf};

use xpm_plugin_api::{
    ENTRY_V1, XPM_CAP_DROPS_ENTRIES, XPM_CAP_EXPERT_VALUES, XPM_CAP_KNOWN, XPM_CAP_NO_SLOTS,
    XPM_CAP_REQUIRED_MASK, XPM_DESCRIPTOR_V1_0_SIZE, XPM_OK, XPM_PANIC, XPM_PLUGIN_ABI_MAJOR,
    XpmBuf, XpmCreateFn, XpmDestroyFn, XpmEntryV1, XpmFreeBufFn, XpmMergeFn, XpmOutputView,
    XpmParamsSchemaFn, XpmPluginDescriptorV1, XpmStr, XpmTensorView,
};

use crate::engine::{Input, Output, Stream};
use xpm_core::error::{Error, Result};
use xpm_core::format::Dtype;

/// A loaded plugin.
pub struct Plugin {
    pub path: PathBuf,
    /// `sha256:` of the library file.
    pub sha256: String,
    pub name: String,
    pub version: String,
    pub abi_major: u32,
    pub abi_minor: u32,
    pub capabilities: u64,
    /// The parameters' JSON Schema.
    pub params_schema: serde_json::Value,
    fns: Entries,
}

/// The function pointer inside an entry-point slot of the descriptor.
type Fn<T> = <T as SlotFn>::F;

/// Maps an `Option<fn>` slot type of the ABI to its non-NULL function pointer type.
trait SlotFn {
    type F;
}

impl<F> SlotFn for Option<F> {
    type F = F;
}

/// The descriptor's entry points, checked non-NULL at load.
struct Entries {
    create: Fn<XpmCreateFn>,
    merge: Fn<XpmMergeFn>,
    destroy: Fn<XpmDestroyFn>,
    free_buf: Fn<XpmFreeBufFn>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("path", &self.path)
            .finish()
    }
}

// SAFETY: the descriptor is a static in a library that is never unloaded; the ABI requires the
// entry points to be callable from any thread (each call gets its own state).
unsafe impl Send for Plugin {}
// SAFETY: as for `Send`: the descriptor is immutable, and concurrent calls on different states
// are allowed by the ABI.
unsafe impl Sync for Plugin {}

fn plugin_error(path: &Path, msg: impl std::fmt::Display, hint: Option<&str>) -> Error {
    Error::Plugin {
        plugin: path.display().to_string(),
        message: msg.to_string(),
        hint: hint.map(str::to_string),
    }
}

/// # Safety
/// `s` must point at `len` readable bytes for the lifetime of the library.
unsafe fn read_str(s: XpmStr) -> Option<String> {
    if s.ptr.is_null() {
        return None;
    }
    // SAFETY: non-null, and the caller guarantees `len` readable bytes.
    let b = unsafe { std::slice::from_raw_parts(s.ptr, s.len) };
    std::str::from_utf8(b).ok().map(str::to_string)
}

/// Load the library at `path` (never unloaded) and call its entry point; the descriptor it
/// returned, non-NULL.
fn load_descriptor(path: &Path) -> Result<*const XpmPluginDescriptorV1> {
    // A bare file name would go to the dynamic loader's search path (LD_LIBRARY_PATH,
    // system directories), not to the file the user named: load by absolute path.
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    // SAFETY: loading a library runs its initialisers; that is the trust a user grants by
    // naming or installing a plugin (docs/plugins.md, "Safety").
    let lib = unsafe { libloading::Library::new(&abs) }.map_err(|e| {
        plugin_error(
            path,
            format!("cannot load it: {e}"),
            Some("is it a shared library built for this platform?"),
        )
    })?;
    // SAFETY: the symbol's type is fixed by the ABI.
    let entry: XpmEntryV1 = unsafe { lib.get::<XpmEntryV1>(ENTRY_V1) }
        .map(|s| *s)
        .map_err(|_| {
            plugin_error(
                path,
                "it does not export `xpm_merge_plugin_v1`",
                Some("a plugin must be built for ABI 1 (with xpm-plugin-sdk's `export!`, or `xpm_plugin.h`)"),
            )
        })?;
    // Never unload: code and statics of the library may be referenced for the process's life.
    std::mem::forget(lib);
    // SAFETY: ABI contract; the pointer is checked before use.
    let d = unsafe { entry() };
    if d.is_null() {
        return Err(plugin_error(
            path,
            "its entry point returned no descriptor",
            None,
        ));
    }
    Ok(d)
}

/// Check the descriptor's ABI major version, then its size; the descriptor as this host's type.
fn check_descriptor_header(
    path: &Path,
    d: *const XpmPluginDescriptorV1,
) -> Result<&'static XpmPluginDescriptorV1> {
    // The header every ABI version shares (size, major, minor) first: another major may
    // lay out everything after it differently, so it is checked before the size.
    // SAFETY: every descriptor of every ABI version starts with `size: usize` and the two
    // `u32` version numbers.
    let (size, major, minor) = unsafe {
        let p = d as *const u8;
        let size = std::ptr::read_unaligned(p as *const usize);
        let major = std::ptr::read_unaligned(p.add(std::mem::size_of::<usize>()) as *const u32);
        let minor = std::ptr::read_unaligned(p.add(std::mem::size_of::<usize>() + 4) as *const u32);
        (size, major, minor)
    };
    if major != XPM_PLUGIN_ABI_MAJOR {
        return Err(plugin_error(
            path,
            format!(
                "it was built for plugin ABI {major}.{minor}, this xpm speaks ABI {XPM_PLUGIN_ABI_MAJOR}.x"
            ),
            Some("rebuild the plugin against this xpm's xpm-plugin-api, or use a matching xpm"),
        ));
    }
    // A 1.x descriptor is at least the frozen 1.0 size; fields that later minors append
    // lie past it and are read only when `size` covers them (none yet).
    if size < XPM_DESCRIPTOR_V1_0_SIZE {
        return Err(plugin_error(
            path,
            format!(
                "its descriptor is {size} bytes, smaller than the {XPM_DESCRIPTOR_V1_0_SIZE} of ABI 1.0"
            ),
            Some("rebuild the plugin against the current xpm-plugin-api"),
        ));
    }
    // SAFETY: at least the 1.0 size, which is this host's descriptor type, static for the
    // process.
    Ok(unsafe { &*d })
}

/// The plugin's strategy name and version, checked (a valid name, a semantic version).
fn read_identity(path: &Path, desc: &XpmPluginDescriptorV1) -> Result<(String, String)> {
    // SAFETY: strings in the descriptor are static in the library.
    let name = unsafe { read_str(desc.name) }
        .ok_or_else(|| plugin_error(path, "its name is not UTF-8", None))?;
    // SAFETY: as for the name.
    let version = unsafe { read_str(desc.version) }
        .ok_or_else(|| plugin_error(path, "its version is not UTF-8", None))?;
    xpm_core::format::manifest::validate_name(&name)
        .map_err(|e| plugin_error(path, format!("invalid strategy name: {e}"), None))?;
    semver::Version::parse(&version).map_err(|e| {
        plugin_error(
            path,
            format!("its version `{version}` is not a semantic version: {e}"),
            Some("plugin versions go into the provenance of merged experts; use e.g. `1.0.0`"),
        )
    })?;
    Ok((name, version))
}

/// The plugin's parameter schema: UTF-8, JSON, and a valid JSON Schema.
fn read_params_schema(
    path: &Path,
    params_schema_fn: Fn<XpmParamsSchemaFn>,
) -> Result<serde_json::Value> {
    // SAFETY: ABI call returning a static string.
    let schema_text = unsafe { read_str(params_schema_fn()) }
        .ok_or_else(|| plugin_error(path, "its parameter schema is not UTF-8", None))?;
    let params_schema: serde_json::Value = serde_json::from_str(&schema_text)
        .map_err(|e| plugin_error(path, format!("its parameter schema is not JSON: {e}"), None))?;
    jsonschema::validator_for(&params_schema).map_err(|e| {
        plugin_error(
            path,
            format!("its parameter schema is not a valid JSON Schema: {e}"),
            None,
        )
    })?;
    Ok(params_schema)
}

impl Plugin {
    /// Load and check a plugin library.
    pub fn load(path: &Path) -> Result<Plugin> {
        let bytes = std::fs::read(path)
            .map_err(|e| plugin_error(path, format!("cannot read it: {e}"), None))?;
        let sha256 = xpm_core::digest::sha256(&bytes);
        drop(bytes);
        let d = load_descriptor(path)?;
        let desc = check_descriptor_header(path, d)?;
        let null = |name: &str| {
            plugin_error(
                path,
                format!("its descriptor's `{name}` entry point is NULL"),
                Some("every function pointer of the descriptor must be set"),
            )
        };
        let params_schema_fn = desc.params_schema.ok_or_else(|| null("params_schema"))?;
        let fns = Entries {
            create: desc.create.ok_or_else(|| null("create"))?,
            merge: desc.merge.ok_or_else(|| null("merge"))?,
            destroy: desc.destroy.ok_or_else(|| null("destroy"))?,
            free_buf: desc.free_buf.ok_or_else(|| null("free_buf"))?,
        };
        let unknown_required = desc.capabilities & XPM_CAP_REQUIRED_MASK & !XPM_CAP_KNOWN;
        if unknown_required != 0 {
            return Err(plugin_error(
                path,
                format!(
                    "it requires capabilities this xpm does not implement (bits {unknown_required:#x})"
                ),
                Some("upgrade xpm to a version that speaks the plugin's ABI minor version"),
            ));
        }
        let (name, version) = read_identity(path, desc)?;
        let params_schema = read_params_schema(path, params_schema_fn)?;
        Ok(Plugin {
            path: path.to_path_buf(),
            sha256,
            name,
            version,
            abi_major: desc.abi_major,
            abi_minor: desc.abi_minor,
            capabilities: desc.capabilities,
            params_schema,
            fns,
        })
    }

    /// Check `params` against the plugin's schema, then create (and drop) one state, so bad
    /// parameters fail before any work.
    pub fn check_params(&self, params: &serde_json::Value) -> Result<()> {
        let v = jsonschema::validator_for(&self.params_schema).expect("checked at load");
        let errors: Vec<String> = v
            .iter_errors(params)
            .map(|e| match e.instance_path().to_string() {
                p if p.is_empty() => format!("{e} (in the parameter object)"),
                p => format!("{e} (at `{p}`)"),
            })
            .collect();
        if !errors.is_empty() {
            return Err(plugin_error(
                &self.path,
                format!(
                    "invalid parameters for `{}`: {}",
                    self.name,
                    errors.join("; ")
                ),
                Some(&format!("the parameter schema: {}", self.params_schema)),
            ));
        }
        self.instance(params).map(drop)
    }

    /// A merge state for `params`.
    pub fn instance(&self, params: &serde_json::Value) -> Result<Instance<'_>> {
        let json = params.to_string();
        let mut state: *mut c_void = std::ptr::null_mut();
        let mut err = XpmBuf {
            ptr: std::ptr::null_mut(),
            len: 0,
        };
        let s = XpmStr {
            ptr: json.as_ptr(),
            len: json.len(),
        };
        // SAFETY: ABI call with valid views and out-pointers.
        let rc = unsafe { (self.fns.create)(s, &mut state, &mut err) };
        if rc != XPM_OK {
            return Err(self.call_error("create", rc, err));
        }
        Ok(Instance {
            plugin: self,
            state,
        })
    }

    fn call_error(&self, what: &str, rc: i32, err: XpmBuf) -> Error {
        let msg = if err.ptr.is_null() {
            "no message".to_string()
        } else {
            // SAFETY: the plugin allocated `len` bytes; it frees them below.
            let m =
                String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(err.ptr, err.len) })
                    .to_string();
            // SAFETY: `err` was filled by this plugin and is freed exactly once, by it.
            unsafe { (self.fns.free_buf)(err) };
            m
        };
        let kind = if rc == XPM_PANIC {
            "panicked"
        } else {
            "failed"
        };
        plugin_error(
            &self.path,
            format!("`{}` {kind} in {what}: {msg}", self.name),
            Some("nothing was written; report this to the plugin's author"),
        )
    }
}

/// One plugin state.
pub struct Instance<'p> {
    plugin: &'p Plugin,
    state: *mut c_void,
}

impl Drop for Instance<'_> {
    fn drop(&mut self) {
        // SAFETY: `state` came from this plugin's `create`.
        unsafe { (self.plugin.fns.destroy)(self.state) };
    }
}

/// The host's per-tensor arrays, kept per thread from one tensor to the next. They are a few
/// times the tensor's entries in size, too large for [`xpm_core::pool`]; allocated afresh, their
/// pages were faulted in and zeroed again for every tensor (a third of the plugin path's CPU
/// time on the merge benchmark, docs/benchmarks.md).
#[derive(Default)]
struct Scratch {
    bits: Vec<u64>,
    prefix: Vec<u32>,
    support: Vec<u64>,
    starts: Vec<usize>,
    slots: Vec<u32>,
    values: Vec<f32>,
    out_vals: Vec<f32>,
    keep: Vec<u8>,
}

impl Scratch {
    /// Larger scratch is dropped after use rather than kept for the next tensor.
    const MAX_KEPT: usize = 64 << 20;

    fn bytes(&self) -> usize {
        fn b<T>(v: &Vec<T>) -> usize {
            v.capacity() * size_of::<T>()
        }
        b(&self.bits)
            + b(&self.prefix)
            + b(&self.support)
            + b(&self.starts)
            + b(&self.slots)
            + b(&self.values)
            + b(&self.out_vals)
            + b(&self.keep)
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// This thread's [`Scratch`] while a merge uses it; back to the thread when the merge ends.
struct KeptScratch(Scratch);

impl Drop for KeptScratch {
    fn drop(&mut self) {
        if self.0.bytes() <= Scratch::MAX_KEPT {
            SCRATCH.set(std::mem::take(&mut self.0));
        }
    }
}

impl Instance<'_> {
    /// Merge one tensor: build the union support and the experts' values on it, call the
    /// plugin, check its output (length, finite values), keep the entries it kept.
    pub fn merge(
        &mut self,
        tensor: &str,
        shape: &[u64],
        dtype: Dtype,
        inputs: &[Input],
        weights: &[f64],
        seed: u64,
    ) -> Result<Output> {
        let mut kept = KeptScratch(SCRATCH.take());
        let s = &mut kept.0;
        let n: u64 = shape.iter().product();
        let dense = inputs.iter().any(|i| matches!(i, Input::Dense { .. }));
        union_support(s, inputs, n, dense);
        let len = s.support.len();
        let ne = inputs.len();
        if len > u32::MAX as usize {
            return Err(plugin_error(
                &self.plugin.path,
                format!(
                    "tensor `{tensor}` has {len} support entries, more than the ABI's u32 positions"
                ),
                None,
            ));
        }
        // A plugin that reads each expert's values where they are (ABI 1.1) gets no copy, and
        // one that works on positions no slots.
        let caps = self.plugin.capabilities;
        let per_expert = caps & XPM_CAP_EXPERT_VALUES != 0;
        let slots = !(per_expert && caps & XPM_CAP_NO_SLOTS != 0);
        gather_entries(s, inputs, dense, !per_expert, slots);
        let expert_values: Vec<*const f32> = inputs
            .iter()
            .map(|i| match i {
                Input::Sparse { values, .. } | Input::Dense { values } => values.as_ptr(),
                Input::Absent => [].as_ptr(),
            })
            .collect();
        let expert_indices: Vec<*const u64> = inputs
            .iter()
            .map(|i| match i {
                Input::Sparse { indices, .. } => indices.as_ptr(),
                Input::Dense { .. } => std::ptr::null(),
                Input::Absent => [].as_ptr(),
            })
            .collect();
        let seeds: Vec<u64> = (0..ne as u64)
            .map(|e| Stream::new(seed, e, tensor).key())
            .collect();
        let mut view = tensor_view(s, tensor, shape, dtype, weights, &seeds);
        (view.expert_values, view.expert_indices) =
            (expert_values.as_ptr(), expert_indices.as_ptr());
        if per_expert {
            view.entry_value = std::ptr::null();
        }
        if !slots {
            view.entry_slot = std::ptr::null();
        }
        let written = self.call_merge(&view, tensor, &mut s.out_vals, &mut s.keep)?;
        let n_kept = self.check_output(s, tensor, written)?;
        let (mut oi, mut ov) = (xpm_core::pool::take(n_kept), xpm_core::pool::take(n_kept));
        if n_kept == len {
            // Nothing dropped (every plugin without XPM_CAP_DROPS_ENTRIES): the support and the
            // values are the output. Swapped, not copied; the scratch keeps the empty buffers
            // (from the pool) for the next tensor.
            std::mem::swap(&mut oi, &mut s.support);
            std::mem::swap(&mut ov, &mut s.out_vals);
        } else {
            for k in 0..len {
                if s.keep[k] != 0 {
                    oi.push(s.support[k]);
                    ov.push(s.out_vals[k]);
                }
            }
        }
        Ok(Output::from_entries(n, dense, oi, ov))
    }

    /// Call the plugin on `view` into `out_vals` and `keep`, zeroed and preset to 1 (as the ABI
    /// says) on every call; the number of values it wrote.
    fn call_merge(
        &mut self,
        view: &XpmTensorView,
        tensor: &str,
        out_vals: &mut Vec<f32>,
        keep: &mut Vec<u8>,
    ) -> Result<usize> {
        let len = view.support_len;
        out_vals.clear();
        out_vals.resize(len, 0.0);
        keep.clear();
        keep.resize(len, 1);
        let mut out = XpmOutputView {
            values: out_vals.as_mut_ptr(),
            keep: keep.as_mut_ptr(),
            capacity: len,
            written: 0,
        };
        let mut err = XpmBuf {
            ptr: std::ptr::null_mut(),
            len: 0,
        };
        // SAFETY: every view is valid for the call; outputs are host-allocated with `len`.
        let rc = unsafe { (self.plugin.fns.merge)(self.state, view, &mut out, &mut err) };
        if rc != XPM_OK {
            return Err(self
                .plugin
                .call_error(&format!("tensor `{tensor}`"), rc, err));
        }
        Ok(out.written)
    }

    /// Check the plugin's output in `s` (`written` values, finite, keep flags 0 or 1, entries
    /// dropped only with the capability); the number of entries kept.
    fn check_output(&self, s: &Scratch, tensor: &str, written: usize) -> Result<usize> {
        let p = self.plugin;
        let (support, out_vals, keep) = (&s.support, &s.out_vals, &s.keep);
        let len = support.len();
        if written != len {
            return Err(plugin_error(
                &p.path,
                format!(
                    "`{}` returned {} values for tensor `{tensor}`, which has {len} support entries",
                    p.name, written
                ),
                Some("nothing was written; report this to the plugin's author"),
            ));
        }
        // One pass for the three checks below (they name the first offender each), in integer
        // accumulators the compiler vectorises (boolean ones it did not: a tenth of the host's
        // plugin time).
        let (mut non_finite, mut bad_flag, mut n_kept) = (0u32, 0u8, 0usize);
        for (v, k) in out_vals.chunks(1 << 16).zip(keep.chunks(1 << 16)) {
            let mut kept = 0u32;
            for (v, &k) in v.iter().zip(k) {
                non_finite |= u32::from(v.to_bits() & 0x7f80_0000 == 0x7f80_0000);
                bad_flag |= k & !1;
                kept += u32::from(k);
            }
            n_kept += kept as usize;
        }
        let (finite, flags) = (non_finite == 0, bad_flag == 0);
        if !finite && let Some(k) = out_vals.iter().position(|v| !v.is_finite()) {
            return Err(plugin_error(
                &p.path,
                format!(
                    "`{}` produced {} at flat index {} of tensor `{tensor}`",
                    p.name, out_vals[k], support[k]
                ),
                Some(
                    "nothing was written; check the inputs and parameters, or report this to the plugin's author",
                ),
            ));
        }
        if !flags && let Some(k) = keep.iter().position(|&k| k > 1) {
            return Err(plugin_error(
                &p.path,
                format!(
                    "`{}` set keep flag {} at support entry {k} of tensor `{tensor}`; flags are 0 or 1",
                    p.name, keep[k]
                ),
                Some("nothing was written; report this to the plugin's author"),
            ));
        }
        if n_kept < len && p.capabilities & XPM_CAP_DROPS_ENTRIES == 0 {
            return Err(plugin_error(
                &p.path,
                format!(
                    "`{}` dropped {} entries of tensor `{tensor}` without declaring the \
                     XPM_CAP_DROPS_ENTRIES capability",
                    p.name,
                    len - n_kept
                ),
                Some("nothing was written; a plugin that drops entries must declare it"),
            ));
        }
        Ok(n_kept)
    }
}

/// The union of the inputs' positions into `s.support`: every position when any input is dense,
/// else through a bitmap (`s.bits`), O(entries + n / 64), no sort; with per-word prefix counts
/// (`s.prefix`) it gives every position its slot in the support in O(1).
fn union_support(s: &mut Scratch, inputs: &[Input], n: u64, dense: bool) {
    let (bits, prefix, support) = (&mut s.bits, &mut s.prefix, &mut s.support);
    support.clear();
    if dense {
        support.extend(0..n);
        return;
    }
    bits.clear();
    bits.resize((n as usize).div_ceil(64), 0);
    for i in inputs {
        if let Input::Sparse { indices, .. } = i {
            for &x in indices {
                bits[(x / 64) as usize] |= 1 << (x % 64);
            }
        }
    }
    prefix.clear();
    let mut count = 0u32;
    for b in bits.iter() {
        prefix.push(count);
        count += b.count_ones();
    }
    // Written into the reserved room with a local count (a `push` per position checked the
    // capacity and stored the length each time).
    support.reserve(count as usize);
    let room = &mut support.spare_capacity_mut()[..count as usize];
    let mut at = 0;
    for (w, &word) in bits.iter().enumerate() {
        let mut b = word;
        while b != 0 {
            room[at].write(w as u64 * 64 + b.trailing_zeros() as u64);
            at += 1;
            b &= b - 1;
        }
    }
    // SAFETY: the loop wrote one position per set bit, `count` of them, into the room.
    unsafe { support.set_len(count as usize) };
}

/// Each expert's entries as (position in the support, value), concatenated into `s.slots`
/// (unless a plugin works on positions: `with_slots` false) and (with `copy_values`, for
/// plugins of ABI 1.0) `s.values`, with expert e's entries at `s.starts[e]..s.starts[e + 1]`.
fn gather_entries(
    s: &mut Scratch,
    inputs: &[Input],
    dense: bool,
    copy_values: bool,
    with_slots: bool,
) {
    let len = s.support.len();
    let (bits, prefix) = (&s.bits, &s.prefix);
    let (starts, slots, values) = (&mut s.starts, &mut s.slots, &mut s.values);
    starts.clear();
    slots.clear();
    values.clear();
    let total: usize = inputs.iter().map(input_len).sum();
    if with_slots {
        slots.reserve(total);
    }
    if copy_values {
        values.reserve(total);
    }
    starts.push(0usize);
    for input in inputs {
        match input {
            Input::Dense { values: d } => {
                if with_slots {
                    slots.extend(0..len as u32);
                }
                if copy_values {
                    values.extend_from_slice(d);
                }
            }
            Input::Sparse {
                indices,
                values: sv,
            } => {
                if with_slots && dense {
                    // The support is every position: a position is its own slot.
                    slots.extend(indices.iter().map(|&i| i as u32));
                } else if with_slots {
                    support_slots(indices, bits, prefix, slots);
                }
                if copy_values {
                    values.extend_from_slice(sv);
                }
            }
            Input::Absent => {}
        }
        starts.push(starts.last().expect("starts at 0") + input_len(input));
    }
}

/// How many entries an expert lists: what it stores (every position when dense).
fn input_len(input: &Input) -> usize {
    match input {
        Input::Sparse { values, .. } | Input::Dense { values } => values.len(),
        Input::Absent => 0,
    }
}

/// Each of `indices`' slot in the support: the set bits of the union bitmap `bits` below it,
/// from the per-word prefix counts `prefix`. With the CPU's `popcnt` where it has one (every
/// x86-64 CPU since 2008, but not the x86-64 baseline the binary is built for, under which
/// `count_ones` is a dozen instructions: 7 % of a plugin merge's time).
fn support_slots(indices: &[u64], bits: &[u64], prefix: &[u32], slots: &mut Vec<u32>) {
    // A plain loop into the reserved capacity: `Vec::extend` would run it in a generic
    // function of its own, compiled without the caller's `popcnt` (as measured: the software
    // popcount was 7 % of a plugin merge).
    #[inline(always)]
    fn each(indices: &[u64], bits: &[u64], prefix: &[u32], slots: &mut Vec<u32>) {
        let start = slots.len();
        slots.reserve(indices.len());
        for (dst, &i) in slots.spare_capacity_mut().iter_mut().zip(indices) {
            let w = (i / 64) as usize;
            dst.write(prefix[w] + (bits[w] & ((1u64 << (i % 64)) - 1)).count_ones());
        }
        // SAFETY: the loop wrote the `indices.len()` slots after `start`, within the capacity
        // reserved above.
        unsafe { slots.set_len(start + indices.len()) };
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "popcnt")]
        fn with_popcnt(indices: &[u64], bits: &[u64], prefix: &[u32], slots: &mut Vec<u32>) {
            each(indices, bits, prefix, slots)
        }
        if std::arch::is_x86_feature_detected!("popcnt") {
            // SAFETY: the CPU has `popcnt`, checked just above.
            return unsafe { with_popcnt(indices, bits, prefix, slots) };
        }
    }
    each(indices, bits, prefix, slots)
}

/// The ABI's view of one tensor's merge inputs, pointing into `s`, `shape`, `weights` and
/// `seeds` (one per expert), which must outlive its use; the ABI 1.1 per-expert arrays are
/// NULL here, for the caller to set.
fn tensor_view(
    s: &Scratch,
    tensor: &str,
    shape: &[u64],
    dtype: Dtype,
    weights: &[f64],
    seeds: &[u64],
) -> XpmTensorView {
    XpmTensorView {
        name: XpmStr {
            ptr: tensor.as_ptr(),
            len: tensor.len(),
        },
        shape: shape.as_ptr(),
        ndim: shape.len(),
        dtype: match dtype {
            Dtype::F16 => xpm_plugin_api::XPM_DTYPE_F16,
            Dtype::BF16 => xpm_plugin_api::XPM_DTYPE_BF16,
            _ => xpm_plugin_api::XPM_DTYPE_F32,
        },
        n_experts: seeds.len(),
        support: s.support.as_ptr(),
        support_len: s.support.len(),
        entries_start: s.starts.as_ptr(),
        entry_slot: s.slots.as_ptr(),
        entry_value: s.values.as_ptr(),
        weights: weights.as_ptr(),
        seeds: seeds.as_ptr(),
        expert_values: std::ptr::null(),
        expert_indices: std::ptr::null(),
    }
}

/// The directories (and library files) searched for plugins: the entries of
/// `$XPM_PLUGIN_PATH` (`plugin_path`, read by the command), then `$XPM_HOME/plugins`.
pub fn search_path(
    plugin_path: Option<&std::ffi::OsStr>,
    home: &xpm_core::home::XpmHome,
) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = plugin_path
        .map(|v| std::env::split_paths(v).collect())
        .unwrap_or_default();
    dirs.push(home.root.join("plugins"));
    dirs
}

/// The file a plugin providing strategy `name` has in a plugin directory, as cargo names a
/// `cdylib` crate `xpm-plugin-<name>`: `libxpm_plugin_<name>.so` (`.dylib` on macOS,
/// `xpm_plugin_<name>.dll` on Windows), with `-` in the name as `_`.
pub fn library_file_name(name: &str) -> String {
    format!(
        "{}xpm_plugin_{}{}",
        std::env::consts::DLL_PREFIX,
        name.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    )
}

/// Every library in `explicit` and the `search` path (directories are listed), in discovery
/// order, with whether it was named explicitly. `xpm plugin list` loads all of them.
pub fn candidates(explicit: &[PathBuf], search: &[PathBuf]) -> Vec<(PathBuf, bool)> {
    let mut out: Vec<(PathBuf, bool)> = explicit.iter().map(|p| (p.clone(), true)).collect();
    for d in search {
        if d.is_file() {
            out.push((d.clone(), false));
        } else if let Ok(rd) = std::fs::read_dir(d) {
            let mut libs: Vec<PathBuf> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.extension()
                        .is_some_and(|x| x == std::env::consts::DLL_EXTENSION)
                })
                .collect();
            libs.sort();
            out.extend(libs.into_iter().map(|p| (p, false)));
        }
    }
    out
}

/// The plugin providing strategy `name`. Libraries named with `--plugin` (`explicit`) are
/// loaded in order until one provides it. In the `search` path only the library file named
/// for the strategy ([`library_file_name`]) is loaded, as cargo finds `cargo-<cmd>`: a typo in
/// `--strategy` runs no plugin's initialisers, and no other library is loaded.
pub fn find(name: &str, explicit: &[PathBuf], search: &[PathBuf]) -> Result<Option<Plugin>> {
    for path in explicit {
        let p = Plugin::load(path)?;
        if p.name == name {
            return Ok(Some(p));
        }
    }
    let file = library_file_name(name);
    for d in search {
        let path = if d.is_file() {
            if d.file_name().is_none_or(|f| *f != *file) {
                continue;
            }
            d.clone()
        } else {
            d.join(&file)
        };
        if !path.is_file() {
            continue;
        }
        let p = Plugin::load(&path)?;
        if p.name != name {
            return Err(plugin_error(
                &path,
                format!(
                    "it provides strategy `{}`, not `{name}` as its file name says",
                    p.name
                ),
                Some(&format!(
                    "rename the file to `{}`, or load it with --plugin",
                    library_file_name(&p.name)
                )),
            ));
        }
        return Ok(Some(p));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "libxpm_plugin_test.so";

    fn xstr(s: &'static [u8]) -> XpmStr {
        XpmStr {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// A descriptor with every entry point NULL and the given header.
    fn descriptor(size: usize, major: u32, minor: u32) -> Box<XpmPluginDescriptorV1> {
        Box::new(XpmPluginDescriptorV1 {
            size,
            abi_major: major,
            abi_minor: minor,
            name: xstr(b"test"),
            version: xstr(b"1.0.0"),
            capabilities: 0,
            params_schema: None,
            create: None,
            merge: None,
            destroy: None,
            free_buf: None,
        })
    }

    fn header(d: XpmPluginDescriptorV1) -> Result<()> {
        // Leaked: the header check hands out a `'static` reference, as for a loaded library.
        let d: &'static XpmPluginDescriptorV1 = Box::leak(Box::new(d));
        check_descriptor_header(Path::new(PATH), d).map(|_| ())
    }

    #[test]
    fn descriptor_header_checks_major_then_size() {
        let ok = *descriptor(XPM_DESCRIPTOR_V1_0_SIZE, XPM_PLUGIN_ABI_MAJOR, 0);
        assert!(header(ok).is_ok());
        // A later minor may append fields: a larger descriptor is accepted.
        let larger = *descriptor(XPM_DESCRIPTOR_V1_0_SIZE + 8, XPM_PLUGIN_ABI_MAJOR, 7);
        assert!(header(larger).is_ok());

        let other_major = *descriptor(XPM_DESCRIPTOR_V1_0_SIZE, XPM_PLUGIN_ABI_MAJOR + 1, 3);
        let e = header(other_major).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "built for plugin ABI {}.3, this xpm speaks ABI {XPM_PLUGIN_ABI_MAJOR}.x",
                XPM_PLUGIN_ABI_MAJOR + 1
            )),
            "{e}"
        );
        assert!(e.contains(PATH), "{e}");

        // The major is checked first: another major with a tiny size names the ABI, not the size.
        let tiny_other = *descriptor(8, XPM_PLUGIN_ABI_MAJOR + 1, 0);
        let e = header(tiny_other).unwrap_err().to_string();
        assert!(e.contains("built for plugin ABI"), "{e}");

        let small = *descriptor(XPM_DESCRIPTOR_V1_0_SIZE - 1, XPM_PLUGIN_ABI_MAJOR, 0);
        let e = header(small).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "is {} bytes, smaller than the {XPM_DESCRIPTOR_V1_0_SIZE} of ABI 1.0",
                XPM_DESCRIPTOR_V1_0_SIZE - 1
            )),
            "{e}"
        );
    }

    #[test]
    fn identity_needs_a_valid_name_and_a_semantic_version() {
        let path = Path::new(PATH);
        let d = descriptor(XPM_DESCRIPTOR_V1_0_SIZE, XPM_PLUGIN_ABI_MAJOR, 0);
        assert_eq!(
            read_identity(path, &d).unwrap(),
            ("test".to_string(), "1.0.0".to_string())
        );

        let mut bad_name = descriptor(XPM_DESCRIPTOR_V1_0_SIZE, XPM_PLUGIN_ABI_MAJOR, 0);
        bad_name.name = xstr(b"Not A Name");
        let e = read_identity(path, &bad_name).unwrap_err().to_string();
        assert!(e.contains("invalid strategy name"), "{e}");

        let mut not_utf8 = descriptor(XPM_DESCRIPTOR_V1_0_SIZE, XPM_PLUGIN_ABI_MAJOR, 0);
        not_utf8.name = xstr(b"\xff\xfe");
        let e = read_identity(path, &not_utf8).unwrap_err().to_string();
        assert!(e.contains("its name is not UTF-8"), "{e}");

        let mut null_version = descriptor(XPM_DESCRIPTOR_V1_0_SIZE, XPM_PLUGIN_ABI_MAJOR, 0);
        null_version.version = XpmStr {
            ptr: std::ptr::null(),
            len: 0,
        };
        let e = read_identity(path, &null_version).unwrap_err().to_string();
        assert!(e.contains("its version is not UTF-8"), "{e}");

        let mut bad_version = descriptor(XPM_DESCRIPTOR_V1_0_SIZE, XPM_PLUGIN_ABI_MAJOR, 0);
        bad_version.version = xstr(b"one");
        let e = read_identity(path, &bad_version).unwrap_err().to_string();
        assert!(e.contains("`one` is not a semantic version"), "{e}");
    }

    #[test]
    fn support_is_the_sorted_union_and_slots_index_it() {
        let inputs = vec![
            Input::Sparse {
                indices: vec![3, 64, 130],
                values: vec![1.0, 2.0, 3.0],
            },
            Input::Absent,
            Input::Sparse {
                indices: vec![0, 3, 200],
                values: vec![4.0, 5.0, 6.0],
            },
        ];
        let mut s = Scratch::default();
        union_support(&mut s, &inputs, 256, false);
        assert_eq!(s.support, vec![0, 3, 64, 130, 200]);
        gather_entries(&mut s, &inputs, false, true, true);
        assert_eq!(s.starts, vec![0, 3, 3, 6]);
        assert_eq!(s.slots, vec![1, 2, 3, 0, 1, 4]);
        assert_eq!(s.values, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        // For a plugin that reads each expert's values where they are (ABI 1.1), the same
        // slots and no concatenated values.
        gather_entries(&mut s, &inputs, false, false, true);
        assert_eq!(s.starts, vec![0, 3, 3, 6]);
        assert_eq!(s.slots, vec![1, 2, 3, 0, 1, 4]);
        assert!(s.values.is_empty());
        // For one that works on positions (XPM_CAP_NO_SLOTS), the ranges alone.
        gather_entries(&mut s, &inputs, false, false, false);
        assert_eq!(s.starts, vec![0, 3, 3, 6]);
        assert!(s.slots.is_empty() && s.values.is_empty());

        // A dense input makes every position part of the support; positions are their slots.
        let inputs = vec![
            Input::Dense {
                values: vec![1.0, 0.0, 2.0],
            },
            Input::Sparse {
                indices: vec![2],
                values: vec![7.0],
            },
        ];
        union_support(&mut s, &inputs, 3, true);
        assert_eq!(s.support, vec![0, 1, 2]);
        gather_entries(&mut s, &inputs, true, true, true);
        assert_eq!(s.starts, vec![0, 3, 4]);
        assert_eq!(s.slots, vec![0, 1, 2, 2]);
        assert_eq!(s.values, vec![1.0, 0.0, 2.0, 7.0]);
    }

    #[test]
    fn discovery_names_and_search_order() {
        let file = library_file_name("magnitude-max");
        assert!(file.contains("xpm_plugin_magnitude_max"), "{file}");
        assert!(file.ends_with(std::env::consts::DLL_SUFFIX), "{file}");

        let d = tempfile::tempdir().unwrap();
        let lib = |n: &str| {
            d.path()
                .join(format!("{n}.{}", std::env::consts::DLL_EXTENSION))
        };
        for n in ["b", "a"] {
            std::fs::write(lib(n), b"").unwrap();
        }
        std::fs::write(d.path().join("notes.txt"), b"").unwrap();
        let explicit = vec![PathBuf::from("x")];
        let search = vec![d.path().to_path_buf(), d.path().join("missing")];
        assert_eq!(
            candidates(&explicit, &search),
            vec![
                (PathBuf::from("x"), true),
                (lib("a"), false),
                (lib("b"), false)
            ]
        );
        // Only the file named for the strategy is loaded from a search directory: none here.
        assert!(find("a", &[], &search).unwrap().is_none());

        let home = xpm_core::home::XpmHome::resolve(Some(d.path().join("home")));
        let sep = if cfg!(windows) { ";" } else { ":" };
        let path = std::ffi::OsString::from(format!("/p1{sep}/p2"));
        assert_eq!(
            search_path(Some(&path), &home),
            vec![
                PathBuf::from("/p1"),
                PathBuf::from("/p2"),
                d.path().join("home").join("plugins")
            ]
        );
    }
}
