//! The NATS side of the control plane, shared by the CLI and the controller.
//!
//! [`FleetClient`] owns one NATS connection. It makes sure the six buckets
//! exist ([`BucketPlan`]), reads and writes fleet deployments and device
//! records, reads every bucket at once into a synced
//! [`Controller`] ([`FleetClient::snapshot`]), follows statuses and sends
//! device commands. It decides nothing about the fleet: that is the core's
//! [`Controller`]. It never alters an existing bucket's settings.
//!
//! Bucket reads ([`FleetClient::snapshot`] and the controller's watches) use
//! one ordered push consumer per bucket delivering the newest entry of
//! every key (`DeliverPolicy::LastPerSubject`), delete markers included; the
//! initial read ends once the consumer has delivered every key the bucket
//! held just after it was made.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::push::{Ordered, OrderedConfig};
use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy};
use async_nats::jetstream::kv;
use async_nats::{Client, Event};
use futures_util::StreamExt;
use podfleet_agent::buckets::{self, BucketError, BucketSettings, Ensured};
use podfleet_agent::nats::{connect_options, kv_stream, NatsError};
use podfleet_core::fleet::controller::{Config, Input};
use podfleet_core::fleet::{
    validate_label, Controller, DeviceRecord, FleetDeployment, FleetDeploymentStatus, LabelError,
};
use podfleet_core::session::{KeyFilter, Operation, WatchedEntry};
use podfleet_core::wire::names::{
    kv_subject, CommandSubject, DEPLOYMENTS_BUCKET, DESIRED_BUCKET, DEVICES_BUCKET,
    HEARTBEAT_BUCKET, STATE_BUCKET, STATUS_BUCKET,
};
use podfleet_core::wire::{DeploymentName, DeviceId, Verb};
use podfleet_core::Timestamp;
use tokio::sync::watch;

use crate::context::Connection;

/// The JetStream header that marks a KV delete or purge.
pub(crate) const KV_OPERATION: &str = "KV-Operation";
/// How often a label change is tried when others keep changing the record.
const LABEL_ATTEMPTS: u32 = 20;
/// How many permission refusals the client remembers.
const DENIALS_KEPT: usize = 16;

