//! podfleet-core: the wire contract and the two sans-IO state machines, the
//! reconciler and the NATS session.
//!
//! This crate makes every decision a podfleet agent makes and performs none
//! of its IO: no sockets, no files, no tokio, no wall clock. Callers pass
//! time in and carry commands out. It is driven by the production agent
//! (real podman, real NATS) and by the simulator (fake runtime, fake network),
//! so both exercise exactly the same logic.
//!
//! - [`wire`]: every type that crosses a process boundary, and the names of
//!   buckets, keys and subjects.
//! - [`runtime`]: the primitive container operations the reconciler asks
//!   for, their results, and the labels podfleet puts on containers.
//! - [`reconciler`]: the sans-IO [`Reconciler`] that decides everything
//!   about containers.
//! - [`session`]: the sans-IO NATS [`Session`](session::Session) of one
//!   device: its desired-state watch, snapshot and command admission.
//! - [`fleet`]: the fleet model, starting with Kubernetes-style label
//!   [`Selector`](fleet::Selector)s.
//! - [`image`]: image references, digest pinning and registry logins
//!   (containers-auth.json), shared by the agent and the control plane.
//! - [`time`]: the caller-supplied [`Timestamp`] and capped [`Backoff`].

pub mod fleet;
pub mod image;
pub mod reconciler;
pub mod runtime;
pub mod session;
pub mod time;
pub mod wire;

pub use reconciler::{Config, DeviceFacts, Input, Output, Reconciler, Wake, WakeReason};
pub use time::{Backoff, Timestamp};
