//! The liveness checks of one device, shared by every tier: nothing left
//! behind, converged, and every field of its report truthful.

use super::*;
use podfleet_core::wire::Lifetime;
use podfleet_testkit::oracle::{is_podfleets, verified_running};

/// One device as the liveness phase finds it, once every fault has healed
/// and desired state has stayed put for [`LIVENESS_BOUND`].
#[derive(Debug, Clone, Copy)]
pub struct DeviceView<'a> {
    /// Desired state: deployment -> (revision, value).
    pub desired: &'a BTreeMap<String, (u64, Vec<u8>)>,
    /// The state bucket as the broker stores it: deployment -> value.
    pub stored: &'a BTreeMap<String, Vec<u8>>,
    /// What the agent last handed its publisher, per deployment, where that
    /// can differ from `stored` (`None` when reports go straight in).
    pub published: Option<&'a BTreeMap<String, Handed>>,
    /// The device's runtime: the ground truth.
    pub fake: &'a FakeRuntime,
    /// What the reconciler was told.
    pub oracle: &'a Oracle,
    /// Since the agent process last started.
    pub epoch: Epoch,
    /// The time of the check.
    pub now: Timestamp,
}

/// The liveness checks of one device. Returns the problems, each starting
/// with the invariant it breaks, and the deployments that converged to
/// Running (and must now stay still).
///
/// - None left behind: the runtime's full container list, init containers
///   included, holds nothing of podfleet's for a deleted deployment; for
///   one that can succeed, exactly one container per service of the
///   desired score, running what the score asks for, and no init
///   container; for a `per_run` job, at most one container per service,
///   each what the score asks for and none running once it reports an
///   end; for a `no_launch` score, no container of its own at all; for one
///   that cannot succeed (malformed, doomed init container or setup
///   script), no init container and at most one container per service.
///   The base system's containers (without podfleet's labels) are not
///   podfleet's to count: the oracle checks at every operation that
///   nothing touches them.
/// - Converged: the stored report is Running at the desired revision with
///   the true ids (or, for a spec that cannot succeed, Failed with a cause
///   or a retry under way; for a crash loop, Running or a CrashLoop; for a
///   `per_run` job, Succeeded, Failed with a cause, or a retry under way;
///   for a `no_launch` score, Running exactly when every container it
///   names runs the score's image, else Failed as unverified).
/// - Truthful reports, every field ([`check_report_fields`]).
pub fn check_device(view: &DeviceView<'_>) -> (Vec<Violation>, Vec<String>) {
    let mut problems = Vec::new();
    let mut running = Vec::new();
    let mut states = BTreeMap::new();
    for (deployment, bytes) in view.stored {
        match serde_json::from_slice::<DeploymentState>(bytes) {
            Ok(s) => {
                states.insert(deployment.clone(), s);
            }
            Err(e) => problems.push(Violation::new(
                Invariant::TruthfulReports,
                format!("the stored state of {deployment} does not decode: {e}"),
            )),
        }
    }
    let mut by_deployment: BTreeMap<&str, Vec<&FakeContainer>> = BTreeMap::new();
    let podfleets = view
        .fake
        .containers()
        .values()
        .filter(|c| is_podfleets(&c.spec.labels));
    for c in podfleets {
        let deployment = c
            .spec
            .labels
            .get(LABEL_DEPLOYMENT)
            .map_or("", String::as_str);
        by_deployment.entry(deployment).or_default().push(c);
    }
    for (deployment, containers) in &by_deployment {
        if !view.desired.contains_key(*deployment) {
            for c in containers {
                problems.push(Violation::new(
                    Invariant::Liveness,
                    format!(
                        "not converged: {} of deleted {deployment:?} still exists ({})",
                        c.spec.name, c.state
                    ),
                ));
            }
        }
    }
    for (deployment, (revision, value)) in view.desired {
        let outlook = outlook(&String::from_utf8_lossy(value));
        let score = PodmanV0Score::from_json(value).ok();
        let state = states.get(deployment);
        let containers = by_deployment
            .get(deployment.as_str())
            .cloned()
            .unwrap_or_default();
        let mut found = Vec::new();
        let mut services: BTreeMap<&str, Vec<&FakeContainer>> = BTreeMap::new();
        for c in containers {
            if c.spec.labels.contains_key(LABEL_INIT) {
                // A revision that cannot succeed (or that crash-loops) may be
                // at another attempt: an init container it created within
                // the longest init timeout the plans use is still at work.
                let created = created_at(view.fake, &c.id);
                let at_work = outlook != Outlook::Succeeds
                    && created.is_some_and(|at| view.now.saturating_since(at) < INIT_AT_WORK);
                if !at_work {
                    found.push(format!(
                        "init container {} of {deployment} left behind ({}, created at {})",
                        c.spec.name,
                        c.state,
                        created.map_or("?".to_owned(), |t| t.to_string())
                    ));
                }
            } else {
                let service = c.spec.labels.get(LABEL_SERVICE).map_or("", String::as_str);
                services.entry(service).or_default().push(c);
            }
        }
        for (service, cs) in &services {
            if cs.len() > 1 {
                found.push(format!(
                    "{} containers for service {deployment}/{service}",
                    cs.len()
                ));
            }
        }
        // What runs once a job reports its end: nothing.
        let ended = state.is_some_and(|s| s.revision == *revision && has_ended(s));
        match (outlook, &score) {
            (Outlook::Succeeds | Outlook::CrashLoops | Outlook::RunsOnce, Some(score)) => {
                for s in &score.services {
                    let wanted =
                        service_container_spec(deployment, score, s, Revision::new(*revision));
                    match services.get(s.name.as_str()).and_then(|cs| cs.first()) {
                        // A job between two attempts may have none yet.
                        None if outlook == Outlook::RunsOnce && !ended => {}
                        None => found.push(format!("service {deployment}/{} has no container", s.name)),
                        Some(c) if !same_program(&c.spec, &wanted) => found.push(format!(
                            "{} ({}) does not run what revision {revision} asks for: image {} env {:?}",
                            c.spec.name, c.id, c.spec.image, c.spec.env
                        )),
                        Some(c) if outlook == Outlook::Succeeds && !view.fake.is_running(&c.id) => {
                            found.push(format!("{} ({}) is {}", c.spec.name, c.id, c.state));
                        }
                        Some(c) if ended && view.fake.is_running(&c.id) => found.push(format!(
                            "{} ({}) of a job that reports its end is {}",
                            c.spec.name, c.id, c.state
                        )),
                        Some(_) => {}
                    }
                }
                for service in services.keys() {
                    if !score.services.iter().any(|s| s.name == *service) {
                        found.push(format!(
                            "a container of {deployment}/{service}, which revision {revision} does not have, is left behind"
                        ));
                    }
                }
            }
            (Outlook::Verifies, _) => {
                for service in services.keys() {
                    found.push(format!(
                        "a container of {deployment}/{service} is left behind, though revision {revision} is no_launch"
                    ));
                }
            }
            _ => {}
        }
        // A no_launch score is Running exactly when every container it
        // names runs the score's image, as the oracle sees it.
        let verified = score.as_ref().is_some_and(|score| {
            score
                .services
                .iter()
                .all(|s| verified_running(view.fake, s).is_some())
        });
        let report_ok = state.is_some_and(|s| {
            // Failed with a cause, or between two attempts a retry under way.
            let failed_or_retrying = (s.phase == Phase::Failed && s.cause.is_some())
                || (s.phase == Phase::Pending && s.attempt > 1);
            s.revision == *revision
                && match outlook {
                    Outlook::Succeeds => s.phase == Phase::Running,
                    Outlook::CrashLoops => {
                        s.phase == Phase::Running
                            || matches!(s.cause, Some(FailureCause::CrashLoop { .. }))
                    }
                    Outlook::Fails => failed_or_retrying,
                    Outlook::RunsOnce => s.phase == Phase::Succeeded || failed_or_retrying,
                    Outlook::Verifies if verified => s.phase == Phase::Running,
                    Outlook::Verifies => {
                        s.phase == Phase::Failed
                            && matches!(s.cause, Some(FailureCause::Unverified { .. }))
                    }
                }
        });
        match (state, report_ok) {
            // A summary leaves the ids out by design (the full report was
            // over the bucket's limit): its phase and revision are checked.
            (Some(s), true) if !s.summarised => {
                if let Ok(name) = DeploymentName::new(deployment.as_str()) {
                    let mut untrue = Vec::new();
                    view.oracle
                        .check_report(Timestamp::ZERO, &name, s, view.fake, &mut untrue);
                    found.extend(untrue.iter().map(Violation::to_string));
                }
            }
            (_, true) => {}
            (state, false) => found.push(format!(
                "{deployment} (revision {revision}, {outlook:?}) reports {}",
                state.map_or("nothing".to_owned(), brief)
            )),
        }
        // What converged must now stay still: a service that runs, a job
        // that ended, a verification (which touches nothing, ever).
        let still = match outlook {
            Outlook::Succeeds | Outlook::Verifies => true,
            Outlook::RunsOnce => ended,
            Outlook::Fails | Outlook::CrashLoops => false,
        };
        if found.is_empty() && still {
            running.push(deployment.clone());
        }
        problems.extend(
            found
                .into_iter()
                .map(|p| Violation::new(Invariant::Liveness, format!("not converged: {p}"))),
        );
    }
    for key in states.keys() {
        if !view.desired.contains_key(key) {
            problems.push(Violation::new(
                Invariant::Liveness,
                format!("not converged: {key} is deleted but still has a reported state"),
            ));
        }
    }
    for (deployment, state) in &states {
        let desired = view.desired.get(deployment).map(|(_, v)| v.as_slice());
        check_report_fields(view, deployment, state, desired, &mut problems);
    }
    if let Some(published) = view.published {
        let keys: BTreeSet<&String> = states.keys().chain(published.keys()).collect();
        for key in keys {
            let stored = states.get(key);
            let handed = published.get(key);
            if stored == handed.and_then(|h| h.state.as_ref()) {
                continue;
            }
            // A first attempt still on its way is not a difference yet.
            let fate = match handed.map(|h| &h.delivery) {
                Some(Delivery::InFlight {
                    since,
                    retry: false,
                }) if view.now.saturating_since(*since) < ACK_TIMEOUT => continue,
                Some(Delivery::InFlight { retry: true, .. }) => {
                    ", whose write failed before and is being retried".to_owned()
                }
                Some(Delivery::InFlight { .. }) => ", whose write was never answered".to_owned(),
                Some(Delivery::Failed(reason)) => format!(", whose write failed: {reason}"),
                Some(Delivery::Stored) | None => String::new(),
            };
            problems.push(Violation::new(
                Invariant::TruthfulReports,
                format!(
                    "{key}: the broker holds {} but the agent last handed its publisher {}{fate}",
                    stored.map_or("nothing".to_owned(), brief),
                    handed.map_or("nothing".to_owned(), |h| h
                        .state
                        .as_ref()
                        .map_or("a clear".to_owned(), brief)),
                ),
            ));
        }
    }
    (problems, running)
}

