//! The production agent for the e2e tests: the same entry point as the
//! shipped `podfleet-agent` binary, built as part of this package so that
//! tests find it through `CARGO_BIN_EXE_podfleet-agent-e2e`, always fresh.

fn main() -> std::process::ExitCode {
    podfleet_agent::cli::main()
}
