/// Training allocates and frees many activation-sized buffers per step. glibc's malloc serves
/// blocks above 128 KiB with fresh `mmap`s (zeroed pages, a page fault per 4 KiB, `munmap` on
/// free); mimalloc with purging off keeps and reuses them. On MiniLM this cut the step time by
/// a third (docs/benchmarks.md, "Training").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc.h (v2): -1 never returns freed memory to the OS.
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

fn main() -> std::process::ExitCode {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a process-wide allocator option; no allocation depends on its old value.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    xpm::cli::main()
}
