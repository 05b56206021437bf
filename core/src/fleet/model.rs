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
    /// What every targeted device runs.
    pub score: PodmanV0Score,
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
    /// digest, or not the one the score pins, or do not say which they run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skew: Vec<DigestSkew>,
}

/// The image digests one service runs with across the devices running the
/// current revision, when they are not all the expected one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DigestSkew {
    /// The service.
    pub service: ServiceName,
    /// The digest the score pins (`image@sha256:...`), if it pins one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    /// The devices per digest, largest group first; `digest: None` groups
    /// the devices that did not report one (an error, never a pass).
    pub digests: Vec<DigestGroup>,
}

/// Devices running one service with the same image digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DigestGroup {
    /// The digest, or `None` for "not reported".
    pub digest: Option<String>,
    /// How many devices.
    pub count: u32,
    /// The first [`FAILURE_GROUP_DEVICES`] of them, in id order.
    pub devices: Vec<DeviceId>,
}

/// The digest an image reference pins (`name@sha256:...`), if any.
pub fn pinned_digest(image: &str) -> Option<&str> {
    image.split_once('@').map(|(_, digest)| digest)
}

/// The skew of each service from `(device, report)` of the devices that run
/// the current revision, against the `pinned` digest of each service
/// (services of the score in order; `None` when the score pins none).
pub(crate) fn digest_skew<'a>(
    services: &[(ServiceName, Option<String>)],
    running: impl IntoIterator<Item = (&'a DeviceId, &'a DeploymentState)>,
) -> Vec<DigestSkew> {
    /// Per digest (`None`: not reported), the device count and the first devices.
    type Groups<'a> = BTreeMap<Option<&'a str>, (u32, Vec<DeviceId>)>;
    let mut seen: BTreeMap<&ServiceName, Groups<'_>> = BTreeMap::new();
    for (device, report) in running {
        for service in report.container_ids.keys() {
            let digest = report.image_digests.get(service).map(String::as_str);
            let (count, devices) = seen.entry(service).or_default().entry(digest).or_default();
            *count += 1;
            if devices.len() < FAILURE_GROUP_DEVICES {
                devices.push(device.clone());
            }
        }
    }
    let mut skew = Vec::new();
    for (service, pinned) in services {
        let Some(groups) = seen.get(service) else {
            continue;
        };
        let agreed = match groups.keys().collect::<Vec<_>>()[..] {
            [Some(one)] => pinned.as_deref().is_none_or(|p| p == *one),
            _ => false,
        };
        if agreed {
            continue;
        }
        let mut digests: Vec<DigestGroup> = groups
            .iter()
            .map(|(digest, (count, devices))| {
                let mut devices = devices.clone();
                devices.sort();
                DigestGroup {
                    digest: digest.map(str::to_owned),
                    count: *count,
                    devices,
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
        let skew = digest_skew(&services, ids.iter().zip(&reports));
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

        // All agree, but not on the digest the score pins.
        let pinned = [("db".into(), Some("sha256:other".to_owned()))];
        let skew = digest_skew(&pinned, ids.iter().zip(&reports));
        assert_eq!(skew.len(), 1);
        assert_eq!(skew[0].pinned.as_deref(), Some("sha256:other"));
        let agreed = [("db".into(), Some("sha256:db".to_owned()))];
        assert!(digest_skew(&agreed, ids.iter().zip(&reports)).is_empty());
        assert_eq!(pinned_digest("r/app:1@sha256:ab"), Some("sha256:ab"));
        assert_eq!(pinned_digest("r/app:1"), None);
    }
}
