//! The C ABI between xpm and merge plugins (version 1.0). Zero dependencies, `#[repr(C)]` only.
//!
//! A plugin is a dynamic library exporting [`ENTRY_V1`] (`xpm_merge_plugin_v1`), a function
//! returning a pointer to a static [`XpmPluginDescriptorV1`]. The descriptor starts with its own
//! size and the ABI version, so the host can refuse a plugin built for another major version or
//! one whose descriptor is shorter than the host expects, before touching anything else.
//!
//! Per target tensor the host passes an [`XpmTensorView`]: the union support of the experts'
//! masks (sorted flat indices), each expert's entries as (position in the support, value) — an
//! entry is in the expert's mask exactly when it is listed — the expert weights and one seed per
//! (expert, tensor). The host allocates the output
//! ([`XpmOutputView`]): one value per support entry and a keep flag (the plugin may drop entries).
//! Views are valid only during the call. Errors come back as a status code and a message buffer
//! the plugin allocated; the host hands it back to the plugin's `free_buf`.
//!
//! The C header `include/xpm_plugin.h` is generated from this file with cbindgen; a test fails
//! when it drifts (`XPM_BLESS=1 cargo test -p xpm-plugin-api` regenerates it).
#![no_std]

use core::ffi::c_void;

/// ABI major version: a plugin with another major is refused.
pub const XPM_PLUGIN_ABI_MAJOR: u32 = 1;
/// ABI minor version: additions only (new capability bits, fields appended to the descriptor).
pub const XPM_PLUGIN_ABI_MINOR: u32 = 1;

/// The exported entry symbol for ABI major 1 (NUL-terminated for dlsym).
pub const ENTRY_V1: &[u8] = b"xpm_merge_plugin_v1\0";

/// Success.
pub const XPM_OK: i32 = 0;
/// The plugin refused (bad parameters, unsupported input…); the error buffer holds why.
pub const XPM_ERR: i32 = 1;
/// The plugin panicked; the error buffer holds the panic message.
pub const XPM_PANIC: i32 = 2;

/// Capability: the plugin may drop support entries (clear keep flags). A plugin that clears a
/// keep flag without declaring it is refused.
pub const XPM_CAP_DROPS_ENTRIES: u64 = 1;
/// Capability: the plugin uses the per-(expert, tensor) seeds.
pub const XPM_CAP_RANDOM: u64 = 2;
/// Capability (ABI 1.1, optional): the plugin never reads `entry_slot` (it works on the
/// experts' positions, [`XpmTensorView::expert_indices`]); the host may leave `entry_slot`
/// NULL and skip mapping every entry to its slot in the support. Meaningful only with
/// [`XPM_CAP_EXPERT_VALUES`], which a 1.0 host refuses.
pub const XPM_CAP_NO_SLOTS: u64 = 4;
/// Capability bits 0–31 are optional: a host that does not know one ignores it. Bits 32–63 are
/// required: a host that does not know one refuses the plugin (a later minor version may define
/// a behaviour the host must implement to merge correctly).
pub const XPM_CAP_REQUIRED_MASK: u64 = 0xFFFF_FFFF_0000_0000;
/// Capability (ABI 1.1, required): the plugin reads each expert's values (and may read its
/// positions) through [`XpmTensorView::expert_values`] and [`XpmTensorView::expert_indices`],
/// and the host leaves `entry_value` NULL instead of copying every expert's values into one
/// array. A 1.0 host does not know the bit and refuses the
/// plugin, so a plugin that declares it never meets a view without `expert_values`.
pub const XPM_CAP_EXPERT_VALUES: u64 = 0x1_0000_0000;
/// Every capability bit this version of the ABI defines.
pub const XPM_CAP_KNOWN: u64 =
    XPM_CAP_DROPS_ENTRIES | XPM_CAP_RANDOM | XPM_CAP_NO_SLOTS | XPM_CAP_EXPERT_VALUES;

