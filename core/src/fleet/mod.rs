//! The fleet: what runs where across many devices.
//!
//! - [`selector`]: Kubernetes-style label [`Selector`]s and the label rules.
//! - [`model`]: what an administrator declares ([`FleetDeployment`],
//!   [`DeviceRecord`]) and what the controller reports
//!   ([`FleetDeploymentStatus`]).
//! - [`controller`]: the sans-IO fleet [`Controller`] that turns them into
//!   per-device desired keys and statuses.
//!
//! Like the rest of the core it never performs IO: it only parses, decides
//! and prints.

pub mod controller;
pub mod model;
pub mod selector;

pub use controller::Controller;
pub use model::{
    describe_cause, pinned_digest, DeviceGroup, DeviceRecord, DeviceRecordError, DigestGroup,
    DigestSkew, FailureGroup, FleetDeployment, FleetDeploymentSpec, FleetDeploymentStatus,
    ManifestError, Metadata, OutdatedAgents, PhaseCounts, Placement, PlacementReason,
    PlacementRefusal, Strategy, Target, API_VERSION, FLEET_DEPLOYMENT_KIND,
};
pub use selector::{validate_label, LabelError, Labels, Requirement, Selector, SelectorError};
