//! From what the fleet controller aggregates to what Kubernetes shows: the
//! FleetDeployment status with its conditions, the events worth a line in
//! `kubectl describe`, and a Device's status. Pure functions: the
//! reconciler carries out what they return.

use podfleet_core::fleet::controller::DeviceView;
use podfleet_core::fleet::{
    describe_cause, FleetDeploymentStatus as Aggregate, PlacementReason, PlacementRefusal,
};
use podfleet_core::wire::report::{DeploymentState, RuntimeHealth};
use podfleet_core::wire::Phase;

use crate::resources::{
    Condition, DeviceDeployment, DeviceStatus, FleetDeploymentStatus, ResolvedImages,
    FORCE_GENERATION,
};

/// The condition saying whether every targeted device runs the current
/// generation.
pub const AVAILABLE: &str = "Available";
/// The condition saying whether devices are still on their way.
pub const PROGRESSING: &str = "Progressing";
/// The condition saying whether something needs a person: failed devices,
/// a refused spec, an unusable name, an all-or-nothing FleetDeployment
/// whose devices do not agree.
pub const DEGRADED: &str = "Degraded";

/// What the fleet controller knows of one FleetDeployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    /// Its name cannot be a podfleet deployment name; nothing was written.
    InvalidName(String),
    /// The controller's aggregate, and the `metadata.generation` it last
    /// read.
    Aggregate {
        /// The generation the controller read last (valid or refused).
        read: i64,
        /// What it aggregated (boxed: by far the largest variant).
        status: Box<Aggregate>,
    },
}