/// Element type of the tensor the values came from (values always cross as f32).
pub const XPM_DTYPE_F32: u32 = 0;
pub const XPM_DTYPE_F16: u32 = 1;
pub const XPM_DTYPE_BF16: u32 = 2;

/// A borrowed UTF-8 string (not NUL-terminated).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct XpmStr {
    pub ptr: *const u8,
    pub len: usize,
}

/// A byte buffer allocated by the plugin; the host returns it through `free_buf`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct XpmBuf {
    pub ptr: *mut u8,
    pub len: usize,
}

/// One target tensor, as the host presents it to `merge`.
#[repr(C)]
pub struct XpmTensorView {
    /// The base tensor's name.
    pub name: XpmStr,
    /// Shape, outermost first (`ndim` entries).
    pub shape: *const u64,
    pub ndim: usize,
    /// Element type of the stored deltas (`XPM_DTYPE_*`).
    pub dtype: u32,
    /// Number of experts.
    pub n_experts: usize,
    /// Sorted flat indices of the union of the experts' masks (`support_len` entries).
    pub support: *const u64,
    pub support_len: usize,
    /// Expert e's entries are `entries_start[e] .. entries_start[e + 1]` (`n_experts + 1`
    /// offsets) in `entry_slot` and `entry_value`: only what the expert stores, so a plugin's
    /// work is proportional to the entries, not to experts × support.
    pub entries_start: *const usize,
    /// For each entry, its position in `support` (0 .. support_len), ascending per expert.
    /// NULL for a plugin that declares [`XPM_CAP_NO_SLOTS`].
    pub entry_slot: *const u32,
    /// For each entry, the expert's delta there. NULL for a plugin that declares
    /// [`XPM_CAP_EXPERT_VALUES`] (it reads `expert_values`).
    pub entry_value: *const f32,
    /// One weight per expert.
    pub weights: *const f64,
    /// One seed per expert for this tensor, derived from the merge seed.
    pub seeds: *const u64,
    /// ABI 1.1: one pointer per expert (`n_experts`) to its values, the host's own arrays:
    /// expert e's `entries_start[e + 1] − entries_start[e]` values, in the order of its
    /// entries in `entry_slot` (never NULL, even for an expert without entries). Only a plugin
    /// that declares [`XPM_CAP_EXPERT_VALUES`] may read it: a 1.0 host's view ends before it.
    pub expert_values: *const *const f32,
    /// ABI 1.1: one pointer per expert (`n_experts`) to its entries' flat indices in the
    /// tensor (row-major), ascending, the host's own arrays; NULL for an expert that stores
    /// the tensor densely, whose entries are then the positions 0, 1, …, count − 1. Read it
    /// only with [`XPM_CAP_EXPERT_VALUES`].
    pub expert_indices: *const *const u64,
}

/// The host-allocated output of `merge` for one tensor.
#[repr(C)]
pub struct XpmOutputView {
    /// One merged value per support entry.
    pub values: *mut f32,
    /// 1 to keep support entry k (preset to 1), 0 to drop it.
    pub keep: *mut u8,
    /// Capacity of both arrays: the support length.
    pub capacity: usize,
    /// Entries the plugin wrote; must equal `capacity` on success.
    pub written: usize,
}

// The entry points are `Option`s of function pointers: the same layout as a C function pointer,
// and a NULL from a C plugin is `None` (never a Rust fn pointer that is null).

/// Returns the plugin's parameter JSON Schema (a static string the plugin owns).
pub type XpmParamsSchemaFn = Option<unsafe extern "C" fn() -> XpmStr>;
/// Create a merge state from parameters (a JSON object). On failure returns `XPM_ERR` or
/// `XPM_PANIC` and sets `*err`.
pub type XpmCreateFn = Option<
    unsafe extern "C" fn(params_json: XpmStr, state: *mut *mut c_void, err: *mut XpmBuf) -> i32,
>;
/// Merge one tensor into `out`.
pub type XpmMergeFn = Option<
    unsafe extern "C" fn(
        state: *mut c_void,
        tensor: *const XpmTensorView,
        out: *mut XpmOutputView,
        err: *mut XpmBuf,
    ) -> i32,
