fn main() -> std::process::ExitCode {
    xpm::cli::main()
}