/// Why a fleet operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No server of the list answered in time.
    #[error("cannot reach NATS at {url}: {reason}")]
    Unreachable {
        /// The server list.
        url: String,
        /// Why (the client's error, or how long it waited).
        reason: String,
    },
    /// The server refused the credentials.
    #[error("NATS at {url} refused the credentials of context {context}: {reason}")]
    CredentialsRefused {
        /// The server list.
        url: String,
        /// The context they came from.
        context: String,
        /// The server's words.
        reason: String,
    },
    /// The connection settings can never work (an unreadable creds file, a
    /// bad URL or seed).
    #[error("cannot set up the NATS client for {url}: {reason}")]
    InvalidSettings {
        /// The server list.
        url: String,
        /// Why.
        reason: String,
    },
    /// The server refused this user a subject.
    #[error("this NATS user may not use {subject} (permission refused by the server)")]
    PermissionDenied {
        /// The subject.
        subject: String,
    },
    /// A bucket could not be checked or created.
    #[error(transparent)]
    Bucket(#[from] BucketError),
    /// A KV operation failed.
    #[error("{operation} {key:?} in bucket {bucket} failed: {reason}")]
    Kv {
        /// The bucket.
        bucket: &'static str,
        /// The key (empty for the bucket as a whole).
        key: String,
        /// What was tried: `get`, `put`, `delete`, `watch`, ...
        operation: &'static str,
        /// The client's or server's words.
        reason: String,
    },
    /// A stored value does not parse.
    #[error("the value of {key:?} in bucket {bucket} is not valid: {reason}")]
    Corrupt {
        /// The bucket.
        bucket: &'static str,
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// A label to set breaks the label rules.
    #[error(transparent)]
    InvalidLabel(#[from] LabelError),
    /// Others kept changing the device's record; the change was not made.
    #[error("the record of device {device} kept changing; gave up after {attempts} attempts")]
    Contended {
        /// The device.
        device: DeviceId,
        /// How many compare-and-set attempts were made.
        attempts: u32,
    },
    /// The fleet deployment was changed (or deleted) since the generation
    /// the change was made against; nothing was written.
    #[error("fleetdeployment/{name} changed since generation {generation} was read; nothing was written")]
    Changed {
        /// The deployment.
        name: DeploymentName,
        /// The generation the change was made against.
        generation: u64,
    },
    /// Nobody listens on the device's command subject.
    #[error("device {device}'s agent is not connected (no responders on {subject})")]
    AgentNotConnected {
        /// The device.
        device: DeviceId,
        /// The command subject.
        subject: String,
    },
    /// The device did not answer in time.
    #[error("device {device} did not answer {verb} within {waited:?}")]
    CommandTimedOut {
        /// The device.
        device: DeviceId,
        /// The command.
        verb: Verb,
        /// How long the request waited.
        waited: Duration,
    },
    /// The command could not be sent, or its reply is not JSON.
    #[error("command {verb} to device {device} failed: {reason}")]
    Command {
        /// The device.
        device: DeviceId,
        /// The command.
        verb: Verb,
        /// Why.
        reason: String,
    },
}

/// The six buckets' settings (replicas, history, max value size), as the
/// controller and CLI create them when missing.
#[derive(Debug, Clone)]
pub struct BucketPlan {
    /// One entry per bucket: desired, state, heartbeats, deployments,
    /// devices, status.
    pub buckets: Vec<BucketSettings>,
}

/// The history kept per fleet deployment, so the previous manifests can be
/// looked at.
pub const DEPLOYMENTS_HISTORY: u8 = 5;

impl Default for BucketPlan {
    /// The agent's three buckets ([`buckets::fleet_buckets`]), the
    /// deployments (a history of [`DEPLOYMENTS_HISTORY`]), the devices and
    /// the statuses (the newest value only); one replica each.
    fn default() -> Self {
        let mut buckets = buckets::fleet_buckets().to_vec();
        buckets.extend([
            BucketSettings::new(DEPLOYMENTS_BUCKET).history(DEPLOYMENTS_HISTORY),
            BucketSettings::new(DEVICES_BUCKET),
            BucketSettings::new(STATUS_BUCKET),
        ]);
        Self { buckets }
    }
}

impl BucketPlan {
    /// Every bucket on `replicas` servers (production runs 3).
    #[must_use]
    pub fn replicas(self, replicas: u8) -> Self {
        self.each(|b| b.replicas(replicas))
    }

    /// Every bucket accepting values up to `bytes`.
    #[must_use]
    pub fn max_value_size(self, bytes: u32) -> Self {
        self.each(|b| b.max_value_size(bytes))
    }

    /// Every bucket on `replicas` servers and, when given, accepting values
    /// up to `max_value_size` bytes.
    #[must_use]
    pub fn sized(self, replicas: u8, max_value_size: Option<u32>) -> Self {
        let plan = self.replicas(replicas);
        match max_value_size {
            Some(bytes) => plan.max_value_size(bytes),
            None => plan,
        }
    }

    /// No bucket at all: connect without checking any.
    pub fn none() -> Self {
        Self {
            buckets: Vec::new(),
        }
    }

    fn each(self, f: impl Fn(BucketSettings) -> BucketSettings) -> Self {
        Self {
            buckets: self.buckets.into_iter().map(f).collect(),
        }
    }
}

/// Whether the connection is up, and how often it was lost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Link {
    pub(crate) connected: bool,
    pub(crate) disconnects: u64,
}

/// A connected client.
#[derive(Debug, Clone)]
pub struct FleetClient {
    client: Client,
    js: async_nats::jetstream::Context,
    url: String,
    timeout: Duration,
    link: watch::Receiver<Link>,
    /// Subjects the server recently refused, newest last.
    denied: Arc<Mutex<VecDeque<String>>>,
}

/// A device command's reply body (the JSON the agent sent), or why none came.
pub type CommandResult = Result<serde_json::Value, ClientError>;

impl FleetClient {
    /// Connects and makes sure the buckets exist (creating missing ones
    /// with `plan`'s settings; existing ones are never altered). Once
    /// connected, the client reconnects on its own whenever the connection
    /// is lost.
    ///
    /// A bucket check that gets no answer (which is what a user without
    /// the permission gets) is logged at warn and skipped.
    ///
    /// # Errors
    /// [`ClientError`] when the server cannot be reached within `timeout`
    /// or refuses the credentials.
    pub async fn connect(
        connection: &Connection,
        plan: &BucketPlan,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let url = connection.url_list();
        let (link_tx, link) = watch::channel(Link::default());
        let denied = Arc::new(Mutex::new(VecDeque::new()));
        let options = connect_options(&connection.credentials)
            .await
            .map_err(|e| ClientError::InvalidSettings {
                url: url.clone(),
                reason: match e {
                    NatsError::Credentials { path, source } => {
                        format!("cannot read the creds file {}: {source}", path.display())
                    }
                    other => other.to_string(),
                },
            })?;
        let mut options = options
            .name("podfleet-control")
            .max_reconnects(None)
            .connection_timeout(timeout)
            .request_timeout(Some(timeout))
            .event_callback({
                let denied = Arc::clone(&denied);
                move |event| {
                    note_event(&link_tx, &denied, &event);
                    async {}
                }
            });
        if let Some(prefix) = &connection.inbox_prefix {
            options = options.custom_inbox_prefix(prefix);
        }
        let client = match tokio::time::timeout(timeout, options.connect(url.as_str())).await {
            Ok(Ok(client)) => client,
            Ok(Err(error)) => {
                use async_nats::ConnectErrorKind as Kind;
                return Err(match error.kind() {
                    Kind::Authentication | Kind::AuthorizationViolation => {
                        ClientError::CredentialsRefused {
                            url,
                            context: connection.context.clone(),
                            reason: error.to_string(),
                        }
                    }
                    Kind::ServerParse | Kind::Tls => ClientError::InvalidSettings {
                        url,
                        reason: error.to_string(),
                    },
                    _ => ClientError::Unreachable {
                        url,
                        reason: error.to_string(),
                    },
                });
            }
            Err(_) => {
                return Err(ClientError::Unreachable {
                    url,
                    reason: format!("no connection within {timeout:?}"),
                })
            }
        };
        let this = Self {
            js: async_nats::jetstream::new(client.clone()),
            client,
            url,
            timeout,
            link,
            denied,
        };
        this.ensure_buckets(plan).await?;
        Ok(this)
    }

    /// The servers this client connects to, comma-separated.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying NATS client.
    pub fn nats(&self) -> &Client {
        &self.client
    }

    async fn ensure_buckets(&self, plan: &BucketPlan) -> Result<(), ClientError> {
        let checks = plan.buckets.iter().map(|settings| async move {
            (
                settings.name(),
                buckets::ensure_bucket(&self.client, settings, self.timeout).await,
            )
        });
        for (bucket, outcome) in futures_util::future::join_all(checks).await {
            match outcome {
                Ok(Ensured::Created) => tracing::info!(%bucket, "created the NATS KV bucket"),
                Ok(Ensured::Existing { differences }) if !differences.is_empty() => {
                    let differences: Vec<String> =
                        differences.iter().map(ToString::to_string).collect();
                    tracing::info!(
                        %bucket,
                        differences = %differences.join(", "),
                        "the NATS KV bucket exists with other settings; it is left as it is"
                    );
                }
                Ok(_) => tracing::debug!(%bucket, "the NATS KV bucket exists"),
                Err(BucketError::TimedOut { subject, .. }) => {
                    let why = if self.was_denied(&subject) {
                        "this user may not publish to it"
                    } else {
                        "no answer (likely not permitted for this user)"
                    };
                    tracing::warn!(%bucket, %subject, "cannot check the bucket: {why}; carrying on");
                }
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    /// Whether the server refused `subject` lately.
    fn was_denied(&self, subject: &str) -> bool {
        self.denied
            .lock()
            .map(|denied| denied.iter().any(|s| s == subject))
            .unwrap_or(false)
    }

    /// The newest refused subject that `matches`, if any.
    fn denial(&self, matches: impl Fn(&str) -> bool) -> Option<String> {
        let denied = self.denied.lock().ok()?;
        denied.iter().rev().find(|s| matches(s)).cloned()
    }

    /// `error` about `bucket`, or the permission refusal behind it.
    fn kv_error(
        &self,
        bucket: &'static str,
        key: &str,
        operation: &'static str,
        reason: impl ToString,
    ) -> ClientError {
        let stream = kv_stream(bucket);
        match self.denial(|s| s.contains(&stream) || s.contains(&kv_subject(bucket, ""))) {
            Some(subject) => ClientError::PermissionDenied { subject },
            None => ClientError::Kv {
                bucket,
                key: key.to_owned(),
                operation,
                reason: reason.to_string(),
            },
        }
    }

    async fn store(&self, bucket: &'static str) -> Result<kv::Store, ClientError> {
        self.js
            .get_key_value(bucket)
            .await
            .map_err(|e| self.kv_error(bucket, "", "open", e))
    }

    /// Stores a fleet deployment (validated by the caller); returns its new
    /// generation (the KV revision).
    pub async fn put_deployment(&self, manifest: &FleetDeployment) -> Result<u64, ClientError> {
        let name = manifest.metadata.name.as_str();
        self.store(DEPLOYMENTS_BUCKET)
            .await?
            .put(name, manifest.to_json().into())
            .await
            .map_err(|e| self.kv_error(DEPLOYMENTS_BUCKET, name, "put", e))
    }

    /// Stores a fleet deployment (validated by the caller) only if its key
    /// is still at `generation`: a compare-and-set, so that a change made
    /// meanwhile is never overwritten. Returns the new generation.
    ///
    /// # Errors
    /// [`ClientError::Changed`] when the key moved on (or was deleted)
    /// since `generation`.
    pub async fn update_deployment(
        &self,
        manifest: &FleetDeployment,
        generation: u64,
    ) -> Result<u64, ClientError> {
        let name = manifest.metadata.name.as_str();
        self.store(DEPLOYMENTS_BUCKET)
            .await?
            .update(name, manifest.to_json().into(), generation)
            .await
            .map_err(|e| {
                if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                    ClientError::Changed {
                        name: manifest.metadata.name.clone(),
                        generation,
                    }
                } else {
                    self.kv_error(DEPLOYMENTS_BUCKET, name, "update", e)
                }
            })
    }

    /// Deletes a fleet deployment; `Ok(false)` when there was none.
    pub async fn delete_deployment(&self, name: &DeploymentName) -> Result<bool, ClientError> {
        let store = self.store(DEPLOYMENTS_BUCKET).await?;
        let key = name.as_str();
        let Some(entry) = store
            .entry(key)
            .await
            .map_err(|e| self.kv_error(DEPLOYMENTS_BUCKET, key, "get", e))?
        else {
            return Ok(false);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(false);
        }
        store
            .delete(key)
            .await
            .map_err(|e| self.kv_error(DEPLOYMENTS_BUCKET, key, "delete", e))?;
        Ok(true)
    }

    /// The stored manifest and its generation, if any.
    ///
    /// # Errors
    /// [`ClientError::Corrupt`] when the stored manifest does not parse.
    pub async fn deployment(
        &self,
        name: &DeploymentName,
    ) -> Result<Option<(u64, FleetDeployment)>, ClientError> {
        let key = name.as_str();
        let Some(entry) = self.entry(DEPLOYMENTS_BUCKET, key).await? else {
            return Ok(None);
        };
        let manifest =
            FleetDeployment::from_json(&entry.value).map_err(|e| ClientError::Corrupt {
                bucket: DEPLOYMENTS_BUCKET,
                key: key.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Some((entry.revision, manifest)))
    }

    /// The key's newest value, `None` when it has none or was deleted.
    async fn entry(
        &self,
        bucket: &'static str,
        key: &str,
    ) -> Result<Option<kv::Entry>, ClientError> {
        let entry = self
            .store(bucket)
            .await?
            .entry(key)
            .await
            .map_err(|e| self.kv_error(bucket, key, "get", e))?;
        Ok(entry.filter(|e| e.operation == kv::Operation::Put))
    }

    /// The device's record (empty when it has none).
    pub async fn device_record(&self, device: &DeviceId) -> Result<DeviceRecord, ClientError> {
        Ok(self
            .device_record_entry(device)
            .await?
            .map(|(_, record)| record)
            .unwrap_or_default())
    }

    async fn device_record_entry(
        &self,
        device: &DeviceId,
    ) -> Result<Option<(u64, DeviceRecord)>, ClientError> {
        let Some(entry) = self.entry(DEVICES_BUCKET, device.as_str()).await? else {
            return Ok(None);
        };
        let record = DeviceRecord::from_json(&entry.value).map_err(|e| ClientError::Corrupt {
            bucket: DEVICES_BUCKET,
            key: device.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Some((entry.revision, record)))
    }

    /// Changes a device's labels: sets `set`, removes `remove`, with a
    /// compare-and-set on the record's revision (retried on conflict), so
    /// two people labelling at once lose nothing. Returns the new record.
    ///
    /// # Errors
    /// [`ClientError::InvalidLabel`] before anything is written;
    /// [`ClientError::Contended`] after 20 conflicting attempts;
    /// [`ClientError::Corrupt`] when the stored record does not parse.
    pub async fn label_device(
        &self,
        device: &DeviceId,
        set: &[(String, String)],
        remove: &[String],
    ) -> Result<DeviceRecord, ClientError> {
        for (key, value) in set {
            validate_label(key, value)?;
        }
        let store = self.store(DEVICES_BUCKET).await?;
        let key = device.as_str();
        for _ in 0..LABEL_ATTEMPTS {
            let current = self.device_record_entry(device).await?;
            let (revision, mut record) = match current {
                Some((revision, record)) => (Some(revision), record),
                None => (None, DeviceRecord::default()),
            };
            for name in remove {
                record.labels.remove(name);
            }
            for (name, value) in set {
                record.labels.insert(name.clone(), value.clone());
            }
            let value = record.to_json().into();
            let written = match revision {
                Some(revision) => store.update(key, value, revision).await.map_err(|e| {
                    (
                        e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                        e.to_string(),
                    )
                }),
                None => store.create(key, value).await.map_err(|e| {
                    (
                        e.kind() == kv::CreateErrorKind::AlreadyExists,
                        e.to_string(),
                    )
                }),
            };
            match written {
                Ok(_) => return Ok(record),
                Err((true, reason)) => {
                    tracing::debug!(%device, %reason, "the device record changed meanwhile; trying again");
                }
                Err((false, reason)) => {
                    return Err(self.kv_error(DEVICES_BUCKET, key, "update", reason))
                }
            }
        }
        Err(ClientError::Contended {
            device: device.clone(),
            attempts: LABEL_ATTEMPTS,
        })
    }

    /// Reads every bucket once into a synced [`Controller`], on a clock
    /// whose `now` is the returned timestamp: the view `get`, `describe`
    /// and `apply --dry-run` show. Never writes.
    ///
    /// The controller has the default [`Config`]; its queued outputs
    /// ([`Controller::poll_output`]) are the writes a controller would make
    /// now. The timestamp is the wall clock in milliseconds since the Unix
    /// epoch.
    pub async fn snapshot(&self) -> Result<(Controller, Timestamp), ClientError> {
        self.snapshot_with(Config::default()).await
    }

    /// [`FleetClient::snapshot`] with the controller's knobs given.
    pub async fn snapshot_with(
        &self,
        config: Config,
    ) -> Result<(Controller, Timestamp), ClientError> {
        let reads = Bucket::ALL.map(|bucket| self.read_bucket(bucket));
        let read = futures_util::future::try_join_all(reads).await?;
        let now = wall_clock();
        let mut controller = Controller::new(config, now);
        for input in read.into_iter().flatten() {
            controller.handle(now, input.into_input(now));
        }
        controller.handle(now, Input::Synced);
        Ok((controller, now))
    }

    /// Every current entry of `bucket` (delete markers included).
    async fn read_bucket(&self, bucket: Bucket) -> Result<Vec<Fed>, ClientError> {
        let mut watch = self.watch_bucket(bucket).await?;
        let mut fed = Vec::new();
        while !watch.snapshot.is_complete() {
            let message = tokio::time::timeout(self.timeout * 2, watch.messages.next()).await;
            let message = match message {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(e))) => return Err(self.kv_error(bucket.name(), "", "read", e)),
                Ok(None) => {
                    return Err(self.kv_error(bucket.name(), "", "read", "the read ended early"))
                }
                Err(_) => {
                    return Err(self.kv_error(bucket.name(), "", "read", "stalled"));
                }
            };
            if let Some((entry, written)) = watched_entry(&message) {
                watch.snapshot.deliver(&entry);
                fed.extend(bucket.classify(entry, written));
            }
        }
        Ok(fed)
    }

    /// An ordered consumer of the newest entry of every key of `bucket`,
    /// then of every change.
    pub(crate) async fn watch_bucket(&self, bucket: Bucket) -> Result<BucketWatch, ClientError> {
        let name = bucket.name();
        let config = OrderedConfig {
            deliver_subject: self.client.new_inbox(),
            description: Some(format!("podfleet-control read of {name}")),
            filter_subject: kv_subject(name, ">"),
            replay_policy: ReplayPolicy::Instant,
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..OrderedConfig::default()
        };
        let consumer: async_nats::jetstream::consumer::Consumer<OrderedConfig> = self
            .js
            .create_consumer_on_stream(config, kv_stream(name))
            .await
            .map_err(|e| self.kv_error(name, "", "watch", e))?;
        // Listed after the consumer is made, never before: a key rewritten
        // in between must still be waited for.
        let mut listing = self
            .js
            .get_stream(kv_stream(name))
            .await
            .map_err(|e| self.kv_error(name, "", "watch", e))?
            .info_with_subjects(kv_subject(name, ">"))
            .await
            .map_err(|e| self.kv_error(name, "", "watch", e))?;
        let mut keys = BTreeSet::new();
        while let Some(subject) = listing.next().await {
            let (subject, _) = subject.map_err(|e| self.kv_error(name, "", "watch", e))?;
            keys.insert(subject);
        }
        let messages = consumer
            .messages()
            .await
            .map_err(|e| self.kv_error(name, "", "watch", e))?;
        Ok(BucketWatch {
            messages,
            snapshot: SnapshotRead::new(keys),
        })
    }

    /// The connection's state, as the event callback saw it.
    pub(crate) fn link(&self) -> watch::Receiver<Link> {
        self.link.clone()
    }

    /// The JetStream context.
    pub(crate) fn jetstream(&self) -> &async_nats::jetstream::Context {
        &self.js
    }

    /// The status the controller last wrote for `name`.
    pub async fn status(
        &self,
        name: &DeploymentName,
    ) -> Result<Option<FleetDeploymentStatus>, ClientError> {
        let key = name.as_str();
        let Some(entry) = self.entry(STATUS_BUCKET, key).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&entry.value)
            .map(Some)
            .map_err(|e| ClientError::Corrupt {
                bucket: STATUS_BUCKET,
                key: key.to_owned(),
                reason: e.to_string(),
            })
    }

    /// Every status change of `name` (the current value first), until the
    /// stream is dropped. `None` is a deleted (or unreadable) status; the
    /// stream ends when the watch fails.
    pub async fn watch_status(
        &self,
        name: &DeploymentName,
    ) -> Result<futures_util::stream::BoxStream<'static, Option<FleetDeploymentStatus>>, ClientError>
    {
        let key = name.as_str();
        let watch = self
            .store(STATUS_BUCKET)
            .await?
            .watch_with_history(key)
            .await
            .map_err(|e| self.kv_error(STATUS_BUCKET, key, "watch", e))?;
        let key = key.to_owned();
        Ok(watch
            .take_while(|entry| std::future::ready(entry.is_ok()))
            .filter_map(move |entry| {
                let status = match entry {
                    Ok(entry) if entry.operation == kv::Operation::Put => {
                        match serde_json::from_slice(&entry.value) {
                            Ok(status) => Some(status),
                            Err(error) => {
                                tracing::warn!(%key, %error, "unreadable status");
                                None
                            }
                        }
                    }
                    _ => None,
                };
                std::future::ready(Some(status))
            })
            .boxed())
    }

    /// Sends a command to a device and waits up to `timeout` for its reply.
    ///
    /// # Errors
    /// [`ClientError::AgentNotConnected`] when nobody listens,
    /// [`ClientError::CommandTimedOut`], [`ClientError::PermissionDenied`]
    /// when this user may not send it, [`ClientError::Command`] otherwise.
    pub async fn command(
        &self,
        device: &DeviceId,
        verb: Verb,
        body: serde_json::Value,
        timeout: Duration,
    ) -> CommandResult {
        use async_nats::RequestErrorKind;
        let subject = CommandSubject {
            device: device.clone(),
            verb,
        }
        .to_subject();
        let request = async_nats::Request::new()
            .payload(body.to_string().into())
            .timeout(Some(timeout));
        let failed = |reason: String| ClientError::Command {
            device: device.clone(),
            verb,
            reason,
        };
        let reply = match self.client.send_request(subject.clone(), request).await {
            Ok(reply) => reply,
            Err(error) => {
                return Err(match error.kind() {
                    RequestErrorKind::NoResponders => ClientError::AgentNotConnected {
                        device: device.clone(),
                        subject,
                    },
                    RequestErrorKind::TimedOut => match self.denial(|s| s == subject) {
                        Some(subject) => ClientError::PermissionDenied { subject },
                        None => ClientError::CommandTimedOut {
                            device: device.clone(),
                            verb,
                            waited: timeout,
                        },
                    },
                    _ => failed(error.to_string()),
                })
            }
        };
        serde_json::from_slice(&reply.payload)
            .map_err(|e| failed(format!("the reply is not JSON: {e}")))
    }
}

/// Records what the connection does for [`FleetClient`].
fn note_event(link: &watch::Sender<Link>, denied: &Mutex<VecDeque<String>>, event: &Event) {
    match event {
        Event::Connected => {
            link.send_modify(|l| l.connected = true);
            tracing::info!("connected to NATS");
        }
        Event::Disconnected => {
            link.send_modify(|l| {
                l.connected = false;
                l.disconnects += 1;
            });
            tracing::warn!("disconnected from NATS");
        }
        Event::ServerError(error) => {
            let text = error.to_string();
            match denied_subject(&text) {
                Some(subject) => {
                    tracing::debug!(%subject, "the server refused a subject");
                    if let Ok(mut denied) = denied.lock() {
                        if denied.len() == DENIALS_KEPT {
                            denied.pop_front();
                        }
                        denied.push_back(subject);
                    }
                }
                None => tracing::warn!(error = %text, "NATS server error"),
            }
        }
        other => tracing::debug!(event = %other, "NATS event"),
    }
}

/// The subject of a `Permissions Violation for Publish to "<subject>"` (or
/// `Subscription to`) server error.
fn denied_subject(text: &str) -> Option<String> {
    let (_, rest) = text.split_once("Permissions Violation for ")?;
    let (_, rest) = rest.split_once(" to \"")?;
    let (subject, _) = rest.split_once('"')?;
    Some(subject.to_owned())
}

/// The wall clock: milliseconds since the Unix epoch.
pub fn wall_clock() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Timestamp::from_millis(ms)
}

/// The six buckets the fleet controller can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// The fleet deployments' manifests.
    Deployments,
    /// The device records (labels).
    Devices,
    /// The per-device desired keys.
    Desired,
    /// The devices' reports.
    State,
    /// The devices' heartbeats.
    Heartbeats,
    /// The fleet deployments' statuses.
    Status,
}

