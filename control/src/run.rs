//! The `podfleet controller` process.
//!
//! SKELETON: being written.
