//! What an administrator declares: [`FleetDeployment`]s and device
//! [`DeviceRecord`]s, and what the fleet controller reports back:
//! [`FleetDeploymentStatus`].
//!
//! A fleet deployment is written as a Kubernetes-style manifest, so one file
//! works with `podfleet apply` and, after changing only `apiVersion` and
//! `kind`, with `kubectl apply` and the operator:
//!
//! ```yaml
//! apiVersion: podfleet.io/v1alpha1
//! kind: FleetDeployment
//! metadata:
//!   name: web
//! spec:
//!   target:
//!     selector: "site=lyon,!canary"   # or: devices: [rpi-01, rpi-02]
//!   strategy:
//!     type: AllAtOnce                 # the default; rollout waves come later
//!   placement: Independent            # the default; or AllOrNothing
//!   score:                            # the PodmanV0Score every device runs
//!     services:
//!       - name: web
//!         image: localhost/web:1
//! ```
//!
//! This module owns the one parser of that manifest ([`FleetDeployment::from_json`],
//! which every reader uses: the CLI, the controller, the operator) and its
//! rules. A refused manifest gets a [`ManifestError`] naming the field path
//! and the rule. Like the rest of the core it never performs IO.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::fleet::selector::{validate_labels, LabelError, Labels, Selector};
use crate::wire::names::{DeploymentName, DeviceId};
use crate::wire::score::PodmanV0Score;
use crate::wire::text::{bounded, TEXT_MAX_BYTES};
use crate::wire::{DeploymentState, FailureCause, Phase, ServiceName};

/// The `apiVersion` of every manifest this version writes and reads.
pub const API_VERSION: &str = "podfleet.io/v1alpha1";
/// The `kind` of a fleet deployment manifest.
pub const FLEET_DEPLOYMENT_KIND: &str = "FleetDeployment";

/// A workload for many devices: a score, and which devices run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FleetDeployment {
    /// Always [`API_VERSION`].
    pub api_version: String,
    /// Always [`FLEET_DEPLOYMENT_KIND`].
    pub kind: String,
    /// Its name.
    pub metadata: Metadata,
    /// What runs where.
    pub spec: FleetDeploymentSpec,
}

/// A manifest's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Metadata {
    /// The deployment's name: the second token of every per-device key it
    /// owns, so it follows the device-id rule (lowercase letters, digits, '-').
    pub name: DeploymentName,
}

/// What runs where, and how a change reaches the devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FleetDeploymentSpec {
    /// Which devices run the score.
    pub target: Target,
    /// How a new revision reaches them.
    #[serde(default)]
    pub strategy: Strategy,
    /// Whether the targeted devices take the score each on its own
    /// (`Independent`), or all of them or none (`AllOrNothing`). Absent:
    /// `Independent`, what every fleet deployment did before the field
    /// existed.
    #[serde(default, skip_serializing_if = "Placement::is_independent")]
    pub placement: Placement,
    /// Forces one rollout of an `AllOrNothing` deployment past the
    /// controller's refusal: the fingerprint of this very spec
    /// (`FleetDeploymentSpec::fingerprint`), as `podfleet rollout force`
    /// (or the operator's `podfleet.io/force-generation` annotation)
    /// writes it. While it matches, the controller writes the score to
    /// every targeted device whatever they run; any change of the spec
    /// leaves it stale, and a stale token forces nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force: Option<String>,
    /// What every targeted device runs.
    pub score: PodmanV0Score,
}

impl FleetDeploymentSpec {
    /// A short, stable name of everything in the spec but `force`: 16 hex
    /// digits of FNV-1a over its canonical JSON. A `force` token that
    /// equals it forces this spec and no other.
    pub fn fingerprint(&self) -> String {
        let unforced = Self {
            force: None,
            ..self.clone()
        };
        let canonical = serde_json::to_vec(&unforced)
            .expect("a fleet deployment spec always serialises: its maps have string keys");
        format!("{:016x}", crate::reconciler::fnv1a64(&canonical))
    }

    /// Whether `force` holds this spec's [`fingerprint`](Self::fingerprint).
    pub fn is_forced(&self) -> bool {
        self.force
            .as_deref()
            .is_some_and(|token| token == self.fingerprint())
    }

    /// The spec with `force` set to its own fingerprint.
    #[must_use]
    pub fn forced(mut self) -> Self {
        self.force = Some(self.fingerprint());
        self
    }
}

/// Whether a fleet deployment's targeted devices take its score each on
/// its own, or together. docs/lifetimes.md ("All or nothing") has the truth table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[non_exhaustive]
pub enum Placement {
    /// Each targeted device converges on its own: the controller writes
    /// its key whatever the others do.
    #[default]
    Independent,
    /// For workloads that only make sense on every targeted device at once
    /// (a distributed test, a cluster service). Before it writes or
    /// deletes any key of the deployment, the controller looks at what
    /// every targeted device reports: when all run it, it writes (attach);
    /// when none does and each could be asked, it writes to all (cold
    /// start); when some run it and some do not, or any device cannot be
    /// asked (no fresh heartbeat), it writes and deletes nothing and says
    /// why in the status ([`PlacementRefusal`]) until a person forces the
    /// rollout ([`FleetDeploymentSpec::force`]). Deleting the deployment is
    /// never refused.
    AllOrNothing,
}

