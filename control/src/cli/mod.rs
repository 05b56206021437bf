//! The `podfleet` verbs.
//!
//! SKELETON: being written.
