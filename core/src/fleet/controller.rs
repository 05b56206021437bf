//! The sans-IO fleet controller: from fleet deployments, device records,
//! reports and heartbeats to per-device desired keys and one status per
//! fleet deployment.
//!
//! The [`Controller`] decides, for every fleet deployment and every device,
//! whether the device's desired key `<device>.<deployment>` should hold the
//! deployment's score, be deleted, or be left alone, and writes only what
//! differs from what the desired bucket already holds. It aggregates what
//! the targeted devices report into a [`FleetDeploymentStatus`]. It never
//! reads a bucket or a clock: the shell (the `podfleet controller`, the
//! simulator, the CLI's dry run) feeds it what the buckets hold and carries
//! its writes out.
//!
//! # Drive loop
//! 1. Feed every entry of the deployments, devices, desired, state,
//!    heartbeat and status buckets with [`Controller::handle`], then
//!    [`Input::Synced`].
//!    Nothing is written before it: a restarted controller first learns what
//!    the buckets hold, so it rewrites nothing that is already right.
//! 2. After every `handle`, drain [`Controller::poll_output`] until `None`
//!    and carry each [`Output`] out. Report a write the broker refused with
//!    [`Input::WriteFailed`]; a write that succeeded comes back through the
//!    desired bucket's watch like any other entry.
//! 3. At [`Controller::poll_timeout`], hand in [`Input::Timeout`].
//! 4. After a lost watch or connection, start over with a new controller:
//!    it costs one read of the buckets and writes nothing that is right.
//!
//! # Ownership
//! The controller owns every desired key whose deployment name is a fleet
//! deployment, or was one (its key in the deployments bucket is a delete
//! marker): those keys end up holding exactly the deployment's score on
//! exactly its targeted devices. Desired keys of other names, written by
//! hand, are left alone.
//!
//! # Targets
//! A device is *known* when it has a device record or a heartbeat. A
//! [`Target::Selector`] picks the known devices whose record's labels
//! match (no record: no labels); a [`Target::Devices`] list picks its
//! devices whether known or not. An offline device stays targeted: its
//! agent converges when it is back.
//!
//! # All or nothing
//! A deployment whose [`Placement`] is [`Placement::AllOrNothing`] is
//! written to all its targeted devices or to none. Before it puts or
//! deletes any of its keys, the controller sorts the targeted devices into
//! those that run it (a report of `running` on any revision; `succeeded`
//! too for a `per_run` score), those that do not (a fresh heartbeat and no
//! report, or `pending` or `failed`) and those it cannot ask (no fresh
//! heartbeat, or never seen). All run it: it writes (attach). None does
//! and none is unknown: it writes (cold start). Otherwise it writes and
//! deletes nothing of the deployment and the status says why
//! ([`PlacementRefusal`]); it looks again whenever a report or a device's
//! heartbeat changes, and a spec whose `force` token is its own
//! fingerprint is written whatever the devices run. A write the broker
//! refused is retried without asking again: the rollout it belongs to was
//! let through. Deleting the deployment is never refused.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use crate::fleet::model::{
    digest_skew, group_failures, pinned_digest, DeviceGroup, FleetDeployment,
    FleetDeploymentStatus, PhaseCounts, Placement, PlacementReason, PlacementRefusal, Target,
};
use crate::fleet::selector::Labels;
use crate::fleet::{DeviceRecord, OutdatedAgents};
use crate::session::Change;
use crate::time::{Backoff, Timestamp};
use crate::wire::names::{DeploymentKey, DeploymentName, DeviceId};
use crate::wire::report::{DeploymentState, FailureCause, Heartbeat, Phase};
use crate::wire::score::Lifetime;
use crate::wire::{PodmanV0Score, Revision, ServiceName};

/// The controller's knobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// A device whose last heartbeat is older than this is offline.
    pub offline_after: Duration,
    /// The shortest time between two status writes of one deployment, so
    /// that ten thousand reports make a handful of writes, not ten thousand.
    pub status_interval: Duration,
    /// How long after a refused write it is tried again.
    pub write_backoff: Backoff,
    /// How long a reported state may outlive its desired key, while its
    /// device is online, before the controller deletes it. An agent deletes
    /// its own report after a teardown; this catches the reports of
    /// deployments deleted while an agent was down and had lost its cache.
    pub orphan_state_grace: Duration,
    /// Deliberate bugs, for the tests that prove the simulator notices.
    /// Exists only with the `bugs` feature.
    #[cfg(feature = "bugs")]
    pub bugs: Bugs,
}

/// Deliberate bugs of the fleet controller, each breaking one invariant.
/// All off by default; exists only with the `bugs` feature.
#[cfg(feature = "bugs")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bugs {
    /// A device that stops being targeted keeps the deployment's key.
    pub keep_untargeted: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            offline_after: Duration::from_secs(60),
            status_interval: Duration::from_secs(1),
            write_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            orphan_state_grace: Duration::from_secs(600),
            #[cfg(feature = "bugs")]
            bugs: Bugs::default(),
        }
    }
}

