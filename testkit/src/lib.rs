//! podfleet's test kit: everything the tests, the simulator and the fuzzer
//! share, and nothing a release binary carries.
//!
//! - [`runtime`]: [`FakeRuntime`], a pure model of podman, and the
//!   [`Behaviour`] of the programs it pretends to run.
//! - [`shell`]: what an exec runs in the fake: a tiny model of busybox
//!   `sh` and `cat` over the files copied into a container.
//! - [`registry`]: the fake's [`ImageStore`] and [`FakeRegistry`]: which
//!   images the device has, and what pulling one finds.
//! - [`harness`]: [`Harness`], which drives a reconciler against the fake in
//!   virtual time and records a transcript.
//! - [`oracle`]: [`Oracle`], the safety invariants checked against the
//!   fake's ground truth.
//! - [`violation`]: [`Violation`] and [`Invariant`], what the checks return.
//! - [`shared`]: [`SharedFake`], the fake behind the agent's async
//!   `ContainerRuntime` trait, for its event loop.
//! - [`images`]: the image catalogue, one behaviour per image name, and
//!   the groups the generators pick from.
//! - [`scripts`]: the setup-script catalogue, and how each script ends in
//!   the fake's shell model.
//! - [`base_system`]: the containers a device runs outside podfleet's
//!   labels, for `no_launch` deployments to verify and podfleet never to
//!   touch.
//! - [`ops`]: [`Op`], what a device lives through, with its own byte
//!   codec (for the fuzzer), a proptest strategy, and the [`ops::Player`]
//!   that plays ops on a harness.
//! - [`conformance`]: podman's behaviour as a suite that runs against real
//!   podman (e2e/) and against the fake.
//!
//! It depends on podfleet-core with its `bugs` feature (the deliberate bugs
//! the invariant checks must catch) and on podfleet-agent without its
//! adapters; the production crates depend on it only for their tests.

pub mod base_system;
pub mod conformance;
pub mod harness;
pub mod images;
pub mod ops;
pub mod oracle;
pub mod registry;
pub mod runtime;
pub mod scripts;
pub mod shared;
pub mod shell;
pub mod violation;

pub use harness::{describe_op, describe_result, Harness, OpFault};
pub use ops::Op;
pub use oracle::Oracle;
pub use registry::{FakeRegistry, ImageStore};
pub use runtime::{Behaviour, Completion, FakeContainer, FakeRuntime, RuntimeEvent};
pub use shared::SharedFake;
pub use violation::{Invariant, Violation};