/// Truthful reports, every field of a stored report (`desired`: the
/// deployment's desired value, if it has one): a non-empty message; a
/// cause exactly when Failed; attempt 1 or more for a failed attempt at a
/// revision; container ids that exist and run (a crash loop's may have
/// exited since), each the container of its service (for a `no_launch`
/// score, the container it names); restart counts and exit codes the
/// runtime's history bears out: a restart needs an exit, a reported exit
/// code was some container's, and the agent cannot have counted more
/// restarts since it started than its containers exited (plus one exit
/// from before the start) plus runtime operations failed; a job's exit
/// code was one its service's containers exited with.
pub fn check_report_fields(
    view: &DeviceView<'_>,
    deployment: &str,
    s: &DeploymentState,
    desired: Option<&[u8]>,
    problems: &mut Vec<Violation>,
) {
    let crash_loops =
        desired.is_some_and(|v| outlook(&String::from_utf8_lossy(v)) == Outlook::CrashLoops);
    let score = desired.and_then(|v| PodmanV0Score::from_json(v).ok());
    // The container a service's id must name: a no_launch service's is the
    // one it verifies, any other the one podfleet creates for it.
    let container_of = |service: &str| match &score {
        Some(score) if score.lifetime() == Lifetime::NoLaunch => score
            .services
            .iter()
            .find(|s| s.name == service)
            .map(|s| s.container_name().to_owned())
            .unwrap_or_default(),
        _ => service_container_name(deployment, service),
    };
    let mut bad = |p: String| {
        problems.push(Violation::new(
            Invariant::TruthfulReports,
            format!("{deployment}: {p}"),
        ));
    };
    if s.message.trim().is_empty() {
        bad(format!("{:?} report with an empty message", s.phase));
    }
    match (s.phase, &s.cause) {
        (Phase::Failed, None) => bad("Failed without a cause".to_owned()),
        (Phase::Running | Phase::Pending, Some(cause)) => {
            bad(format!("{:?} with a cause, {cause:?}", s.phase));
        }
        _ => {}
    }
    let failed_attempt = matches!(
        s.cause,
        Some(
            FailureCause::InitContainerExited { .. }
                | FailureCause::InitContainerTimedOut { .. }
                | FailureCause::StillRunningAfterWait { .. }
                | FailureCause::Runtime { .. }
                | FailureCause::ImagePull { .. }
        )
    );
    if failed_attempt && s.attempt == 0 {
        bad(format!(
            "a failed attempt at revision {} reported as attempt 0",
            s.revision
        ));
    }
    let fake = view.fake;
    for (service, id) in &s.container_ids {
        match fake.containers().get(id) {
            None => bad(format!("names {service}={id}, which does not exist")),
            Some(c) if c.spec.name != container_of(service.as_str()) => {
                bad(format!("names {service}={id}, which is {}", c.spec.name));
            }
            Some(c) if !crash_loops && !fake.is_running(id) => {
                bad(format!("names {service}={id}, which is {}", c.state));
            }
            Some(_) => {}
        }
    }
    let events = fake.events();
    for (service, record) in &s.restarts {
        let exits = exits_of(events, &service_container_name(deployment, service));
        if record.count > 0 && exits.is_empty() {
            bad(format!(
                "reports {} restarts of {service}, whose containers never exited",
                record.count
            ));
        }
        if let Some(code) = record.last_exit_code {
            if !exits.iter().any(|(_, c)| *c == code) {
                bad(format!(
                    "reports that {service} last exited with code {code}, which none of its containers did"
                ));
            }
        }
        let since = exits
            .iter()
            .filter(|(i, _)| *i >= view.epoch.events)
            .count() as u64;
        if u64::from(record.count) > 1 + since + view.epoch.errors {
            bad(format!(
                "reports {} restarts of {service}, but since the agent started its containers exited {since} times and {} runtime operations failed",
                record.count, view.epoch.errors
            ));
        }
    }
    for (service, code) in &s.exit_codes {
        let exits = exits_of(events, &service_container_name(deployment, service));
        if !exits.iter().any(|(_, c)| c == code) {
            bad(format!(
                "reports that {service} exited with code {code}, which none of its containers did"
            ));
        }
    }
}

