//! The podfleet control plane.
//!
//! The fleet controller's decisions are all made by the sans-IO
//! [`podfleet_core::fleet::Controller`]; this crate only moves bytes between
//! it and NATS JetStream KV, and gives people the `podfleet` CLI.
//!
//! - [`context`]: connection settings with named contexts, like a kubeconfig.
//! - [`client`]: [`client::FleetClient`], the NATS side shared by the CLI
//!   and the controller process: buckets, reads, writes, watches, device
//!   commands.
//! - [`run`]: the long-running `podfleet controller`.
//! - [`registry`]: resolving image tags to digests over the registries'
//!   HTTP API, and finding the logins to ask with.
//! - [`cli`]: the `podfleet` verbs and how their output reads.

pub mod cli;
pub mod client;
pub mod context;
pub mod registry;
pub mod run;
