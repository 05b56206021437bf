//! The liveness phase's checks bite: each plants one wrong thing in an
//! otherwise converged device (a container left behind, a report field that
//! lies) and feeds it to [`sim::world::check_device`], the check both the
//! network tiers and the discrete tier run once faults have healed.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use podfleet_core::reconciler::{init_container_spec, service_container_spec};
use podfleet_core::runtime::{ContainerSpec, RuntimeOp, LABEL_SERVICE};
use podfleet_core::time::Timestamp;
use podfleet_core::wire::{
    DeploymentState, FailureCause, Phase, PodmanV0Score, RestartRecord, Revision, ServiceName,
    VerifiedStatus,
};
use podfleet_testkit::{base_system, FakeRuntime, Oracle};
use sim::world::{check_device, Delivery, DeviceView, Epoch, Handed};

const SHOP: &str = r#"{"services":[{"name":"web","image":"img/app:1"},{"name":"db","image":"img/app:2"}],"init_containers":[{"name":"migrate","image":"img/init-ok:1"}]}"#;
const CAM_BAD: &str = r#"{"services":[{"name":"web","image":"img/app:1"}],"init_containers":[{"name":"bad","image":"img/init-fail:1","timeout":5}]}"#;
/// Verifies the base system's proxy, which runs img/a:1.
const EDGE: &str = r#"{"lifetime":"no_launch","services":[{"name":"web","image":"img/a:1","container":"base_proxy"}]}"#;
/// A job that ran once.
const JOB: &str = r#"{"lifetime":"per_run","services":[{"name":"web","image":"img/init-ok:1"}]}"#;
/// When the checks run: an hour after the device converged.
const NOW: Timestamp = Timestamp::from_millis(3_600_000);

fn before_now(secs: u64) -> Timestamp {
    Timestamp::from_millis(NOW.as_millis() - secs * 1000)
}

fn score(json: &str) -> PodmanV0Score {
    PodmanV0Score::from_json(json.as_bytes()).unwrap()
}

fn service(deployment: &str, json: &str, index: usize, revision: u64) -> ContainerSpec {
    let s = score(json);
    service_container_spec(deployment, &s, &s.services[index], Revision::new(revision))
}

/// A converged device: shop runs revision 3 (after its init container),
/// cam's doomed revision 4 failed and left cam/web of an earlier revision
/// running; relay is deleted and gone; edge verifies the base system's
/// proxy, which runs; job's run of revision 2 exited 0.
struct World {
    fake: FakeRuntime,
    oracle: Oracle,
    desired: BTreeMap<String, (u64, Vec<u8>)>,
    states: BTreeMap<String, DeploymentState>,
    epoch: Epoch,
    handed: Option<BTreeMap<String, Handed>>,
}

