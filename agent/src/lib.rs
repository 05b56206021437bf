//! The podfleet device agent.
//!
//! It owns the event loop that feeds the podfleet-core reconciler (written
//! once, generic over its desired-state source, state publisher, container
//! runtime and clock, so the simulator runs the very same loop) and the
//! production adapters: podman through bollard (feature `podman`) and NATS
//! JetStream through async-nats (feature `nats`), with the KV buckets it
//! needs (module `buckets`, reusable by a control plane). Module `facts`
//! reads the device facts its heartbeats report.

#[cfg(feature = "nats")]
pub mod buckets;
pub mod cache_store;
#[cfg(feature = "cli")]
pub mod cli;
pub mod event_loop;
pub mod facts;
#[cfg(feature = "nats")]
pub mod nats;
pub mod outbox;
#[cfg(feature = "podman")]
pub mod podman;
pub mod runtime;
#[cfg(feature = "cli")]
pub mod settings;
