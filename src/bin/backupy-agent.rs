fn main() -> std::process::ExitCode {
    backupy_agent::cli::agent::main()
}