impl Bucket {
    /// In the order a snapshot feeds them.
    pub const ALL: [Bucket; 6] = [
        Bucket::Deployments,
        Bucket::Devices,
        Bucket::Desired,
        Bucket::State,
        Bucket::Heartbeats,
        Bucket::Status,
    ];

    /// The bucket's name in NATS.
    pub fn name(self) -> &'static str {
        match self {
            Bucket::Deployments => DEPLOYMENTS_BUCKET,
            Bucket::Devices => DEVICES_BUCKET,
            Bucket::Desired => DESIRED_BUCKET,
            Bucket::State => STATE_BUCKET,
            Bucket::Heartbeats => HEARTBEAT_BUCKET,
            Bucket::Status => STATUS_BUCKET,
        }
    }

    /// What an entry of this bucket tells the controller, or `None` (logged)
    /// for a key that is not podfleet's.
    pub(crate) fn classify(self, entry: WatchedEntry, written: Timestamp) -> Option<Fed> {
        let bucket = self.name();
        let key = entry
            .subject
            .strip_prefix(&kv_subject(bucket, ""))
            .unwrap_or(&entry.subject);
        let deleted = entry.operation != Operation::Put;
        let skip = |error: String| {
            tracing::warn!(%bucket, subject = %entry.subject, %error, "entry skipped");
            None
        };
        let input = match self {
            Bucket::Deployments => match DeploymentName::new(key) {
                Ok(name) if deleted => Input::DeploymentDeleted { name },
                Ok(name) => Input::DeploymentPut {
                    name,
                    generation: entry.revision,
                    value: entry.payload,
                },
                Err(e) => return skip(e.to_string()),
            },
            Bucket::Devices => match DeviceId::new(key) {
                Ok(device) if deleted => Input::DeviceDeleted { device },
                Ok(device) => Input::DevicePut {
                    device,
                    value: entry.payload,
                },
                Err(e) => return skip(e.to_string()),
            },
            Bucket::Status => match DeploymentName::new(key) {
                Ok(name) => Input::Status {
                    name,
                    value: (!deleted).then_some(entry.payload),
                },
                Err(e) => return skip(e.to_string()),
            },
            Bucket::Heartbeats => match DeviceId::new(key) {
                Ok(device) => {
                    return Some(Fed::Heartbeat {
                        device,
                        value: (!deleted).then_some(entry.payload),
                        written,
                    })
                }
                Err(e) => return skip(e.to_string()),
            },
            Bucket::Desired | Bucket::State => {
                match KeyFilter::every_device(bucket).classify(entry.clone()) {
                    Ok(change) if self == Bucket::Desired => Input::Desired(change),
                    Ok(change) => Input::State(change),
                    Err(e) => return skip(e.to_string()),
                }
            }
        };
        Some(Fed::Ready(input))
    }
}

