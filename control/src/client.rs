//! The NATS side of the control plane, shared by the CLI and the controller.
//!
//! SKELETON: the signatures are the contract between the CLI and the NATS
//! side; the bodies are being written.

use std::time::Duration;

use podfleet_agent::buckets::BucketSettings;
use podfleet_core::fleet::{Controller, DeviceRecord, FleetDeployment, FleetDeploymentStatus};
use podfleet_core::wire::{DeploymentName, DeviceId, Verb};

use crate::context::Connection;

/// Why a fleet operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Placeholder while the skeleton is filled in.
    #[error("{0}")]
    Other(String),
}

/// The six buckets' settings (replicas, history, max value size), as the
/// controller and CLI create them when missing.
#[derive(Debug, Clone)]
pub struct BucketPlan {
    /// One entry per bucket: desired, state, heartbeats, deployments,
    /// devices, status.
    pub buckets: Vec<BucketSettings>,
}

/// A connected client.
#[derive(Debug, Clone)]
pub struct FleetClient {}

/// A device command's reply body (the JSON the agent sent), or why none came.
pub type CommandResult = Result<serde_json::Value, ClientError>;

impl FleetClient {
    /// Connects and makes sure the buckets exist (creating missing ones
    /// with `plan`'s settings; existing ones are never altered).
    ///
    /// # Errors
    /// [`ClientError`] when the server cannot be reached within `timeout`
    /// or refuses the credentials.
    pub async fn connect(
        _connection: &Connection,
        _plan: &BucketPlan,
        _timeout: Duration,
    ) -> Result<Self, ClientError> {
        unimplemented!("skeleton")
    }

    /// Stores a fleet deployment (validated by the caller); returns its new
    /// generation (the KV revision).
    pub async fn put_deployment(&self, _manifest: &FleetDeployment) -> Result<u64, ClientError> {
        unimplemented!("skeleton")
    }

    /// Deletes a fleet deployment; `Ok(false)` when there was none.
    pub async fn delete_deployment(&self, _name: &DeploymentName) -> Result<bool, ClientError> {
        unimplemented!("skeleton")
    }

    /// The stored manifest and its generation, if any.
    pub async fn deployment(
        &self,
        _name: &DeploymentName,
    ) -> Result<Option<(u64, FleetDeployment)>, ClientError> {
        unimplemented!("skeleton")
    }

    /// The device's record (empty when it has none).
    pub async fn device_record(&self, _device: &DeviceId) -> Result<DeviceRecord, ClientError> {
        unimplemented!("skeleton")
    }

    /// Changes a device's labels: sets `set`, removes `remove`, with a
    /// compare-and-set on the record's revision (retried on conflict), so
    /// two people labelling at once lose nothing. Returns the new record.
    pub async fn label_device(
        &self,
        _device: &DeviceId,
        _set: &[(String, String)],
        _remove: &[String],
    ) -> Result<DeviceRecord, ClientError> {
        unimplemented!("skeleton")
    }

    /// Reads every bucket once into a synced [`Controller`], on a clock
    /// whose `now` is the returned timestamp: the view `get`, `describe`
    /// and `apply --dry-run` show. Never writes.
    pub async fn snapshot(
        &self,
    ) -> Result<(Controller, podfleet_core::Timestamp), ClientError> {
        unimplemented!("skeleton")
    }

    /// The status the controller last wrote for `name`.
    pub async fn status(
        &self,
        _name: &DeploymentName,
    ) -> Result<Option<FleetDeploymentStatus>, ClientError> {
        unimplemented!("skeleton")
    }

    /// Every status change of `name` (the current value first), until the
    /// stream is dropped.
    pub async fn watch_status(
        &self,
        _name: &DeploymentName,
    ) -> Result<
        futures_util::stream::BoxStream<'static, Option<FleetDeploymentStatus>>,
        ClientError,
    > {
        unimplemented!("skeleton")
    }

    /// Sends a command to a device and waits up to `timeout` for its reply.
    pub async fn command(
        &self,
        _device: &DeviceId,
        _verb: Verb,
        _body: serde_json::Value,
        _timeout: Duration,
    ) -> CommandResult {
        unimplemented!("skeleton")
    }
}
