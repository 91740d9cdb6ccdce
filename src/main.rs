fn main() -> std::process::ExitCode {
    tune_allocator();
    xpm::cli::main()
}

/// Training allocates and frees many activation-sized buffers per step. glibc serves blocks
/// above 128 KiB with fresh `mmap`s (zeroed pages, a page fault per 4 KiB, `munmap` on free),
/// which doubled the step time on MiniLM (docs/benchmarks.md, "Training"). Keep them on the
/// heap (up to 32 MiB, glibc's maximum) and do not give memory back on every free.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread
    // exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