/// An input for the controller; a heartbeat's age depends on when it is fed.
#[derive(Debug)]
pub(crate) enum Fed {
    Ready(Input),
    Heartbeat {
        device: DeviceId,
        value: Option<Vec<u8>>,
        /// When it was written, on the wall clock.
        written: Timestamp,
    },
}

impl Fed {
    /// The input, fed at wall-clock time `now`.
    pub(crate) fn into_input(self, now: Timestamp) -> Input {
        match self {
            Fed::Ready(input) => input,
            Fed::Heartbeat {
                device,
                value,
                written,
            } => Input::Heartbeat {
                device,
                value,
                age: now.saturating_since(written),
            },
        }
    }
}

/// One bucket's ordered consumer.
pub(crate) struct BucketWatch {
    pub(crate) messages: Ordered,
    /// How far it is through what the bucket held when it was made.
    pub(crate) snapshot: SnapshotRead,
}

/// How far a watch of a bucket is through its snapshot: the newest entry
/// of every key, which its consumer delivers first.
///
/// The snapshot is complete once every key the bucket held just after the
/// consumer was made has been delivered. Neither a sequence number nor the
/// consumer's `pending` count can tell: while keys are rewritten during
/// the read (heartbeats, every second on every device), a key's older
/// entry is dropped (the bucket keeps one value per key) and the key comes
/// only at its new sequence, after entries of other keys written
/// meanwhile, and nats-server 2.9 reports nothing pending before it has
/// come. Every listed key does come: a KV bucket never loses a key's last
/// entry (deletes and purges are markers), and a rewritten key is
/// delivered at its new sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapshotRead {
    /// The subjects (`$KV.<bucket>.<key>`) listed just after the consumer
    /// was made and not delivered yet.
    unseen: BTreeSet<String>,
}

