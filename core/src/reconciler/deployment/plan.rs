//! Planning: from what runs to the steps of a job. Pure functions of the
//! target, what was observed and the runtime's list; table-tested below.

use std::collections::{BTreeMap, BTreeSet};

use super::{Call, Observed, Step, Target};
use crate::reconciler::spec::{init_container_spec, service_container_spec};
use crate::reconciler::Config;
use crate::runtime::{
    init_container_name, service_container_name, ContainerState, ContainerSummary, LABEL_INIT,
    LABEL_SERVICE,
};
use crate::wire::{DeploymentName, Lifetime, PullPolicy, ServiceName};

/// The rollout of `target` for deployment `name`, given its containers in
/// the runtime (`mine`) and its service containers among them (`observed`):
///
/// 0. every image a container is about to be created from is made present,
///    as its pull policy says, before anything else ("download, then
///    kill": a pull that fails stops nothing);
/// 1. leftover init containers are removed;
/// 2. if any service container must be (re)created, the init containers
///    run first, one at a time, in order;
/// 3. containers of services the target no longer has are retired;
/// 4. each service: kept if its spec hash matches (started if it is not
///    running), otherwise stopped gracefully, removed and created anew;
/// 5. the target is then applied.
pub(super) fn rollout(
    name: &DeploymentName,
    target: &Target,
    observed: &BTreeMap<ServiceName, Observed>,
    mine: &[&ContainerSummary],
    config: &Config,
) -> Vec<Step> {
    let expected: BTreeSet<String> = target
        .score
        .services
        .iter()
        .map(|s| service_container_name(name.as_str(), &s.name))
        .collect();
    let mut cleanup = Vec::new();
    let mut drops = Vec::new();
    for c in mine {
        if c.label(LABEL_INIT).is_some() {
            cleanup.push(Step::Call(Call::RemoveIfPresent {
                container: c.id.clone(),
            }));
        } else if !expected.contains(&c.name) {
            retire(c, &mut drops);
        }
    }
    let per_run = target.score.lifetime() == Lifetime::PerRun;
    // A `per_run` container is this revision's run only when it was created
    // for a revision that put this very spec.
    let this_run = |o: &Observed| {
        !per_run
            || o.revision
                .is_some_and(|r| (target.since.get()..=target.revision.get()).contains(&r))
    };
    let mut services = Vec::new();
    let mut waits = Vec::new();
    let mut recreates = false;
    let mut images = Images::default();
    for service in &target.score.services {
        let hash = target.hashes.get(&service.name);
        // A container known not to be provisioned is never adopted.
        let adopts_unprovisioned = bug!(config, trust_unprovisioned);
        let kept = |o: &&Observed| {
            o.spec_hash.as_ref() == hash
                && this_run(o)
                && (!o.unprovisioned || adopts_unprovisioned)
                && !bug!(config, recreate_on_tick)
        };
        let needs_image = observed.get(&service.name).filter(kept).is_none();
        if needs_image && !bug!(config, pull_after_stop) {
            images.add(&service.image, service.pull_policy());
        }
        let first_step = services.len();
        let spec =
            || service_container_spec(name.as_str(), &target.score, service, target.revision);
        match observed.get(&service.name) {
            Some(o) if kept(&o) && per_run => {
                // This revision's run, under way or over: never a second
                // one. Waits come after every start, so the services of a
                // run run side by side.
                let (service, id) = (service.name.clone(), o.id.clone());
                match o.state {
                    ContainerState::Created => {
                        services.push(Step::Call(Call::StartService { service, id }));
                    }
                    ContainerState::Exited => waits.push(Step::Call(Call::InspectRun {
                        service,
                        id,
                        retried: true,
                    })),
                    _ => waits.push(Step::Call(Call::WaitRun {
                        service,
                        id,
                        retried: false,
                    })),
                }
            }
            Some(o) if kept(&o) => {
                if o.state != ContainerState::Running {
                    services.push(Step::Call(Call::StartService {
                        service: service.name.clone(),
                        id: o.id.clone(),
                    }));
                }
            }
            Some(o) => {
                recreates = true;
                if still_up(o.state) && !bug!(config, skip_graceful_stop) {
                    services.push(Step::Call(Call::Stop {
                        service: service.name.clone(),
                        id: o.id.clone(),
                        signal: o.signal,
                        grace: o.grace,
                    }));
                }
                let remove = Step::Call(Call::RemoveService {
                    service: service.name.clone(),
                    id: o.id.clone(),
                });
                if bug!(config, create_before_remove) {
                    // The new container gets a second name, so the old and
                    // the new one coexist.
                    let mut spec = spec();
                    spec.name.push_str("-next");
                    services.push(Step::Call(Call::CreateService {
                        service: service.name.clone(),
                        spec,
                    }));
                    services.push(remove);
                } else {
                    services.push(remove);
                    services.push(Step::Call(Call::CreateService {
                        service: service.name.clone(),
                        spec: spec(),
                    }));
                }
            }
            None => {
                recreates = true;
                services.push(Step::Call(Call::CreateService {
                    service: service.name.clone(),
                    spec: spec(),
                }));
            }
        }
        if needs_image && bug!(config, pull_after_stop) {
            let create = services[first_step..]
                .iter()
                .position(|s| matches!(s, Step::Call(Call::CreateService { .. })))
                .map_or(services.len(), |i| first_step + i);
            services.insert(create, ensure(&service.image, service.pull_policy()));
        }
    }
    if recreates && !bug!(config, skip_init_containers) {
        for init in &target.score.init_containers {
            images.add(&init.image, init.pull_policy());
        }
    }
    let mut steps = images.steps();
    steps.extend(cleanup);
    if recreates && !bug!(config, skip_init_containers) {
        for (index, init) in target.score.init_containers.iter().enumerate() {
            steps.push(Step::Call(Call::RemoveIfPresent {
                container: init_container_name(name.as_str(), &init.name),
            }));
            steps.push(Step::Call(Call::CreateInit {
                index,
                spec: init_container_spec(name.as_str(), init, target.revision),
            }));
        }
    }
    steps.extend(drops);
    steps.extend(services);
    steps.extend(waits);
    steps.push(Step::Finish);
    steps
}

