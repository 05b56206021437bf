//! What agents report, decoded from arbitrary bytes: `DeploymentState`
//! (with its `FailureCause` and `RestartRecord`s) and `Heartbeat` (with its
//! `RuntimeHealth`), each also on its own.
//!
//! Checks: decoding never panics, and whatever decodes survives
//! encode -> decode unchanged, with a canonical encoding. See
//! `podfleet_fuzz::wire::report`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| podfleet_fuzz::wire::report(data));