impl World {
    fn converged() -> World {
        let mut fake = FakeRuntime::new();
        base_system::install(&mut fake);
        let mut oracle = Oracle::default();
        oracle.saw_put("shop", 3, SHOP.as_bytes());
        oracle.saw_put("cam", 4, CAM_BAD.as_bytes());
        oracle.saw_put("edge", 1, EDGE.as_bytes());
        oracle.saw_put("job", 2, JOB.as_bytes());
        let mut start = |spec| {
            let id = fake.create_quietly(spec);
            fake.execute(&RuntimeOp::Start {
                container: id.clone(),
            });
            id
        };
        let web = start(service("shop", SHOP, 0, 3));
        let db = start(service("shop", SHOP, 1, 3));
        let cam = start(service("cam", CAM_BAD, 0, 2));
        let job = start(service("job", JOB, 0, 2));
        fake.crash(Timestamp::ZERO, &job, 0);
        let proxy = fake.by_name(base_system::PROXY).unwrap().id.clone();
        let running =
            |phase, revision, ids: &[(&str, &String)], message: &str, cause| DeploymentState {
                phase,
                revision,
                container_ids: ids
                    .iter()
                    .map(|(s, id)| (ServiceName::from(*s), (*id).clone()))
                    .collect(),
                message: message.into(),
                cause,
                attempt: 1,
                image_digests: BTreeMap::new(),
                exit_codes: BTreeMap::new(),
                verified: BTreeMap::new(),
                restarts: BTreeMap::new(),
                summarised: false,
            };
        let states = BTreeMap::from([
            (
                "shop".to_owned(),
                running(
                    Phase::Running,
                    Revision::new(3),
                    &[("web", &web), ("db", &db)],
                    "1 init container completed, 2 services running",
                    None,
                ),
            ),
            (
                "cam".to_owned(),
                running(
                    Phase::Failed,
                    Revision::new(4),
                    &[("web", &cam)],
                    "attempt 1 at revision 4 failed: init container \"bad\" exited with code 5; retrying",
                    Some(FailureCause::InitContainerExited {
                        name: "bad".into(),
                        exit_code: 5,
                    }),
                ),
            ),
            (
                "edge".to_owned(),
                running(
                    Phase::Running,
                    Revision::new(1),
                    &[("web", &proxy)],
                    "1 container verified running (no_launch)",
                    None,
                ),
            ),
            (
                "job".to_owned(),
                DeploymentState {
                    exit_codes: BTreeMap::from([(ServiceName::from("web"), 0)]),
                    ..running(
                        Phase::Succeeded,
                        Revision::new(2),
                        &[],
                        "1 service ran to completion",
                        None,
                    )
                },
            ),
        ]);
        World {
            fake,
            oracle,
            desired: BTreeMap::from([
                ("shop".to_owned(), (3, SHOP.as_bytes().to_vec())),
                ("cam".to_owned(), (4, CAM_BAD.as_bytes().to_vec())),
                ("edge".to_owned(), (1, EDGE.as_bytes().to_vec())),
                ("job".to_owned(), (2, JOB.as_bytes().to_vec())),
            ]),
            states,
            epoch: Epoch::default(),
            handed: None,
        }
    }

    fn problems(&self) -> Vec<String> {
        let stored = self
            .states
            .iter()
            .map(|(d, s)| (d.clone(), serde_json::to_vec(s).unwrap()))
            .collect();
        check_device(&DeviceView {
            desired: &self.desired,
            stored: &stored,
            published: self.handed.as_ref(),
            fake: &self.fake,
            oracle: &self.oracle,
            epoch: self.epoch,
            now: NOW,
        })
        .0
        .iter()
        .map(ToString::to_string)
        .collect()
    }

    /// Creates `spec` at the fake's time (an hour before the check, unless
    /// advanced), and leaves it as it is.
    fn plant(&mut self, spec: ContainerSpec) -> String {
        self.fake.create_quietly(spec)
    }

    fn state(&mut self, deployment: &str) -> &mut DeploymentState {
        self.states.get_mut(deployment).unwrap()
    }
}

#[track_caller]
fn bites(world: &World, wanted: &str) {
    let problems = world.problems();
    assert!(
        problems.iter().any(|p| p.contains(wanted)),
        "expected {wanted:?} among {problems:#?}"
    );
}

#[test]
fn a_converged_device_has_no_problems() {
    let world = World::converged();
    assert_eq!(world.problems(), Vec::<String>::new());
    let (_, running) = check_device(&DeviceView {
        desired: &world.desired,
        stored: &BTreeMap::new(),
        published: None,
        fake: &world.fake,
        oracle: &world.oracle,
        epoch: world.epoch,
        now: NOW,
    });
    assert!(running.is_empty(), "nothing reported, nothing converged");
}

