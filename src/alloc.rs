//! Allocator settings for training.
//!
//! A training step allocates and frees many activation-sized buffers. glibc's malloc serves
//! blocks above 128 KiB with fresh `mmap`s (zeroed pages, a page fault per 4 KiB, `munmap` on
//! free); mimalloc reuses them, once told not to return freed memory to the OS. On MiniLM this
//! cut the step time by about a third (docs/benchmarks.md, "Training"). The `xpm` binary and
//! the training benchmark install mimalloc as their global allocator; `xpm train` and `xpm eval`
//! call [`configure`]. Every other command runs [`lean`]: memory goes back to the OS at once
//! and arenas are committed on demand. With mimalloc's defaults `xpm merge`'s peak RSS on the
//! merge benchmark was about twice what it is with glibc's malloc (docs/benchmarks.md).

unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc.h (v2).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;
/// `mi_option_arena_eager_commit` in mimalloc.h (v2).
const MI_OPTION_ARENA_EAGER_COMMIT: std::ffi::c_int = 4;

/// Return freed memory at once and commit arenas lazily (unless the `MIMALLOC_*` variables say
/// otherwise): the lowest peak RSS, for commands whose large buffers are not reused.
pub fn lean() {
    for (var, option, value) in [
        ("MIMALLOC_PURGE_DELAY", MI_OPTION_PURGE_DELAY, 0),
        (
            "MIMALLOC_ARENA_EAGER_COMMIT",
            MI_OPTION_ARENA_EAGER_COMMIT,
            0,
        ),
    ] {
        if std::env::var_os(var).is_none() {
            // SAFETY: sets a process-wide allocator option; nothing depends on its old value.
            unsafe { mi_option_set(option, value) };
        }
    }
}

/// Keep freed memory for reuse (unless `MIMALLOC_PURGE_DELAY` says otherwise).
pub fn configure() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a process-wide allocator option; nothing depends on its old value.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_none() {
        // SAFETY: as above; 2 is mimalloc's default (eager on overcommitting systems).
        unsafe { mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 2) };
    }
}