/// The status to show for what is `known`, keeping each condition's
/// transition time from `previous` while its status stays the same;
/// `now` is an RFC 3339 time.
pub fn fleet_status(
    known: &Known,
    previous: Option<&FleetDeploymentStatus>,
    now: &str,
) -> FleetDeploymentStatus {
    let condition = |type_: &str, status: bool, reason: &str, message: String, generation| {
        condition(previous, now, type_, status, reason, message, generation)
    };
    let (read, status) = match known {
        Known::InvalidName(why) => {
            let message = format!("nothing is deployed: {why}");
            return FleetDeploymentStatus {
                conditions: vec![
                    condition(AVAILABLE, false, "InvalidName", message.clone(), None),
                    condition(PROGRESSING, false, "InvalidName", message.clone(), None),
                    condition(DEGRADED, true, "InvalidName", message, None),
                ],
                ..FleetDeploymentStatus::default()
            };
        }
        Known::Aggregate { read, status } => (*read, status),
    };
    let generation = Some(read);
    let rolled_out = i64::try_from(status.observed_generation)
        .ok()
        .filter(|g| *g > 0);
    let shown =
        rolled_out.map_or_else(|| "no generation".to_owned(), |g| format!("generation {g}"));
    let phases = status.phases;
    let available = if status.targeted == 0 {
        condition(
            AVAILABLE,
            false,
            "NoTargets",
            "the target matches no device: check spec.target and the Devices' labels".into(),
            generation,
        )
    } else if phases.running == status.targeted && status.updated == status.targeted {
        condition(
            AVAILABLE,
            true,
            "AllRunning",
            format!("all {} targeted devices run {shown}", status.targeted),
            generation,
        )
    } else {
        condition(
            AVAILABLE,
            false,
            "NotAllRunning",
            format!(
                "{} of {} targeted devices run {shown}",
                phases.running, status.targeted
            ),
            generation,
        )
    };
    let settled = status.updated == status.targeted && phases.pending == 0;
    let refused = status.placement.as_ref().map(|refusal| {
        (
            placement_reason(refusal),
            format!(
                "{}; to write generation {read} to every targeted device anyway, annotate the FleetDeployment {FORCE_GENERATION}: \"{read}\"",
                refusal.message(),
            ),
        )
    });
    let progressing = if let Some((reason, message)) = &refused {
        condition(PROGRESSING, false, reason, message.clone(), generation)
    } else if settled {
        condition(
            PROGRESSING,
            false,
            "RolloutComplete",
            format!("every targeted device reports on {shown}"),
            generation,
        )
    } else {
        let offline = if status.offline > 0 {
            format!(", {} offline", status.offline)
        } else {
            String::new()
        };
        condition(
            PROGRESSING,
            true,
            "RollingOut",
            format!(
                "{} of {} targeted devices report on {shown}, {} pending{offline}",
                status.updated, status.targeted, phases.pending
            ),
            generation,
        )
    };
    let degraded = if let Some(error) = &status.error {
        condition(
            DEGRADED,
            true,
            "SpecRefused",
            format!("{error}; the devices stay on {shown}"),
            generation,
        )
    } else if let Some((reason, message)) = refused {
        condition(DEGRADED, true, reason, message, generation)
    } else if let Some(outdated) = &status.outdated_agents {
        condition(
            DEGRADED,
            true,
            "OutdatedAgents",
            outdated.message(),
            generation,
        )
    } else if let Some(group) = status.failures.first() {
        let more = if status.failures.len() > 1 {
            format!(" (and {} more causes)", status.failures.len() - 1)
        } else {
            String::new()
        };
        condition(
            DEGRADED,
            true,
            "DevicesFailed",
            format!(
                "{} of {} targeted devices failed on {shown}; {} of them: {} ({}){more}",
                phases.failed,
                status.targeted,
                group.count,
                group.message,
                group
                    .devices
                    .iter()
                    .map(|d| d.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            generation,
        )
    } else {
        condition(
            DEGRADED,
            false,
            "Healthy",
            "no targeted device failed".into(),
            generation,
        )
    };
    FleetDeploymentStatus {
        observed_generation: generation,
        rolled_out_generation: rolled_out,
        conditions: vec![available, progressing, degraded],
        targeted: status.targeted,
        updated: status.updated,
        pending: phases.pending,
        running: phases.running,
        failed: phases.failed,
        offline: status.offline,
        failures: status.failures.clone(),
        skew: status.skew.clone(),
        placement: status.placement.clone(),
        outdated_agents: status.outdated_agents.clone(),
        resolved_images: None,
    }
}

/// The Degraded (and Progressing) reason of a refused all-or-nothing
/// FleetDeployment.
pub fn placement_reason(refusal: &PlacementRefusal) -> &'static str {
    match refusal.reason {
        PlacementReason::PartialPlacement => PARTIAL_PLACEMENT,
        PlacementReason::UnknownDevices => UNKNOWN_DEVICES,
        _ => PLACEMENT_REFUSED,
    }
}

/// Degraded: some targeted devices run the all-or-nothing FleetDeployment
/// and some do not; nothing is written.
pub const PARTIAL_PLACEMENT: &str = "PartialPlacement";
/// Degraded: some targeted devices of the all-or-nothing FleetDeployment
/// cannot be asked; nothing is written.
pub const UNKNOWN_DEVICES: &str = "UnknownDevices";
/// Degraded: the all-or-nothing FleetDeployment is refused for a reason
/// this operator does not know by name.
pub const PLACEMENT_REFUSED: &str = "PlacementRefused";

/// A condition of `type_`, keeping its transition time from `previous`
/// while its status stays the same.
fn condition(
    previous: Option<&FleetDeploymentStatus>,
    now: &str,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let since = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map_or_else(|| now.to_owned(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: since,
        observed_generation: generation,
    }
}

/// Where the images of a FleetDeployment's current generation stand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Images {
    /// Nothing is pinned: the spec reaches the devices as written.
    AsWritten,
    /// Pinned, as this record of the current generation says.
    Pinned(ResolvedImages),
    /// The current generation's images could not be pinned.
    Unresolved {
        /// The current generation.
        generation: i64,
        /// The record of an older generation: what the devices were
        /// handed, kept.
        running: Option<ResolvedImages>,
        /// What failed, with the rule ([`crate::images::unresolved_message`]).
        message: String,
    },
}

/// The Degraded reason of a generation whose images could not be pinned.
pub const IMAGE_RESOLVE_FAILED: &str = "ImageResolveFailed";

/// `status` (from [`fleet_status`]; `None` when the fleet controller has
/// not read the FleetDeployment yet) with what `images` says: the record
/// of pinned images, and a Degraded condition when they could not be
/// pinned. Without a status of its own it builds on `previous`. `None`:
/// nothing to show yet.
pub fn with_images(
    status: Option<FleetDeploymentStatus>,
    images: &Images,
    previous: Option<&FleetDeploymentStatus>,
    now: &str,
) -> Option<FleetDeploymentStatus> {
    let mut status = match (status, images) {
        (Some(status), _) => status,
        (None, Images::AsWritten) => return None,
        (None, _) => previous.cloned().unwrap_or_default(),
    };
    match images {
        Images::AsWritten => status.resolved_images = None,
        Images::Pinned(record) => status.resolved_images = Some(record.clone()),
        Images::Unresolved {
            generation,
            running,
            message,
        } => {
            status.resolved_images = running.clone();
            let generation = Some(*generation);
            let mut set = |type_: &str, value: bool, message: String| {
                let next = condition(
                    previous,
                    now,
                    type_,
                    value,
                    IMAGE_RESOLVE_FAILED,
                    message,
                    generation,
                );
                match status.conditions.iter_mut().find(|c| c.type_ == type_) {
                    Some(slot) => *slot = next,
                    None => status.conditions.push(next),
                }
            };
            if status.observed_generation.is_none() {
                let nothing = "nothing is deployed: the images are not pinned to digests yet";
                set(AVAILABLE, false, nothing.to_owned());
                set(PROGRESSING, false, nothing.to_owned());
            }
            set(DEGRADED, true, message.clone());
        }
    }
    Some(status)
}

/// An event for `kubectl describe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// A warning (or a normal event).
    pub warning: bool,
    /// A CamelCase reason.
    pub reason: &'static str,
    /// What happened.
    pub message: String,
}

