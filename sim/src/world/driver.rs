//! The driver: walks a plan on a tier, heals, then checks liveness and
//! quiet on every device.

use super::*;

#[derive(Debug, Clone)]
enum Timed {
    Plan(Action),
    LinkUp(u32),
    /// The agent starts again, maybe into a runtime in trouble for a while.
    AgentUp(u32, Option<(RuntimeTrouble, u64)>),
    ImageBack(u32, String),
    /// A registry or disk fault of the device ends.
    RegistryHealed(u32, RegistryFault),
    ControllerUp,
}

/// Which registry or disk fault ends.
#[derive(Debug, Clone, Copy)]
enum RegistryFault {
    Down,
    Slow,
    Credentials,
    DiskFull,
}

/// Undoes `fault` on `fake`.
fn heal_registry(fake: &mut FakeRuntime, fault: RegistryFault) {
    use podfleet_testkit::registry::{DEFAULT_ROUND_TRIP, DEFAULT_THROUGHPUT};
    match fault {
        RegistryFault::Down => fake.registry_mut().set_up(true),
        RegistryFault::Slow => fake
            .registry_mut()
            .set_speed(DEFAULT_THROUGHPUT, DEFAULT_ROUND_TRIP),
        RegistryFault::Credentials => fake.registry_mut().set_accepts_credentials(true),
        RegistryFault::DiskFull => fake.images_mut().set_capacity(None),
    }
}

