/* xpm merge plugin ABI 1.1. Generated from plugins/xpm-plugin-api/src/lib.rs by
 * cbindgen; do not edit (XPM_BLESS=1 cargo test -p xpm-plugin-api regenerates it). */

#ifndef XPM_PLUGIN_H
#define XPM_PLUGIN_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <stdint.h>
#include <stddef.h>

/**
 * ABI major version: a plugin with another major is refused.
 */
#define XPM_PLUGIN_ABI_MAJOR 1

/**
 * ABI minor version: additions only (new capability bits, fields appended to the descriptor).
 */
#define XPM_PLUGIN_ABI_MINOR 1

/**
 * Success.
 */
#define XPM_OK 0

/**
 * The plugin refused (bad parameters, unsupported input…); the error buffer holds why.
 */
#define XPM_ERR 1

/**
 * The plugin panicked; the error buffer holds the panic message.
 */
#define XPM_PANIC 2

/**
 * Capability: the plugin may drop support entries (clear keep flags). A plugin that clears a
 * keep flag without declaring it is refused.
 */
#define XPM_CAP_DROPS_ENTRIES 1

/**
 * Capability: the plugin uses the per-(expert, tensor) seeds.
 */
#define XPM_CAP_RANDOM 2

/**
 * Capability (ABI 1.1, optional): the plugin never reads `entry_slot` (it works on the
 * experts' positions, [`XpmTensorView::expert_indices`]); the host may leave `entry_slot`
 * NULL and skip mapping every entry to its slot in the support. Meaningful only with
 * [`XPM_CAP_EXPERT_VALUES`], which a 1.0 host refuses.
 */
#define XPM_CAP_NO_SLOTS 4

/**
 * Capability bits 0–31 are optional: a host that does not know one ignores it. Bits 32–63 are
 * required: a host that does not know one refuses the plugin (a later minor version may define
 * a behaviour the host must implement to merge correctly).
 */
#define XPM_CAP_REQUIRED_MASK 18446744069414584320ull

/**
 * Capability (ABI 1.1, required): the plugin reads each expert's values (and may read its
 * positions) through [`XpmTensorView::expert_values`] and [`XpmTensorView::expert_indices`],
 * and the host leaves `entry_value` NULL instead of copying every expert's values into one
 * array. A 1.0 host does not know the bit and refuses the
 * plugin, so a plugin that declares it never meets a view without `expert_values`.
 */
#define XPM_CAP_EXPERT_VALUES 4294967296

/**
 * Every capability bit this version of the ABI defines.
 */
#define XPM_CAP_KNOWN (((XPM_CAP_DROPS_ENTRIES | XPM_CAP_RANDOM) | XPM_CAP_NO_SLOTS) | XPM_CAP_EXPERT_VALUES)

/**
 * Element type of the tensor the values came from (values always cross as f32).
 */
#define XPM_DTYPE_F32 0

#define XPM_DTYPE_F16 1

#define XPM_DTYPE_BF16 2

/**
 * A borrowed UTF-8 string (not NUL-terminated).
 */
typedef struct XpmStr {
  const uint8_t *ptr;
  size_t len;
} XpmStr;

/**
 * A byte buffer allocated by the plugin; the host returns it through `free_buf`.
 */
typedef struct XpmBuf {
  uint8_t *ptr;
  size_t len;
} XpmBuf;

/**
 * One target tensor, as the host presents it to `merge`.
 */