impl SnapshotRead {
    /// A snapshot of the bucket's `keys` (their subjects), listed after the
    /// consumer was made.
    pub(crate) fn new(keys: BTreeSet<String>) -> Self {
        Self { unseen: keys }
    }

    /// Takes one delivered entry.
    pub(crate) fn deliver(&mut self, entry: &WatchedEntry) {
        self.unseen.remove(&entry.subject);
    }

    /// Whether every key of the snapshot has been delivered.
    pub(crate) fn is_complete(&self) -> bool {
        self.unseen.is_empty()
    }
}

/// A watched message as a [`WatchedEntry`] and when it was written (on the
/// server's wall clock); `None` (logged) for one without JetStream metadata.
/// Its `pending` is 0 when it is the last entry the consumer has to deliver.
pub(crate) fn watched_entry(
    message: &async_nats::jetstream::Message,
) -> Option<(WatchedEntry, Timestamp)> {
    let entry = podfleet_agent::nats::watched_entry(message)?;
    let written_ms = message
        .info()
        .map_or(0, |info| info.published.unix_timestamp_nanos() / 1_000_000);
    let written = Timestamp::from_millis(u64::try_from(written_ms).unwrap_or(0));
    Some((entry, written))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_plan_has_six_buckets() {
        let plan = BucketPlan::default().replicas(3).max_value_size(4096);
        let names: Vec<&str> = plan.buckets.iter().map(BucketSettings::name).collect();
        assert_eq!(
            names,
            [
                DESIRED_BUCKET,
                STATE_BUCKET,
                HEARTBEAT_BUCKET,
                DEPLOYMENTS_BUCKET,
                DEVICES_BUCKET,
                STATUS_BUCKET
            ]
        );
        let deployments = plan.buckets[3].stream_config();
        assert_eq!(deployments["max_msgs_per_subject"], 5);
        assert_eq!(deployments["num_replicas"], 3);
        assert_eq!(deployments["max_msg_size"], 4096);
    }

    /// The race the old end of a snapshot lost: `b` is rewritten while the
    /// snapshot is delivered, so its older entry is gone and it comes at
    /// its new sequence, after `c`'s, and after an entry the server said
    /// nothing was pending behind. The snapshot ends only once `b` came.
    #[test]
    fn a_snapshot_ends_once_every_listed_key_came() {
        let subject = |key: &str| format!("$KV.podfleet-heartbeats.{key}");
        let entry = |key: &str, revision: u64, pending: u64| WatchedEntry {
            subject: subject(key),
            operation: Operation::Put,
            revision,
            pending,
            payload: Vec::new(),
        };
        let mut read = SnapshotRead::new(["a", "b", "c"].map(subject).into_iter().collect());
        assert!(!read.is_complete());
        read.deliver(&entry("a", 1, 4));
        read.deliver(&entry("c", 5, 3));
        // A key written after the listing is not waited for.
        read.deliver(&entry("d", 6, 0));
        read.deliver(&entry("a", 7, 0));
        assert!(!read.is_complete(), "b has not come yet");
        read.deliver(&entry("b", 8, 0));
        assert!(read.is_complete());
        assert!(SnapshotRead::new(BTreeSet::new()).is_complete());
    }

    #[test]
    fn permission_violations_name_their_subject() {
        assert_eq!(
            denied_subject("Permissions Violation for Publish to \"device-commands.a.ping\"")
                .as_deref(),
            Some("device-commands.a.ping")
        );
        assert_eq!(
            denied_subject(
                "permissions violation: Permissions Violation for Subscription to \"_INBOX.x.>\""
            )
            .as_deref(),
            Some("_INBOX.x.>")
        );
        assert_eq!(denied_subject("something else"), None);
    }
}
