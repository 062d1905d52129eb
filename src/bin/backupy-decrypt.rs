fn main() -> std::process::ExitCode {
    backupy_agent::cli::decrypt::main()
}