/// Runs `plan` on `tier`: its steps, then healing, liveness and quiet.
pub fn run_plan<T: Network>(plan: &Plan, tier: &mut T, shared: &Shared) -> Outcome {
    let world = &shared.world;
    let mut queue: BTreeMap<(u64, u64), Timed> = BTreeMap::new();
    for (n, step) in plan.steps.iter().enumerate() {
        queue.insert((step.at_ms, n as u64), Timed::Plan(step.action.clone()));
    }
    let mut seq = plan.steps.len() as u64;
    let mut links = vec![LinkState::Up; shared.devices.len()];
    let mut agent_up = vec![true; shared.devices.len()];
    let mut controller_up = true;
    let mut faults: BTreeMap<&'static str, u32> = BTreeMap::new();
    let mut failure = None;
    while let Some(((at, _), timed)) = queue.pop_first() {
        if at >= plan.heal_at_ms {
            break;
        }
        if let Err(e) = tier.run_until(Duration::from_millis(at)) {
            failure = Some(e);
            break;
        }
        let now = Timestamp::from_millis(at);
        let mut later = |queue: &mut BTreeMap<(u64, u64), Timed>, after: u64, what: Timed| {
            seq += 1;
            queue.insert((at + after, seq), what);
        };
        let device = |i: u32| shared.devices.get(i as usize);
        match timed {
            Timed::Plan(action) => {
                if let Some(kind) = action.fault_kind() {
                    *faults.entry(kind).or_default() += 1;
                }
                world.trace(now, "plan", format_args!("{action:?}"));
                match action {
                    Action::Put {
                        device: i,
                        deployment,
                        json,
                    } => {
                        let _ = shared.operator.send(OperatorCommand::Write {
                            bucket: DESIRED_BUCKET,
                            key: format!("{}.{deployment}", device_id(i)),
                            value: Some(json.into_bytes()),
                        });
                    }
                    Action::Delete {
                        device: i,
                        deployment,
                    } => {
                        let offline = links.get(i as usize) != Some(&LinkState::Up)
                            || agent_up.get(i as usize) == Some(&false);
                        if offline {
                            world.probe("delete while offline");
                        }
                        let _ = shared.operator.send(OperatorCommand::Write {
                            bucket: DESIRED_BUCKET,
                            key: format!("{}.{deployment}", device_id(i)),
                            value: None,
                        });
                    }
                    Action::Apply {
                        deployment,
                        selector,
                        json,
                    } => {
                        let _ = shared.operator.send(OperatorCommand::Write {
                            bucket: DEPLOYMENTS_BUCKET,
                            value: Some(fleet_manifest(&deployment, &selector, &json)),
                            key: deployment,
                        });
                    }
                    Action::Unapply { deployment } => {
                        let _ = shared.operator.send(OperatorCommand::Write {
                            bucket: DEPLOYMENTS_BUCKET,
                            key: deployment,
                            value: None,
                        });
                    }
                    Action::Label { device: i, labels } => {
                        let record = DeviceRecord { labels };
                        let _ = shared.operator.send(OperatorCommand::Write {
                            bucket: DEVICES_BUCKET,
                            key: device_id(i).to_string(),
                            value: Some(record.to_json()),
                        });
                    }
                    Action::ControllerRestart { down_ms } => {
                        if controller_up {
                            tier.crash_controller();
                            controller_up = false;
                            later(&mut queue, down_ms, Timed::ControllerUp);
                        }
                    }
                    Action::Ping { device: i } => {
                        let _ = shared.operator.send(OperatorCommand::Ping {
                            device: device_id(i),
                        });
                    }
                    Action::Crash {
                        device: i,
                        container,
                        code,
                    } => {
                        if let Some(d) = device(i) {
                            let now = d.fake.now();
                            d.fake.with(|f| {
                                let id = f.by_name(&container).map(|c| c.id.clone());
                                if let Some(id) = id.filter(|id| f.is_running(id)) {
                                    f.crash(now, &id, code);
                                }
                            });
                        }
                    }
                    Action::ApiFault {
                        device: i,
                        op,
                        after_effect,
                        unavailable,
                    } => {
                        if let Some(d) = device(i) {
                            let kind = if unavailable {
                                RuntimeErrorKind::Unavailable
                            } else {
                                RuntimeErrorKind::Other
                            };
                            lock(&d.faults)
                                .entry(op)
                                .or_default()
                                .push_back((after_effect, kind));
                        }
                    }
                    Action::Partition { device: i, for_ms }
                    | Action::Hold { device: i, for_ms }
                        if (i as usize) < links.len() =>
                    {
                        let state = if matches!(action, Action::Partition { .. }) {
                            LinkState::Partitioned
                        } else {
                            LinkState::Held
                        };
                        if let Some(d) = device(i) {
                            let upgrading =
                                d.published().values().any(|s| s.phase == Phase::Pending);
                            if upgrading && state == LinkState::Partitioned {
                                world.probe("partition during an upgrade");
                            }
                        }
                        if links[i as usize] == LinkState::Up {
                            links[i as usize] = state;
                            tier.set_link(i, state);
                            later(&mut queue, for_ms, Timed::LinkUp(i));
                        }
                    }
                    Action::Partition { .. } | Action::Hold { .. } => {}
                    Action::BrokerRestart => {
                        shared.broker.restart();
                        tier.restart_broker();
                    }
                    Action::AgentCrash {
                        device: i,
                        keep_cache,
                        down_ms,
                    } => {
                        if let Some(d) = device(i).filter(|_| agent_up[i as usize]) {
                            tier.crash_agent(i);
                            agent_up[i as usize] = false;
                            if !keep_cache {
                                *lock(&d.disk) = None;
                                if d.fake.with(|f| !f.containers().is_empty()) {
                                    world.probe("adoption after cache loss");
                                }
                            }
                            later(&mut queue, down_ms, Timed::AgentUp(i, None));
                        }
                    }
                    Action::AgentRestartTrouble {
                        device: i,
                        keep_cache,
                        down_ms,
                        for_ms,
                        trouble,
                    } => {
                        if let Some(d) = device(i).filter(|_| agent_up[i as usize]) {
                            tier.crash_agent(i);
                            agent_up[i as usize] = false;
                            if !keep_cache {
                                *lock(&d.disk) = None;
                            }
                            let up = Timed::AgentUp(i, Some((trouble, for_ms)));
                            later(&mut queue, down_ms, up);
                        }
                    }
                    Action::PutOversized {
                        device: i,
                        deployment,
                        name_bytes,
                    } => {
                        let _ = shared.operator.send(OperatorCommand::Write {
                            bucket: DESIRED_BUCKET,
                            key: format!("{}.{deployment}", device_id(i)),
                            value: Some(oversized_score(name_bytes).into_bytes()),
                        });
                    }
                    Action::StaleDelivery { device: i } => {
                        shared
                            .broker
                            .deliver_stale(DESIRED_BUCKET, &format!("{}.", device_id(i)));
                    }
                    Action::ImageMissing {
                        device: i,
                        image,
                        for_ms,
                    } => {
                        if let Some(d) = device(i) {
                            d.fake.with(|f| f.remove_image(&image));
                            later(&mut queue, for_ms, Timed::ImageBack(i, image));
                        }
                    }
                    Action::RegistryDown { device: i, for_ms }
                    | Action::RegistrySlow {
                        device: i, for_ms, ..
                    }
                    | Action::CredentialsRefused { device: i, for_ms }
                    | Action::DiskFull { device: i, for_ms } => {
                        if let Some(d) = device(i) {
                            let fault = d.fake.with(|f| match action {
                                Action::RegistryDown { .. } => {
                                    f.registry_mut().set_up(false);
                                    RegistryFault::Down
                                }
                                Action::RegistrySlow { bytes_per_sec, .. } => {
                                    f.registry_mut()
                                        .set_speed(bytes_per_sec, Duration::from_secs(1));
                                    RegistryFault::Slow
                                }
                                Action::CredentialsRefused { .. } => {
                                    f.registry_mut().set_accepts_credentials(false);
                                    RegistryFault::Credentials
                                }
                                _ => {
                                    // Full: no pulled byte more fits.
                                    let used = f.images().used();
                                    f.images_mut().set_capacity(Some(used));
                                    RegistryFault::DiskFull
                                }
                            });
                            later(&mut queue, for_ms, Timed::RegistryHealed(i, fault));
                        }
                    }
                    Action::Duplicate => shared.broker.duplicate_next(1),
                    Action::SlowRuntime {
                        device: i,
                        for_ms,
                        delay_ms,
                    } => {
                        if let Some(d) = device(i) {
                            let until = now + Duration::from_millis(for_ms);
                            *lock(&d.slow) = Some((until, Duration::from_millis(delay_ms)));
                        }
                    }
                    Action::Redeliver { device: i } => {
                        shared
                            .broker
                            .redeliver(DESIRED_BUCKET, &format!("{}.", device_id(i)));
                    }
                }
            }
            Timed::LinkUp(i) => {
                links[i as usize] = LinkState::Up;
                tier.set_link(i, LinkState::Up);
            }
            Timed::AgentUp(i, trouble) => {
                if let (Some(d), Some((trouble, for_ms))) = (device(i), trouble) {
                    let until = now + Duration::from_millis(for_ms);
                    *lock(&d.trouble) = Some((until, trouble));
                }
                agent_up[i as usize] = true;
                tier.start_agent(i);
            }
            Timed::ControllerUp => {
                controller_up = true;
                tier.start_controller();
            }
            Timed::ImageBack(i, image) => {
                if let Some(d) = device(i) {
                    d.fake.with(|f| f.add_image(&image));
                }
            }
            Timed::RegistryHealed(i, fault) => {
                if let Some(d) = device(i) {
                    d.fake.with(|f| heal_registry(f, fault));
                }
            }
        }
    }
    // Heal every fault still in force; desired state stays as it is.
    let heal = Duration::from_millis(plan.heal_at_ms);
    if failure.is_none() {
        failure = tier.run_until(heal).err();
    }
    world.trace(Timestamp::from_millis(plan.heal_at_ms), "plan", "heal");
    if !controller_up {
        tier.start_controller();
    }
    for (i, d) in shared.devices.iter().enumerate() {
        let i = i as u32;
        if links[i as usize] != LinkState::Up {
            tier.set_link(i, LinkState::Up);
        }
        if !agent_up[i as usize] {
            tier.start_agent(i);
        }
        lock(&d.faults).clear();
        *lock(&d.slow) = None;
        *lock(&d.trouble) = None;
        d.fake.with(|f| {
            for image in crate::plan::GOOD_IMAGES {
                f.add_image(image);
            }
            for fault in [
                RegistryFault::Down,
                RegistryFault::Slow,
                RegistryFault::Credentials,
                RegistryFault::DiskFull,
            ] {
                heal_registry(f, fault);
            }
        });
    }
    if failure.is_none() {
        failure = tier.run_until(heal + LIVENESS_BOUND).err();
    }
    if failure.is_none() {
        let running = check_converged(shared);
        check_fleet(plan, shared);
        let before: Vec<usize> = shared
            .devices
            .iter()
            .map(|d| d.fake.with(|f| f.events().len()))
            .collect();
        failure = tier.run_until(heal + LIVENESS_BOUND + QUIET_PERIOD).err();
        check_quiet(shared, &before, &running);
    }
    if let Some(e) = failure {
        world.violation(Violation::new(Invariant::HostFailed, e));
    }
    for refusal in shared.broker.refusals() {
        world.violation(Violation::new(
            Invariant::Isolation,
            format!("the broker refused {refusal}, which is not the device's own"),
        ));
    }
    let w = lock(&world.0);
    Outcome {
        seed: plan.seed,
        simulated: tier.now(),
        faults,
        probes: w.probes.clone(),
        violations: w.violations.clone(),
        events: w.events,
        trace_hash: w.hash,
        trace: w.lines.iter().cloned().collect(),
    }
}