impl Placement {
    /// The default, [`Placement::Independent`].
    pub fn is_independent(&self) -> bool {
        *self == Placement::Independent
    }

    /// The placement's name, as the manifest writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Placement::Independent => "Independent",
            Placement::AllOrNothing => "AllOrNothing",
        }
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which devices a fleet deployment runs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Target {
    /// Exactly these devices, whether or not they are known yet.
    Devices(Vec<DeviceId>),
    /// Every known device whose labels match. An empty selector matches
    /// every known device.
    Selector(Selector),
}

impl Target {
    /// Whether the device `id` with `labels` is targeted.
    pub fn matches(&self, id: &DeviceId, labels: &Labels) -> bool {
        match self {
            Target::Devices(ids) => ids.contains(id),
            Target::Selector(selector) => selector.matches(labels),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Devices(ids) => {
                f.write_str("devices ")?;
                for (i, id) in ids.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{id}")?;
                }
                Ok(())
            }
            Target::Selector(selector) if selector.is_empty() => f.write_str("every device"),
            Target::Selector(selector) => write!(f, "{selector}"),
        }
    }
}

/// How a new revision reaches the targeted devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type")]
#[non_exhaustive]
pub enum Strategy {
    /// Every targeted device gets it at once.
    #[default]
    AllAtOnce,
}

/// Why a manifest was refused: where, and which rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {problem}", if .path.is_empty() { "the document" } else { .path.as_str() })]
pub struct ManifestError {
    /// The field path, as `spec.score.services[0].image`; empty when the
    /// document as a whole is at fault.
    pub path: String,
    /// What is wrong and the rule it broke.
    pub problem: String,
}

impl ManifestError {
    fn at(path: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            problem: bounded(&problem.into(), TEXT_MAX_BYTES),
        }
    }

    /// A decoding error at `path`. The decoder's " at line L column C" is
    /// left out: the path says where, and the document the person edits
    /// may be YAML, whose lines are not the JSON's.
    fn decoding(path: &serde_path_to_error::Path, error: &serde_json::Error) -> Self {
        let message = error.to_string();
        let message = match message.rfind(" at line ") {
            Some(at) if error.line() > 0 => &message[..at],
            _ => message.as_str(),
        };
        Self::at(path.to_string().trim_start_matches('.'), message)
    }
}

impl FleetDeployment {
    /// A manifest for `name` with the current `apiVersion` and `kind`.
    pub fn new(name: DeploymentName, spec: FleetDeploymentSpec) -> Self {
        Self {
            api_version: API_VERSION.to_owned(),
            kind: FLEET_DEPLOYMENT_KIND.to_owned(),
            metadata: Metadata { name },
            spec,
        }
    }

