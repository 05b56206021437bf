//! `cargo xtask`: podfleet's developer tasks.

fn main() {}
