//! Images and pulls, driven by hand: the test answers each runtime
//! operation itself (a pull may fail, hang or never be answered), over a
//! small table of containers, and reads the order of the operations.

#![allow(clippy::unwrap_used)] // a panic is how a test fails

use std::collections::BTreeMap;
use std::time::Duration;

use podfleet_core::reconciler::{CommandId, Config, Input, Output, Reconciler};
use podfleet_core::runtime::{
    ContainerState, ContainerSummary, ImageInfo, PullProgress, RuntimeError, RuntimeErrorKind,
    RuntimeOp, RuntimeReply, RuntimeResult, StopOutcome, LABEL_IMAGE_DIGEST,
};
use podfleet_core::time::Timestamp;
use podfleet_core::wire::{
    DeploymentName, DeploymentState, DeviceId, FailureCause, Phase, PullFailure, Revision,
};

/// What the test answers an operation with: a result now, or nothing (the
/// operation hangs).
type Answer = Option<RuntimeResult>;

/// One reconciler and the containers of its runtime.
struct Device {
    r: Reconciler,
    now: Timestamp,
    containers: BTreeMap<String, ContainerSummary>,
    /// Every operation issued, in order.
    ops: Vec<RuntimeOp>,
    /// Images in the store.
    images: Vec<String>,
    /// What the runtime says of a pull's progress when asked, and how
    /// often it was asked.
    progress: Option<PullProgress>,
    progress_queries: usize,
    /// The last pull left hanging.
    hanging: Option<CommandId>,
}

impl Device {
    fn new(config: Config) -> Self {
        let mut device = Self {
            r: Reconciler::new(config, None, Timestamp::ZERO),
            now: Timestamp::ZERO,
            containers: BTreeMap::new(),
            ops: Vec::new(),
            images: vec!["img/web:1".into()],
            progress: None,
            progress_queries: 0,
            hanging: None,
        };
        device.settle(|_| None);
        device
    }

    /// Answers every operation: `pull` by `on_pull` (`None` leaves it
    /// hanging), the rest from the table.
    fn settle(&mut self, mut on_pull: impl FnMut(&str) -> Answer) {
        while let Some(output) = self.r.poll_output() {
            if let Output::QueryPullProgress { id, .. } = output {
                self.progress_queries += 1;
                let progress = self.progress;
                self.r
                    .handle(self.now, Input::PullProgress { id, progress });
                continue;
            }
            let Output::Runtime { id, op } = output else {
                continue;
            };
            self.ops.push(op.clone());
            let answer = match &op {
                RuntimeOp::Pull { image } => {
                    let answer = on_pull(image);
                    if matches!(answer, Some(Ok(_))) {
                        self.images.push(image.clone());
                    }
                    answer
                }
                other => Some(self.answer(other)),
            };
            match answer {
                Some(result) => self.r.handle(self.now, Input::RuntimeResult { id, result }),
                None => self.hanging = Some(id),
            }
        }
    }

    fn answer(&mut self, op: &RuntimeOp) -> RuntimeResult {
        let set = |c: &mut ContainerSummary, state| c.state = state;
        Ok(match op {
            RuntimeOp::List => RuntimeReply::Listed {
                containers: self.containers.values().cloned().collect(),
            },
            RuntimeOp::InspectImage { image } => RuntimeReply::ImageInspected {
                image: self.images.contains(image).then(|| ImageInfo {
                    id: format!("id-{image}"),
                    digest: None,
                }),
            },
            RuntimeOp::Create { spec } => {
                assert!(
                    self.images.contains(&spec.image),
                    "created from an absent image: {op:?}"
                );
                self.containers.insert(
                    spec.name.clone(),
                    ContainerSummary {
                        id: spec.name.clone(),
                        name: spec.name.clone(),
                        state: ContainerState::Created,
                        labels: spec.labels.clone(),
                    },
                );
                RuntimeReply::Created {
                    id: spec.name.clone(),
                }
            }
            RuntimeOp::Start { container } => {
                set(
                    self.containers.get_mut(container).unwrap(),
                    ContainerState::Running,
                );
                RuntimeReply::Started
            }
            RuntimeOp::Stop { container, .. } => {
                set(
                    self.containers.get_mut(container).unwrap(),
                    ContainerState::Exited,
                );
                RuntimeReply::Stopped {
                    outcome: StopOutcome::Graceful,
                }
            }
            RuntimeOp::Remove { container, .. } => {
                self.containers.remove(container);
                RuntimeReply::Removed
            }
            // Garbage collection finds nothing to remove.
            RuntimeOp::ListImages => RuntimeReply::ImagesListed {
                images: Vec::new(),
                disk: None,
            },
            other => panic!("not expected here: {other:?}"),
        })
    }