/// The images a rollout makes present, each once, in first-use order.
#[derive(Default)]
struct Images(Vec<(String, PullPolicy)>);

impl Images {
    /// Adds `image`; named twice with different policies, the one that
    /// pulls more often wins (`always`, then `if_not_present`, then `never`).
    fn add(&mut self, image: &str, policy: PullPolicy) {
        let rank = |p: PullPolicy| match p {
            PullPolicy::Never => 0,
            PullPolicy::IfNotPresent => 1,
            PullPolicy::Always => 2,
        };
        match self.0.iter_mut().find(|(i, _)| i == image) {
            Some((_, held)) if rank(policy) > rank(*held) => *held = policy,
            Some(_) => {}
            None => self.0.push((image.to_owned(), policy)),
        }
    }

    fn steps(self) -> Vec<Step> {
        self.0
            .into_iter()
            .map(|(image, policy)| ensure(&image, policy))
            .collect()
    }
}

/// Makes sure `image` is in the store, as `policy` says, before a create.
pub(super) fn ensure(image: &str, policy: PullPolicy) -> Step {
    Step::EnsureImage {
        image: image.to_owned(),
        policy,
    }
}

/// The teardown of every container in `mine`, then forgetting the
/// deployment.
pub(super) fn teardown(mine: &[&ContainerSummary]) -> Vec<Step> {
    let mut steps = retire_all(mine);
    steps.push(Step::Forget);
    steps
}

/// Stopping (gracefully) and removing every container in `mine`.
pub(super) fn retire_all(mine: &[&ContainerSummary]) -> Vec<Step> {
    let mut steps = Vec::new();
    for c in mine {
        retire(c, &mut steps);
    }
    steps
}

/// Whether a container still has a process to stop gracefully. One already
/// stopping (say, when an agent restarted mid-stop) is stopped again with
/// its signal and grace rather than removed by force under its feet.
fn still_up(state: ContainerState) -> bool {
    matches!(state, ContainerState::Running | ContainerState::Stopping)
}