/// Every exit of a container named `name`, as (event index, exit code).
fn exits_of(events: &[(Timestamp, RuntimeEvent)], name: &str) -> Vec<(usize, i64)> {
    let ids: BTreeSet<&str> = events
        .iter()
        .filter_map(|(_, e)| match e {
            RuntimeEvent::Created { id, spec } if spec.name == name => Some(id.as_str()),
            _ => None,
        })
        .collect();
    events
        .iter()
        .enumerate()
        .filter_map(|(i, (_, e))| match e {
            RuntimeEvent::Exited { id, code } if ids.contains(id.as_str()) => Some((i, *code)),
            _ => None,
        })
        .collect()
}

/// Whether a report says its job is over: Succeeded, or a run that
/// failed (a `per_run` revision is never run again).
fn has_ended(s: &DeploymentState) -> bool {
    s.phase == Phase::Succeeded || matches!(s.cause, Some(FailureCause::RunFailed { .. }))
}

/// How long an init container may be at work before it counts as left
/// behind: the longest init timeout the plans use (30 s), plus slack.
const INIT_AT_WORK: Duration = Duration::from_secs(40);

/// When the fake created container `id`.
fn created_at(fake: &FakeRuntime, id: &str) -> Option<Timestamp> {
    fake.events().iter().rev().find_map(|(at, e)| match e {
        RuntimeEvent::Created { id: created, .. } if created == id => Some(*at),
        _ => None,
    })
}

/// Whether two specs run the same program: everything but the labels.
fn same_program(a: &ContainerSpec, b: &ContainerSpec) -> bool {
    a.name == b.name
        && a.image == b.image
        && a.args == b.args
        && a.env == b.env
        && a.volumes == b.volumes
        && a.ports == b.ports
        && a.stop_signal == b.stop_signal
}

/// A report in a few words (its message cut short), for violations.
fn brief(s: &DeploymentState) -> String {
    let mut message: String = s.message.chars().take(120).collect();
    if message.len() < s.message.len() {
        message.push_str("...");
    }
    format!(
        "{:?} rev {} attempt {} ids {:?} restarts {:?} {message:?}",
        s.phase, s.revision, s.attempt, s.container_ids, s.restarts
    )
}
