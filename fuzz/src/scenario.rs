//! Structure-aware fuzzing of the reconciler: the fuzz input read as a list
//! of [`Op`]s ([`Op::decode_all`], the test kit's own compact format: every
//! byte string is some valid list) and played against the real core
//! through the test kit's harness ([`run`]).
//!
//! The ops and their player live in `podfleet_testkit::ops`, shared with
//! the core's property test, so a crash found here replays there.

pub use podfleet_testkit::ops::{run, Op, MAX_OPS};

/// Reads `data` as ops and plays them (at most [`MAX_OPS`]).
///
/// # Panics
/// As [`run`]: with the violated invariant, the ops and the transcript's
/// tail; any other panic is the core's own.
pub fn run_bytes(data: &[u8]) {
    run(&Op::decode_all(data));
}
