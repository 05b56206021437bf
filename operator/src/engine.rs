//! The operator's side of the fleet controller: the custom resources in,
//! statuses out.
//!
//! The operator runs the very passes of `podfleet controller`
//! ([`podfleet_control::run::run_with`]): the sans-IO fleet controller reads
//! the desired, state and heartbeat buckets from NATS and writes the
//! desired keys there. [`KubeSide`] replaces the deployments and devices
//! buckets with the FleetDeployment and Device resources, and the status
//! bucket with the [`Hub`] the reconciler reads the aggregates from.
//!
//! - A FleetDeployment is handed in once it carries the
//!   [`FINALIZER`] (so nothing is written for
//!   an object that could vanish without its keys being removed), as the
//!   manifest `podfleet apply` would store, at its `metadata.generation`,
//!   with its image tags pinned to the digests of `status.resolvedImages`
//!   ([`images::feed`]). Until the reconciler has recorded them for the
//!   current generation it is not handed in: the controller keeps the
//!   generation it was handed before, and a new controller (after a lost
//!   connection) is handed that one again. Nothing here asks a registry.
//!   One with a deletion timestamp, or gone, is a deleted deployment.
//! - A Device is handed in as a device record with its `metadata.labels`.
//! - Every `device_status_every`, each Device's status is worked out from
//!   the controller's view and sent to the writer when it changed; with
//!   `create_devices`, a device that heartbeats without a Device resource
//!   gets one.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kube::runtime::reflector::{ObjectRef, Store};
use kube::ResourceExt;
use podfleet_control::client::{wall_clock, Bucket};
use podfleet_control::run::Side;
use podfleet_core::fleet::controller::{Input, Output};
use podfleet_core::fleet::{Controller, DeviceRecord};
use podfleet_core::time::Timestamp;
use podfleet_core::wire::{DeploymentName, DeviceId};
use tokio::sync::{mpsc, Notify};

use crate::images::{self, Feed};
use crate::metrics::Metrics;
use crate::resources::{Device, DeviceStatus, FleetDeployment, FINALIZER};
use crate::status::{device_deployment, device_status, Known};

/// A resource the reconciler or the Device watch saw change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Touched {
    /// The FleetDeployment of this name (in the operator's namespace).
    Deployment(String),
    /// The Device of this name.
    Device(String),
    /// The Device watch listed everything again: some may have vanished.
    Devices,
}

/// What the engine and the reconciler share.
#[derive(Debug)]
pub struct Hub {
    touched: mpsc::UnboundedSender<Touched>,
    known: Mutex<HashMap<String, Known>>,
    torn_down: Mutex<HashSet<String>>,
    teardowns: Notify,
    unsent: Mutex<Vec<String>>,
}

impl Hub {
    /// A hub, and the receiver of what is touched (for [`KubeSide`]).
    pub fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<Touched>) {
        let (touched, receiver) = mpsc::unbounded_channel();
        let hub = Self {
            touched,
            known: Mutex::default(),
            torn_down: Mutex::default(),
            teardowns: Notify::new(),
            unsent: Mutex::default(),
        };
        (Arc::new(hub), receiver)
    }

    /// Tells the engine that `what` changed.
    pub fn touch(&self, what: Touched) {
        // The engine outlives every caller; if it is gone, so is the process.
        let _ = self.touched.send(what);
    }

    /// What the fleet controller knows of the FleetDeployment `name`.
    pub fn known(&self, name: &str) -> Option<Known> {
        lock(&self.known).get(name).cloned()
    }

    /// Whether the deleted deployment `name` holds no desired key any more.
    pub fn is_torn_down(&self, name: &str) -> bool {
        lock(&self.torn_down).contains(name)
    }

    /// Waits up to `wait` for the deleted deployment `name` to hold no
    /// desired key; whether it does.
    pub async fn wait_torn_down(&self, name: &str, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.teardowns.notified();
            if self.is_torn_down(name) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.is_torn_down(name);
            }
        }
    }

    /// A Device write failed: the engine sends the device's status (or
    /// creation) again at its next sweep.
    pub fn unsent(&self, device: String) {
        lock(&self.unsent).push(device);
    }

    /// What the FleetDeployments' devices are doing, summed over every
    /// FleetDeployment: pending, running, failed.
    pub fn phase_totals(&self) -> [u64; 3] {
        let mut totals = [0u64; 3];
        for known in lock(&self.known).values() {
            if let Known::Aggregate { status, .. } = known {
                totals[0] += u64::from(status.phases.pending);
                totals[1] += u64::from(status.phases.running);
                totals[2] += u64::from(status.phases.failed);
            }
        }
        totals
    }

    fn set_known(&self, name: &str, known: Known) -> bool {
        let mut map = lock(&self.known);
        if map.get(name) == Some(&known) {
            return false;
        }
        map.insert(name.to_owned(), known);
        true
    }

    fn forget(&self, name: &str) {
        lock(&self.known).remove(name);
    }

    fn set_torn_down(&self, name: &str, done: bool) {
        let changed = {
            let mut set = lock(&self.torn_down);
            if done {
                set.insert(name.to_owned())
            } else {
                set.remove(name)
            }
        };
        if changed && done {
            self.teardowns.notify_waiters();
        }
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind: carry on.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A write to the Kubernetes API that the engine asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceWrite {
    /// Set the Device's status.
    Status {
        /// The Device.
        name: String,
        /// Its status.
        status: DeviceStatus,
    },
    /// Create a Device for a device that heartbeats without one.
    Create {
        /// The device id.
        name: String,
    },
}

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// The namespace of the FleetDeployments.
    pub namespace: String,
    /// How often Device statuses are worked out.
    pub device_status_every: Duration,
    /// `lastSeen` is rounded down to this, so that a heartbeat does not
    /// rewrite the status each time.
    pub last_seen_every: Duration,
    /// Create a Device for each device that heartbeats without one.
    pub create_devices: bool,
}