/// Steps that take `c` out of service: a graceful stop with its own signal
/// and grace when it is up (init containers are just removed), then removal.
fn retire(c: &ContainerSummary, steps: &mut Vec<Step>) {
    let o = Observed::from_summary(c);
    let service = ServiceName::from(c.label(LABEL_SERVICE).unwrap_or(&c.name));
    if still_up(c.state) && c.label(LABEL_INIT).is_none() {
        steps.push(Step::Call(Call::Stop {
            service: service.clone(),
            id: c.id.clone(),
            signal: o.signal,
            grace: o.grace,
        }));
    }
    steps.push(Step::Call(Call::RemoveService {
        service,
        id: c.id.clone(),
    }));
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::reconciler::spec::service_spec_hash;
    use crate::runtime::{LABEL_DEPLOYMENT, LABEL_GRACE, LABEL_SPEC_HASH, LABEL_STOP_SIGNAL};
    use crate::wire::{DeviceId, PodmanV0Score, Revision, Signal};

    fn name() -> DeploymentName {
        DeploymentName::new("web").expect("valid")
    }

    fn target(json: &str) -> Target {
        let score = PodmanV0Score::from_json(json.as_bytes()).expect("valid score");
        Target::new(Revision::new(7), json.as_bytes().to_vec(), score)
    }

    const ONE: &str = r#"{"services":[{"name":"app","image":"img/a:1"}]}"#;
    const ONE_V2: &str = r#"{"services":[{"name":"app","image":"img/a:2"}]}"#;
    const WITH_INIT: &str = r#"{"init_containers":[{"name":"migrate","image":"img/m:1"}],"services":[{"name":"app","image":"img/a:1"}]}"#;

    fn config() -> Config {
        Config::new(DeviceId::new("pi").expect("valid"), "test")
    }

    /// The service container of `app` as the runtime lists it.
    fn app(state: ContainerState, json: &str) -> ContainerSummary {
        let t = target(json);
        let service = &t.score.services[0];
        ContainerSummary {
            id: "c-app".into(),
            name: service_container_name("web", "app"),
            state,
            labels: BTreeMap::from([
                (LABEL_DEPLOYMENT.into(), "web".into()),
                (LABEL_SERVICE.into(), "app".into()),
                (LABEL_SPEC_HASH.into(), service_spec_hash(&t.score, service)),
                (LABEL_STOP_SIGNAL.into(), "SIGINT".into()),
                (LABEL_GRACE.into(), "3".into()),
            ]),
        }
    }

    fn stray(name: &str, service: &str, state: ContainerState, init: bool) -> ContainerSummary {
        let mut labels = BTreeMap::from([
            (LABEL_DEPLOYMENT.to_owned(), "web".to_owned()),
            (LABEL_SERVICE.to_owned(), service.to_owned()),
        ]);
        if init {
            labels.insert(LABEL_INIT.into(), "true".into());
        }
        ContainerSummary {
            id: format!("c-{name}"),
            name: name.into(),
            state,
            labels,
        }
    }

    /// The plan in words, one word per step, for compact tables.
    fn words(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .map(|step| match step {
                Step::Call(Call::RemoveIfPresent { container }) => format!("remove? {container}"),
                Step::Call(Call::CreateInit { index, .. }) => format!("init {index}"),
                Step::Call(Call::Stop {
                    id, signal, grace, ..
                }) => {
                    format!("stop {id} {signal} {}s", grace.as_secs())
                }
                Step::Call(Call::RemoveService { id, .. }) => format!("remove {id}"),
                Step::Call(Call::CreateService { service, spec }) => {
                    format!("create {service} as {}", spec.name)
                }
                Step::Call(Call::StartService { id, .. }) => format!("start {id}"),
                Step::EnsureImage { image, policy } => format!("image {image} {}", policy.as_str()),
                Step::Finish => "finish".into(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    fn plan(json: &str, runs: &[ContainerSummary]) -> Vec<String> {
        let t = target(json);
        let mine: Vec<&ContainerSummary> = runs.iter().collect();
        let observed = runs
            .iter()
            .filter(|c| {
                c.label(LABEL_INIT).is_none() && c.name == service_container_name("web", "app")
            })
            .map(|c| (ServiceName::from("app"), Observed::from_summary(c)))
            .collect();
        words(&rollout(&name(), &t, &observed, &mine, &config()))
    }

    #[test]
    fn rollout_plans() {
        let app_name = service_container_name("web", "app");
        let init_name = init_container_name("web", "migrate");
        let cases: Vec<(&str, &str, Vec<ContainerSummary>, Vec<String>)> = vec![
            (
                "nothing runs: the image, then create",
                ONE,
                vec![],
                vec![
                    "image img/a:1 if_not_present".into(),
                    format!("create app as {app_name}"),
                    "finish".into(),
                ],
            ),
            (
                "the same spec runs: nothing to do, no image looked up",
                ONE,
                vec![app(ContainerState::Running, ONE)],
                vec!["finish".into()],
            ),
            (
                "the same spec exited: start it, no init containers, no image",
                WITH_INIT,
                vec![app(ContainerState::Exited, WITH_INIT)],
                vec!["start c-app".into(), "finish".into()],
            ),
            (
                "a changed spec: the new image first, then graceful stop with the old container's signal and grace, remove, create",
                ONE_V2,
                vec![app(ContainerState::Running, ONE)],
                vec![
                    "image img/a:2 if_not_present".into(),
                    "stop c-app SIGINT 3s".into(),
                    "remove c-app".into(),
                    format!("create app as {app_name}"),
                    "finish".into(),
                ],
            ),
            (
                "a container caught mid-stop is stopped again, not killed",
                ONE_V2,
                vec![app(ContainerState::Stopping, ONE)],
                vec![
                    "image img/a:2 if_not_present".into(),
                    "stop c-app SIGINT 3s".into(),
                    "remove c-app".into(),
                    format!("create app as {app_name}"),
                    "finish".into(),
                ],
            ),
            (
                "an exited container of a changed spec is removed without a stop",
                ONE_V2,
                vec![app(ContainerState::Exited, ONE)],
                vec![
                    "image img/a:2 if_not_present".into(),
                    "remove c-app".into(),
                    format!("create app as {app_name}"),
                    "finish".into(),
                ],
            ),
            (
                "a recreate runs the init containers first; every image before anything",
                WITH_INIT,
                vec![],
                vec![
                    "image img/a:1 if_not_present".into(),
                    "image img/m:1 if_not_present".into(),
                    format!("remove? {init_name}"),
                    "init 0".into(),
                    format!("create app as {app_name}"),
                    "finish".into(),
                ],
            ),
            (
                "a leftover init container goes first; a dropped service is retired",
                ONE,
                vec![
                    app(ContainerState::Running, ONE),
                    stray(&init_name, "migrate", ContainerState::Exited, true),
                    stray("web-old", "old", ContainerState::Running, false),
                ],
                vec![
                    format!("remove? c-{init_name}"),
                    "stop c-web-old SIGTERM 30s".into(),
                    "remove c-web-old".into(),
                    "finish".into(),
                ],
            ),
            (
                "pull policies: set, or the image's default; one image named twice is pulled once, by the policy that pulls more",
                r#"{"services":[{"name":"app","image":"img/a"},
                               {"name":"b","image":"img/b:1","pull_policy":"never"},
                               {"name":"c","image":"img/b:1","pull_policy":"always"},
                               {"name":"d","image":"img/d@sha256:0123"},
                               {"name":"e","image":"img/e:latest","pull_policy":"if_not_present"}]}"#,
                vec![],
                vec![
                    "image img/a always".into(),
                    "image img/b:1 always".into(),
                    "image img/d@sha256:0123 if_not_present".into(),
                    "image img/e:latest if_not_present".into(),
                    format!("create app as {app_name}"),
                    "create b as web_b".into(),
                    "create c as web_c".into(),
                    "create d as web_d".into(),
                    "create e as web_e".into(),
                    "finish".into(),
                ],
            ),
        ];
        for (what, json, runs, want) in cases {
            assert_eq!(plan(json, &runs), want, "{what}");
        }
    }

    #[test]
    fn teardown_stops_what_runs_and_removes_everything() {
        let init_name = init_container_name("web", "migrate");
        let runs = [
            app(ContainerState::Running, ONE),
            stray(&init_name, "migrate", ContainerState::Running, true),
        ];
        let mine: Vec<&ContainerSummary> = runs.iter().collect();
        let steps = teardown(&mine);
        let want = vec![
            Step::Call(Call::Stop {
                service: "app".into(),
                id: "c-app".into(),
                signal: Signal::Int,
                grace: Duration::from_secs(3),
            }),
            Step::Call(Call::RemoveService {
                service: "app".into(),
                id: "c-app".into(),
            }),
            Step::Call(Call::RemoveService {
                service: "migrate".into(),
                id: format!("c-{init_name}"),
            }),
            Step::Forget,
        ];
        assert_eq!(steps, want);
    }
}