/// Liveness: what each device reports through the broker matches desired
/// state, the agent's own latest reports and the runtime's ground truth
/// ([`check_device`]). Returns the (device, deployment) pairs that run and
/// must now stay still.
fn check_converged(shared: &Shared) -> Vec<(usize, String)> {
    let desired = shared.broker.entries(DESIRED_BUCKET);
    let reported = shared.broker.entries(STATE_BUCKET);
    let mut running = Vec::new();
    for (i, d) in shared.devices.iter().enumerate() {
        let prefix = format!("{}.", d.id);
        let under = |map: &BTreeMap<String, (u64, Vec<u8>)>| {
            map.range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, v)| (k[prefix.len()..].to_owned(), v.clone()))
                .collect::<BTreeMap<String, (u64, Vec<u8>)>>()
        };
        let mine = under(&desired);
        let stored: BTreeMap<String, Vec<u8>> = under(&reported)
            .into_iter()
            .map(|(k, (_, v))| (k, v))
            .collect();
        // A report whose desired key is gone and which the fleet controller
        // deleted as an orphan (its agent could not: it restarted without
        // its cache and never learnt of the deployment) is not the agent's.
        let mut published = lock(&d.published).clone();
        published.retain(|deployment, _| {
            let key = format!("{prefix}{deployment}");
            mine.contains_key(deployment.as_str())
                || stored.contains_key(deployment.as_str())
                || !shared.world.was_collected(&key)
        });
        let oracle = lock(&d.oracle).clone();
        let epoch = *lock(&d.epoch);
        let (problems, converged) = d.fake.with(|fake| {
            check_device(&DeviceView {
                desired: &mine,
                stored: &stored,
                published: Some(&published),
                fake,
                oracle: &oracle,
                epoch,
                now: d.fake.now(),
            })
        });
        running.extend(converged.into_iter().map(|c| (i, c)));
        for p in problems {
            shared.world.violation(p.on(&d.id));
        }
    }
    running
}