    fn put(&mut self, revision: u64, image: &str, policy: Option<&str>) {
        let policy = policy.map_or(String::new(), |p| format!(r#","pull_policy":"{p}""#));
        let json = format!(r#"{{"services":[{{"name":"web","image":"{image}"{policy}}}]}}"#);
        self.r.handle(
            self.now,
            Input::DesiredPut {
                deployment: shop(),
                revision: Revision::new(revision),
                value: json.as_bytes(),
            },
        );
    }

    /// Runs the clock for `span`, handing in each timeout that falls due
    /// and answering pulls by `on_pull` meanwhile.
    fn run_for(&mut self, span: Duration, mut on_pull: impl FnMut(&str) -> Answer) {
        let until = self.now + span;
        loop {
            let at = self.r.poll_timeout().at.max(self.now);
            if at > until {
                break;
            }
            self.now = at;
            self.r.handle(at, Input::Timeout);
            self.settle(&mut on_pull);
        }
        self.now = until;
    }

    fn state(&self) -> DeploymentState {
        self.r.deployment_state(&shop()).expect("a state").clone()
    }

    /// The operations since `from`, as words.
    fn since(&self, from: usize) -> Vec<String> {
        self.ops[from..]
            .iter()
            .map(|op| match op {
                RuntimeOp::List => "list".to_owned(),
                RuntimeOp::InspectImage { image } => format!("inspect_image {image}"),
                RuntimeOp::Pull { image } => format!("pull {image}"),
                RuntimeOp::Create { spec } => format!("create {}", spec.image),
                RuntimeOp::ListImages => "list_images".to_owned(),
                other => format!("{} {}", other.name(), other.container().unwrap_or("")),
            })
            .collect()
    }
}

fn shop() -> DeploymentName {
    DeploymentName::new("shop").unwrap()
}

fn config() -> Config {
    Config::new(DeviceId::new("rpi-01").unwrap(), "test")
}

fn pulled(image: &str) -> Answer {
    Some(Ok(RuntimeReply::Pulled {
        image: ImageInfo {
            id: format!("id-{image}"),
            digest: Some("sha256:feed".into()),
        },
    }))
}

fn refused(reason: PullFailure, message: &str) -> Answer {
    Some(Err(RuntimeError::new(
        RuntimeErrorKind::Pull(reason),
        message,
    )))
}

/// A device running revision 1 (`img/web:1`, present).
fn running_v1() -> Device {
    let mut d = Device::new(config());
    d.put(1, "img/web:1", None);
    d.settle(|_| panic!("nothing to pull"));
    assert_eq!(d.state().phase, Phase::Running);
    d
}

#[test]
fn the_new_image_is_pulled_before_the_old_container_is_stopped() {
    let mut d = running_v1();
    let from = d.ops.len();
    d.put(2, "img/web:2", None);
    d.settle(pulled);
    assert_eq!(
        d.since(from),
        [
            "list",
            "inspect_image img/web:2",
            "pull img/web:2",
            "stop shop_web",
            "remove shop_web",
            "create img/web:2",
            "start shop_web",
            // The rollout is done: garbage collection looks at the store.
            "list_images",
        ]
    );
    assert_eq!(d.state().phase, Phase::Running);
    // The digest it was pulled by is on the container and in the report.
    assert_eq!(
        d.containers["shop_web"].labels[LABEL_IMAGE_DIGEST],
        "sha256:feed"
    );
    assert_eq!(
        d.state().image_digests,
        BTreeMap::from([("web".into(), "sha256:feed".to_owned())])
    );
}

#[test]
fn the_report_says_what_is_being_pulled() {
    let mut d = running_v1();
    d.put(2, "img/web:2", None);
    d.settle(|_| None);
    let s = d.state();
    assert_eq!(s.phase, Phase::Pending);
    assert!(
        s.message.ends_with("pulling \"img/web:2\""),
        "{}",
        s.message
    );
    // The image of revision 1 was built on the device: no digest known.
    assert!(s.image_digests.is_empty(), "{s:?}");
}

#[test]
fn a_pinned_image_is_named_readably_while_it_is_pulled() {
    let mut d = running_v1();
    let pinned = format!(
        "registry.example:5000/team/web:2@sha256:{}",
        "4b825dc642cb".repeat(5)
    );
    d.put(2, &pinned, None);
    d.settle(|_| None);
    let message = d.state().message;
    assert!(
        message.ends_with("pulling \"registry.example:5000/team/web:2@sha256:4b825dc642cb…\""),
        "{message}"
    );
}

#[test]
fn the_report_says_how_far_the_pull_has_got() {
    let mut d = running_v1();
    d.put(2, "img/web:2", None);
    d.settle(|_| None);
    d.progress = Some(PullProgress {
        downloaded: 12_345_678,
        total: 40_100_000,
        layers_done: 2,
        layers: 5,
    });
    // Asked every 2 s while the pull runs.
    d.run_for(Duration::from_millis(1_900), |_| None);
    assert_eq!(d.progress_queries, 0);
    d.run_for(Duration::from_millis(100), |_| None);
    assert_eq!(d.progress_queries, 1);
    let message = d.state().message;
    assert!(
        message.ends_with("pulling \"img/web:2\" (12.3 MB of 40.1 MB, 2/5 layers)"),
        "{message}"
    );
    d.run_for(Duration::from_secs(10), |_| None);
    assert_eq!(d.progress_queries, 6);
    // A runtime that cannot tell leaves the last figures.
    d.progress = None;
    d.run_for(Duration::from_secs(2), |_| None);
    assert!(d.state().message.contains("2/5 layers"));
    // Once the pull is done, nobody asks.
    let queries = d.progress_queries;
    let id = d.hanging.take().unwrap();
    d.images.push("img/web:2".into());
    let result = pulled("img/web:2").unwrap();
    d.r.handle(d.now, Input::RuntimeResult { id, result });
    d.settle(pulled);
    d.run_for(Duration::from_secs(10), pulled);
    assert_eq!(d.progress_queries, queries);
    assert_eq!(d.state().phase, Phase::Running);
}

#[test]
fn a_failed_pull_stops_nothing_reports_a_typed_cause_and_is_retried() {
    let mut d = running_v1();
    let from = d.ops.len();
    d.put(2, "img/web:2", None);
    d.settle(|_| refused(PullFailure::Unauthorized, "authentication required"));
    assert_eq!(
        d.since(from),
        ["list", "inspect_image img/web:2", "pull img/web:2"]
    );
    let s = d.state();
    assert_eq!(s.phase, Phase::Failed);
    assert_eq!(
        s.cause,
        Some(FailureCause::ImagePull {
            image: "img/web:2".into(),
            reason: PullFailure::Unauthorized,
            error: "authentication required".into(),
        })
    );
    assert!(s.message.contains("unauthorized"), "{}", s.message);
    assert_eq!(
        d.containers["shop_web"].state,
        ContainerState::Running,
        "the old revision runs on"
    );

    // The retry, after the revision's backoff (10 s), pulls again and
    // rolls out; liveness ticks meanwhile list the runtime only.
    let from = d.ops.len();
    d.run_for(Duration::from_secs(9), |_| panic!("too early"));
    assert!(
        d.since(from).iter().all(|op| op == "list"),
        "{:?}",
        d.since(from)
    );
    let from = d.ops.len();
    d.run_for(Duration::from_secs(2), pulled);
    let ops = d.since(from);
    let pull = ops.iter().position(|op| op == "pull img/web:2").unwrap();
    let stop = ops.iter().position(|op| op == "stop shop_web").unwrap();
    assert!(pull < stop, "{ops:?}");
    assert_eq!(d.state().phase, Phase::Running);
    assert_eq!(d.containers["shop_web"].labels["io.podfleet.revision"], "2");
}

#[test]
fn a_pull_that_never_answers_times_out_and_stops_nothing() {
    let mut d = Device::new(config().pull_timeout(Duration::from_secs(60)));
    d.put(1, "img/web:1", None);
    d.settle(|_| None);
    let from = d.ops.len();
    d.put(2, "img/web:2", None);
    d.settle(|_| None);
    assert_eq!(d.since(from).last().unwrap(), "pull img/web:2");
    d.run_for(Duration::from_secs(59), |_| None);
    assert_eq!(d.state().phase, Phase::Pending, "{:?}", d.state());
    d.run_for(Duration::from_secs(1), |_| None);
    let s = d.state();
    assert!(
        matches!(
            &s.cause,
            Some(FailureCause::ImagePull {
                reason: PullFailure::Timeout,
                ..
            })
        ),
        "{s:?}"
    );
    assert_eq!(d.containers["shop_web"].state, ContainerState::Running);
}

#[test]
fn a_newer_revision_walks_away_from_a_pull_in_progress() {
    let mut d = running_v1();
    d.put(2, "img/web:2", None);
    d.settle(|_| None);
    assert_eq!(d.since(d.ops.len() - 1), ["pull img/web:2"]);
    // Revision 3 goes back to the image in the store: it does not wait for
    // the pull of revision 2.
    let from = d.ops.len();
    d.put(3, "img/web:1", Some("if_not_present"));
    d.settle(|_| panic!("nothing to pull"));
    assert_eq!(
        d.since(from),
        [
            "list",
            "inspect_image img/web:1",
            "stop shop_web",
            "remove shop_web",
            "create img/web:1",
            "start shop_web",
        ]
    );
    assert_eq!(d.state().phase, Phase::Running);
    assert_eq!(d.state().revision, Revision::new(3));
}

#[test]
fn pull_policies_have_the_kubernetes_meaning() {
    // `always` pulls a present image; `never` never pulls and fails on an
    // absent one; `if_not_present` pulls only an absent one.
    let mut d = running_v1();
    let from = d.ops.len();
    d.put(2, "img/web:1", Some("always"));
    d.settle(pulled);
    assert_eq!(d.since(from)[..2], ["list", "pull img/web:1"]);
    assert_eq!(d.state().phase, Phase::Running);

    let from = d.ops.len();
    d.put(3, "img/web:9", Some("never"));
    d.settle(|_| panic!("never pulls"));
    assert_eq!(d.since(from), ["list", "inspect_image img/web:9"]);
    assert!(matches!(
        d.state().cause,
        Some(FailureCause::ImagePull {
            reason: PullFailure::NotPresent,
            ..
        })
    ));
    assert_eq!(d.containers["shop_web"].state, ContainerState::Running);

    // An untagged reference or `:latest` is `always` by default.
    let from = d.ops.len();
    d.put(4, "img/web", None);
    d.settle(pulled);
    assert_eq!(d.since(from)[..2], ["list", "pull img/web"]);
}
