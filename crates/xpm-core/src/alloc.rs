//! Allocator settings for training.
//!
//! A training step allocates and frees many activation-sized buffers. glibc's malloc serves
//! blocks above 128 KiB with fresh `mmap`s (zeroed pages, a page fault per 4 KiB, `munmap` on
//! free); mimalloc reuses them, once told not to return freed memory to the OS. On MiniLM this
//! cut the step time by about a third (docs/benchmarks.md, "Training"). The `xpm` binary and
//! the training benchmark install mimalloc as their global allocator; `xpm train`, `xpm eval`
//! and `xpm import` call [`configure`]. Every other command runs [`lean`]: memory goes back to the OS after
//! 10 ms and arenas are committed on demand. With mimalloc's defaults `xpm merge`'s peak RSS on the
//! merge benchmark was about twice what it is with glibc's malloc (docs/benchmarks.md).

unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc.h (v2).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;
/// `mi_option_arena_eager_commit` in mimalloc.h (v2).
const MI_OPTION_ARENA_EAGER_COMMIT: std::ffi::c_int = 4;

/// Set mimalloc options, each unless its `MIMALLOC_*` variable is set (the variable wins).
fn set_options(options: [(&str, std::ffi::c_int, std::ffi::c_long); 2]) {
    for (var, option, value) in options {
        if std::env::var_os(var).is_none() {
            // SAFETY: sets a process-wide allocator option; nothing depends on its old value.
            unsafe { mi_option_set(option, value) };
        }
    }
}

/// Return freed memory after 10 ms (mimalloc's default delay) and commit arenas lazily: a low
/// peak RSS for commands whose large buffers are not reused. Purging at once (delay 0) gave
/// 7–12 % less peak RSS on the merge benchmark but made the TIES merge 7–13 % slower, in page
/// faults and page clearing (docs/benchmarks.md, "Merge").
pub fn lean() {
    set_options([
        ("MIMALLOC_PURGE_DELAY", MI_OPTION_PURGE_DELAY, 10),
        (
            "MIMALLOC_ARENA_EAGER_COMMIT",
            MI_OPTION_ARENA_EAGER_COMMIT,
            0,
        ),
    ]);
}

/// Keep freed memory for reuse, with mimalloc's default arena commit (2: eager on
/// overcommitting systems).
pub fn configure() {
    set_options([
        ("MIMALLOC_PURGE_DELAY", MI_OPTION_PURGE_DELAY, -1),
        (
            "MIMALLOC_ARENA_EAGER_COMMIT",
            MI_OPTION_ARENA_EAGER_COMMIT,
            2,
        ),
    ]);
}
