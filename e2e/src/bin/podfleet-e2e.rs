//! The `podfleet` CLI and controller for the e2e tests and the demo: the
//! same entry point as the shipped `podfleet` binary, built as part of this
//! package so that tests find it through `CARGO_BIN_EXE_podfleet-e2e`,
//! always fresh.

fn main() -> std::process::ExitCode {
    podfleet_control::cli::entry::main()
}
