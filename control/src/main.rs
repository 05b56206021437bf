//! `podfleet`: the fleet CLI and the controller process (docs/cli.md).

fn main() -> std::process::ExitCode {
    podfleet_control::cli::entry::main()
}
