//! The podfleet Kubernetes operator: FleetDeployment and Device custom
//! resources over the same sans-IO fleet controller as `podfleet
//! controller`.
//!
//! The custom resources are the source of truth; every decision about
//! which device runs what is made by [`podfleet_core::fleet::Controller`],
//! driven by the same passes as the CLI's controller
//! ([`podfleet_control::run::run_with`]). This crate adapts:
//!
//! - [`resources`]: the CRDs, generated from the fleet model's types.
//! - [`engine`]: the fleet controller's [`Side`](podfleet_control::run::Side)
//!   that reads the resources and hands statuses to the reconciler.
//! - [`reconcile`]: the kube-runtime reconciler (finalizer, status,
//!   events, error policy) and the Device writer.
//! - [`images`]: which image tags are pinned to digests, and what the
//!   fleet controller is handed once they are (pure; the reconciler asks
//!   the registries).
//! - [`status`]: what the statuses and events say (pure).
//! - [`lease`]: leader election over a Lease.
//! - [`metrics`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`cli`]: the `podfleet-operator` command line.
//!
//! # Drive loop
//! [`run`] wires them; in short:
//!
//! ```no_run
//! # async fn example(client: kube::Client) -> anyhow::Result<()> {
//! use podfleet_operator::{run, Options};
//! use podfleet_control::context::Connection;
//!
//! let options = Options::new("podfleet");
//! let connection = Connection::new(vec!["nats://nats.podfleet:4222".into()]);
//! run(client, connection, options, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(())
//! # }
//! ```

pub mod cli;
pub mod crd;
pub mod engine;
pub mod images;
pub mod lease;
pub mod metrics;
pub mod reconcile;
pub mod resources;
pub mod status;

mod operator;

pub use operator::{run, LeaseOptions, Options};