/// Something the controller learns.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Input {
    /// The deployments bucket holds `value` at key `name`, KV revision
    /// `generation`. The controller parses it; a manifest it refuses
    /// leaves the devices as they are and shows in the status.
    DeploymentPut {
        /// The key.
        name: DeploymentName,
        /// The key's KV revision.
        generation: u64,
        /// The manifest's JSON.
        value: Vec<u8>,
    },
    /// The deployment's key was deleted: tear it down everywhere.
    DeploymentDeleted {
        /// The key.
        name: DeploymentName,
    },
    /// The devices bucket holds `value` at key `device`. A record that does
    /// not parse is ignored: the device keeps the labels it had.
    DevicePut {
        /// The key.
        device: DeviceId,
        /// The record's JSON.
        value: Vec<u8>,
    },
    /// The device's record was deleted: it has no labels any more.
    DeviceDeleted {
        /// The key.
        device: DeviceId,
    },
    /// A change of the desired bucket (the controller's own writes too).
    Desired(Change),
    /// A change of the state bucket.
    State(Change),
    /// The heartbeat bucket holds `value` at key `device` (or nothing, on a
    /// delete); it was written `age` ago.
    Heartbeat {
        /// The key.
        device: DeviceId,
        /// The heartbeat's JSON, `None` when deleted.
        value: Option<Vec<u8>>,
        /// How long before `now` it was written.
        age: Duration,
    },
    /// The status bucket holds `value` at key `name` (or nothing, on a
    /// delete). The controller rewrites a status only when it differs, and
    /// deletes the statuses of deployments that no longer exist.
    Status {
        /// The key.
        name: DeploymentName,
        /// The status's JSON, `None` when deleted.
        value: Option<Vec<u8>>,
    },
    /// A write the controller asked for was refused.
    WriteFailed {
        /// The desired key.
        key: DeploymentKey,
        /// Why, for the log.
        error: String,
    },
    /// Every bucket has been read once: the controller may write.
    Synced,
    /// Time has passed: act on [`Controller::poll_timeout`].
    Timeout,
}

/// Something the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Output {
    /// Put `payload` (a score's JSON) at the desired key.
    PutDesired {
        /// The key.
        key: DeploymentKey,
        /// The value; shared by every device of a deployment.
        payload: Arc<[u8]>,
    },
    /// Delete the desired key.
    DeleteDesired {
        /// The key.
        key: DeploymentKey,
    },
    /// Delete a report that outlived its desired key.
    DeleteState {
        /// The key in the state bucket.
        key: DeploymentKey,
    },
    /// Put the deployment's status.
    PutStatus {
        /// The deployment.
        name: DeploymentName,
        /// Its status (boxed: it is the largest output by far).
        status: Box<FleetDeploymentStatus>,
    },
    /// Delete the status of a deleted deployment.
    DeleteStatus {
        /// The deployment.
        name: DeploymentName,
    },
}

/// When the controller wants [`Input::Timeout`], and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wake {
    /// The instant.
    pub at: Timestamp,
    /// Why, for traces.
    pub reason: WakeReason,
}

/// Why the controller wants to wake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WakeReason {
    /// A refused write is due again.
    WriteRetry,
    /// A device's heartbeat grows too old: it goes offline.
    DeviceOffline,
    /// A deployment's status changed and its write interval has passed.
    Status,
}

/// What the controller intends for one desired key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Intent {
    /// Not the controller's key (or its manifest was refused): leave it.
    LeaveAlone,
    /// The key should hold this payload.
    Hold(Arc<[u8]>),
    /// The key should not exist.
    Absent,
}

/// A write sent and not yet seen in the desired bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Write {
    Put(Arc<[u8]>),
    Delete,
}

/// What the controller knows about one `<device>.<deployment>` pair.
#[derive(Debug, Clone, Default)]
struct Cell {
    /// What the desired bucket holds.
    desired: Option<(Revision, Arc<[u8]>)>,
    /// A write in flight.
    write: Option<Write>,
    /// Refused writes in a row, and when the next attempt is due.
    refused: u32,
    retry_at: Option<Timestamp>,
    /// What the device reports.
    state: Option<DeploymentState>,
    /// Since when the report has had no desired key.
    orphan_since: Option<Timestamp>,
    /// The report's deletion was asked for.
    state_delete_sent: bool,
    /// The write the broker refused, due again at `retry_at`: it was let
    /// through once, so an all-or-nothing deployment does not ask again.
    retrying: Option<Write>,
}

impl Cell {
    fn is_empty(&self) -> bool {
        self.desired.is_none()
            && self.write.is_none()
            && self.retry_at.is_none()
            && self.retrying.is_none()
            && self.state.is_none()
    }

    /// The revision the device should report on, when the desired key
    /// holds `payload` and no write is in flight.
    fn current_revision(&self, payload: &[u8]) -> Option<Revision> {
        match (&self.write, &self.desired) {
            (None, Some((revision, held))) if **held == *payload => Some(*revision),
            _ => None,
        }
    }
}

/// A fleet deployment as the controller holds it.
#[derive(Debug, Clone)]
struct Deployment {
    /// The KV revision of the manifest last read.
    generation: u64,
    /// The last manifest that was valid, and its generation: a refused
    /// manifest changes nothing on the devices.
    spec: Option<(u64, Spec)>,
    /// Why the manifest last read was refused.
    error: Option<String>,
    /// The status last emitted.
    status: Option<FleetDeploymentStatus>,
    /// Something the status depends on changed since.
    dirty: bool,
    /// The earliest time the next status may be emitted.
    next_status_at: Timestamp,
}

#[derive(Debug, Clone)]
struct Spec {
    target: Target,
    payload: Arc<[u8]>,
    /// All or nothing, and not forced: writes wait for the devices to agree.
    gated: bool,
    /// The score runs to completion: `succeeded` counts as having run it.
    per_run: bool,
    /// The score features it uses ([`PodmanV0Score::features`]): written
    /// only to devices whose agent names them all.
    features: Vec<&'static str>,
}

/// Whether the writes of an all-or-nothing deployment may go out, asked at
/// most once per pass over its devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Gate {
    #[default]
    Unasked,
    Open,
    Shut,
}

/// A device as the controller knows it.
#[derive(Debug, Clone, Default)]
struct Device {
    /// The record's labels; `None` without a record.
    labels: Option<Labels>,
    heartbeat: Option<Heartbeat>,
    /// The score features its agent named in its last heartbeat, kept when
    /// the heartbeat goes: `None` until one came.
    score_features: Option<Vec<String>>,
    /// When the heartbeat was written, on the controller's clock.
    seen_at: Option<Timestamp>,
    /// When it goes offline; `None` when it is.
    online_until: Option<Timestamp>,
}

