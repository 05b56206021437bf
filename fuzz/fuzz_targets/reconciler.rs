//! The reconciler driven by the input read as test-kit ops
//! (`podfleet_testkit::Op::decode_all`): desired puts
//! (vocabulary scores of every lifetime, with setup scripts and `no_launch`
//! services verifying the world's base-system containers; mutated scores;
//! raw bytes), deletes, late redeliveries of older revisions, resyncs,
//! runtime faults (including the libpod wait/inspect race, init-container
//! timeouts and failed copies and execs), container crashes, missing
//! images, time passing, and agent restarts with the cache kept or lost,
//! played against the real core on `podfleet_testkit`'s harness.
//!
//! Checks, after every step and once more after healing and settling: no
//! input panics or busy-loops the core, and the harness's oracle saw no
//! invariant violation (no two containers for one service, no healthy
//! container recreated, nothing older started once a newer revision was
//! seen, init containers first, graceful replace by recorded id, nothing
//! outside podfleet's labels touched and nothing launched for `no_launch`,
//! truthful Running reports). A violation panics with the invariant, the steps and
//! the transcript. See `podfleet_fuzz::scenario`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podfleet_fuzz::scenario::run_bytes;

fuzz_target!(|data: &[u8]| run_bytes(data));
