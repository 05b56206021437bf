//! The deterministic simulation testbed.
//!
//! It will run the real agent loop and the real podfleet-core reconciler on a
//! turmoil network against a fake container runtime and a fake clock, inject
//! faults from a seed, and check the safety and liveness invariants.