/// No flapping: converged deployments see no runtime mutation at all.
fn check_quiet(shared: &Shared, before: &[usize], running: &[(usize, String)]) {
    for (i, d) in shared.devices.iter().enumerate() {
        let from = before.get(i).copied().unwrap_or(0);
        let flaps = d.fake.with(|f| {
            let mut out = String::new();
            for (at, event) in f.events().iter().skip(from) {
                let id = match event {
                    RuntimeEvent::Created { id, .. }
                    | RuntimeEvent::Started { id }
                    | RuntimeEvent::StopBegan { id, .. }
                    | RuntimeEvent::Removed { id, .. } => id,
                    RuntimeEvent::Exited { .. } | RuntimeEvent::ImagePulled { .. } => continue,
                };
                let deployment = f
                    .containers()
                    .get(id)
                    .and_then(|c| c.spec.labels.get(LABEL_DEPLOYMENT).cloned())
                    .unwrap_or_default();
                if running.contains(&(i, deployment)) {
                    let _ = write!(out, " {at} {event:?};");
                }
            }
            out
        });
        if !flaps.is_empty() {
            shared.world.violation(
                Violation::new(
                    Invariant::Liveness,
                    format!("no quiet after convergence:{flaps}"),
                )
                .on(&d.id),
            );
        }
    }
}

/// How long after a restart the controller may take to be back and synced,
/// in ms: a broker restart shows only when the connection falls silent
/// (the idle timeout, checked at each ping), then a reconnect and a
/// snapshot, with room to spare.
const RESTART_MARGIN_MS: u64 = 45_000;