impl Device {
    fn is_known(&self) -> bool {
        self.labels.is_some() || self.heartbeat.is_some()
    }

    /// Whether its agent is known not to understand one of `features`:
    /// its last heartbeat, however old (even deleted since), does not name
    /// it. A device never heard from is not: nothing says its agent is
    /// old, and a new device gets its deployments before its agent first
    /// connects.
    fn lacks(&self, features: &[&str]) -> bool {
        self.score_features.as_ref().is_some_and(|named| {
            features
                .iter()
                .any(|f| !named.iter().any(|known| known == f))
        })
    }
}

static NO_LABELS: Labels = Labels::new();

/// The fleet controller. See the [module docs](self) for the drive loop.
#[derive(Debug, Clone)]
pub struct Controller {
    config: Config,
    now: Timestamp,
    synced: bool,
    deployments: BTreeMap<DeploymentName, Deployment>,
    /// Deleted fleet deployments whose keys the controller still owns.
    tombstones: BTreeSet<DeploymentName>,
    devices: BTreeMap<DeviceId, Device>,
    cells: BTreeMap<(DeploymentName, DeviceId), Cell>,
    /// Which deployments have a cell on each device.
    on_device: BTreeMap<DeviceId, BTreeSet<DeploymentName>>,
    /// Devices by when they go offline.
    offline_at: BTreeSet<(Timestamp, DeviceId)>,
    /// Refused writes by when they are due again.
    retries: BTreeSet<(Timestamp, DeploymentName, DeviceId)>,
    /// What the status bucket holds (or is being written), by deployment.
    statuses: BTreeMap<DeploymentName, FleetDeploymentStatus>,
    /// All-or-nothing deployments a write of which was refused: looked at
    /// again when a report or a device's heartbeat changes.
    held: BTreeSet<DeploymentName>,
    outputs: VecDeque<Output>,
}

impl Controller {
    /// A controller that knows nothing yet.
    pub fn new(config: Config, now: Timestamp) -> Self {
        Self {
            config,
            now,
            synced: false,
            deployments: BTreeMap::new(),
            tombstones: BTreeSet::new(),
            devices: BTreeMap::new(),
            cells: BTreeMap::new(),
            on_device: BTreeMap::new(),
            offline_at: BTreeSet::new(),
            retries: BTreeSet::new(),
            statuses: BTreeMap::new(),
            held: BTreeSet::new(),
            outputs: VecDeque::new(),
        }
    }

    /// Learns one thing at `now` (never earlier than the last call's).
    pub fn handle(&mut self, now: Timestamp, input: Input) {
        self.now = self.now.max(now);
        match input {
            Input::DeploymentPut {
                name,
                generation,
                value,
            } => self.deployment_put(name, generation, &value),
            Input::DeploymentDeleted { name } => self.deployment_deleted(name),
            Input::DevicePut { device, value } => {
                if let Ok(record) = DeviceRecord::from_json(&value) {
                    self.set_labels(device, Some(record.labels));
                }
            }
            Input::DeviceDeleted { device } => self.set_labels(device, None),
            Input::Desired(change) => self.desired_changed(change),
            Input::State(change) => self.state_changed(change),
            Input::Heartbeat { device, value, age } => self.heartbeat(device, value, age),
            Input::Status { name, value } => self.status_observed(name, value),
            Input::WriteFailed { key, .. } => self.write_failed(key),
            Input::Synced => self.synced(),
            Input::Timeout => self.timeout(),
        }
        self.flush_statuses();
    }

