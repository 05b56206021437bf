//! The desired-state score (`PodmanV0Score`) decoded from arbitrary bytes.
//!
//! Checks: decoding never panics; what decodes validates without panicking,
//! `from_json` accepts exactly what decodes and validates (with the same
//! error), and encode -> decode gives back an equal score with a canonical
//! encoding; a valid score re-encodes to a valid, equal one, and the
//! container names, specs and spec hashes the reconciler derives from it are
//! computed without a panic. See `podfleet_fuzz::wire::score`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| podfleet_fuzz::wire::score(data));