/// A generation and the manifest handed in for it.
type Fed = (i64, Vec<u8>);

/// [`Side`] of the operator: see the [module docs](self).
pub struct KubeSide {
    options: EngineOptions,
    hub: Arc<Hub>,
    deployments: Store<FleetDeployment>,
    devices: Store<Device>,
    touched: mpsc::UnboundedReceiver<Touched>,
    pending: Vec<Touched>,
    /// Asks the reconciler to look at a FleetDeployment again.
    reconcile: mpsc::UnboundedSender<ObjectRef<FleetDeployment>>,
    writes: mpsc::UnboundedSender<DeviceWrite>,
    sweep: tokio::time::Interval,
    sweep_due: bool,
    /// Deleted deployments whose keys may still exist.
    deleting: BTreeSet<DeploymentName>,
    /// The generation and manifest of each FleetDeployment handed to this
    /// pass's controller: a status patch or a label change on the object
    /// changes neither and is not handed in again.
    fed: HashMap<String, Fed>,
    /// The same, handed to any pass's controller: what a new controller is
    /// handed while the current generation's images are not pinned yet.
    held: HashMap<String, Fed>,
    /// Statuses handed out by the controller and not yet published.
    statuses: Vec<DeploymentName>,
    /// The Device statuses last sent, by name.
    sent: HashMap<String, DeviceStatus>,
    /// Devices a creation was asked for.
    created: HashSet<String>,
    /// The wall clock at pass time zero, to date heartbeats.
    wall_at_zero: Option<(Timestamp, Timestamp)>,
    metrics: Arc<Metrics>,
}

impl KubeSide {
    /// A side over the two stores (both ready), fed by `touched`.
    pub fn new(
        options: EngineOptions,
        hub: Arc<Hub>,
        stores: (Store<FleetDeployment>, Store<Device>),
        touched: mpsc::UnboundedReceiver<Touched>,
        reconcile: mpsc::UnboundedSender<ObjectRef<FleetDeployment>>,
        writes: mpsc::UnboundedSender<DeviceWrite>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut sweep = tokio::time::interval(options.device_status_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            options,
            hub,
            deployments: stores.0,
            devices: stores.1,
            touched,
            pending: Vec::new(),
            reconcile,
            writes,
            sweep,
            sweep_due: false,
            deleting: BTreeSet::new(),
            fed: HashMap::new(),
            held: HashMap::new(),
            statuses: Vec::new(),
            sent: HashMap::new(),
            created: HashSet::new(),
            wall_at_zero: None,
            metrics,
        }
    }

