//! `podfleet-agent`: the binary that runs on every device.

fn main() {
    eprintln!(
        "podfleet-agent {}: not yet runnable; see the README",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
