//! The custom resources: [`FleetDeployment`] (namespaced) and [`Device`]
//! (cluster-scoped), in the API group `podfleet.io/v1alpha1`.
//!
//! A FleetDeployment's spec is the fleet model's own
//! [`podfleet_core::fleet::FleetDeploymentSpec`], so one YAML file works with
//! `podfleet apply` and `kubectl apply`. Its status is what the fleet
//! controller aggregates, in Kubernetes' shape: conditions, counts per
//! phase, the failing devices grouped by cause. See [`crate::status`] for
//! how it is made.

use std::collections::BTreeMap;

use kube::CustomResource;
use podfleet_core::fleet::{
    DigestSkew, FailureGroup, FleetDeploymentSpec as ModelSpec, OutdatedAgents, PlacementRefusal,
};
use podfleet_core::wire::Phase;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every podfleet resource.
pub const GROUP: &str = "podfleet.io";
/// The API version this operator serves.
pub const VERSION: &str = "v1alpha1";
/// The finalizer a FleetDeployment carries while its per-device desired
/// keys may exist.
pub const FINALIZER: &str = "podfleet.io/desired-keys";
/// The annotation that makes a FleetDeployment deploy its image tags as
/// written, as `podfleet apply --keep-tags` does: its value `"true"`. Any
/// other value, or none, pins every tag to its digest.
pub const KEEP_TAGS: &str = "podfleet.io/keep-tags";
/// The annotation that forces one rollout of an all-or-nothing
/// FleetDeployment past the fleet controller's refusal, as `podfleet
/// rollout force` does: its value is the `metadata.generation` to force.
/// While it names the current generation, the controller writes that
/// generation to every targeted device whatever they run; the next change
/// of the spec makes a new generation, which it does not name.
pub const FORCE_GENERATION: &str = "podfleet.io/force-generation";

/// A workload for many devices: which devices run which score.
///
/// The spec is held as JSON and checked by the fleet model's one parser
/// ([`podfleet_core::fleet::FleetDeployment::from_value`]) when the engine
/// reads it: a spec that breaks a rule shows in its own status (Degraded,
/// `SpecRefused`, with the field path) and stops nothing else, where a
/// typed field would make the whole list fail to decode. The CRD's schema
/// is [`ModelSpec`]'s, so the API server refuses malformed specs up front.
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[kube(
    group = "podfleet.io",
    version = "v1alpha1",
    kind = "FleetDeployment",
    plural = "fleetdeployments",
    shortname = "fdep",
    namespaced,
    status = "FleetDeploymentStatus",
    printcolumn = r#"{"name":"Targeted","type":"integer","jsonPath":".status.targeted"}"#,
    printcolumn = r#"{"name":"Updated","type":"integer","jsonPath":".status.updated"}"#,
    printcolumn = r#"{"name":"Running","type":"integer","jsonPath":".status.running"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.failed"}"#,
    printcolumn = r#"{"name":"Offline","type":"integer","jsonPath":".status.offline"}"#,
    printcolumn = r#"{"name":"Available","type":"string","jsonPath":".status.conditions[?(@.type==\"Available\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(transparent)]
pub struct FleetDeploymentSpec(pub serde_json::Value);

impl JsonSchema for FleetDeploymentSpec {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        ModelSpec::schema_name()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        ModelSpec::json_schema(generator)
    }
}

impl From<ModelSpec> for FleetDeploymentSpec {
    fn from(spec: ModelSpec) -> Self {
        Self(serde_json::to_value(spec).expect("a fleet deployment spec serialises"))
    }
}

/// What the operator reports on a FleetDeployment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FleetDeploymentStatus {
    /// The `metadata.generation` the operator has acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The generation the devices are converged to: the newest one that was
    /// valid. Lower than `observedGeneration` when the newest was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_out_generation: Option<i64>,
    /// Available, Progressing and Degraded.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// How many devices the target picks.
    #[serde(default)]
    pub targeted: u32,
    /// How many of them report on the current revision.
    #[serde(default)]
    pub updated: u32,
    /// Targeted devices on their way, or not reported on the current
    /// revision yet.
    #[serde(default)]
    pub pending: u32,
    /// Targeted devices running the current revision.
    #[serde(default)]
    pub running: u32,
    /// Targeted devices that failed on the current revision.
    #[serde(default)]
    pub failed: u32,
    /// Targeted devices without a recent heartbeat.
    #[serde(default)]
    pub offline: u32,
    /// Failed devices grouped by cause, largest group first (at most 20
    /// groups, each naming at most 10 devices).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<FailureGroup>,
    /// Services whose devices run different image digests, or not the
    /// pinned one, or do not say which, or do not run the current
    /// generation (an error, never a pass).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skew: Vec<DigestSkew>,
    /// Why the fleet controller writes nothing of an all-or-nothing
    /// FleetDeployment: the targeted devices that run it, that do not, and
    /// that cannot be asked (each at most 10 named, with counts). Absent
    /// while nothing is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementRefusal>,
    /// Targeted devices whose agents do not understand a score feature the
    /// spec uses (`lifetime`, `setup_script`, `restart`): nothing of the
    /// current generation is written to them until they are upgraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outdated_agents: Option<OutdatedAgents>,
    /// The digests the image tags of one generation were resolved to: the
    /// images the devices are handed. Resolved once per generation and
    /// kept here, so that neither a restart nor a resync asks a registry
    /// again: a tag pushed anew reaches no device until the spec changes.
    /// Absent when no image is pinned (local or digest-pinned images only,
    /// or the `podfleet.io/keep-tags` annotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_images: Option<ResolvedImages>,
}

