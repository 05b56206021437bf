use podfleet_core::fleet::{
    DeviceGroup, FailureGroup, FleetDeploymentStatus as Aggregate, PhaseCounts, PlacementReason,
    PlacementRefusal,
};
use podfleet_core::wire::DeviceId;
use serde_json::json;

use super::*;

fn aggregate(targeted: u32, updated: u32, phases: [u32; 3], offline: u32) -> Aggregate {
    Aggregate {
        observed_generation: 3,
        error: None,
        targeted,
        updated,
        phases: PhaseCounts {
            pending: phases[0],
            running: phases[1],
            failed: phases[2],
            succeeded: 0,
        },
        offline,
        failures: Vec::new(),
        skew: Vec::new(),
        placement: None,
        outdated_agents: None,
    }
}

fn known(status: Aggregate) -> Known {
    Known::Aggregate {
        read: 4,
        status: Box::new(status),
    }
}

fn condition<'a>(status: &'a FleetDeploymentStatus, type_: &str) -> &'a Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition"))
}

#[test]
fn a_complete_rollout_is_available_and_healthy() {
    let status = fleet_status(&known(aggregate(3, 3, [0, 3, 0], 0)), None, "T1");
    assert_eq!(status.observed_generation, Some(4));
    assert_eq!(status.rolled_out_generation, Some(3));
    assert_eq!((status.targeted, status.running, status.updated), (3, 3, 3));
    let available = condition(&status, AVAILABLE);
    assert_eq!(
        (available.status.as_str(), available.reason.as_str()),
        ("True", "AllRunning")
    );
    assert_eq!(available.message, "all 3 targeted devices run generation 3");
    assert_eq!(condition(&status, PROGRESSING).reason, "RolloutComplete");
    assert_eq!(condition(&status, DEGRADED).status, "False");
    assert!(status
        .conditions
        .iter()
        .all(|c| c.last_transition_time == "T1"));
}

#[test]
fn transition_times_move_only_when_a_status_flips() {
    let first = fleet_status(&known(aggregate(3, 1, [2, 1, 0], 1)), None, "T1");
    assert_eq!(condition(&first, PROGRESSING).status, "True");
    assert_eq!(
        condition(&first, PROGRESSING).message,
        "1 of 3 targeted devices report on generation 3, 2 pending, 1 offline"
    );
    let same = fleet_status(&known(aggregate(3, 2, [1, 2, 0], 0)), Some(&first), "T2");
    assert!(same
        .conditions
        .iter()
        .all(|c| c.last_transition_time == "T1"));
    let done = fleet_status(&known(aggregate(3, 3, [0, 3, 0], 0)), Some(&same), "T3");
    assert_eq!(condition(&done, AVAILABLE).last_transition_time, "T3");
    assert_eq!(condition(&done, PROGRESSING).last_transition_time, "T3");
    assert_eq!(condition(&done, DEGRADED).last_transition_time, "T1");
    // Unchanged input, unchanged status: nothing to patch.
    assert_eq!(
        fleet_status(&known(aggregate(3, 3, [0, 3, 0], 0)), Some(&done), "T4"),
        done
    );
}

#[test]
fn failures_and_refusals_degrade_with_a_message_to_act_on() {
    let mut failing = aggregate(4, 4, [0, 2, 2], 0);
    failing.failures = vec![FailureGroup {
        reason: "init_container_exited".into(),
        message: "init container \"migrate\" exited with code 3".into(),
        count: 2,
        devices: vec![
            DeviceId::new("rpi-01").unwrap(),
            DeviceId::new("rpi-04").unwrap(),
        ],
    }];
    let status = fleet_status(&known(failing.clone()), None, "T1");
    let degraded = condition(&status, DEGRADED);
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "DevicesFailed")
    );
    assert_eq!(
        degraded.message,
        "2 of 4 targeted devices failed on generation 3; 2 of them: init container \"migrate\" exited with code 3 (rpi-01, rpi-04)"
    );
    assert_eq!(status.failures, failing.failures);
    let mut refused = aggregate(4, 4, [0, 4, 0], 0);
    refused.error = Some("generation 4 was refused: spec.score.services[0].image: blank".into());
    let status = fleet_status(&known(refused), None, "T1");
    let degraded = condition(&status, DEGRADED);
    assert_eq!(degraded.reason, "SpecRefused");
    assert!(
        degraded
            .message
            .ends_with("; the devices stay on generation 3"),
        "{}",
        degraded.message
    );
    assert_eq!(status.observed_generation, Some(4));
    assert_eq!(status.rolled_out_generation, Some(3));
}

#[test]
fn no_target_and_a_bad_name_say_so() {
    let status = fleet_status(&known(aggregate(0, 0, [0, 0, 0], 0)), None, "T1");
    assert_eq!(condition(&status, AVAILABLE).reason, "NoTargets");
    let status = fleet_status(
        &Known::InvalidName("\"Web.1\": not a name".into()),
        None,
        "T1",
    );
    assert_eq!(condition(&status, DEGRADED).reason, "InvalidName");
    assert_eq!(condition(&status, AVAILABLE).status, "False");
    assert_eq!(status.observed_generation, None);
}