    /// The next thing to do, if any.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When to hand in [`Input::Timeout`], if ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Wake> {
        let retry = self.retries.first().map(|(at, ..)| Wake {
            at: *at,
            reason: WakeReason::WriteRetry,
        });
        let offline = self.offline_at.first().map(|(at, _)| Wake {
            at: *at,
            reason: WakeReason::DeviceOffline,
        });
        // Statuses are written only once synced: before, a dirty status is
        // no reason to wake.
        let status = self
            .deployments
            .values()
            .filter(|d| self.synced && d.dirty)
            .map(|d| d.next_status_at)
            .min()
            .map(|at| Wake {
                at,
                reason: WakeReason::Status,
            });
        [retry, offline, status]
            .into_iter()
            .flatten()
            .min_by_key(|w| w.at)
    }

    /// Whether [`Input::Synced`] has been handed in.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    // ---- inputs ----

    fn deployment_put(&mut self, name: DeploymentName, generation: u64, value: &[u8]) {
        let spec = match FleetDeployment::from_json(value) {
            Ok(manifest) if manifest.metadata.name != name => Err(format!(
                "metadata.name: {:?} differs from the key {:?} it is stored under",
                manifest.metadata.name.as_str(),
                name.as_str()
            )),
            Ok(manifest) => Ok(Spec {
                gated: manifest.spec.placement == Placement::AllOrNothing
                    && !manifest.spec.is_forced(),
                per_run: manifest.spec.score.lifetime() == Lifetime::PerRun,
                features: manifest.spec.score.features(),
                target: manifest.spec.target,
                payload: manifest.spec.score.to_json().into(),
            }),
            Err(e) => Err(e.to_string()),
        };
        if spec.is_ok() {
            self.tombstones.remove(&name);
        }
        let next_status_at = self.now;
        let entry = self
            .deployments
            .entry(name.clone())
            .or_insert_with(|| Deployment {
                generation,
                spec: None,
                error: None,
                status: self.statuses.get(&name).cloned(),
                dirty: true,
                next_status_at,
            });
        entry.generation = generation;
        match spec {
            Ok(spec) => {
                entry.spec = Some((generation, spec));
                entry.error = None;
            }
            Err(error) => entry.error = Some(error),
        }
        entry.dirty = true;
        if self.synced {
            self.converge_deployment(&name);
        }
    }

    fn deployment_deleted(&mut self, name: DeploymentName) {
        self.deployments.remove(&name);
        self.held.remove(&name);
        self.tombstones.insert(name.clone());
        if self.synced {
            self.converge_deployment(&name);
            self.delete_status(name);
        }
    }

    fn status_observed(&mut self, name: DeploymentName, value: Option<Vec<u8>>) {
        let status = value.and_then(|v| serde_json::from_slice::<FleetDeploymentStatus>(&v).ok());
        match &status {
            Some(status) => self.statuses.insert(name.clone(), status.clone()),
            None => self.statuses.remove(&name),
        };
        match self.deployments.get_mut(&name) {
            Some(deployment) => {
                deployment.status = status;
                deployment.dirty = true;
            }
            None if self.synced => self.delete_status(name),
            None => {}
        }
    }

    /// Deletes the status of `name`, a deployment that no longer exists, if
    /// the bucket holds one.
    fn delete_status(&mut self, name: DeploymentName) {
        if self.statuses.remove(&name).is_some() {
            self.outputs.push_back(Output::DeleteStatus { name });
        }
    }

    fn set_labels(&mut self, id: DeviceId, labels: Option<Labels>) {
        let device = self.devices.entry(id.clone()).or_default();
        if device.labels == labels {
            return;
        }
        device.labels = labels;
        if !device.is_known() {
            self.devices.remove(&id);
        }
        self.converge_device(&id);
    }

    fn heartbeat(&mut self, id: DeviceId, value: Option<Vec<u8>>, age: Duration) {
        let heartbeat = value.and_then(|v| serde_json::from_slice::<Heartbeat>(&v).ok());
        let device = self.devices.entry(id.clone()).or_default();
        let was_known = device.is_known();
        let was_online = device.online_until.is_some();
        if let Some(until) = device.online_until.take() {
            self.offline_at.remove(&(until, id.clone()));
        }
        let features_changed;
        match heartbeat {
            Some(heartbeat) => {
                let seen_at = Timestamp::from_millis(
                    self.now
                        .as_millis()
                        .saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
                );
                // From the age, not from `seen_at`: on a clock that started
                // after the heartbeat was written, `seen_at` is clamped to
                // the clock's origin and would make an old heartbeat fresh.
                let until = self.now + self.config.offline_after.saturating_sub(age);
                // A first heartbeat, or an agent upgraded (or downgraded)
                // in place: what it may be written changes.
                features_changed =
                    device.score_features.as_ref() != Some(&heartbeat.score_features);
                if features_changed {
                    device.score_features = Some(heartbeat.score_features.clone());
                }
                device.heartbeat = Some(heartbeat);
                device.seen_at = Some(seen_at);
                if age < self.config.offline_after {
                    device.online_until = Some(until);
                    self.offline_at.insert((until, id.clone()));
                }
            }
            None => {
                features_changed = false;
                device.heartbeat = None;
                device.seen_at = None;
            }
        }
        let is_known = device.is_known();
        let is_online = device.online_until.is_some();
        if !is_known {
            self.devices.remove(&id);
        }
        if was_known != is_known || features_changed {
            // A device heard from (or upgraded) may now take what it was
            // not written; its deployments' statuses and any held
            // all-or-nothing deployment are looked at again.
            self.converge_device(&id);
        }
        if was_online != is_online {
            self.mark_device_dirty(&id);
            self.reconsider_held();
        }
        if is_online {
            self.collect_orphans(&id);
        }
    }

    fn desired_changed(&mut self, change: Change) {
        let (key, held) = match change {
            Change::Put {
                key,
                revision,
                value,
            } => (key, Some((revision, value))),
            Change::Delete { key, .. } => (key, None),
        };
        let DeploymentKey { device, deployment } = key;
        let shared = self
            .deployments
            .get(&deployment)
            .and_then(|d| d.spec.as_ref())
            .map(|(_, s)| s.payload.clone());
        let now = self.now;
        let cell = self.cell(&deployment, &device);
        match held {
            Some((revision, value)) => {
                let payload = match shared {
                    Some(shared) if *shared == *value => shared,
                    _ => value.into(),
                };
                if cell.write == Some(Write::Put(payload.clone())) {
                    cell.write = None;
                    cell.refused = 0;
                }
                cell.desired = Some((revision, payload));
                cell.orphan_since = None;
            }
            None => {
                if cell.write == Some(Write::Delete) {
                    cell.write = None;
                    cell.refused = 0;
                }
                cell.desired = None;
                if cell.state.is_some() && cell.orphan_since.is_none() {
                    cell.orphan_since = Some(now);
                }
            }
        }
        self.mark_dirty(&deployment);
        if self.synced {
            self.settle(&deployment, &device, &mut Gate::Unasked);
        }
        self.prune(&deployment, &device);
    }

    fn state_changed(&mut self, change: Change) {
        let (key, state) = match change {
            Change::Put { key, value, .. } => {
                (key, serde_json::from_slice::<DeploymentState>(&value).ok())
            }
            Change::Delete { key, .. } => (key, None),
        };
        let DeploymentKey { device, deployment } = key;
        let now = self.now;
        let cell = self.cell(&deployment, &device);
        if state.is_none() {
            cell.state_delete_sent = false;
        }
        cell.orphan_since = match (&state, &cell.desired, &cell.write) {
            (Some(_), None, None) => cell.orphan_since.or(Some(now)),
            _ => None,
        };
        cell.state = state;
        self.mark_dirty(&deployment);
        self.prune(&deployment, &device);
        if self.synced && self.held.contains(&deployment) {
            self.converge_deployment(&deployment);
        }
    }

    fn write_failed(&mut self, key: DeploymentKey) {
        let DeploymentKey { device, deployment } = key;
        let now = self.now;
        let backoff = self.config.write_backoff;
        let cell = self.cell(&deployment, &device);
        let Some(write) = cell.write.take() else {
            return;
        };
        cell.retrying = Some(write);
        let at = now + backoff.delay(cell.refused);
        cell.refused = cell.refused.saturating_add(1);
        cell.retry_at = Some(at);
        self.retries.insert((at, deployment, device));
    }

    fn synced(&mut self) {
        if self.synced {
            return;
        }
        self.synced = true;
        let names: BTreeSet<DeploymentName> = self
            .deployments
            .keys()
            .chain(&self.tombstones)
            .cloned()
            .collect();
        for name in &names {
            self.converge_deployment(name);
        }
        let gone: Vec<DeploymentName> = self
            .statuses
            .keys()
            .filter(|name| !self.deployments.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            self.delete_status(name);
        }
        let online: Vec<DeviceId> = self
            .devices
            .iter()
            .filter(|(_, d)| d.online_until.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        for id in online {
            self.collect_orphans(&id);
        }
    }

    fn timeout(&mut self) {
        let now = self.now;
        let mut went_offline = false;
        while let Some((at, id)) = self.offline_at.first().cloned() {
            if at > now {
                break;
            }
            self.offline_at.remove(&(at, id.clone()));
            if let Some(device) = self.devices.get_mut(&id) {
                device.online_until = None;
            }
            self.mark_device_dirty(&id);
            went_offline = true;
        }
        if went_offline {
            self.reconsider_held();
        }
        while let Some((at, name, id)) = self.retries.first().cloned() {
            if at > now {
                break;
            }
            self.retries.remove(&(at, name.clone(), id.clone()));
            if let Some(cell) = self.cells.get_mut(&(name.clone(), id.clone())) {
                if cell.retry_at == Some(at) {
                    cell.retry_at = None;
                }
            }
            if self.synced {
                self.settle(&name, &id, &mut Gate::Unasked);
            }
            self.prune(&name, &id);
        }
    }

    // ---- decisions ----

    /// Every device the deployment `name` may have a key on: those with a
    /// cell, and those it targets.
    fn devices_of(&self, name: &DeploymentName) -> BTreeSet<DeviceId> {
        let mut devices: BTreeSet<DeviceId> = self
            .cells
            .range((name.clone(), min_device())..)
            .take_while(|((n, _), _)| n == name)
            .map(|((_, d), _)| d.clone())
            .collect();
        match self.deployments.get(name).and_then(|d| d.spec.as_ref()) {
            Some((
                _,
                Spec {
                    target: Target::Devices(ids),
                    ..
                },
            )) => {
                devices.extend(ids.iter().cloned());
            }
            Some((
                _,
                Spec {
                    target: Target::Selector(_),
                    ..
                },
            )) => {
                devices.extend(self.devices.keys().cloned());
            }
            None => {}
        }
        devices
    }

    /// Settles every device the deployment `name` may have a key on.
    fn converge_deployment(&mut self, name: &DeploymentName) {
        self.held.remove(name);
        let mut gate = Gate::Unasked;
        for device in self.devices_of(name) {
            self.settle(name, &device, &mut gate);
            self.prune(name, &device);
        }
        self.mark_dirty(name);
    }

    /// Looks again at every all-or-nothing deployment a write of which was
    /// refused: a device's heartbeat came or went.
    fn reconsider_held(&mut self) {
        if !self.synced {
            return;
        }
        let held: Vec<DeploymentName> = self.held.iter().cloned().collect();
        for name in held {
            self.converge_deployment(&name);
        }
    }

    /// Settles every deployment's key on device `id`.
    fn converge_device(&mut self, id: &DeviceId) {
        if !self.synced {
            return;
        }
        let names: Vec<DeploymentName> = self
            .deployments
            .keys()
            .chain(&self.tombstones)
            .cloned()
            .collect();
        for name in names {
            self.settle(&name, id, &mut Gate::Unasked);
            self.prune(&name, id);
            self.mark_dirty(&name);
        }
        // What the device is targeted by changed, and with it which
        // devices a refused deployment waits for.
        self.reconsider_held();
    }

    fn intent(&self, name: &DeploymentName, id: &DeviceId) -> Intent {
        match self.deployments.get(name) {
            Some(Deployment {
                spec: Some((_, spec)),
                ..
            }) => {
                if self.targets(spec, id) {
                    Intent::Hold(spec.payload.clone())
                } else if self.keeps_untargeted() {
                    Intent::LeaveAlone
                } else {
                    Intent::Absent
                }
            }
            // Deleted, or never valid: a refused manifest after a delete
            // does not bring anything back.
            _ if self.tombstones.contains(name) => Intent::Absent,
            _ => Intent::LeaveAlone,
        }
    }

    fn keeps_untargeted(&self) -> bool {
        #[cfg(feature = "bugs")]
        let on = self.config.bugs.keep_untargeted;
        #[cfg(not(feature = "bugs"))]
        let on = false;
        on
    }

    fn targets(&self, spec: &Spec, id: &DeviceId) -> bool {
        match &spec.target {
            Target::Devices(ids) => ids.contains(id),
            Target::Selector(selector) => self.devices.get(id).is_some_and(|device| {
                selector.matches(device.labels.as_ref().unwrap_or(&NO_LABELS))
            }),
        }
    }

    /// The write that would bring the key `<id>.<name>` to the intent, if
    /// it differs from it; a write in flight counts as done.
    fn change(&self, name: &DeploymentName, id: &DeviceId) -> Option<Write> {
        let cell = self.cells.get(&(name.clone(), id.clone()));
        let in_flight = cell.and_then(|c| c.write.as_ref());
        let held = cell.and_then(|c| c.desired.as_ref()).map(|(_, p)| p);
        match self.intent(name, id) {
            Intent::LeaveAlone => None,
            Intent::Hold(payload) => {
                let done = match in_flight {
                    Some(Write::Put(sent)) => *sent == payload,
                    Some(Write::Delete) => false,
                    None => held == Some(&payload),
                };
                (!done).then_some(Write::Put(payload))
            }
            Intent::Absent => {
                let done = match in_flight {
                    Some(Write::Delete) => true,
                    Some(Write::Put(_)) => false,
                    None => held.is_none(),
                };
                (!done).then_some(Write::Delete)
            }
        }
    }

    /// Writes the key `<id>.<name>` if it differs from the intent and, for
    /// an all-or-nothing deployment, the devices let it (`gate` keeps the
    /// answer for the rest of the pass).
    fn settle(&mut self, name: &DeploymentName, id: &DeviceId, gate: &mut Gate) {
        let key = (name.clone(), id.clone());
        if self.cells.get(&key).is_some_and(|c| c.retry_at.is_some()) {
            return;
        }
        let Some(write) = self.change(name, id) else {
            return;
        };
        if matches!(write, Write::Put(_)) && self.outdated(name, id) {
            self.mark_dirty(name);
            return;
        }
        if !self.may_write(name, id, &write, gate) {
            return;
        }
        self.outputs.push_back(match &write {
            Write::Put(payload) => Output::PutDesired {
                key: deployment_key(name, id),
                payload: payload.clone(),
            },
            Write::Delete => Output::DeleteDesired {
                key: deployment_key(name, id),
            },
        });
        let cell = self.cell(name, id);
        cell.write = Some(write);
        cell.retrying = None;
    }

    /// Whether `write` of the key `<id>.<name>` may go out: always, unless
    /// the deployment is all or nothing and its devices do not agree. A
    /// refused write being retried was let through already.
    fn may_write(
        &mut self,
        name: &DeploymentName,
        id: &DeviceId,
        write: &Write,
        gate: &mut Gate,
    ) -> bool {
        let Some(spec) = self.gated_spec(name) else {
            return true;
        };
        let retrying = self
            .cells
            .get(&(name.clone(), id.clone()))
            .and_then(|c| c.retrying.as_ref());
        if retrying == Some(write) {
            return true;
        }
        if *gate == Gate::Unasked {
            // All or nothing: one device that cannot take the score is
            // enough to write it to none.
            let outdated = !spec.features.is_empty()
                && self
                    .rows(name, spec)
                    .any(|row| self.outdated(name, row.device));
            *gate = match self.refusal(name, spec) {
                None if !outdated => Gate::Open,
                _ => Gate::Shut,
            };
        }
        if *gate == Gate::Shut {
            self.held.insert(name.clone());
            self.mark_dirty(name);
            return false;
        }
        true
    }

    /// Whether the current spec of `name` uses a score feature the agent of
    /// `id` is known not to understand.
    fn outdated(&self, name: &DeploymentName, id: &DeviceId) -> bool {
        let Some((_, spec)) = self.deployments.get(name).and_then(|d| d.spec.as_ref()) else {
            return false;
        };
        !spec.features.is_empty()
            && self
                .devices
                .get(id)
                .is_some_and(|d| d.lacks(&spec.features))
    }

    /// The spec of `name` when it is all or nothing and not forced.
    fn gated_spec(&self, name: &DeploymentName) -> Option<&Spec> {
        self.deployments
            .get(name)
            .and_then(|d| d.spec.as_ref())
            .map(|(_, spec)| spec)
            .filter(|spec| spec.gated)
    }

    /// The targeted devices of `name` each way, when they refuse the
    /// deployment's writes: some run it and some do not, or some cannot be
    /// asked. `None`: all run it, or none does and each can be asked.
    fn refusal(&self, name: &DeploymentName, spec: &Spec) -> Option<PlacementRefusal> {
        let mut running = Vec::new();
        let mut not_running = Vec::new();
        let mut unknown = Vec::new();
        for row in self.rows(name, spec) {
            let runs = row.report.is_some_and(|r| {
                r.phase == Phase::Running || (spec.per_run && r.phase == Phase::Succeeded)
            });
            if !row.online {
                unknown.push(row.device);
            } else if runs {
                running.push(row.device);
            } else {
                not_running.push(row.device);
            }
        }
        let reason = if !running.is_empty() && !not_running.is_empty() {
            PlacementReason::PartialPlacement
        } else if !unknown.is_empty() {
            PlacementReason::UnknownDevices
        } else {
            return None;
        };
        Some(PlacementRefusal {
            reason,
            running: DeviceGroup::of(running),
            not_running: DeviceGroup::of(not_running),
            unknown: DeviceGroup::of(unknown),
        })
    }

    /// Why the writes of the deployment `name` are refused, when it is all
    /// or nothing, a write is due (not counting retries) and its devices do
    /// not agree.
    fn placement(&self, name: &DeploymentName, spec: &Spec) -> Option<PlacementRefusal> {
        if !spec.gated {
            return None;
        }
        let due = self.devices_of(name).iter().any(|id| {
            self.change(name, id).is_some_and(|write| {
                self.cells
                    .get(&(name.clone(), id.clone()))
                    .and_then(|c| c.retrying.as_ref())
                    != Some(&write)
            })
        });
        if due {
            self.refusal(name, spec)
        } else {
            None
        }
    }

    /// Deletes the reports of device `id` that outlived their desired key
    /// by the grace period.
    fn collect_orphans(&mut self, id: &DeviceId) {
        if !self.synced {
            return;
        }
        let Some(names) = self.on_device.get(id) else {
            return;
        };
        let grace = self.config.orphan_state_grace;
        let now = self.now;
        let mut orphans = Vec::new();
        for name in names {
            if let Some(cell) = self.cells.get(&(name.clone(), id.clone())) {
                let due = cell.orphan_since.is_some_and(|since| since + grace <= now);
                if due
                    && cell.state.is_some()
                    && cell.desired.is_none()
                    && cell.write.is_none()
                    && !cell.state_delete_sent
                {
                    orphans.push(name.clone());
                }
            }
        }
        for name in orphans {
            self.cell(&name, id).state_delete_sent = true;
            self.outputs.push_back(Output::DeleteState {
                key: deployment_key(&name, id),
            });
        }
    }

    // ---- status ----

    fn mark_dirty(&mut self, name: &DeploymentName) {
        if let Some(deployment) = self.deployments.get_mut(name) {
            deployment.dirty = true;
        }
    }

    fn mark_device_dirty(&mut self, id: &DeviceId) {
        let names: Vec<DeploymentName> = self
            .on_device
            .get(id)
            .map(|names| names.iter().cloned().collect())
            .unwrap_or_default();
        for name in names {
            self.mark_dirty(&name);
        }
    }

    fn flush_statuses(&mut self) {
        if !self.synced {
            return;
        }
        let now = self.now;
        let due: Vec<DeploymentName> = self
            .deployments
            .iter()
            .filter(|(_, d)| d.dirty && d.next_status_at <= now)
            .map(|(name, _)| name.clone())
            .collect();
        for name in due {
            let status = self.status(&name);
            let interval = self.config.status_interval;
            let Some(deployment) = self.deployments.get_mut(&name) else {
                continue;
            };
            deployment.dirty = false;
            if deployment.status.as_ref() != Some(&status) {
                deployment.status = Some(status.clone());
                self.statuses.insert(name.clone(), status.clone());
                deployment.next_status_at = now + interval;
                self.outputs.push_back(Output::PutStatus {
                    name,
                    status: Box::new(status),
                });
            }
        }
    }

    /// The status of the deployment `name` as of now (the default status
    /// for a deployment the controller does not hold).
    pub fn status(&self, name: &DeploymentName) -> FleetDeploymentStatus {
        let Some(deployment) = self.deployments.get(name) else {
            return FleetDeploymentStatus::default();
        };
        let mut status = FleetDeploymentStatus {
            error: deployment
                .error
                .as_ref()
                .map(|e| format!("generation {} was refused: {e}", deployment.generation)),
            ..FleetDeploymentStatus::default()
        };
        let Some((generation, spec)) = &deployment.spec else {
            return status;
        };
        status.observed_generation = *generation;
        let mut phases = PhaseCounts::default();
        let mut failures: Vec<(&DeviceId, &FailureCause)> = Vec::new();
        // Every targeted device, with its report when it runs the current
        // revision, but those that ran it to completion: their containers
        // are gone, and with them any digest to compare.
        let mut targeted: Vec<(&DeviceId, Option<&DeploymentState>)> = Vec::new();
        for row in self.rows(name, spec) {
            status.targeted += 1;
            if !row.online {
                status.offline += 1;
            }
            let mut runs = None;
            match row.report.filter(|_| row.updated) {
                Some(report) => {
                    status.updated += 1;
                    phases.add(report.phase);
                    if let Some(cause) = &report.cause {
                        failures.push((row.device, cause));
                    }
                    match report.phase {
                        Phase::Running => runs = Some(report),
                        Phase::Succeeded => continue,
                        Phase::Pending | Phase::Failed => {}
                    }
                }
                None => phases.pending += 1,
            }
            targeted.push((row.device, runs));
        }
        status.phases = phases;
        status.failures = group_failures(failures);
        status.placement = self.placement(name, spec);
        let outdated: Vec<&DeviceId> = match spec.features.is_empty() {
            true => Vec::new(),
            false => self
                .rows(name, spec)
                .filter(|row| self.outdated(name, row.device))
                .map(|row| row.device)
                .collect(),
        };
        if !outdated.is_empty() {
            status.outdated_agents = Some(OutdatedAgents {
                features: spec.features.iter().map(|f| (*f).to_owned()).collect(),
                devices: DeviceGroup::of(outdated),
            });
        }
        if targeted.iter().any(|(_, runs)| runs.is_some()) {
            let services: Vec<(ServiceName, Option<String>)> =
                PodmanV0Score::from_json(&spec.payload)
                    .map(|score| {
                        score
                            .services
                            .into_iter()
                            // A local-only image (`localhost/...`, built on
                            // the device) has no registry digest to agree on.
                            .filter(|s| {
                                !crate::image::ImageReference::parse(&s.image)
                                    .is_ok_and(|r| r.is_local_only())
                            })
                            .map(|s| {
                                let pinned = pinned_digest(&s.image).map(str::to_owned);
                                (s.name, pinned)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
            status.skew = digest_skew(&services, targeted);
        }
        status
    }

    fn rows<'a>(
        &'a self,
        name: &'a DeploymentName,
        spec: &'a Spec,
    ) -> impl Iterator<Item = DeviceRollout<'a>> + 'a {
        let candidates: Box<dyn Iterator<Item = &'a DeviceId> + 'a> = match &spec.target {
            Target::Devices(ids) => Box::new(ids.iter()),
            Target::Selector(_) => Box::new(self.devices.keys()),
        };
        candidates
            .filter(move |id| self.targets(spec, id))
            .map(move |id| {
                let cell = self.cells.get(&(name.clone(), id.clone()));
                let revision = cell.and_then(|c| c.current_revision(&spec.payload));
                let report = cell.and_then(|c| c.state.as_ref());
                let device = self.devices.get(id);
                DeviceRollout {
                    device: id,
                    revision,
                    updated: revision.is_some()
                        && report.map(|r| Some(r.revision)) == Some(revision),
                    report,
                    online: device.is_some_and(|d| d.online_until.is_some()),
                    seen_at: device.and_then(|d| d.seen_at),
                }
            })
    }

    // ---- views, for people ----

    /// Every targeted device of the deployment `name` with where it stands,
    /// in device order; empty for an unknown or refused deployment.
    pub fn rollout(&self, name: &DeploymentName) -> Vec<DeviceRollout<'_>> {
        match self.deployments.get_key_value(name) {
            Some((
                name,
                Deployment {
                    spec: Some((_, spec)),
                    ..
                },
            )) => self.rows(name, spec).collect(),
            _ => Vec::new(),
        }
    }

    /// The deployment `name`'s generation and, when its manifest was
    /// refused, why.
    pub fn deployment(&self, name: &DeploymentName) -> Option<(u64, Option<&str>)> {
        self.deployments
            .get(name)
            .map(|d| (d.generation, d.error.as_deref()))
    }

    /// Every fleet deployment the controller holds (valid or refused), in
    /// name order; deleted ones are not listed.
    pub fn deployment_names(&self) -> impl Iterator<Item = &DeploymentName> {
        self.deployments.keys()
    }

    /// Every known device, in id order.
    pub fn devices(&self) -> impl Iterator<Item = DeviceView<'_>> {
        self.devices
            .iter()
            .map(|(id, device)| self.view(id, device))
    }

    /// The known device `id`, if it is known.
    pub fn device(&self, id: &DeviceId) -> Option<DeviceView<'_>> {
        self.devices
            .get_key_value(id)
            .map(|(id, device)| self.view(id, device))
    }

    fn view<'a>(&'a self, id: &'a DeviceId, device: &'a Device) -> DeviceView<'a> {
        DeviceView {
            id,
            labels: device.labels.as_ref().unwrap_or(&NO_LABELS),
            heartbeat: device.heartbeat.as_ref(),
            seen_at: device.seen_at,
            online: device.online_until.is_some(),
            deployments: self
                .on_device
                .get(id)
                .map(|names| {
                    names
                        .iter()
                        .filter(|n| {
                            self.cells
                                .get(&((*n).clone(), id.clone()))
                                .is_some_and(|c| {
                                    c.desired.is_some() || matches!(c.write, Some(Write::Put(_)))
                                })
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// Whether no device's desired key of the deployment `name` is held,
    /// being written or due for a retry, as far as a synced controller
    /// knows: after [`Input::DeploymentDeleted`], the teardown's writes are
    /// all done and seen in the desired bucket. Always `false` before
    /// [`Input::Synced`] and while `name` is a live deployment that targets
    /// a device.
    pub fn holds_no_keys(&self, name: &DeploymentName) -> bool {
        self.synced
            && self
                .cells
                .range((name.clone(), min_device())..)
                .take_while(|((n, _), _)| n == name)
                .all(|(_, cell)| {
                    cell.desired.is_none() && cell.write.is_none() && cell.retry_at.is_none()
                })
    }

    /// The reported state of `<id>.<name>`, if any.
    pub fn report(&self, name: &DeploymentName, id: &DeviceId) -> Option<&DeploymentState> {
        self.cells
            .get(&(name.clone(), id.clone()))
            .and_then(|c| c.state.as_ref())
    }

    // ---- bookkeeping ----

    fn cell(&mut self, name: &DeploymentName, id: &DeviceId) -> &mut Cell {
        let key = (name.clone(), id.clone());
        if !self.cells.contains_key(&key) {
            self.on_device
                .entry(id.clone())
                .or_default()
                .insert(name.clone());
        }
        self.cells.entry(key).or_default()
    }

    fn prune(&mut self, name: &DeploymentName, id: &DeviceId) {
        let key = (name.clone(), id.clone());
        if self.cells.get(&key).is_some_and(Cell::is_empty) {
            self.cells.remove(&key);
            if let Some(names) = self.on_device.get_mut(id) {
                names.remove(name);
                if names.is_empty() {
                    self.on_device.remove(id);
                }
            }
        }
    }
}

/// One targeted device of a deployment, as [`Controller::rollout`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRollout<'a> {
    /// The device.
    pub device: &'a DeviceId,
    /// The revision of its desired key, once it holds the current score.
    pub revision: Option<Revision>,
    /// Its latest report (about any revision).
    pub report: Option<&'a DeploymentState>,
    /// The report is about `revision`.
    pub updated: bool,
    /// Its heartbeat is fresh.
    pub online: bool,
    /// When its last heartbeat was written, on the controller's clock.
    pub seen_at: Option<Timestamp>,
}

impl DeviceRollout<'_> {
    /// Where the device stands on the current revision: its reported phase
    /// once it reports on it, pending until then.
    pub fn phase(&self) -> Phase {
        match self.report {
            Some(report) if self.updated => report.phase,
            _ => Phase::Pending,
        }
    }
}

/// A known device, as [`Controller::devices`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceView<'a> {
    /// Its id.
    pub id: &'a DeviceId,
    /// Its labels (none without a record).
    pub labels: &'a Labels,
    /// Its last heartbeat.
    pub heartbeat: Option<&'a Heartbeat>,
    /// When that was written, on the controller's clock.
    pub seen_at: Option<Timestamp>,
    /// The heartbeat is fresh.
    pub online: bool,
    /// The deployments whose desired key it has (or is being written).
    pub deployments: Vec<&'a DeploymentName>,
}

fn deployment_key(name: &DeploymentName, id: &DeviceId) -> DeploymentKey {
    DeploymentKey {
        device: id.clone(),
        deployment: name.clone(),
    }
}

/// The smallest device id, to start a range over one deployment's cells.
fn min_device() -> DeviceId {
    DeviceId::new("0").expect("\"0\" is a device id")
}

#[cfg(test)]
mod tests;
