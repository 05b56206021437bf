//! `podfleet describe device|deployment`: one object in detail, for people.

use std::fmt::Write as _;
use std::time::Duration;

use podfleet_core::fleet::controller::DeviceRollout;
use podfleet_core::fleet::{describe_cause, Controller, FleetDeployment, Placement};
use podfleet_core::wire::{DeploymentName, DeploymentState, DeviceId, Phase};
use podfleet_core::Timestamp;

use crate::cli::get::{runtime_health, strategy_name};
use crate::cli::table::{self, Table};
use crate::cli::Failure;

/// The label column's width: `Name:` and its value line up like kubectl's.
const KEY: usize = 14;

fn field(out: &mut String, indent: usize, key: &str, value: impl std::fmt::Display) {
    let pad = KEY.saturating_sub(key.len() + 1);
    let _ = writeln!(out, "{:indent$}{key}:{:pad$} {value}", "", "");
}

/// A phase as a word: `Running`.
pub fn phase_word(phase: Phase) -> &'static str {
    match phase {
        Phase::Pending => "Pending",
        Phase::Running => "Running",
        Phase::Failed => "Failed",
        Phase::Succeeded => "Succeeded",
    }
}

fn restarts(state: &DeploymentState) -> u32 {
    state.restarts.values().map(|r| r.count).sum()
}

/// `describe device ID` at `now`.
///
/// # Errors
/// [`Failure`] when the snapshot does not know the device.
pub fn device(controller: &Controller, now: Timestamp, id: &DeviceId) -> Result<String, Failure> {
    let Some(device) = controller.devices().find(|d| d.id == id) else {
        return Err(Failure::failed(format!(
            "device \"{id}\" not found: it has neither a heartbeat nor a device record"
        )));
    };
    let mut out = String::new();
    field(&mut out, 0, "Name", id);
    let status = match (device.heartbeat, device.online) {
        (None, _) => "Unknown (no heartbeat yet)".to_owned(),
        (Some(_), online) => format!(
            "{} (last heartbeat {} ago)",
            if online { "Online" } else { "Offline" },
            device.seen_at.map_or_else(
                || "<unknown>".to_owned(),
                |s| table::age(now.saturating_since(s))
            )
        ),
    };
    field(&mut out, 0, "Status", status);
    let mut labels = device.labels.iter().map(|(k, v)| format!("{k}={v}"));
    field(
        &mut out,
        0,
        "Labels",
        labels.next().unwrap_or_else(|| "<none>".into()),
    );
    for label in labels {
        let _ = writeln!(out, "{:KEY$} {label}", "");
    }
    match device.heartbeat {
        Some(heartbeat) => {
            field(&mut out, 0, "Agent", &heartbeat.agent_version);
            field(
                &mut out,
                0,
                "Uptime",
                table::age(Duration::from_secs(heartbeat.uptime_s)),
            );
            field(&mut out, 0, "Runtime", runtime_health(&heartbeat.runtime));
            field(
                &mut out,
                0,
                "Managed",
                format!(
                    "{} deployment(s), as the agent counts them",
                    heartbeat.deployments
                ),
            );
        }
        None => field(&mut out, 0, "Agent", "<unknown>"),
    }
    if device.deployments.is_empty() {
        field(&mut out, 0, "Deployments", "<none>");
    } else {
        let _ = writeln!(out, "Deployments:");
    }
    for name in &device.deployments {
        let _ = writeln!(out, "  {name}:");
        let desired = controller
            .rollout(name)
            .into_iter()
            .find(|r| r.device == id)
            .and_then(|r| r.revision);
        let fleet = if controller.deployment(name).is_some() {
            "fleet deployment"
        } else {
            "not a fleet deployment (desired key written by hand)"
        };
        field(&mut out, 4, "Kind", fleet);
        let Some(state) = controller.report(name, id) else {
            field(&mut out, 4, "Phase", "Pending (no report yet)");
            if let Some(desired) = desired {
                field(&mut out, 4, "Revision", format!("- (desired {desired})"));
            }
            continue;
        };
        field(&mut out, 4, "Phase", phase_word(state.phase));
        let revision = match desired {
            Some(d) if d == state.revision => format!("{} (up to date)", state.revision),
            Some(d) => format!("{} (desired {d})", state.revision),
            None => state.revision.to_string(),
        };
        field(&mut out, 4, "Revision", revision);
        if state.attempt > 1 {
            field(&mut out, 4, "Attempt", state.attempt);
        }
        if !state.message.is_empty() {
            field(&mut out, 4, "Message", &state.message);
        }
        if let Some(cause) = &state.cause {
            field(&mut out, 4, "Cause", describe_cause(cause));
        }
        if state.container_ids.is_empty() {
            field(&mut out, 4, "Containers", "<none>");
        } else {
            let _ = writeln!(out, "    Containers:");
            for (service, container) in &state.container_ids {
                let _ = writeln!(out, "      {service}: {container}");
            }
        }
        if !state.exit_codes.is_empty() {
            let _ = writeln!(out, "    Exit codes:");
            for (service, code) in &state.exit_codes {
                let _ = writeln!(out, "      {service}: {code}");
            }
        }
        if !state.verified.is_empty() {
            let _ = writeln!(out, "    Verified:");
            for (service, v) in &state.verified {
                let _ = writeln!(
                    out,
                    "      {service}: container {} {} ({})",
                    v.container, v.status, v.evidence
                );
            }
        }
        if !state.restarts.is_empty() {
            let _ = writeln!(out, "    Restarts:");
            for (service, record) in &state.restarts {
                let exit = record
                    .last_exit_code
                    .map(|c| format!(" (last exit code {c})"))
                    .unwrap_or_default();
                let _ = writeln!(out, "      {service}: {}{exit}", record.count);
            }
        }
        if state.summarised {
            field(
                &mut out,
                4,
                "Note",
                "the report was summarised: it was over the broker's size limit",
            );
        }
    }
    Ok(out)
}