    /// Parses and checks a manifest from JSON bytes.
    ///
    /// # Errors
    /// A [`ManifestError`] naming the field and the rule: a field of the
    /// wrong type or missing, a wrong `apiVersion` or `kind`, an empty or
    /// repeated device list, or a score that breaks one of its rules.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ManifestError> {
        let mut decoder = serde_json::Deserializer::from_slice(bytes);
        let manifest: FleetDeployment = serde_path_to_error::deserialize(&mut decoder)
            .map_err(|e| ManifestError::decoding(e.path(), e.inner()))?;
        decoder
            .end()
            .map_err(|e| ManifestError::at("", e.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Parses and checks a manifest already decoded into a JSON value (the
    /// CLI decodes YAML files this way).
    ///
    /// # Errors
    /// As [`FleetDeployment::from_json`].
    pub fn from_value(value: serde_json::Value) -> Result<Self, ManifestError> {
        let manifest: FleetDeployment = serde_path_to_error::deserialize(value)
            .map_err(|e| ManifestError::decoding(e.path(), e.inner()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// The manifest's canonical JSON bytes, as kept in the deployments bucket.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest always serialises: its maps have string keys")
    }

    /// Checks every rule a manifest follows beyond its types.
    ///
    /// # Errors
    /// The first broken rule, as a [`ManifestError`].
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.api_version != API_VERSION {
            return Err(ManifestError::at(
                "apiVersion",
                format!(
                    "{:?} is not supported: use {API_VERSION:?}",
                    self.api_version
                ),
            ));
        }
        if self.kind != FLEET_DEPLOYMENT_KIND {
            return Err(ManifestError::at(
                "kind",
                format!(
                    "{:?} is not a fleet deployment: use {FLEET_DEPLOYMENT_KIND:?}",
                    self.kind
                ),
            ));
        }
        if let Target::Devices(ids) = &self.spec.target {
            if ids.is_empty() {
                return Err(ManifestError::at(
                    "spec.target.devices",
                    "the list is empty: name at least one device, or use a selector",
                ));
            }
            for (i, id) in ids.iter().enumerate() {
                if ids[..i].contains(id) {
                    return Err(ManifestError::at(
                        format!("spec.target.devices[{i}]"),
                        format!("device {id} is listed twice: each device once"),
                    ));
                }
            }
        }
        self.spec.score.validate().map_err(|e| {
            let path = e.field_path(&self.spec.score);
            let path = if path.is_empty() {
                "spec.score".to_owned()
            } else {
                format!("spec.score.{path}")
            };
            ManifestError::at(path, e.to_string())
        })
    }
}

/// A device as an administrator describes it, at key `<device_id>` of the
/// devices bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeviceRecord {
    /// Labels that selectors match against.
    #[serde(default)]
    pub labels: Labels,
}

impl DeviceRecord {
    /// Parses and checks a device record.
    ///
    /// # Errors
    /// [`DeviceRecordError`] when the bytes do not decode or a label breaks
    /// the label rules.
    pub fn from_json(bytes: &[u8]) -> Result<Self, DeviceRecordError> {
        let record: DeviceRecord =
            serde_json::from_slice(bytes).map_err(|e| DeviceRecordError::Malformed {
                reason: bounded(&e.to_string(), TEXT_MAX_BYTES),
            })?;
        validate_labels(&record.labels)?;
        Ok(record)
    }

    /// The record's canonical JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a device record always serialises")
    }
}

/// Why a device record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceRecordError {
    /// The bytes are not a device record.
    #[error("malformed device record: {reason}")]
    Malformed {
        /// The decoder's message.
        reason: String,
    },
    /// A label broke the label rules.
    #[error(transparent)]
    Label(#[from] LabelError),
}

/// A fleet deployment's status, as the controller aggregates it from every
/// targeted device's report and heartbeat, at key `<name>` of the status
/// bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FleetDeploymentStatus {
    /// The generation (the deployment key's KV revision) of the manifest
    /// the devices are being converged to: the newest valid one read.
    pub observed_generation: u64,
    /// Why the newest manifest was refused, if it was; the devices stay on
    /// the last valid one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How many devices it targets.
    pub targeted: u32,
    /// How many targeted devices report on the current revision.
    pub updated: u32,
    /// Targeted devices by phase. A device that has not reported on the
    /// current revision yet counts as pending.
    pub phases: PhaseCounts,
    /// How many targeted devices have not sent a heartbeat lately.
    pub offline: u32,
    /// Failure causes on the current revision, grouped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<FailureGroup>,
    /// Services whose running devices do not all run the same image
    /// digest, or not the one the score pins, or do not say which they run,
    /// or whose targeted devices do not all run the current revision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skew: Vec<DigestSkew>,
    /// An [`Placement::AllOrNothing`] deployment the controller writes
    /// nothing of, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementRefusal>,
    /// Targeted devices whose agents do not understand a feature the score
    /// uses: nothing of the current generation is written to them (nor,
    /// for an all-or-nothing deployment, to any device) until they are
    /// upgraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outdated_agents: Option<OutdatedAgents>,
}

/// Targeted devices whose agents are too old for the score: their last
/// heartbeat does not name every score feature it uses
/// ([`PodmanV0Score::features`]). An older agent would ignore such a
/// field and do something else: run a `no_launch` deployment's services
/// itself, skip a setup script.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutdatedAgents {
    /// The score features the score uses (`lifetime`, `setup_script`,
    /// `restart`).
    pub features: Vec<String>,
    /// The devices whose agent lacks at least one of them.
    pub devices: DeviceGroup,
}

impl OutdatedAgents {
    /// What to tell a person: `rpi-03 runs an agent that does not
    /// understand lifetime: upgrade it (nothing of this generation is
    /// written to it)`.
    pub fn message(&self) -> String {
        let features = self.features.join(", ");
        let devices = self.devices.listed();
        if self.devices.count == 1 {
            format!(
                "{devices} runs an agent that does not understand {features}: upgrade it (nothing of this generation is written to it)"
            )
        } else {
            format!(
                "{devices} run agents that do not understand {features}: upgrade them (nothing of this generation is written to them)"
            )
        }
    }
}

/// Why the controller writes and deletes no key of an
/// [`Placement::AllOrNothing`] deployment: its targeted devices each way.
/// It holds until the devices agree (all run it, or none does and each can
/// be asked) or a person forces the rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementRefusal {
    /// Which rule refused it.
    pub reason: PlacementReason,
    /// Targeted devices that run it: they report `running` (or, for a
    /// `per_run` score, `succeeded`) on any revision.
    pub running: DeviceGroup,
    /// Targeted devices with a fresh heartbeat that report nothing of it,
    /// or `pending` or `failed`.
    pub not_running: DeviceGroup,
    /// Targeted devices that cannot be asked: offline, or never seen.
    /// Unknown is never taken as "not running".
    pub unknown: DeviceGroup,
}

