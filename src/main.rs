#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Some commands switch to `alloc::reuse` or `alloc::configure` when they start.
    xpm::alloc::lean();
    xpm::cli::main()
}