/// `describe deployment NAME` at `now`: the stored manifest (with its
/// generation), the status computed from the snapshot, and one row per
/// targeted device.
///
/// # Errors
/// [`Failure`] when neither the bucket nor the snapshot has it.
pub fn deployment(
    controller: &Controller,
    now: Timestamp,
    name: &DeploymentName,
    stored: Option<&(u64, FleetDeployment)>,
    width: usize,
) -> Result<String, Failure> {
    let held = controller.deployment(name);
    if stored.is_none() && held.is_none() {
        return Err(Failure::failed(format!(
            "fleetdeployment \"{name}\" not found"
        )));
    }
    let status = controller.status(name);
    let generation = stored
        .map(|(g, _)| *g)
        .or(held.map(|(g, _)| g))
        .unwrap_or_default();
    let mut out = String::new();
    field(&mut out, 0, "Name", name);
    field(
        &mut out,
        0,
        "Generation",
        format!("{generation} (observed {})", status.observed_generation),
    );
    if let Some((_, manifest)) = stored {
        field(&mut out, 0, "Target", &manifest.spec.target);
        field(&mut out, 0, "Strategy", strategy_name(manifest));
        let spec = &manifest.spec;
        let placement = match (spec.placement, &spec.force) {
            (Placement::AllOrNothing, Some(_)) if spec.is_forced() => {
                "AllOrNothing (forced: written to every targeted device, whatever they run)"
                    .to_owned()
            }
            (Placement::AllOrNothing, Some(_)) => {
                "AllOrNothing (its force token is stale: the spec changed since it was forced)"
                    .to_owned()
            }
            (placement, _) => placement.to_string(),
        };
        field(&mut out, 0, "Placement", placement);
        let score = &manifest.spec.score;
        let _ = writeln!(out, "Services:");
        for service in &score.services {
            let _ = writeln!(out, "  {}: {}", service.name, service.image);
        }
        if !score.init_containers.is_empty() {
            let _ = writeln!(out, "Init containers:");
            for init in &score.init_containers {
                let _ = writeln!(
                    out,
                    "  {}: {} (timeout {})",
                    init.name,
                    init.image,
                    table::age(init.timeout)
                );
            }
        }
    }
    let p = status.phases;
    field(
        &mut out,
        0,
        "Status",
        format!(
            "{}/{} running, {} pending, {} failed; {} up to date, {} offline",
            p.running, status.targeted, p.pending, p.failed, status.updated, status.offline
        ),
    );
    if let Some(error) = held.and_then(|(_, e)| e) {
        field(&mut out, 0, "Error", error);
    }
    if let Some(refusal) = &status.placement {
        field(
            &mut out,
            0,
            "Refused",
            format!(
                "{}: nothing is written until every targeted device runs it, or none does and each can be asked",
                refusal.reason.as_str()
            ),
        );
        for (what, group) in [
            ("running", &refusal.running),
            ("not running", &refusal.not_running),
            ("unknown", &refusal.unknown),
        ] {
            let pad = 12usize.saturating_sub(what.len());
            let devices = if group.count == 0 {
                String::new()
            } else {
                format!(" ({})", group.listed())
            };
            let _ = writeln!(
                out,
                "  {what}:{:pad$} {} device(s){devices}",
                "", group.count
            );
        }
        let _ = writeln!(
            out,
            "  to write generation {} to every targeted device anyway: podfleet rollout force {name}",
            status.observed_generation
        );
    }
    if let Some(outdated) = &status.outdated_agents {
        field(&mut out, 0, "Outdated", outdated.message());
    }
    if !status.failures.is_empty() {
        let _ = writeln!(out, "Failures:");
        for group in &status.failures {
            let _ = writeln!(
                out,
                "  {} device(s): {} ({})",
                group.count,
                group.message,
                some_devices(&group.devices, group.count)
            );
        }
    }
    if !status.skew.is_empty() {
        let _ = writeln!(out, "Image skew:");
        for skew in &status.skew {
            let pinned = skew
                .pinned
                .as_deref()
                .map(|p| format!(" (the score pins {p})"))
                .unwrap_or_default();
            let _ = writeln!(out, "  service {}{pinned}:", skew.service);
            for group in &skew.digests {
                let _ = writeln!(
                    out,
                    "    {}: {} device(s) ({})",
                    match (&group.digest, group.missing) {
                        (Some(digest), _) => digest.as_str(),
                        (None, false) => "not reported",
                        (None, true) => "not running the current revision",
                    },
                    group.count,
                    some_devices(&group.devices, group.count)
                );
            }
        }
    }
    let rows = controller.rollout(name);
    if rows.is_empty() {
        field(&mut out, 0, "Devices", "<none>");
        return Ok(out);
    }
    let _ = writeln!(out, "Devices:");
    let mut devices = Table::new(vec![
        "DEVICE",
        "PHASE",
        "REVISION",
        "UP-TO-DATE",
        "RESTARTS",
        "HEARTBEAT",
        "CAUSE",
    ]);
    for row in &rows {
        devices.row(device_row(row, now));
    }
    for line in devices.render(width.saturating_sub(2)).lines() {
        let _ = writeln!(out, "  {line}");
    }
    Ok(out)
}