impl PlacementRefusal {
    /// What was refused, in plain words, without the way out (which
    /// differs between the CLI and the operator).
    pub fn message(&self) -> String {
        let each = |one: &str, many: &str, group: &DeviceGroup| {
            let verb = if group.count == 1 { one } else { many };
            (group.count > 0).then(|| format!("{} {verb} ({})", group.count, group.listed()))
        };
        let ways: Vec<String> = [
            each("runs it", "run it", &self.running),
            each("does not", "do not", &self.not_running),
            each("cannot be asked", "cannot be asked", &self.unknown),
        ]
        .into_iter()
        .flatten()
        .collect();
        let rule = match self.reason {
            PlacementReason::PartialPlacement => "is written to all of them or to none",
            PlacementReason::UnknownDevices => {
                "is written only when every targeted device can be asked"
            }
        };
        let targeted = self
            .running
            .count
            .saturating_add(self.not_running.count)
            .saturating_add(self.unknown.count);
        format!(
            "of {targeted} targeted devices, {}: an all-or-nothing deployment {rule}, so nothing was written",
            ways.join(", ")
        )
    }
}

/// The rule by which an [`Placement::AllOrNothing`] deployment was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum PlacementReason {
    /// Some targeted devices run it and some do not: writing would leave
    /// it on some devices only, or replace it on some and start it fresh
    /// on others.
    PartialPlacement,
    /// No targeted device is known not to run it while others do, but
    /// some cannot be asked: whether they run it is unknown.
    UnknownDevices,
}

impl PlacementReason {
    /// The reason as on the wire: `partial_placement`, `unknown_devices`.
    pub fn as_str(self) -> &'static str {
        match self {
            PlacementReason::PartialPlacement => "partial_placement",
            PlacementReason::UnknownDevices => "unknown_devices",
        }
    }
}

/// Some devices: how many, and the first [`FAILURE_GROUP_DEVICES`] of them
/// in id order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeviceGroup {
    /// How many devices.
    pub count: u32,
    /// The first [`FAILURE_GROUP_DEVICES`] of them, in id order.
    pub devices: Vec<DeviceId>,
}

impl DeviceGroup {
    /// A group of `devices` (in any order).
    pub fn of<'a>(devices: impl IntoIterator<Item = &'a DeviceId>) -> Self {
        let mut all: Vec<&DeviceId> = devices.into_iter().collect();
        all.sort_unstable();
        Self {
            count: u32::try_from(all.len()).unwrap_or(u32::MAX),
            devices: all
                .into_iter()
                .take(FAILURE_GROUP_DEVICES)
                .cloned()
                .collect(),
        }
    }

    /// `rpi-01, rpi-02 and 8 more`; `none` when empty.
    pub fn listed(&self) -> String {
        if self.count == 0 {
            return "none".to_owned();
        }
        let named: Vec<&str> = self.devices.iter().map(DeviceId::as_str).collect();
        let more = (self.count as usize).saturating_sub(named.len());
        if more > 0 {
            format!("{} and {more} more", named.join(", "))
        } else {
            named.join(", ")
        }
    }
}

/// The image digests one service runs with across the targeted devices,
/// when they are not all the expected one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DigestSkew {
    /// The service.
    pub service: ServiceName,
    /// The digest the score pins (`image@sha256:...`), if it pins one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    /// The devices per digest, largest group first; `digest: None` groups
    /// the devices that run the current revision and did not report one
    /// (an error, never a pass), `missing: true` the targeted devices that
    /// do not run it at all.
    pub digests: Vec<DigestGroup>,
}

/// Devices running one service with the same image digest, or targeted
/// devices that do not run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DigestGroup {
    /// The digest, or `None` for "not reported" (and for `missing`).
    pub digest: Option<String>,
    /// The devices are targeted and do not run the current revision: no
    /// report says which image they run. Left out of the JSON when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub missing: bool,
    /// How many devices.
    pub count: u32,
    /// The first [`FAILURE_GROUP_DEVICES`] of them, in id order.
    pub devices: Vec<DeviceId>,
}

/// The digest an image reference pins (`name@sha256:...`), if any.
pub fn pinned_digest(image: &str) -> Option<&str> {
    image.split_once('@').map(|(_, digest)| digest)
}

/// Where one targeted device stands on one service's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Seen<'a> {
    /// It runs the current revision with this digest, or did not say
    /// which (`None`).
    Reported(Option<&'a str>),
    /// It does not run the current revision.
    Missing,
}

