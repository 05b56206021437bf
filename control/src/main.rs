//! `podfleet`: the fleet CLI and the controller process.

fn main() {
    eprintln!("podfleet: being written");
    std::process::exit(2);
}