typedef struct XpmTensorView {
  /**
   * The base tensor's name.
   */
  struct XpmStr name;
  /**
   * Shape, outermost first (`ndim` entries).
   */
  const uint64_t *shape;
  size_t ndim;
  /**
   * Element type of the stored deltas (`XPM_DTYPE_*`).
   */
  uint32_t dtype;
  /**
   * Number of experts.
   */
  size_t n_experts;
  /**
   * Sorted flat indices of the union of the experts' masks (`support_len` entries).
   */
  const uint64_t *support;
  size_t support_len;
  /**
   * Expert e's entries are `entries_start[e] .. entries_start[e + 1]` (`n_experts + 1`
   * offsets) in `entry_slot` and `entry_value`: only what the expert stores, so a plugin's
   * work is proportional to the entries, not to experts × support.
   */
  const size_t *entries_start;
  /**
   * For each entry, its position in `support` (0 .. support_len), ascending per expert.
   * NULL for a plugin that declares [`XPM_CAP_NO_SLOTS`].
   */
  const uint32_t *entry_slot;
  /**
   * For each entry, the expert's delta there. NULL for a plugin that declares
   * [`XPM_CAP_EXPERT_VALUES`] (it reads `expert_values`).
   */
  const float *entry_value;
  /**
   * One weight per expert.
   */
  const double *weights;
  /**
   * One seed per expert for this tensor, derived from the merge seed.
   */
  const uint64_t *seeds;
  /**
   * ABI 1.1: one pointer per expert (`n_experts`) to its values, the host's own arrays:
   * expert e's `entries_start[e + 1] − entries_start[e]` values, in the order of its
   * entries in `entry_slot` (never NULL, even for an expert without entries). Only a plugin
   * that declares [`XPM_CAP_EXPERT_VALUES`] may read it: a 1.0 host's view ends before it.
   */
  const float *const *expert_values;
  /**
   * ABI 1.1: one pointer per expert (`n_experts`) to its entries' flat indices in the
   * tensor (row-major), ascending, the host's own arrays; NULL for an expert that stores
   * the tensor densely, whose entries are then the positions 0, 1, …, count − 1. Read it
   * only with [`XPM_CAP_EXPERT_VALUES`].
   */
  const uint64_t *const *expert_indices;
} XpmTensorView;

/**
 * The host-allocated output of `merge` for one tensor.
 */
typedef struct XpmOutputView {
  /**
   * One merged value per support entry.
   */
  float *values;
  /**
   * 1 to keep support entry k (preset to 1), 0 to drop it.
   */
  uint8_t *keep;
  /**
   * Capacity of both arrays: the support length.
   */
  size_t capacity;
  /**
   * Entries the plugin wrote; must equal `capacity` on success.
   */
  size_t written;
} XpmOutputView;

/**
 * Returns the plugin's parameter JSON Schema (a static string the plugin owns).
 */
typedef struct XpmStr (*XpmParamsSchemaFn)(void);

/**
 * Create a merge state from parameters (a JSON object). On failure returns `XPM_ERR` or
 * `XPM_PANIC` and sets `*err`.
 */
typedef int32_t (*XpmCreateFn)(struct XpmStr params_json, void **state, struct XpmBuf *err);

/**
 * Merge one tensor into `out`.
 */
typedef int32_t (*XpmMergeFn)(void *state,
                              const struct XpmTensorView *tensor,
                              struct XpmOutputView *out,
                              struct XpmBuf *err);

/**
 * Free a state made by `create`.
 */
typedef void (*XpmDestroyFn)(void *state);

/**
 * Free a buffer the plugin allocated (error messages).
 */
typedef void (*XpmFreeBufFn)(struct XpmBuf buf);

/**
 * What `xpm_merge_plugin_v1` returns. Later minor versions only append fields: a host reads a
 * field only when the descriptor's `size` covers it, and a descriptor of
 * [`XPM_DESCRIPTOR_V1_0_SIZE`] bytes (ABI 1.0) stays valid for every 1.x host. Every function
 * pointer must be non-NULL; the host refuses a descriptor with a NULL one, naming the slot.
 */
typedef struct XpmPluginDescriptorV1 {
  /**
   * `sizeof(XpmPluginDescriptorV1)` as the plugin was compiled.
   */
  size_t size;
  uint32_t abi_major;
  uint32_t abi_minor;
  /**
   * The strategy name users pass to `--strategy`.
   */
  struct XpmStr name;
  /**
   * The plugin's own version (semver).
   */
  struct XpmStr version;
  /**
   * `XPM_CAP_*` bits.
   */
  uint64_t capabilities;
  XpmParamsSchemaFn params_schema;
  XpmCreateFn create;
  XpmMergeFn merge;
  XpmDestroyFn destroy;
  XpmFreeBufFn free_buf;
} XpmPluginDescriptorV1;

/**
 * The entry point's type.
 *
 * Safety, for plugin authors: a plugin runs inside the xpm process with the user's privileges
 * (loading it runs its initialisers). `merge` may be called concurrently from several threads,
 * each on its own state from `create`; data shared between states must be synchronised. A
 * crash, an `abort` (a Rust plugin built with `panic = "abort"`) or a C++ exception that
 * crosses this ABI takes xpm down with it: catch everything at the boundary and report it
 * through `err`.
 */
typedef const struct XpmPluginDescriptorV1 *(*XpmEntryV1)(void);

#endif  /* XPM_PLUGIN_H */