/// The skew of each service against the `pinned` digest of each service
/// (services of the score in order; `None` when the score pins none),
/// from every targeted device with its report when it runs the current
/// revision (`None` when it does not).
///
/// Every targeted device is accounted for under every service: a device
/// running the current revision whose report names no digest for the
/// service (or does not list the service at all) is "not reported", a
/// targeted device that does not run it is "missing"; neither is ever a
/// pass. Nothing is compared before at least one device runs the current
/// revision: until then the phases tell the whole story.
pub(crate) fn digest_skew<'a>(
    services: &[(ServiceName, Option<String>)],
    targeted: impl IntoIterator<Item = (&'a DeviceId, Option<&'a DeploymentState>)>,
) -> Vec<DigestSkew> {
    /// Per service and what is seen, the device count and the first devices.
    type Groups<'a> = BTreeMap<Seen<'a>, (u32, Vec<&'a DeviceId>)>;
    let mut seen: Vec<Groups<'a>> = vec![Groups::new(); services.len()];
    let mut any_runs = false;
    for (device, report) in targeted {
        any_runs |= report.is_some();
        for ((service, _), groups) in services.iter().zip(&mut seen) {
            let key = match report {
                Some(report) => {
                    Seen::Reported(report.image_digests.get(service).map(String::as_str))
                }
                None => Seen::Missing,
            };
            let (count, devices) = groups.entry(key).or_default();
            *count += 1;
            devices.push(device);
        }
    }
    if !any_runs {
        return Vec::new();
    }
    let mut skew = Vec::new();
    for ((service, pinned), groups) in services.iter().zip(seen) {
        let agreed = match groups.keys().collect::<Vec<_>>()[..] {
            [Seen::Reported(Some(one))] => pinned.as_deref().is_none_or(|p| p == *one),
            _ => false,
        };
        if agreed {
            continue;
        }
        let mut digests: Vec<DigestGroup> = groups
            .into_iter()
            .map(|(seen, (count, mut devices))| {
                devices.sort_unstable();
                DigestGroup {
                    digest: match seen {
                        Seen::Reported(digest) => digest.map(str::to_owned),
                        Seen::Missing => None,
                    },
                    missing: seen == Seen::Missing,
                    count,
                    devices: devices
                        .into_iter()
                        .take(FAILURE_GROUP_DEVICES)
                        .cloned()
                        .collect(),
                }
            })
            .collect();
        digests.sort_by_key(|g| std::cmp::Reverse(g.count));
        skew.push(DigestSkew {
            service: service.clone(),
            pinned: pinned.clone(),
            digests,
        });
    }
    skew
}

impl FleetDeploymentStatus {
    /// Every targeted device runs the current revision.
    pub fn is_complete(&self) -> bool {
        self.error.is_none()
            && self.placement.is_none()
            && self.updated == self.targeted
            && self.phases.running == self.targeted
    }
}

/// Devices per phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PhaseCounts {
    /// On their way to the current revision, or not reported yet.
    pub pending: u32,
    /// Running the current revision.
    pub running: u32,
    /// Failed on the current revision.
    pub failed: u32,
    /// `per_run`: ran the current revision to completion, every service
    /// exiting 0. Left out of the JSON when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub succeeded: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl PhaseCounts {
    pub(crate) fn add(&mut self, phase: Phase) {
        match phase {
            Phase::Pending => self.pending += 1,
            Phase::Running => self.running += 1,
            Phase::Failed => self.failed += 1,
            Phase::Succeeded => self.succeeded += 1,
        }
    }
}

/// The most device ids a [`FailureGroup`] lists; `count` has them all.
pub const FAILURE_GROUP_DEVICES: usize = 10;
/// The most failure groups a status lists, largest first.
pub const MAX_FAILURE_GROUPS: usize = 20;

/// Devices that failed for the same reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FailureGroup {
    /// The cause's kind, as on the wire (`init_container_exited`...).
    pub reason: String,
    /// The cause in plain words ([`describe_cause`]).
    pub message: String,
    /// How many devices.
    pub count: u32,
    /// The first [`FAILURE_GROUP_DEVICES`] of them, in id order.
    pub devices: Vec<DeviceId>,
}

/// A failure cause's kind, as its wire tag (`crash_loop`...).
pub fn cause_reason(cause: &FailureCause) -> &'static str {
    match cause {
        FailureCause::InvalidScore { .. } => "invalid_score",
        FailureCause::InitContainerExited { .. } => "init_container_exited",
        FailureCause::InitContainerTimedOut { .. } => "init_container_timed_out",
        FailureCause::StillRunningAfterWait { .. } => "still_running_after_wait",
        FailureCause::Runtime { .. } => "runtime",
        FailureCause::CrashLoop { .. } => "crash_loop",
        FailureCause::ImagePull { .. } => "image_pull",
        FailureCause::Unverified { .. } => "unverified",
        FailureCause::RunFailed { .. } => "run_failed",
        FailureCause::SetupScriptFailed { .. } => "setup_script_failed",
    }
}

/// A failure cause in plain words, for people: `init container "migrate"
/// exited with code 5`.
pub fn describe_cause(cause: &FailureCause) -> String {
    match cause {
        FailureCause::InvalidScore { error } => format!("the device refused the score: {error}"),
        FailureCause::InitContainerExited { name, exit_code } => {
            format!("init container {name:?} exited with code {exit_code}")
        }
        FailureCause::InitContainerTimedOut { name, waited_secs } => {
            format!("init container {name:?} still ran after its timeout of {waited_secs} s and was removed")
        }
        FailureCause::StillRunningAfterWait { name } => {
            format!("init container {name:?} was reported running after it exited")
        }
        FailureCause::Runtime {
            container,
            operation,
            error,
        } => format!("podman could not {operation} {container}: {error}"),
        FailureCause::CrashLoop {
            service,
            restarts,
            last_exit_code,
        } => match last_exit_code {
            Some(code) => format!(
                "service {service:?} keeps exiting (code {code}); restarted {restarts} times"
            ),
            None => format!("service {service:?} keeps exiting; restarted {restarts} times"),
        },
        FailureCause::ImagePull {
            image,
            reason,
            error,
        } => format!("image {image:?} could not be pulled ({reason}): {error}; the previous revision keeps running"),
        FailureCause::Unverified {
            service,
            container,
            status,
            evidence,
        } => format!("service {service:?}: container {container:?} is {status}: {evidence}"),
        FailureCause::RunFailed { service, exit_code } => {
            format!("service {service:?} ran and exited with code {exit_code}")
        }
        FailureCause::SetupScriptFailed {
            service,
            exit_code,
            output,
        } => match exit_code {
            Some(code) => format!(
                "the setup script of service {service:?} exited with code {code}; its container was removed; output: {output}"
            ),
            None => format!(
                "the setup script of service {service:?} ran past its timeout; its container was removed; output: {output}"
            ),
        },
    }
}