#[test]
fn nothing_is_left_behind_after_any_failure_timeout_or_teardown() {
    // A deleted deployment: nothing at all.
    let mut w = World::converged();
    w.plant(service("relay", SHOP, 0, 1));
    bites(&w, "relay_web of deleted \"relay\" still exists");

    // One that succeeds: no init container...
    let mut w = World::converged();
    let init = score(SHOP).init_containers[0].clone();
    w.plant(init_container_spec("shop", &init, Revision::new(3)));
    bites(&w, "init container shop_init_migrate of shop left behind");

    // ...no container of a service the score dropped...
    let mut w = World::converged();
    let mut dropped = service("shop", SHOP, 0, 2);
    dropped.name = "shop_worker".into();
    dropped.labels.insert(LABEL_SERVICE.into(), "worker".into());
    w.plant(dropped);
    bites(
        &w,
        "shop/worker, which revision 3 does not have, is left behind",
    );

    // ...exactly one container per service, running what the score says.
    let mut w = World::converged();
    let db = w.state("shop").container_ids["db"].clone();
    w.fake.execute(&RuntimeOp::Remove {
        container: db,
        force: true,
    });
    bites(&w, "service shop/db has no container");
    let mut w = World::converged();
    let mut twin = service("shop", SHOP, 0, 3);
    twin.name = "shop_web_2".into();
    w.plant(twin);
    bites(&w, "2 containers for service shop/web");
    let mut w = World::converged();
    let web = w.state("shop").container_ids["web"].clone();
    let wrong = w.fake.containers()[&web].spec.clone();
    w.fake.execute(&RuntimeOp::Remove {
        container: web,
        force: true,
    });
    let mut old = wrong;
    old.image = "img/app:0".into();
    w.plant(old);
    bites(&w, "does not run what revision 3 asks for");

    // A failed one (here a doomed init container): no init container left
    // once its attempt is over...
    let mut w = World::converged();
    let bad = score(CAM_BAD).init_containers[0].clone();
    w.plant(init_container_spec("cam", &bad, Revision::new(4)));
    bites(&w, "init container cam_init_bad of cam left behind");
    // ...(while an attempt under way may have one at work)...
    let mut w = World::converged();
    w.fake.advance(before_now(10));
    w.plant(init_container_spec("cam", &bad, Revision::new(4)));
    assert_eq!(w.problems(), Vec::<String>::new());
    // ...and nothing beyond one container per service.
    let mut w = World::converged();
    let mut twin = service("cam", CAM_BAD, 0, 2);
    twin.name = "cam_web_old".into();
    w.plant(twin);
    bites(&w, "2 containers for service cam/web");
}

#[test]
fn every_field_of_a_stored_report_must_match_the_truth() {
    let mut w = World::converged();
    w.state("shop").message.clear();
    bites(
        &w,
        "truthful reports: shop: Running report with an empty message",
    );

    let mut w = World::converged();
    w.state("shop")
        .container_ids
        .insert("db".into(), "0000deadbeef".into());
    bites(&w, "names db=0000deadbeef, which does not exist");

    let mut w = World::converged();
    let web = w.state("shop").container_ids["web"].clone();
    w.state("shop").container_ids.insert("db".into(), web);
    bites(&w, "which is shop_web");

    let mut w = World::converged();
    let cam = w.state("cam").container_ids["web"].clone();
    w.fake.crash(NOW, &cam, 1);
    bites(&w, &format!("names web={cam}, which is exited"));

    let mut w = World::converged();
    w.state("cam").attempt = 0;
    bites(&w, "a failed attempt at revision 4 reported as attempt 0");

    let mut w = World::converged();
    w.state("shop").phase = Phase::Failed;
    bites(&w, "Failed without a cause");

    // Restarts: a count needs exits, an exit code must be one that happened,
    // and the agent cannot have counted more than exits and errors allow.
    let restarts = |count, last_exit_code| {
        BTreeMap::from([(
            ServiceName::from("web"),
            RestartRecord {
                count,
                last_exit_code,
            },
        )])
    };
    let mut w = World::converged();
    w.state("shop").restarts = restarts(1, Some(1));
    bites(
        &w,
        "reports 1 restarts of web, whose containers never exited",
    );

    let mut w = World::converged();
    let web = w.state("shop").container_ids["web"].clone();
    w.fake.crash(NOW, &web, 2);
    w.fake.execute(&RuntimeOp::Start {
        container: web.clone(),
    });
    w.state("shop").restarts = restarts(1, Some(2));
    assert_eq!(w.problems(), Vec::<String>::new());
    w.state("shop").restarts = restarts(1, Some(7));
    bites(
        &w,
        "web last exited with code 7, which none of its containers did",
    );
    w.state("shop").restarts = restarts(3, Some(2));
    bites(&w, "reports 3 restarts of web, but since the agent started its containers exited 1 times and 0 runtime operations failed");
    w.epoch.errors = 1;
    w.state("shop").restarts = restarts(3, Some(2));
    assert_eq!(w.problems(), Vec::<String>::new());
    w.epoch = Epoch {
        events: w.fake.events().len(),
        errors: 0,
    };
    bites(&w, "exited 0 times");
}