fn device_row(row: &DeviceRollout<'_>, now: Timestamp) -> Vec<String> {
    let reported = row
        .report
        .map_or_else(|| "-".to_owned(), |r| r.revision.to_string());
    let desired = row
        .revision
        .map_or_else(|| "-".to_owned(), |r| r.to_string());
    let heartbeat = match (row.seen_at, row.online) {
        (None, _) => "<unknown>".to_owned(),
        (Some(seen), true) => table::age(now.saturating_since(seen)),
        (Some(seen), false) => format!("{} (offline)", table::age(now.saturating_since(seen))),
    };
    vec![
        row.device.to_string(),
        phase_word(row.phase()).to_owned(),
        format!("{reported}/{desired}"),
        if row.updated { "yes" } else { "no" }.to_owned(),
        row.report.map_or(0, restarts).to_string(),
        heartbeat,
        row.report
            .and_then(|r| r.cause.as_ref())
            .map(describe_cause)
            .unwrap_or_default(),
    ]
}

/// The first devices of a group of `count`, and how many more there are:
/// `rpi-01, rpi-02 and 8 more`.
fn some_devices(devices: &[DeviceId], count: u32) -> String {
    let named: Vec<&str> = devices.iter().map(DeviceId::as_str).collect();
    let more = (count as usize)
        .checked_sub(named.len())
        .filter(|n| *n > 0)
        .map(|n| format!(" and {n} more"))
        .unwrap_or_default();
    format!("{}{more}", named.join(", "))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::cli::fixtures::{id, name, Fleet, NOW};

    #[test]
    fn describe_device() {
        let fleet = Fleet::sample();
        let running = device(&fleet.controller, NOW, &id("rpi-01")).unwrap();
        let failed = device(&fleet.controller, NOW, &id("rpi-02")).unwrap();
        let offline = device(&fleet.controller, NOW, &id("rpi-03")).unwrap();
        insta::assert_snapshot!(format!("{running}\n{failed}\n{offline}"));
        let missing = device(&fleet.controller, NOW, &id("nope")).unwrap_err();
        assert_eq!(missing.exit, crate::cli::Exit::Failed);
        assert!(missing.message.contains("\"nope\" not found"), "{missing}");
    }

    #[test]
    fn describe_deployment() {
        let fleet = Fleet::sample();
        let web = name("web");
        let text =
            deployment(&fleet.controller, NOW, &web, fleet.manifests.get(&web), 120).unwrap();
        let db = name("db");
        let explicit =
            deployment(&fleet.controller, NOW, &db, fleet.manifests.get(&db), 120).unwrap();
        insta::assert_snapshot!(format!("{text}\n{explicit}"));
        let missing = deployment(&fleet.controller, NOW, &name("nope"), None, 120).unwrap_err();
        assert_eq!(missing.message, "fleetdeployment \"nope\" not found");
    }

    #[test]
    fn describe_device_shows_exit_codes_and_verifications() {
        let mut fleet = Fleet::new();
        fleet.label("rpi-01", &[("site", "lyon")]);
        fleet.heartbeat("rpi-01", "0.1.0", 60, 2);
        for deployment in ["batch", "edge"] {
            fleet.apply(crate::cli::fixtures::manifest(
                deployment,
                serde_json::json!({"selector": "site=lyon"}),
                "localhost/job:1",
            ));
        }
        fleet.report(
            "rpi-01",
            "batch",
            serde_json::json!({"phase": "failed", "exit_codes": {"fetch": 0, "index": 3},
                "cause": {"kind": "run_failed", "service": "index", "exit_code": 3}}),
            None,
        );
        fleet.report(
            "rpi-01",
            "edge",
            serde_json::json!({"phase": "running", "container_ids": {"proxy": "9c1d"},
                "verified": {"proxy": {"container": "base_proxy", "status": "running", "evidence": "running sha256:11"}}}),
            None,
        );
        let text = device(&fleet.controller, NOW, &id("rpi-01")).unwrap();
        assert!(
            text.contains("    Exit codes:\n      fetch: 0\n      index: 3\n"),
            "{text}"
        );
        assert!(
            text.contains("service \"index\" ran and exited with code 3"),
            "{text}"
        );
        assert!(
            text.contains(
                "    Verified:\n      proxy: container base_proxy running (running sha256:11)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn describe_deployment_shows_devices_off_the_pinned_digest() {
        let pinned = format!("registry.local/web:2@sha256:{}", "a".repeat(64));
        let other = format!("sha256:{}", "b".repeat(64));
        let mut fleet = Fleet::new();
        for device in ["rpi-01", "rpi-02", "rpi-03"] {
            fleet.label(device, &[("site", "lyon")]);
            fleet.heartbeat(device, "0.1.0", 60, 2);
        }
        fleet.apply(crate::cli::fixtures::manifest(
            "web",
            serde_json::json!({"selector": "site=lyon"}),
            &pinned,
        ));
        let running = |digest: Option<&str>| {
            let mut state =
                serde_json::json!({"phase": "running", "container_ids": {"app": "3f2a"}});
            if let Some(digest) = digest {
                state["image_digests"] = serde_json::json!({"app": digest});
            }
            state
        };
        let wanted = pinned.split_once('@').unwrap().1.to_owned();
        fleet.report("rpi-01", "web", running(Some(&wanted)), None);
        fleet.report("rpi-02", "web", running(Some(&other)), None);
        fleet.report("rpi-03", "web", running(None), None);
        let web = name("web");
        let text =
            deployment(&fleet.controller, NOW, &web, fleet.manifests.get(&web), 120).unwrap();
        let skew = text
            .split_once("Image skew:\n")
            .map(|(_, rest)| rest.split_once("Devices:").map_or(rest, |(skew, _)| skew))
            .unwrap_or_else(|| panic!("no skew shown:\n{text}"));
        assert_eq!(
            skew,
            format!(
                // Largest group first; among equals, unreported first.
                "  service app (the score pins {wanted}):\n    not reported: 1 device(s) (rpi-03)\n    {wanted}: 1 device(s) (rpi-01)\n    {other}: 1 device(s) (rpi-02)\n"
            )
        );
    }

    #[test]
    fn describe_deployment_shows_a_refused_all_or_nothing_rollout() {
        let mut fleet = Fleet::new();
        for device in ["rpi-01", "rpi-02", "rpi-03"] {
            fleet.label(device, &[("site", "lyon")]);
            fleet.heartbeat(device, "0.1.0", 60, 2);
        }
        let all_or_nothing = |image: &str, force: bool| {
            let mut manifest = crate::cli::fixtures::manifest(
                "web",
                serde_json::json!({"selector": "site=lyon"}),
                image,
            );
            manifest.spec.placement = Placement::AllOrNothing;
            if force {
                manifest.spec = manifest.spec.forced();
            }
            manifest
        };
        fleet.apply(all_or_nothing("localhost/web:1", false));
        fleet.report(
            "rpi-01",
            "web",
            serde_json::json!({"phase": "running"}),
            None,
        );
        fleet.report(
            "rpi-02",
            "web",
            serde_json::json!({"phase": "running"}),
            None,
        );
        fleet.heartbeat("rpi-03", "0.1.0", 60, 3600);
        fleet.apply(all_or_nothing("localhost/web:2", false));
        let web = name("web");
        let refused =
            deployment(&fleet.controller, NOW, &web, fleet.manifests.get(&web), 120).unwrap();
        let mut stale = all_or_nothing("localhost/web:2", true);
        stale.spec.score.services[0].image = "localhost/web:3".into();
        fleet.apply(stale);
        let stale =
            deployment(&fleet.controller, NOW, &web, fleet.manifests.get(&web), 120).unwrap();
        fleet.apply(all_or_nothing("localhost/web:3", true));
        let forced =
            deployment(&fleet.controller, NOW, &web, fleet.manifests.get(&web), 120).unwrap();
        assert!(!forced.contains("Refused:"), "{forced}");
        insta::assert_snapshot!(format!("{refused}\n{stale}\n{forced}"));
    }
}
