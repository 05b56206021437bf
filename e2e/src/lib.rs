//! The real-infrastructure harness.
//!
//! It will start its own nats-server and podman API service, build its test
//! images locally, run the production agent against them and check both the
//! reported state and podman's own ground truth.