#[test]
fn notes_tell_rollouts_failures_and_target_changes() {
    let reasons = |notes: Vec<Note>| notes.into_iter().map(|n| n.reason).collect::<Vec<_>>();
    let started = fleet_status(&known(aggregate(2, 0, [2, 0, 0], 0)), None, "T1");
    assert_eq!(reasons(notes(None, &started)), ["RolloutStarted"]);
    let mut failing = aggregate(3, 3, [0, 2, 1], 0);
    failing.failures = vec![FailureGroup {
        reason: "crash_loop".into(),
        message: "crash loop".into(),
        count: 1,
        devices: vec![DeviceId::new("rpi-03").unwrap()],
    }];
    let failed = fleet_status(&known(failing), Some(&started), "T2");
    assert_eq!(
        reasons(notes(Some(&started), &failed)),
        ["TargetsChanged", "DevicesFailed"]
    );
    let done = fleet_status(&known(aggregate(3, 3, [0, 3, 0], 0)), Some(&failed), "T3");
    assert_eq!(reasons(notes(Some(&failed), &done)), ["RolloutComplete"]);
    assert!(notes(Some(&done), &done).is_empty());
}

fn record(generation: i64) -> ResolvedImages {
    ResolvedImages {
        generation,
        images: vec![crate::resources::ResolvedImage {
            container: "web".into(),
            init_container: false,
            image: "registry.example/web:1".into(),
            pinned: format!("registry.example/web:1@sha256:{}", "a".repeat(64)),
        }],
    }
}

#[test]
fn a_pinned_record_rides_along_with_every_status() {
    // Before the fleet controller has read it, the record alone: the
    // engine reads it back from the status.
    let first = with_images(None, &Images::Pinned(record(1)), None, "T1").unwrap();
    assert_eq!(first.resolved_images, Some(record(1)));
    assert!(first.conditions.is_empty());
    assert_eq!(
        reasons(notes(None, &first)),
        ["ImagesPinned"],
        "one event when a generation's images are pinned"
    );
    assert_eq!(
        notes(None, &first)[0].message,
        format!(
            "generation 1 pins service \"web\": registry.example/web:1@sha256:{}",
            "a".repeat(64)
        )
    );
    // Nothing to show and nothing known: no status.
    assert_eq!(with_images(None, &Images::AsWritten, None, "T1"), None);
    // With an aggregate, the record is in the same apply (one field
    // manager: a status without it would remove it).
    let base = fleet_status(&known(aggregate(1, 1, [0, 1, 0], 0)), Some(&first), "T2");
    let next = with_images(Some(base), &Images::Pinned(record(1)), Some(&first), "T2").unwrap();
    assert_eq!(next.resolved_images, Some(record(1)));
    assert_eq!(condition(&next, AVAILABLE).reason, "AllRunning");
    assert!(!reasons(notes(Some(&first), &next)).contains(&"ImagesPinned"));
    // Keeping tags (or nothing left to pin) drops it.
    let base = fleet_status(&known(aggregate(1, 1, [0, 1, 0], 0)), Some(&next), "T3");
    let kept = with_images(Some(base), &Images::AsWritten, Some(&next), "T3").unwrap();
    assert_eq!(kept.resolved_images, None);
}

#[test]
fn unresolved_images_degrade_and_keep_the_running_record() {
    let running = with_images(
        Some(fleet_status(
            &known(aggregate(2, 2, [0, 2, 0], 0)),
            None,
            "T1",
        )),
        &Images::Pinned(record(3)),
        None,
        "T1",
    )
    .unwrap();
    let unresolved = Images::Unresolved {
        generation: 5,
        running: Some(record(3)),
        message: "service \"web\": image \"registry.example/web:2\": not found".into(),
    };
    // The fleet controller still aggregates generation 3 (read 4).
    let base = fleet_status(&known(aggregate(2, 2, [0, 2, 0], 0)), Some(&running), "T2");
    let next = with_images(Some(base), &unresolved, Some(&running), "T2").unwrap();
    let degraded = condition(&next, DEGRADED);
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", IMAGE_RESOLVE_FAILED)
    );
    assert_eq!(degraded.observed_generation, Some(5));
    assert_eq!(degraded.last_transition_time, "T2");
    assert!(degraded.message.contains("web:2"), "{}", degraded.message);
    assert_eq!(next.resolved_images, Some(record(3)), "what runs stays");
    assert_eq!(condition(&next, AVAILABLE).reason, "AllRunning");
    assert_eq!(next.observed_generation, Some(4));
    let told = notes(Some(&running), &next);
    assert_eq!(reasons(told.clone()), [IMAGE_RESOLVE_FAILED]);
    assert!(told[0].warning);
    // The same failure again: no new event, no new transition.
    let again = with_images(
        Some(fleet_status(
            &known(aggregate(2, 2, [0, 2, 0], 0)),
            Some(&next),
            "T3",
        )),
        &unresolved,
        Some(&next),
        "T3",
    )
    .unwrap();
    assert_eq!(again, next);
    assert!(notes(Some(&next), &again).is_empty());

    // Nothing ever deployed: not available, not progressing, degraded.
    let first = with_images(
        None,
        &Images::Unresolved {
            generation: 1,
            running: None,
            message:
                "registry logins: the Secret podfleet/regcred has no \".dockerconfigjson\" key"
                    .into(),
        },
        None,
        "T1",
    )
    .unwrap();
    assert_eq!(condition(&first, AVAILABLE).status, "False");
    assert_eq!(condition(&first, PROGRESSING).status, "False");
    assert_eq!(condition(&first, DEGRADED).reason, IMAGE_RESOLVE_FAILED);
    assert_eq!(first.resolved_images, None);
    assert_eq!(first.observed_generation, None);
}