/// Fleet convergence: every fleet deployment's per-device keys are exactly
/// its resolved target, each holding its score, and its status counts what
/// the devices report. The expectation is worked out from the plan alone:
/// the last labels of each device, and the last valid manifest of each
/// fleet deployment (or its deletion).
fn check_fleet(plan: &Plan, shared: &Shared) {
    let mut labels: BTreeMap<u32, Labels> = BTreeMap::new();
    // Per fleet deployment: the last valid (selector, score), or `None`
    // once deleted; `unknown` when the controller cannot know the last
    // valid manifest (it restarted while the newest one was refused).
    let mut fleets: BTreeMap<String, Option<(Selector, Vec<u8>)>> = BTreeMap::new();
    let mut refused: BTreeSet<String> = BTreeSet::new();
    let mut unknown: BTreeSet<String> = BTreeSet::new();
    // Until when the controller may be down or starting over: a refused
    // manifest that a fresh controller reads first leaves it as unknown.
    let mut restarting_until = 0;
    for step in plan.steps.iter().filter(|s| s.at_ms < plan.heal_at_ms) {
        match &step.action {
            Action::Label { device, labels: l } => {
                labels.insert(*device, l.clone());
            }
            Action::Apply {
                deployment,
                selector,
                json,
            } => match FleetDeployment::from_json(&fleet_manifest(deployment, selector, json)) {
                Ok(manifest) => {
                    let target = match manifest.spec.target {
                        Target::Selector(selector) => selector,
                        Target::Devices(_) => continue,
                    };
                    fleets.insert(
                        deployment.clone(),
                        Some((target, manifest.spec.score.to_json())),
                    );
                    refused.remove(deployment);
                    unknown.remove(deployment);
                }
                Err(_) => {
                    fleets.entry(deployment.clone()).or_insert(None);
                    refused.insert(deployment.clone());
                    if step.at_ms <= restarting_until {
                        unknown.insert(deployment.clone());
                    }
                }
            },
            Action::Unapply { deployment } => {
                fleets.insert(deployment.clone(), None);
                refused.remove(deployment);
                unknown.remove(deployment);
            }
            Action::ControllerRestart { down_ms } => {
                unknown.extend(refused.iter().cloned());
                restarting_until = restarting_until.max(step.at_ms + down_ms + RESTART_MARGIN_MS);
            }
            Action::BrokerRestart => {
                unknown.extend(refused.iter().cloned());
                restarting_until = restarting_until.max(step.at_ms + RESTART_MARGIN_MS);
            }
            _ => {}
        }
    }
    let desired = shared.broker.entries(DESIRED_BUCKET);
    let states = shared.broker.entries(STATE_BUCKET);
    let statuses = shared.broker.entries(STATUS_BUCKET);
    let deployments = shared.broker.entries(DEPLOYMENTS_BUCKET);
    let violation = |detail: String| {
        shared
            .world
            .violation(Violation::new(Invariant::FleetConvergence, detail));
    };
    for (name, fleet) in &fleets {
        if unknown.contains(name) {
            continue;
        }
        let suffix = format!(".{name}");
        let got: BTreeMap<&str, &Vec<u8>> = desired
            .iter()
            .filter_map(|(k, (_, v))| Some((k.strip_suffix(&suffix)?, v)))
            .collect();
        let mut want: BTreeMap<String, &Vec<u8>> = BTreeMap::new();
        if let Some((selector, score)) = fleet {
            for i in 0..plan.devices {
                if selector.matches(labels.get(&i).unwrap_or(&Labels::new())) {
                    want.insert(device_id(i).to_string(), score);
                }
            }
        }
        let want: BTreeMap<&str, &Vec<u8>> = want.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        if got != want {
            let show =
                |m: &BTreeMap<&str, &Vec<u8>>| m.keys().copied().collect::<Vec<_>>().join(",");
            violation(format!(
                "{name}: the desired keys are on [{}], its target is [{}] (or a score differs)",
                show(&got),
                show(&want)
            ));
            continue;
        }
        if fleet.is_some() && !want.is_empty() {
            shared.world.probe("fleet deployment converged");
        }
        let status = statuses
            .get(name.as_str())
            .and_then(|(_, v)| serde_json::from_slice::<FleetDeploymentStatus>(v).ok());
        match (fleet, status) {
            (None, Some(_)) if !refused.contains(name) => {
                violation(format!("{name} is deleted but still has a status"));
            }
            (None, _) => {}
            (Some(_), None) => violation(format!("{name} has no status")),
            (Some(_), Some(status)) => {
                let running = want
                    .keys()
                    .filter(|device| {
                        let key = format!("{device}{suffix}");
                        let revision = desired.get(&key).map(|(r, _)| *r);
                        states
                            .get(&key)
                            .and_then(|(_, v)| serde_json::from_slice::<DeploymentState>(v).ok())
                            .is_some_and(|s| {
                                s.phase == Phase::Running && Some(s.revision.get()) == revision
                            })
                    })
                    .count();
                let generation = deployments.get(name.as_str()).map(|(r, _)| *r);
                let stale =
                    !refused.contains(name) && Some(status.observed_generation) != generation;
                if status.targeted as usize != want.len()
                    || status.phases.running as usize != running
                    || stale
                {
                    violation(format!(
                        "{name}: the status says {} targeted, {} running at generation {}; \
                         the buckets say {}, {running} and {generation:?}",
                        status.targeted,
                        status.phases.running,
                        status.observed_generation,
                        want.len()
                    ));
                }
            }
        }
    }
}