    fn deployment(&mut self, controller: &mut Controller, now: Timestamp, name: &str) {
        let object = self
            .deployments
            .get(&ObjectRef::new(name).within(&self.options.namespace));
        let id = match DeploymentName::new(name) {
            Ok(id) => id,
            Err(error) => {
                if object.is_some() {
                    self.publish(name, Known::InvalidName(error.to_string()));
                } else {
                    self.hub.forget(name);
                }
                return;
            }
        };
        match object {
            Some(fd) if fd.metadata.deletion_timestamp.is_none() => {
                if !fd.finalizers().iter().any(|f| f == FINALIZER) {
                    // The reconciler adds it first; until then nothing is
                    // written for this object.
                    return;
                }
                let generation = fd.metadata.generation.unwrap_or(0);
                let next = match images::feed(&fd) {
                    Feed::Manifest(manifest) => (generation, manifest),
                    // The reconciler is resolving its images (or failing
                    // to): the controller keeps what it was handed.
                    Feed::Unpinned => match self.held.get(name) {
                        Some(held) if !self.fed.contains_key(name) => held.clone(),
                        _ => return,
                    },
                };
                if self.fed.get(name) == Some(&next) && !self.deleting.contains(&id) {
                    return;
                }
                self.fed.insert(name.to_owned(), next.clone());
                self.held.insert(name.to_owned(), next.clone());
                let (generation, value) = next;
                controller.handle(
                    now,
                    Input::DeploymentPut {
                        name: id.clone(),
                        generation: u64::try_from(generation).unwrap_or(0),
                        value,
                    },
                );
                self.deleting.remove(&id);
                self.hub.set_torn_down(name, false);
                self.statuses.push(id);
            }
            Some(_) | None => {
                self.fed.remove(name);
                self.held.remove(name);
                if object.is_none() {
                    self.hub.forget(name);
                }
                if self.deleting.insert(id.clone()) {
                    controller.handle(now, Input::DeploymentDeleted { name: id });
                }
            }
        }
    }

    fn device(&mut self, controller: &mut Controller, now: Timestamp, name: &str) {
        let Ok(id) = DeviceId::new(name) else {
            tracing::warn!(
                device = name,
                "a Device whose name is not a device id is ignored"
            );
            return;
        };
        match self.devices.get(&ObjectRef::new(name)) {
            Some(device) => {
                let record = DeviceRecord {
                    labels: device.labels().clone(),
                };
                let value = record.to_json();
                if let Err(error) = DeviceRecord::from_json(&value) {
                    tracing::warn!(device = name, %error, "the Device's labels are refused; it keeps the labels it had");
                }
                controller.handle(now, Input::DevicePut { device: id, value });
            }
            None => {
                self.sent.remove(name);
                controller.handle(now, Input::DeviceDeleted { device: id });
            }
        }
    }

    fn devices_listed(&mut self, controller: &mut Controller, now: Timestamp) {
        let listed: BTreeSet<String> = self.devices.state().iter().map(|d| d.name_any()).collect();
        let vanished: Vec<String> = controller
            .devices()
            .filter(|d| !d.labels.is_empty() && !listed.contains(d.id.as_str()))
            .map(|d| d.id.to_string())
            .collect();
        for name in listed.iter().chain(&vanished) {
            self.device(controller, now, name);
        }
    }

    /// Works every Device's status out and sends those that changed.
    fn sweep_devices(&mut self, controller: &Controller) {
        let Some((zero_pass, zero_wall)) = self.wall_at_zero else {
            return;
        };
        for name in std::mem::take(&mut *lock(&self.hub.unsent)) {
            self.sent.remove(&name);
            self.created.remove(&name);
        }
        let resolution = u64::try_from(self.options.last_seen_every.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        for view in controller.devices() {
            let name = view.id.as_str();
            if self.devices.get(&ObjectRef::new(name)).is_none() {
                if self.options.create_devices
                    && view.heartbeat.is_some()
                    && self.created.insert(name.to_owned())
                {
                    let _ = self.writes.send(DeviceWrite::Create {
                        name: name.to_owned(),
                    });
                }
                continue;
            }
            let last_seen = view.seen_at.map(|seen| {
                let wall = i128::from(zero_wall.as_millis()) + i128::from(seen.as_millis())
                    - i128::from(zero_pass.as_millis());
                let wall = u64::try_from(wall.max(0)).unwrap_or(0);
                rfc3339((wall - wall % resolution) / 1000)
            });
            let deployments = view
                .deployments
                .iter()
                .map(|d| {
                    (
                        d.to_string(),
                        device_deployment(controller.report(d, view.id)),
                    )
                })
                .collect();
            let status = device_status(&view, last_seen, deployments);
            let shown = match self.sent.get(name) {
                Some(sent) => Some(sent.clone()),
                // What the object shows, after a restart.
                None => self
                    .devices
                    .get(&ObjectRef::new(name))
                    .and_then(|d| d.status.clone()),
            };
            if shown.as_ref() != Some(&status) {
                self.sent.insert(name.to_owned(), status.clone());
                let _ = self.writes.send(DeviceWrite::Status {
                    name: name.to_owned(),
                    status,
                });
            }
        }
    }

    fn publish(&self, name: &str, known: Known) {
        if self.hub.set_known(name, known) {
            let _ = self
                .reconcile
                .send(ObjectRef::new(name).within(&self.options.namespace));
        }
    }
}

impl Side for KubeSide {
    fn buckets(&self) -> &[Bucket] {
        &[Bucket::Desired, Bucket::State, Bucket::Heartbeats]
    }

