//! `podfleet-operator`: see [`podfleet_operator::cli`].

fn main() -> std::process::ExitCode {
    podfleet_operator::cli::main()
}
