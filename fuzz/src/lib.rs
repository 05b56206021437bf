//! The checks behind podfleet's fuzz targets, one module per target family.
//!
//! Everything a device receives comes over the network from a component that
//! may be older, newer, buggy or hostile. These checks say what must hold for
//! any input whatsoever:
//!
//! - [`wire`]: every wire type either refuses the bytes or decodes to a value
//!   that validates without panicking and survives encode -> decode unchanged
//!   (targets `score`, `report`, `command`).
//! - [`names`]: every key, subject and identifier either parses into a value
//!   that rebuilds the very same string, or fails with the typed error that
//!   names what is wrong (target `names`).
//! - [`scenario`]: any sequence of desired-state puts, deletes,
//!   redeliveries, runtime faults, crashes, time and agent restarts, fed to
//!   the real reconciler through [`podfleet_testkit::Harness`], whose
//!   oracle checks the safety invariants at every operation (target
//!   `reconciler`).
//!
//! A failed check panics with what broke and the input that broke it; the
//! fuzz targets themselves are one-line entry points into these functions.
//! This crate never touches a file or a clock, except the seed-corpus
//! generator, which is a test (see docs/fuzzing.md).

pub mod names;
pub mod scenario;
pub mod wire;

#[cfg(test)]
mod seeds;
