//! Allocator settings for training.
//!
//! A training step allocates and frees many activation-sized buffers. glibc's malloc serves
//! blocks above 128 KiB with fresh `mmap`s (zeroed pages, a page fault per 4 KiB, `munmap` on
//! free); mimalloc reuses them, once told not to return freed memory to the OS. On MiniLM this
//! cut the step time by about a third (docs/benchmarks.md, "Training"). The `xpm` binary and
//! the training benchmark install mimalloc as their global allocator; `xpm train` and `xpm eval`
//! call [`configure`]. Other commands keep mimalloc's default purging: holding every freed
//! block doubled `xpm merge`'s peak RSS (87 → 188 MB on the merge benchmark).

unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc.h (v2).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Keep freed memory for reuse (unless `MIMALLOC_PURGE_DELAY` says otherwise).
pub fn configure() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a process-wide allocator option; nothing depends on its old value.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}