/// The images of one generation, each pinned to the digest its registry
/// served when that generation was first reconciled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedImages {
    /// The `metadata.generation` whose spec named these images.
    pub generation: i64,
    /// One entry per container whose image was pinned, init containers
    /// first, in the score's order.
    pub images: Vec<ResolvedImage>,
}

/// One container's image, as written and as pinned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedImage {
    /// The container's name: a service's, or an init container's.
    pub container: String,
    /// The container is an init container (its name is one of
    /// `score.init_containers`, not of `score.services`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub init_container: bool,
    /// The image as the spec writes it: `registry.example/web:1`.
    pub image: String,
    /// What the devices are handed: `registry.example/web:1@sha256:...`.
    pub pinned: String,
}

/// A condition, in the shape of Kubernetes' `metav1.Condition`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Available`, `Progressing` or `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase word for programs.
    pub reason: String,
    /// What it means, for people.
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
    /// The `metadata.generation` it was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// An edge device that runs podfleet's agent. Its name is the device id;
/// its `metadata.labels` are what FleetDeployment selectors match.
#[derive(
    CustomResource, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "podfleet.io",
    version = "v1alpha1",
    kind = "Device",
    plural = "devices",
    shortname = "dev",
    status = "DeviceStatus",
    printcolumn = r#"{"name":"Online","type":"boolean","jsonPath":".status.online"}"#,
    printcolumn = r#"{"name":"Arch","type":"string","jsonPath":".status.arch"}"#,
    printcolumn = r#"{"name":"Agent","type":"string","jsonPath":".status.agentVersion"}"#,
    printcolumn = r#"{"name":"Runtime","type":"string","jsonPath":".status.runtimeVersion"}"#,
    printcolumn = r#"{"name":"Deployments","type":"integer","jsonPath":".status.deploymentCount"}"#,
    printcolumn = r#"{"name":"Last-Seen","type":"date","jsonPath":".status.lastSeen"}"#
)]
pub struct DeviceSpec {
    /// A note for people; podfleet does not read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// What the operator reports on a Device, from its agent's heartbeats.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    /// Its last heartbeat is recent.
    #[serde(default)]
    pub online: bool,
    /// When its last heartbeat was written (RFC 3339), to the minute: the
    /// status is not rewritten for every heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// The agent's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// The CPU architecture (`aarch64`, `x86_64`...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// The operating system (os-release's `PRETTY_NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// The kernel release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// The container runtime's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_version: Option<String>,
    /// Whether the container runtime answered the agent lately.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_healthy: Option<bool>,
    /// How many fleet deployments it has.
    #[serde(default)]
    pub deployment_count: u32,
    /// Its fleet deployments by name, with where each stands.
    // An atomic map for server-side apply: the operator owns it whole, so an
    // apply without it removes it. Were its entries owned one by one,
    // removing the last would leave `null` behind, which the schema refuses
    // (kubernetes/kubernetes#103011, #117447).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("x-kubernetes-map-type" = "atomic"))]
    pub deployments: BTreeMap<String, DeviceDeployment>,
}

/// Where one fleet deployment stands on one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceDeployment {
    /// `pending`, `running` or `failed`; `pending` until it reports.
    pub phase: Phase,
    /// The desired key's revision it reports on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// Why it failed, in plain words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