#[test]
fn each_lifetime_is_held_to_what_it_promises() {
    // The base system's containers are not podfleet's: the converged
    // device has them, and no problem (the oracle proves at every
    // operation that nothing touches them).
    let w = World::converged();
    assert!(w.fake.by_name(base_system::VPN).is_some());
    assert_eq!(w.problems(), Vec::<String>::new());

    // no_launch: nothing of its own, ever...
    let mut w = World::converged();
    w.plant(service("edge", SHOP, 0, 1));
    bites(
        &w,
        "a container of edge/web is left behind, though revision 1 is no_launch",
    );
    // ...Running exactly when what it names runs the score's image...
    let mut w = World::converged();
    let proxy = w.state("edge").container_ids["web"].clone();
    w.fake.crash(NOW, &proxy, 0);
    bites(&w, "edge (revision 1, Verifies) reports Running");
    let mut w = World::converged();
    let edge = w.state("edge");
    edge.phase = Phase::Failed;
    edge.container_ids.clear();
    edge.cause = Some(FailureCause::Unverified {
        service: "web".into(),
        container: base_system::PROXY.into(),
        status: VerifiedStatus::Stopped,
        evidence: "exited with code 0".into(),
    });
    bites(&w, "edge (revision 1, Verifies) reports Failed");
    // ...with the id of the container it names.
    let mut w = World::converged();
    let vpn = w.fake.by_name(base_system::VPN).unwrap().id.clone();
    w.state("edge").container_ids.insert("web".into(), vpn);
    bites(&w, "names web=");
    bites(&w, "which is base_vpn");

    // per_run: the exit codes it reports are the ones its run had...
    let mut w = World::converged();
    w.state("job").exit_codes.insert("web".into(), 3);
    bites(
        &w,
        "reports that web exited with code 3, which none of its containers did",
    );
    // ...and a run that reports its end runs nothing.
    let mut w = World::converged();
    let job = w.fake.by_name("job_web").unwrap().id.clone();
    w.fake.execute(&RuntimeOp::Start { container: job });
    bites(&w, "of a job that reports its end is running");
    let mut w = World::converged();
    w.state("job").phase = Phase::Running;
    bites(&w, "job (revision 2, RunsOnce) reports Running");
}

#[test]
fn the_broker_must_hold_what_the_agent_last_handed_its_publisher() {
    let mut w = World::converged();
    let handed = |state: &DeploymentState, delivery| Handed {
        state: Some(state.clone()),
        delivery,
    };
    let cam = w.states["cam"].clone();
    let mut newer = cam.clone();
    newer.attempt = 2;
    newer.message =
        "attempt 2 at revision 4 failed: init container \"bad\" exited with code 5; retrying"
            .into();
    let mut published: BTreeMap<String, Handed> = w
        .states
        .iter()
        .map(|(d, s)| (d.clone(), handed(s, Delivery::Stored)))
        .collect();
    w.handed = Some(published.clone());
    assert_eq!(w.problems(), Vec::<String>::new());
    // A first attempt on its way is not a difference yet...
    let on_its_way = Delivery::InFlight {
        since: before_now(1),
        retry: false,
    };
    published.insert("cam".into(), handed(&newer, on_its_way));
    w.handed = Some(published.clone());
    assert_eq!(w.problems(), Vec::<String>::new());
    // ...a refused one is, and so is a retry of it, or one never answered.
    for delivery in [
        Delivery::Failed("maximum payload exceeded: 2000000 bytes, the limit is 1048576".into()),
        Delivery::InFlight {
            since: NOW,
            retry: true,
        },
        Delivery::InFlight {
            since: before_now(60),
            retry: false,
        },
    ] {
        published.insert("cam".into(), handed(&newer, delivery));
        w.handed = Some(published.clone());
        bites(
            &w,
            "truthful reports: cam: the broker holds Failed rev 4 attempt 1",
        );
    }
    // A clear the broker never got.
    published.insert(
        "cam".into(),
        Handed {
            state: None,
            delivery: Delivery::Failed("no acknowledgement".into()),
        },
    );
    w.handed = Some(published);
    bites(
        &w,
        "but the agent last handed its publisher a clear, whose write failed: no acknowledgement",
    );
}
