//! `podfleet-agent`: the binary that runs on every device. Everything it
//! does is in [`podfleet_agent::cli`], so the e2e tests run the same code.

fn main() -> std::process::ExitCode {
    podfleet_agent::cli::main()
}