fn reasons(notes: Vec<Note>) -> Vec<&'static str> {
    notes.into_iter().map(|n| n.reason).collect()
}

fn ids(names: &[&str]) -> Vec<DeviceId> {
    names.iter().map(|n| DeviceId::new(*n).unwrap()).collect()
}

#[test]
fn a_refused_all_or_nothing_rollout_degrades_and_says_how_to_force_it() {
    let healthy = fleet_status(&known(aggregate(3, 3, [0, 3, 0], 0)), None, "T1");
    // Generation 4 (a new image) is refused: rpi-03 does not run it, and
    // the devices stay on generation 3's keys.
    let mut refused = aggregate(3, 0, [3, 0, 0], 1);
    refused.observed_generation = 4;
    refused.placement = Some(PlacementRefusal {
        reason: PlacementReason::PartialPlacement,
        running: DeviceGroup::of(&ids(&["rpi-02", "rpi-01"])),
        not_running: DeviceGroup::of(&ids(&["rpi-03"])),
        unknown: DeviceGroup::default(),
    });
    let status = fleet_status(&known(refused.clone()), Some(&healthy), "T2");
    let degraded = condition(&status, DEGRADED);
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", PARTIAL_PLACEMENT)
    );
    assert_eq!(
        degraded.message,
        "of 3 targeted devices, 2 run it (rpi-01, rpi-02), 1 does not (rpi-03): an all-or-nothing \
         deployment is written to all of them or to none, so nothing was written; to write \
         generation 4 to every targeted device anyway, annotate the FleetDeployment \
         podfleet.io/force-generation: \"4\""
    );
    let progressing = condition(&status, PROGRESSING);
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_str()),
        ("False", PARTIAL_PLACEMENT)
    );
    assert_eq!(status.placement, refused.placement);
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["placement"]["reason"], "partial_placement");
    assert_eq!(
        json["placement"]["running"]["devices"],
        json!(["rpi-01", "rpi-02"])
    );
    assert_eq!(json["placement"]["notRunning"]["count"], 1);
    // One warning event when it starts, none while it lasts.
    let told = notes(Some(&healthy), &status);
    assert!(
        told.iter()
            .any(|n| n.warning && n.reason == PARTIAL_PLACEMENT),
        "{told:?}"
    );
    let again = fleet_status(&known(refused.clone()), Some(&status), "T3");
    assert!(!notes(Some(&status), &again)
        .iter()
        .any(|n| n.reason == PARTIAL_PLACEMENT));
    // Unknown devices have their own reason.
    let mut unknown = refused.clone();
    if let Some(placement) = &mut unknown.placement {
        placement.reason = PlacementReason::UnknownDevices;
    }
    let status = fleet_status(&known(unknown), Some(&again), "T4");
    assert_eq!(condition(&status, DEGRADED).reason, UNKNOWN_DEVICES);
    // A refused spec still comes first: it is the newest thing to fix.
    let mut both = refused;
    both.error = Some("generation 5 was refused: spec.score.services[0].image: blank".into());
    let status = fleet_status(&known(both), None, "T5");
    assert_eq!(condition(&status, DEGRADED).reason, "SpecRefused");
}

#[test]
fn outdated_agents_degrade_and_name_the_devices_to_upgrade() {
    let mut outdated = aggregate(3, 2, [1, 2, 0], 0);
    outdated.outdated_agents = Some(podfleet_core::fleet::OutdatedAgents {
        features: vec!["lifetime".into()],
        devices: DeviceGroup::of(&ids(&["rpi-03"])),
    });
    let status = fleet_status(&known(outdated.clone()), None, "T1");
    let degraded = condition(&status, DEGRADED);
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "OutdatedAgents")
    );
    assert_eq!(
        degraded.message,
        "rpi-03 runs an agent that does not understand lifetime: upgrade it (nothing of this \
         generation is written to it)"
    );
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(
        json["outdatedAgents"]["devices"]["devices"],
        json!(["rpi-03"])
    );
    assert_eq!(json["outdatedAgents"]["features"], json!(["lifetime"]));
}