>;
/// Free a state made by `create`.
pub type XpmDestroyFn = Option<unsafe extern "C" fn(state: *mut c_void)>;
/// Free a buffer the plugin allocated (error messages).
pub type XpmFreeBufFn = Option<unsafe extern "C" fn(buf: XpmBuf)>;

/// What `xpm_merge_plugin_v1` returns. Later minor versions only append fields: a host reads a
/// field only when the descriptor's `size` covers it, and a descriptor of
/// [`XPM_DESCRIPTOR_V1_0_SIZE`] bytes (ABI 1.0) stays valid for every 1.x host. Every function
/// pointer must be non-NULL; the host refuses a descriptor with a NULL one, naming the slot.
#[repr(C)]
pub struct XpmPluginDescriptorV1 {
    /// `sizeof(XpmPluginDescriptorV1)` as the plugin was compiled.
    pub size: usize,
    pub abi_major: u32,
    pub abi_minor: u32,
    /// The strategy name users pass to `--strategy`.
    pub name: XpmStr,
    /// The plugin's own version (semver).
    pub version: XpmStr,
    /// `XPM_CAP_*` bits.
    pub capabilities: u64,
    pub params_schema: XpmParamsSchemaFn,
    pub create: XpmCreateFn,
    pub merge: XpmMergeFn,
    pub destroy: XpmDestroyFn,
    pub free_buf: XpmFreeBufFn,
}

/// The size of an ABI 1.0 descriptor, frozen: fields appended by later minor versions lie past
/// it, and hosts accept any descriptor at least this large.
/// 96 bytes on 64-bit targets, 56 on 32-bit ones.
pub const XPM_DESCRIPTOR_V1_0_SIZE: usize = 10 * core::mem::size_of::<usize>() + 16;

// The 1.0 layout is frozen: these fail to compile if a field moves or the size changes.
const _: () = {
    use core::mem::{offset_of, size_of};
    type D = XpmPluginDescriptorV1;
    let p = size_of::<usize>();
    assert!(offset_of!(D, size) == 0);
    assert!(offset_of!(D, abi_major) == p);
    assert!(offset_of!(D, abi_minor) == p + 4);
    assert!(offset_of!(D, name) == p + 8);
    assert!(offset_of!(D, version) == 3 * p + 8);
    assert!(offset_of!(D, capabilities) == 5 * p + 8);
    assert!(offset_of!(D, params_schema) == 5 * p + 16);
    assert!(offset_of!(D, create) == 6 * p + 16);
    assert!(offset_of!(D, merge) == 7 * p + 16);
    assert!(offset_of!(D, destroy) == 8 * p + 16);
    assert!(offset_of!(D, free_buf) == 9 * p + 16);
    assert!(size_of::<D>() == XPM_DESCRIPTOR_V1_0_SIZE);
    // `Option` of a function pointer is a nullable pointer: the C layout is unchanged.
    assert!(size_of::<XpmMergeFn>() == p);
};

/// The entry point's type.
///
/// Safety, for plugin authors: a plugin runs inside the xpm process with the user's privileges
/// (loading it runs its initialisers). `merge` may be called concurrently from several threads,
/// each on its own state from `create`; data shared between states must be synchronised. A
/// crash, an `abort` (a Rust plugin built with `panic = "abort"`) or a C++ exception that
/// crosses this ABI takes xpm down with it: catch everything at the boundary and report it
/// through `err`.
pub type XpmEntryV1 = unsafe extern "C" fn() -> *const XpmPluginDescriptorV1;

// SAFETY: a descriptor is an immutable static (plain data and function pointers; its
// `XpmStr`s point at static strings), never written after the plugin is built, so sharing it
// between threads is sound.
unsafe impl Sync for XpmPluginDescriptorV1 {}
// SAFETY: an `XpmStr` in a descriptor points at a static, immutable string (the ABI's rule for
// descriptor strings), so reading it from any thread is sound.
unsafe impl Sync for XpmStr {}
