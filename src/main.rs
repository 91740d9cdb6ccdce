#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // `xpm train`, `eval` and `demo` switch to `alloc::configure` when they start.
    xpm::alloc::lean();
    xpm::cli::main()
}
