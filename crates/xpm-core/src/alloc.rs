//! Allocator settings.
//!
//! A training step allocates and frees many activation-sized buffers. glibc's malloc serves
//! blocks above 128 KiB with fresh `mmap`s (zeroed pages, a page fault per 4 KiB, `munmap` on
//! free); mimalloc reuses them, once told not to return freed memory to the OS. On MiniLM this
//! cut the step time by about a third (docs/benchmarks.md, "Training"). The `xpm` binary and
//! the benchmarks install mimalloc as their global allocator; `xpm train`, `eval`, `demo`,
//! `import` and `serve` call [`configure`], every other command runs [`lean`].
//!
//! Both keep freed memory for reuse (mimalloc's purge delay −1). The streaming commands
//! (`merge`, `pack`, `extract`, …) used to return it after 10 ms, for a low peak RSS. But
//! every return is an `madvise` that interrupts the other cores to flush their TLBs, and the
//! next tensor faults the pages in and zeroes them again: on this project's 2-core VM, purging
//! took more than half of `xpm merge`'s CPU time on densified inputs (12–14 s of system time
//! in a 12 s merge) and about a third on sparse ones (docs/benchmarks.md, "Merge"). Longer
//! delays (50 ms to 1 s) recovered only part of it.
//!
//! What keeps their peak RSS low instead is that [`lean`] turns transparent huge pages off
//! for the process (Linux; the common system setting is `always`). Those commands stream
//! tensor after tensor through buffers of a few MiB: with huge pages, every buffer's first
//! write faulted in and zeroed whole 2 MiB pages. Without them the TIES merge on the merge
//! benchmark peaks at 80–96 MB with no purging, against 113–128 MB with huge pages and 10 ms
//! purging. Arenas are committed on demand in [`lean`] and eagerly (mimalloc's default, 2) in
//! [`configure`], which also leaves huge pages on: training's large matrices profit from them.

unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc.h (v2 and v3).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;
/// `mi_option_arena_eager_commit` in mimalloc.h (v2 and v3).
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

/// For the streaming commands: keep freed memory for reuse, commit arenas lazily, no
/// transparent huge pages (see the module's documentation).
pub fn lean() {
    huge_pages(false);
    set_options([
        ("MIMALLOC_PURGE_DELAY", MI_OPTION_PURGE_DELAY, -1),
        (
            "MIMALLOC_ARENA_EAGER_COMMIT",
            MI_OPTION_ARENA_EAGER_COMMIT,
            0,
        ),
    ]);
}

/// For training, evaluation and serving: keep freed memory for reuse, with mimalloc's default
/// arena commit (2: eager on overcommitting systems) and transparent huge pages allowed.
pub fn configure() {
    huge_pages(true);
    set_options([
        ("MIMALLOC_PURGE_DELAY", MI_OPTION_PURGE_DELAY, -1),
        (
            "MIMALLOC_ARENA_EAGER_COMMIT",
            MI_OPTION_ARENA_EAGER_COMMIT,
            2,
        ),
    ]);
}

/// Allow or forbid transparent huge pages for this process (`PR_SET_THP_DISABLE`, which also
/// applies to memory already mapped), unless `MIMALLOC_ALLOW_THP` is set. Linux only.
fn huge_pages(allow: bool) {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: sets a flag of the calling process; no memory is passed.
        unsafe {
            libc::prctl(
                libc::PR_SET_THP_DISABLE,
                libc::c_ulong::from(!allow),
                0,
                0,
                0,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = allow;
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    // `mi_option_set` is mimalloc's: link it into this test binary.
    extern crate mimalloc;

    #[test]
    fn lean_turns_huge_pages_off_and_configure_on() {
        std::thread::spawn(|| {
            // SAFETY: reads a flag of the calling process.
            let thp_disabled = || unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
            super::lean();
            assert_eq!(thp_disabled(), 1);
            super::configure();
            assert_eq!(thp_disabled(), 0);
        })
        .join()
        .unwrap();
    }
}