/// Groups failures `(device, cause)` by reason and message, largest group
/// first (then by reason and message), at most [`MAX_FAILURE_GROUPS`].
pub(crate) fn group_failures<'a>(
    failures: impl IntoIterator<Item = (&'a DeviceId, &'a FailureCause)>,
) -> Vec<FailureGroup> {
    let mut groups: BTreeMap<(&'static str, String), (u32, Vec<DeviceId>)> = BTreeMap::new();
    for (device, cause) in failures {
        let (count, devices) = groups
            .entry((cause_reason(cause), describe_cause(cause)))
            .or_default();
        *count += 1;
        if devices.len() < FAILURE_GROUP_DEVICES {
            devices.push(device.clone());
        }
    }
    let mut groups: Vec<FailureGroup> = groups
        .into_iter()
        .map(|((reason, message), (count, mut devices))| {
            devices.sort();
            FailureGroup {
                reason: reason.to_owned(),
                message: bounded(&message, TEXT_MAX_BYTES / 4),
                count,
                devices,
            }
        })
        .collect();
    groups.sort_by_key(|g| std::cmp::Reverse(g.count));
    groups.truncate(MAX_FAILURE_GROUPS);
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(spec: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": FLEET_DEPLOYMENT_KIND,
            "metadata": {"name": "web"},
            "spec": spec,
        })
    }

    fn score() -> serde_json::Value {
        serde_json::json!({"services": [{"name": "web", "image": "localhost/web:1"}]})
    }

    #[test]
    fn a_manifest_parses_and_prints_back() {
        let value = manifest(
            serde_json::json!({"target": {"selector": "site=lyon,!canary"}, "score": score()}),
        );
        let parsed = FleetDeployment::from_json(value.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.metadata.name.as_str(), "web");
        assert_eq!(parsed.spec.strategy, Strategy::AllAtOnce);
        assert_eq!(parsed.spec.target.to_string(), "site=lyon,!canary");
        let again = FleetDeployment::from_json(&parsed.to_json()).unwrap();
        assert_eq!(again, parsed);
        assert_eq!(FleetDeployment::from_value(value).unwrap(), parsed);
    }

    #[test]
    fn a_refused_manifest_names_the_field_and_the_rule() {
        let cases = [
            (
                manifest(
                    serde_json::json!({"target": {"selector": "site in ()"}, "score": score()}),
                ),
                "spec.target.selector",
                "empty",
            ),
            (
                manifest(serde_json::json!({"target": {"devices": []}, "score": score()})),
                "spec.target.devices",
                "at least one device",
            ),
            (
                manifest(
                    serde_json::json!({"target": {"devices": ["a", "b", "a"]}, "score": score()}),
                ),
                "spec.target.devices[2]",
                "listed twice",
            ),
            (
                manifest(serde_json::json!({"target": {"devices": ["Rpi"]}, "score": score()})),
                "spec.target.devices[0]",
                "a-z",
            ),
            (
                manifest(
                    serde_json::json!({"target": {"devices": ["a"]}, "score": {"services": [
                    {"name": "web", "image": "x"}, {"name": "db", "image": " "}]}}),
                ),
                "spec.score.services[1].image",
                "empty image",
            ),
            (
                manifest(
                    serde_json::json!({"target": {"devices": ["a"]}, "score": {"services": [
                    {"name": "web", "image": "x"}], "init_containers": [{"name": "web", "image": "x"}]}}),
                ),
                "spec.score.init_containers[0].name",
                "both a service and an init container",
            ),
            (
                manifest(
                    serde_json::json!({"target": {"devices": ["a"]}, "score": {"services": [
                    {"name": "web", "image": "x", "ports": [{"host_port": "80", "container_port": 80}]}]}}),
                ),
                "spec.score.services[0].ports[0].host_port",
                "invalid type",
            ),
            (
                manifest(
                    serde_json::json!({"target": {"devices": ["a"]}, "score": {"services": []}}),
                ),
                "spec.score.services",
                "no services",
            ),
            (
                manifest(serde_json::json!({"target": {"nodes": ["a"]}, "score": score()})),
                "spec.target",
                "unknown variant",
            ),
            (
                manifest(
                    serde_json::json!({"target": {"devices": ["a"]}, "strategy": {"type": "Waves"}, "score": score()}),
                ),
                "spec.strategy.type",
                "unknown variant",
            ),
        ];
        for (value, path, rule) in cases {
            let error = FleetDeployment::from_json(value.to_string().as_bytes()).unwrap_err();
            assert_eq!(error.path, path, "{error}");
            assert!(error.problem.contains(rule), "{error} should say {rule:?}");
            assert_eq!(FleetDeployment::from_value(value).unwrap_err(), error);
        }
        let mut wrong_kind =
            manifest(serde_json::json!({"target": {"devices": ["a"]}, "score": score()}));
        wrong_kind["kind"] = "Deployment".into();
        let error = FleetDeployment::from_value(wrong_kind).unwrap_err();
        assert_eq!(
            error.to_string(),
            "kind: \"Deployment\" is not a fleet deployment: use \"FleetDeployment\""
        );
    }

    #[test]
    fn device_records_check_their_labels() {
        let record =
            DeviceRecord::from_json(br#"{"labels": {"site": "lyon", "podfleet.io/canary": ""}}"#)
                .unwrap();
        assert_eq!(record.labels.len(), 2);
        assert_eq!(DeviceRecord::from_json(&record.to_json()).unwrap(), record);
        let error = DeviceRecord::from_json(br#"{"labels": {"site": "ly on"}}"#).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("invalid value \"ly on\" for label \"site\""),
            "{error}"
        );
        assert!(matches!(
            DeviceRecord::from_json(b"\"lyon\""),
            Err(DeviceRecordError::Malformed { .. })
        ));
    }

    #[test]
    fn failures_group_by_cause_largest_first() {
        let ids: Vec<DeviceId> = ["d1", "d2", "d3"]
            .iter()
            .map(|d| DeviceId::new(*d).unwrap())
            .collect();
        let exited = FailureCause::InitContainerExited {
            name: "migrate".into(),
            exit_code: 5,
        };
        let looping = FailureCause::CrashLoop {
            service: "web".into(),
            restarts: 3,
            last_exit_code: Some(1),
        };
        let groups = group_failures([(&ids[2], &exited), (&ids[0], &looping), (&ids[1], &exited)]);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].reason, "init_container_exited");
        assert_eq!(
            groups[0].message,
            "init container \"migrate\" exited with code 5"
        );
        assert_eq!(groups[0].count, 2);
        assert_eq!(groups[0].devices, vec![ids[1].clone(), ids[2].clone()]);
        assert_eq!(
            groups[1].message,
            "service \"web\" keeps exiting (code 1); restarted 3 times"
        );
    }

    #[test]
    fn digest_skew_names_each_digest_and_treats_unknown_as_skew() {
        let report = |digest: Option<&str>| {
            let mut r: DeploymentState = serde_json::from_value(serde_json::json!({
                "phase": "running", "revision": 4,
                "container_ids": {"web": "c1", "db": "c2"},
                "image_digests": {"db": "sha256:db"},
            }))
            .unwrap();
            if let Some(digest) = digest {
                r.image_digests.insert("web".into(), digest.into());
            }
            r
        };
        let ids: Vec<DeviceId> = (1..=4)
            .map(|n| DeviceId::new(format!("rpi-{n}")).unwrap())
            .collect();
        let reports = [
            report(Some("sha256:a")),
            report(Some("sha256:a")),
            report(Some("sha256:b")),
            report(None),
        ];
        let services = [("web".into(), None), ("db".into(), None)];
        let running = || ids.iter().zip(reports.iter().map(Some));
        let skew = digest_skew(&services, running());
        assert_eq!(skew.len(), 1, "db agrees: {skew:?}");
        assert_eq!(skew[0].service.as_str(), "web");
        let groups: Vec<(Option<&str>, u32)> = skew[0]
            .digests
            .iter()
            .map(|g| (g.digest.as_deref(), g.count))
            .collect();
        assert_eq!(
            groups,
            [(Some("sha256:a"), 2), (None, 1), (Some("sha256:b"), 1)]
        );
        assert_eq!(skew[0].digests[2].devices, [ids[2].clone()]);
        assert!(skew[0].digests.iter().all(|g| !g.missing));

        // All agree, but not on the digest the score pins.
        let pinned = [("db".into(), Some("sha256:other".to_owned()))];
        let skew = digest_skew(&pinned, running());
        assert_eq!(skew.len(), 1);
        assert_eq!(skew[0].pinned.as_deref(), Some("sha256:other"));
        let agreed = [("db".into(), Some("sha256:db".to_owned()))];
        assert!(digest_skew(&agreed, running()).is_empty());
        assert_eq!(pinned_digest("r/app:1@sha256:ab"), Some("sha256:ab"));
        assert_eq!(pinned_digest("r/app:1"), None);
    }

    #[test]
    fn digest_skew_never_passes_a_device_it_cannot_account_for() {
        let running = |digests: serde_json::Value, containers: serde_json::Value| {
            serde_json::from_value::<DeploymentState>(serde_json::json!({
                "phase": "running", "revision": 4,
                "container_ids": containers,
                "image_digests": digests,
            }))
            .unwrap()
        };
        let ids: Vec<DeviceId> = (1..=4)
            .map(|n| DeviceId::new(format!("rpi-{n}")).unwrap())
            .collect();
        let services = [("web".into(), None), ("db".into(), None)];
        // rpi-1 and rpi-2 agree on both; rpi-3's report leaves db out
        // altogether; rpi-4 is targeted and does not run the revision.
        let both = running(
            serde_json::json!({"web": "sha256:w", "db": "sha256:d"}),
            serde_json::json!({"web": "c1", "db": "c2"}),
        );
        let web_only = running(
            serde_json::json!({"web": "sha256:w"}),
            serde_json::json!({"web": "c1"}),
        );
        let targeted = [
            (&ids[0], Some(&both)),
            (&ids[1], Some(&both)),
            (&ids[2], Some(&web_only)),
            (&ids[3], None),
        ];
        let skew = digest_skew(&services, targeted);
        /// Digest, missing, count.
        type Shown<'a> = Vec<(Option<&'a str>, bool, u32)>;
        let shown: Vec<(&str, Shown<'_>)> = skew
            .iter()
            .map(|s| {
                (
                    s.service.as_str(),
                    s.digests
                        .iter()
                        .map(|g| (g.digest.as_deref(), g.missing, g.count))
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                ("web", vec![(Some("sha256:w"), false, 3), (None, true, 1)]),
                (
                    "db",
                    vec![
                        (Some("sha256:d"), false, 2),
                        (None, false, 1),
                        (None, true, 1)
                    ]
                ),
            ]
        );
        assert_eq!(skew[1].digests[1].devices, [ids[2].clone()]);
        assert_eq!(skew[1].digests[2].devices, [ids[3].clone()]);
        // Nothing runs the revision yet: nothing to compare.
        let none = [(&ids[0], None), (&ids[1], None)];
        assert!(digest_skew(&services, none).is_empty());
        // Every device agrees: no skew.
        let all = [(&ids[0], Some(&both)), (&ids[1], Some(&both))];
        assert!(digest_skew(&services, all).is_empty());
    }

    #[test]
    fn placement_is_optional_and_force_names_one_spec() {
        let value = manifest(serde_json::json!({"target": {"devices": ["a"]}, "score": score()}));
        let parsed = FleetDeployment::from_value(value).unwrap();
        assert_eq!(parsed.spec.placement, Placement::Independent);
        assert_eq!(parsed.spec.force, None);
        // Absent stays absent: a stored manifest reads back byte for byte.
        let json = String::from_utf8(parsed.to_json()).unwrap();
        assert!(
            !json.contains("placement") && !json.contains("force"),
            "{json}"
        );

        let value = manifest(serde_json::json!({
            "target": {"devices": ["a"]}, "placement": "AllOrNothing", "score": score()
        }));
        let spec = FleetDeployment::from_value(value).unwrap().spec;
        assert_eq!(spec.placement, Placement::AllOrNothing);
        assert!(!spec.is_forced());
        let forced = spec.clone().forced();
        assert!(forced.is_forced());
        assert_eq!(
            forced.fingerprint(),
            spec.fingerprint(),
            "force is not fingerprinted"
        );
        assert_eq!(forced.fingerprint().len(), 16);
        // Any change of the spec leaves the token stale.
        let mut changed = forced.clone();
        changed.score.services[0].image = "localhost/web:2".into();
        assert!(!changed.is_forced());
        let mut retargeted = forced.clone();
        retargeted.target = Target::Devices(vec![DeviceId::new("b").unwrap()]);
        assert!(!retargeted.is_forced());
        let mut independent = forced;
        independent.placement = Placement::Independent;
        assert!(!independent.is_forced());

        let error = FleetDeployment::from_value(manifest(serde_json::json!({
            "target": {"devices": ["a"]}, "placement": "Some", "score": score()
        })))
        .unwrap_err();
        assert_eq!(error.path, "spec.placement");
        assert!(error.problem.contains("unknown variant"), "{error}");
    }

    #[test]
    fn a_placement_refusal_names_the_devices_each_way() {
        let ids: Vec<DeviceId> = (1..=13)
            .map(|n| DeviceId::new(format!("rpi-{n:02}")).unwrap())
            .collect();
        let refusal = PlacementRefusal {
            reason: PlacementReason::PartialPlacement,
            running: DeviceGroup::of(ids[..12].iter().rev()),
            not_running: DeviceGroup::of([&ids[12]]),
            unknown: DeviceGroup::default(),
        };
        assert_eq!(refusal.running.count, 12);
        assert_eq!(refusal.running.devices.len(), FAILURE_GROUP_DEVICES);
        assert_eq!(refusal.running.devices[0].as_str(), "rpi-01");
        assert_eq!(
            refusal.message(),
            "of 13 targeted devices, 12 run it (rpi-01, rpi-02, rpi-03, rpi-04, rpi-05, rpi-06, \
             rpi-07, rpi-08, rpi-09, rpi-10 and 2 more), 1 does not (rpi-13): an all-or-nothing \
             deployment is written to all of them or to none, so nothing was written"
        );
        let json = serde_json::to_value(&refusal).unwrap();
        assert_eq!(json["reason"], "partial_placement");
        assert_eq!(json["notRunning"]["count"], 1);
        let back: PlacementRefusal = serde_json::from_value(json).unwrap();
        assert_eq!(back, refusal);
    }
}