/// What changed from `previous` to `next` that people want to read about:
/// a rollout started or completed, devices failed, the targets changed.
pub fn notes(previous: Option<&FleetDeploymentStatus>, next: &FleetDeploymentStatus) -> Vec<Note> {
    let empty = FleetDeploymentStatus::default();
    let previous = previous.unwrap_or(&empty);
    let mut notes = Vec::new();
    let reason_of = |s: &FleetDeploymentStatus, type_: &str| {
        s.conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    if next.rolled_out_generation != previous.rolled_out_generation {
        if let Some(generation) = next.rolled_out_generation {
            notes.push(Note {
                warning: false,
                reason: "RolloutStarted",
                message: format!(
                    "rolling generation {generation} out to {}",
                    devices(next.targeted)
                ),
            });
        }
    }
    if next.targeted != previous.targeted && previous.observed_generation.is_some() {
        notes.push(Note {
            warning: false,
            reason: "TargetsChanged",
            message: format!(
                "the target now picks {} (was {})",
                devices(next.targeted),
                previous.targeted
            ),
        });
    }
    let degraded = reason_of(next, DEGRADED);
    if next.failed > previous.failed {
        if let Some((_, message)) = &degraded {
            notes.push(Note {
                warning: true,
                reason: "DevicesFailed",
                message: message.clone(),
            });
        }
    }
    if let Some((reason, message)) = &degraded {
        let was = reason_of(previous, DEGRADED).map(|(r, _)| r);
        let warned = [
            "SpecRefused",
            "InvalidName",
            IMAGE_RESOLVE_FAILED,
            PARTIAL_PLACEMENT,
            UNKNOWN_DEVICES,
            PLACEMENT_REFUSED,
        ]
        .into_iter()
        .find(|r| r == reason);
        if let Some(reason) = warned.filter(|r| was.as_deref() != Some(*r)) {
            notes.push(Note {
                warning: true,
                reason,
                message: message.clone(),
            });
        }
    }
    if let Some(record) = &next.resolved_images {
        let was = previous.resolved_images.as_ref().map(|r| r.generation);
        if was != Some(record.generation) {
            let pins: Vec<String> = record
                .images
                .iter()
                .map(|i| {
                    let kind = if i.init_container {
                        "init container"
                    } else {
                        "service"
                    };
                    format!("{kind} {:?}: {}", i.container, i.pinned)
                })
                .collect();
            notes.push(Note {
                warning: false,
                reason: "ImagesPinned",
                message: format!("generation {} pins {}", record.generation, pins.join(", ")),
            });
        }
    }
    let complete =
        |s: &FleetDeploymentStatus| reason_of(s, AVAILABLE).is_some_and(|(r, _)| r == "AllRunning");
    if complete(next) && !complete(previous) {
        if let Some((_, message)) = reason_of(next, AVAILABLE) {
            notes.push(Note {
                warning: false,
                reason: "RolloutComplete",
                message,
            });
        }
    }
    notes
}

/// `n` devices, in words.
fn devices(n: u32) -> String {
    if n == 1 {
        "1 device".to_owned()
    } else {
        format!("{n} devices")
    }
}

/// A Device's status from the controller's view of it; `last_seen` is the
/// RFC 3339 time of its last heartbeat, if any.
pub fn device_status(
    view: &DeviceView<'_>,
    last_seen: Option<String>,
    deployments: Vec<(String, DeviceDeployment)>,
) -> DeviceStatus {
    let heartbeat = view.heartbeat;
    let fact = |f: &str| (!f.is_empty()).then(|| f.to_owned());
    DeviceStatus {
        online: view.online,
        last_seen,
        agent_version: heartbeat.and_then(|h| fact(&h.agent_version)),
        arch: heartbeat.and_then(|h| fact(&h.arch)),
        os: heartbeat.and_then(|h| fact(&h.os)),
        kernel: heartbeat.and_then(|h| fact(&h.kernel)),
        runtime_version: heartbeat.and_then(|h| h.runtime_version.clone()),
        runtime_healthy: heartbeat.map(|h| h.runtime == RuntimeHealth::default()),
        deployment_count: u32::try_from(deployments.len()).unwrap_or(u32::MAX),
        deployments: deployments.into_iter().collect(),
    }
}

/// Where one deployment stands on a device, from its report.
pub fn device_deployment(report: Option<&DeploymentState>) -> DeviceDeployment {
    match report {
        None => DeviceDeployment {
            phase: Phase::Pending,
            revision: None,
            message: None,
        },
        Some(report) => DeviceDeployment {
            phase: report.phase,
            revision: Some(report.revision.get()),
            message: report.cause.as_ref().map(describe_cause),
        },
    }
}

#[cfg(test)]
mod tests;
