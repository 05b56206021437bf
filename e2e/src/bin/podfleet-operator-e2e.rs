//! The `podfleet-operator` binary, built inside the e2e crate so that its
//! tests find it through `CARGO_BIN_EXE_podfleet-operator-e2e`.

fn main() -> std::process::ExitCode {
    podfleet_operator::cli::main()
}
