//! Allocator settings.
//!
//! A training step allocates and frees many activation-sized buffers. glibc's malloc serves
//! blocks above 128 KiB with fresh `mmap`s (zeroed pages, a page fault per 4 KiB, `munmap` on
//! free); mimalloc reuses them, once told not to return freed memory to the OS. On MiniLM this
//! cut the step time by about a third (docs/benchmarks.md, "Training"). The `xpm` binary and
//! the benchmarks install mimalloc as their global allocator, and every command picks one of
//! three settings:
//!
//! - [`lean`] (the default, set in `main`): freed memory goes back to the OS after 10 ms,
//!   arenas are committed on demand, and transparent huge pages are off. With mimalloc's
//!   defaults `xpm merge`'s peak RSS on the merge benchmark was about twice what it was with
//!   glibc's malloc.
//! - [`reuse`] (`xpm merge` of sparse experts, `xpm export`): the same, but freed memory is
//!   kept for reuse. Every
//!   return of memory is an `madvise` that interrupts the other cores to flush their TLBs, and
//!   the next tensor faults the pages in and zeroes them again: on this project's 2-core VM,
//!   purging took more than half of `xpm merge`'s CPU time on densified inputs (12–14 s of
//!   system time in a 12 s merge) and about a third on sparse ones; export's runs took 1.3 s,
//!   or 6 s when the purges stalled (docs/benchmarks.md, "Merge"). Longer delays (50 ms to 1 s)
//!   recovered only part of it. These commands stream tensors of similar sizes through the
//!   buffers of [`crate::pool`], so what they keep is what the next tensor needs. Large dense
//!   tensors are another matter: keeping freed memory raised `xpm pack`'s peak RSS on the format
//!   benchmark from 445 MB to 607 MB, and a `ties` merge of four dense experts of eight
//!   4096 × 4096 tensors from 0.91–0.97 GB to 1.54–1.58 GB (for half the time). So `pack` stays
//!   on [`lean`], and `merge` switches to [`reuse`] only when every input is a sparse expert
//!   ([`reuse_if_lean`]). A merge of dense experts still reuses its own buffers under [`lean`]:
//!   `merge` asks [`crate::pool`] to keep each thread's large buffers from one tensor to the
//!   next ([`crate::pool::keep_large_buffers`]; the densified merge benchmark: 12 s of system
//!   time → under 1 s). `pack` does not: kept, its 67 MB buffers raised its peak by 30 MB.
//! - [`configure`] (`xpm train`, `eval`, `demo`, `import`, `serve`): freed memory kept, arenas
//!   committed eagerly (mimalloc's default, 2), transparent huge pages allowed: training's
//!   large matrices profit from them.
//!
//! Transparent huge pages are off in [`lean`] and [`reuse`] (Linux; the common system setting
//! is `always`): those commands stream tensor after tensor through buffers of a few MiB, and
//! with huge pages every buffer's first write faulted in and zeroed whole 2 MiB pages. The
//! TIES merge on the merge benchmark peaks at 80–96 MB without them, against 113–128 MB with
//! them.

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

/// Which of the settings below the process runs (0: none set).
static MODE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
const LEAN: u8 = 1;
const REUSE: u8 = 2;
const CONFIGURE: u8 = 3;

/// [`reuse`] if the process runs [`lean`]; otherwise (training, serving) nothing changes. For
/// library code that knows its work suits [`reuse`] (a merge of sparse experts) but must not
/// override what the command chose.
pub fn reuse_if_lean() {
    if MODE.load(std::sync::atomic::Ordering::Relaxed) == LEAN {
        reuse();
    }
}

/// Whether the process keeps freed memory for reuse ([`reuse`] or [`configure`]). The large
/// buffers of [`crate::pool`] are kept then, and under [`lean`] only where the command asks
/// ([`crate::pool::keep_large_buffers`]).
pub fn keeps_freed_memory() -> bool {
    matches!(
        MODE.load(std::sync::atomic::Ordering::Relaxed),
        REUSE | CONFIGURE
    )
}

/// The default: return freed memory after 10 ms (mimalloc's default delay), commit arenas on
/// demand, no transparent huge pages (see the module's documentation).
pub fn lean() {
    set(LEAN);
}

/// For `xpm merge` of sparse experts and `xpm export`: as [`lean`], but freed memory is kept
/// (see the module's documentation).
pub fn reuse() {
    set(REUSE);
}

/// For training, evaluation and serving: keep freed memory for reuse, with mimalloc's default
/// arena commit (2: eager on overcommitting systems) and transparent huge pages allowed.
pub fn configure() {
    set(CONFIGURE);
}

/// Switch the process to `mode`: its purge delay, arena commit and huge-page setting.
fn set(mode: u8) {
    let (purge_delay, eager_commit) = match mode {
        LEAN => (10, 0),
        REUSE => (-1, 0),
        _ => (-1, 2),
    };
    MODE.store(mode, std::sync::atomic::Ordering::Relaxed);
    huge_pages(mode == CONFIGURE);
    set_options([
        ("MIMALLOC_PURGE_DELAY", MI_OPTION_PURGE_DELAY, purge_delay),
        (
            "MIMALLOC_ARENA_EAGER_COMMIT",
            MI_OPTION_ARENA_EAGER_COMMIT,
            eager_commit,
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
    fn lean_and_reuse_turn_huge_pages_off_and_configure_on() {
        std::thread::spawn(|| {
            // SAFETY: reads a flag of the calling process.
            let thp_disabled = || unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
            super::lean();
            assert_eq!(thp_disabled(), 1);
            super::configure();
            assert_eq!(thp_disabled(), 0);
            super::reuse_if_lean();
            assert_eq!(thp_disabled(), 0, "configure stays");
            super::lean();
            super::reuse_if_lean();
            assert_eq!(
                super::MODE.load(std::sync::atomic::Ordering::Relaxed),
                super::REUSE
            );
            assert_eq!(thp_disabled(), 1);
        })
        .join()
        .unwrap();
    }
}