    fn start(&mut self, controller: &mut Controller, now: Timestamp) {
        self.metrics.set_nats_connected(true);
        self.wall_at_zero = Some((now, wall_clock()));
        // What was touched before is in the stores' state now.
        while self.touched.try_recv().is_ok() {}
        self.pending.clear();
        self.deleting.clear();
        self.fed.clear();
        self.statuses.clear();
        let names: Vec<String> = self
            .deployments
            .state()
            .iter()
            .map(|fd| fd.name_any())
            .collect();
        for name in names {
            self.deployment(controller, now, &name);
        }
        let devices: Vec<String> = self.devices.state().iter().map(|d| d.name_any()).collect();
        for name in devices {
            self.device(controller, now, &name);
        }
    }

    async fn ready(&mut self) {
        tokio::select! {
            touched = self.touched.recv() => self.pending.extend(touched),
            _ = self.sweep.tick() => self.sweep_due = true,
        }
    }

    fn feed(&mut self, controller: &mut Controller, now: Timestamp) {
        while let Ok(touched) = self.touched.try_recv() {
            self.pending.push(touched);
        }
        for touched in std::mem::take(&mut self.pending) {
            match touched {
                Touched::Deployment(name) => self.deployment(controller, now, &name),
                Touched::Device(name) => self.device(controller, now, &name),
                Touched::Devices => self.devices_listed(controller, now),
            }
        }
        if std::mem::take(&mut self.sweep_due) && controller.is_synced() {
            self.sweep_devices(controller);
        }
    }

    fn take(&mut self, output: Output) -> Option<Output> {
        match output {
            Output::PutStatus { name, .. } => {
                self.statuses.push(name);
                None
            }
            Output::DeleteStatus { .. } => None,
            other => Some(other),
        }
    }

    fn stopped(&mut self) {
        self.metrics.set_nats_connected(false);
        self.metrics.set_ready(false);
    }

    fn observe(&mut self, controller: &Controller) {
        if controller.is_synced() {
            self.metrics.set_ready(true);
        }
        for name in std::mem::take(&mut self.statuses) {
            if let Some((read, _)) = controller.deployment(&name) {
                let known = Known::Aggregate {
                    read: i64::try_from(read).unwrap_or(i64::MAX),
                    status: Box::new(controller.status(&name)),
                };
                self.publish(name.as_str(), known);
            }
        }
        let done: Vec<DeploymentName> = self
            .deleting
            .iter()
            .filter(|name| controller.holds_no_keys(name))
            .cloned()
            .collect();
        for name in done {
            let object = ObjectRef::new(name.as_str()).within(&self.options.namespace);
            if self.deployments.get(&object).is_none() {
                // Its finalizer was released and it is gone: forget it.
                self.deleting.remove(&name);
                self.hub.forget(name.as_str());
                self.hub.set_torn_down(name.as_str(), false);
            } else if !self.hub.is_torn_down(name.as_str()) {
                self.hub.set_torn_down(name.as_str(), true);
                let _ = self.reconcile.send(object);
            }
        }
    }
}

/// Seconds since the Unix epoch.
pub fn wall_seconds() -> u64 {
    wall_clock().as_millis() / 1000
}

/// `seconds` since the Unix epoch as RFC 3339 (UTC, to the second).
pub fn rfc3339(seconds: u64) -> String {
    let seconds = i64::try_from(seconds).unwrap_or(i64::MAX);
    k8s_openapi::jiff::Timestamp::from_second(seconds)
        .map(|t| t.to_string())
        .unwrap_or_default()
}
