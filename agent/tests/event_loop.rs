//! The agent's event loop over the fake runtime, an in-memory desired-state
//! source and a publisher that can be taken offline, on tokio's paused clock.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use podfleet_agent::event_loop::{
    self, CacheError, CacheStore, CommandRequest, DesiredSource, Inbound, LoopExit, LoopOptions,
    LoopStats, PublishError, Publisher, Report, TokioClock,
};
use podfleet_core::reconciler::{AgentCache, Bugs};
use podfleet_core::runtime::ContainerState;
use podfleet_core::wire::{DeploymentName, DeviceId, Heartbeat, Phase, Verb};
use podfleet_core::Config;
use podfleet_testkit::SharedFake;
use podfleet_testkit::{Behaviour, FakeRuntime};
use tokio::sync::{mpsc, oneshot};

struct Channel(mpsc::UnboundedReceiver<Inbound>);

impl DesiredSource for Channel {
    async fn next(&mut self) -> Option<Inbound> {
        self.0.recv().await
    }
}

#[derive(Clone, Default)]
struct Recorder {
    offline: Arc<AtomicBool>,
    /// The broker's payload limit (0: none).
    limit: Arc<AtomicUsize>,
    /// Deployments whose state the broker never acknowledges.
    stuck: Arc<Mutex<BTreeSet<String>>>,
    reports: Arc<Mutex<Vec<Report>>>,
    replies: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
}

impl Publisher for Recorder {
    async fn publish(&self, report: Report) -> Result<(), PublishError> {
        if self.offline.load(Ordering::SeqCst) {
            return Err(PublishError::Failed("offline".into()));
        }
        if let Report::State { deployment, state } = &report {
            if self.stuck.lock().unwrap().contains(deployment.as_str()) {
                return Err(PublishError::Failed("no acknowledgement".into()));
            }
            let size = serde_json::to_vec(state).unwrap().len();
            let limit = self.limit.load(Ordering::SeqCst);
            if limit > 0 && size > limit {
                return Err(PublishError::TooLarge {
                    size,
                    limit: Some(limit),
                });
            }
        }
        self.reports.lock().unwrap().push(report);
        Ok(())
    }

    async fn reply(&self, reply_to: String, body: Vec<u8>) -> Result<(), PublishError> {
        let body = serde_json::from_slice(&body).unwrap();
        self.replies.lock().unwrap().push((reply_to, body));
        Ok(())
    }
}

impl Recorder {
    fn last_state(&self, deployment: &str) -> Option<(Phase, u64, Vec<String>)> {
        self.reports
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find_map(|r| match r {
                Report::State {
                    deployment: d,
                    state,
                } if d.as_str() == deployment => Some((
                    state.phase,
                    state.revision.get(),
                    state.container_ids.values().cloned().collect(),
                )),
                _ => None,
            })
    }

    fn last_heartbeat(&self) -> Option<Heartbeat> {
        let reports = self.reports.lock().unwrap();
        reports.iter().rev().find_map(|r| match r {
            Report::Heartbeat(hb) => Some(hb.clone()),
            _ => None,
        })
    }

    fn heartbeats(&self) -> usize {
        let reports = self.reports.lock().unwrap();
        reports
            .iter()
            .filter(|r| matches!(r, Report::Heartbeat(_)))
            .count()
    }
}

/// A disk that survives the loop.
#[derive(Clone, Default)]
struct Disk(Arc<Mutex<Option<AgentCache>>>);

impl CacheStore for Disk {
    fn load(&mut self) -> Result<Option<AgentCache>, CacheError> {
        Ok(self.0.lock().unwrap().clone())
    }
    fn store(&mut self, cache: &AgentCache) -> Result<(), CacheError> {
        *self.0.lock().unwrap() = Some(cache.clone());
        Ok(())
    }
}

struct Agent {
    inbox: mpsc::UnboundedSender<Inbound>,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<(LoopExit, LoopStats)>,
}

impl Agent {
    fn start(
        options: LoopOptions,
        publisher: Recorder,
        fake: SharedFake<TokioClock>,
        disk: Disk,
    ) -> Self {
        Self::start_with_bugs(options, publisher, fake, disk, Bugs::default())
    }

    fn start_with_bugs(
        options: LoopOptions,
        publisher: Recorder,
        fake: SharedFake<TokioClock>,
        disk: Disk,
        bugs: Bugs,
    ) -> Self {
        let (inbox, rx) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let config = Config::new(DeviceId::new("pi-1").unwrap(), "0.1.0-test").inject_bugs(bugs);
        let done = tokio::spawn(async move {
            let mut stats = LoopStats::default();
            let exit = event_loop::run(
                config,
                options,
                Channel(rx),
                publisher,
                fake,
                TokioClock::start(),
                disk,
                async {
                    let _ = stopped.await;
                },
                &mut stats,
            )
            .await;
            (exit, stats)
        });
        Self {
            inbox,
            stop: Some(stop),
            done,
        }
    }

    fn send(&self, inbound: Inbound) {
        self.inbox.send(inbound).unwrap();
    }

    fn put(&self, deployment: &str, revision: u64, json: &str) {
        self.send(Inbound::Put {
            deployment: DeploymentName::new(deployment).unwrap(),
            revision: revision.into(),
            value: json.as_bytes().to_vec(),
        });
    }

    fn command(&self, verb: Verb, body: &str, reply_to: &str) {
        self.send(Inbound::Command(CommandRequest {
            verb,
            body: body.as_bytes().to_vec(),
            reply_to: reply_to.to_owned(),
        }));
    }

    async fn stop(mut self) -> (LoopExit, LoopStats) {
        self.stop.take().unwrap().send(()).unwrap();
        self.done.await.unwrap()
    }
}

fn web(env: &str) -> String {
    format!(r#"{{"services":[{{"name":"web","image":"img/web:1","env":{{"MODE":"{env}"}}}}]}}"#)
}

fn fake() -> SharedFake<TokioClock> {
    SharedFake::new(FakeRuntime::new(), TokioClock::start())
}

async fn settle(d: Duration) {
    tokio::time::sleep(d).await;
}

#[tokio::test(start_paused = true)]
async fn a_put_becomes_a_running_report_with_the_true_container_id() {
    let publisher = Recorder::default();
    let fake = fake();
    let agent = Agent::start(
        LoopOptions::default(),
        publisher.clone(),
        fake.clone(),
        Disk::default(),
    );
    agent.put("shop", 7, &web("a"));
    settle(Duration::from_secs(1)).await;

    let (phase, revision, ids) = publisher.last_state("shop").unwrap();
    assert_eq!((phase, revision), (Phase::Running, 7));
    let running = fake.with(|f| f.by_name("shop_web").map(|c| (c.id.clone(), c.state)));
    assert_eq!(running, Some((ids[0].clone(), ContainerState::Running)));
    assert!(
        publisher.heartbeats() >= 1,
        "a heartbeat is published at start"
    );

    let (exit, stats) = agent.stop().await;
    assert_eq!(exit, LoopExit::Shutdown);
    assert!(stats.runtime_ops >= 3, "list, create, start: {stats:?}");
    assert!(
        fake.with(|f| f
            .by_name("shop_web")
            .is_some_and(|c| c.state == ContainerState::Running)),
        "shutdown leaves containers running"
    );
}

#[tokio::test(start_paused = true)]
async fn the_heartbeat_reports_the_runtimes_version_once_it_answered() {
    let publisher = Recorder::default();
    let fake = fake();
    fake.with(|f| f.set_version("4.3.1"));
    let agent = Agent::start(
        LoopOptions::default(),
        publisher.clone(),
        fake.clone(),
        Disk::default(),
    );
    settle(Duration::from_secs(1)).await;
    let heartbeat = publisher.last_heartbeat().unwrap();
    assert_eq!(heartbeat.runtime_version.as_deref(), Some("4.3.1"));
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn offline_the_agent_keeps_ticking_and_reports_the_newest_state_on_return() {
    let publisher = Recorder::default();
    publisher.offline.store(true, Ordering::SeqCst);
    let fake = fake();
    let agent = Agent::start(
        LoopOptions::default(),
        publisher.clone(),
        fake.clone(),
        Disk::default(),
    );
    agent.put("shop", 1, &web("a"));
    settle(Duration::from_secs(5)).await;
    let first = fake.with(|f| f.by_name("shop_web").unwrap().id.clone());

    // The container crashes while NATS is away: the liveness tick restarts it.
    let now = fake.now();
    fake.with(|f| f.crash(now, &first, 1));
    settle(Duration::from_secs(120)).await;
    let (state, starts) = fake.with(|f| {
        let c = f.by_name("shop_web").unwrap();
        (c.state, c.starts)
    });
    assert_eq!(state, ContainerState::Running, "restarted while offline");
    assert!(starts >= 2, "started {starts} times");
    assert!(publisher.reports.lock().unwrap().is_empty());

    publisher.offline.store(false, Ordering::SeqCst);
    settle(Duration::from_secs(60)).await;
    let (phase, revision, ids) = publisher.last_state("shop").unwrap();
    assert_eq!((phase, revision, ids), (Phase::Running, 1, vec![first]));
    // The outbox kept one report per key, not the whole history.
    let states = publisher
        .reports
        .lock()
        .unwrap()
        .iter()
        .filter(|r| matches!(r, Report::State { .. }))
        .count();
    assert!(states <= 2, "{states} state reports after reconnect");
    let (_, stats) = agent.stop().await;
    assert!(stats.publish_failures > 0);
}

#[tokio::test(start_paused = true)]
async fn a_snapshot_removes_what_is_gone_and_republishes_the_rest() {
    let publisher = Recorder::default();
    let fake = fake();
    let agent = Agent::start(
        LoopOptions::default(),
        publisher.clone(),
        fake.clone(),
        Disk::default(),
    );
    agent.put("shop", 1, &web("a"));
    agent.put("cam", 2, &web("b"));
    settle(Duration::from_secs(2)).await;
    let before = publisher.reports.lock().unwrap().len();

    let present: BTreeSet<DeploymentName> = [DeploymentName::new("shop").unwrap()].into();
    agent.send(Inbound::Snapshot { present });
    settle(Duration::from_secs(30)).await;

    assert!(
        fake.with(|f| f.by_name("cam_web").is_none()),
        "cam torn down"
    );
    assert!(fake.with(|f| f.by_name("shop_web").is_some()));
    let reports = publisher.reports.lock().unwrap().clone();
    let after = &reports[before..];
    assert!(after
        .iter()
        .any(|r| matches!(r, Report::Clear { deployment } if deployment.as_str() == "cam")));
    assert!(after.iter().any(
        |r| matches!(r, Report::State { deployment, state } if deployment.as_str() == "shop" && state.phase == Phase::Running)
    ), "shop republished");
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn commands_are_answered_and_exec_is_refused_unless_allowed() {
    let publisher = Recorder::default();
    let fake = fake();
    fake.with(|f| {
        f.set_behaviour(
            "img/web:1",
            Behaviour {
                output: vec!["listening on :8080".to_owned(), "ready".to_owned()],
                ..Behaviour::default()
            },
        );
    });
    let agent = Agent::start(
        LoopOptions::default(),
        publisher.clone(),
        fake.clone(),
        Disk::default(),
    );
    agent.put("shop", 1, &web("a"));
    settle(Duration::from_secs(65)).await;

    agent.command(Verb::Ping, "", "inbox.1");
    agent.command(
        Verb::Logs,
        r#"{"deployment":"shop","service":"web","tail_lines":1}"#,
        "inbox.2",
    );
    agent.command(
        Verb::Logs,
        r#"{"deployment":"shop","service":"nope"}"#,
        "inbox.3",
    );
    agent.command(Verb::Logs, "{not json", "inbox.4");
    agent.command(
        Verb::Exec,
        r#"{"deployment":"shop","service":"web","argv":["true"]}"#,
        "inbox.5",
    );
    settle(Duration::from_millis(100)).await;

    let replies = publisher.replies.lock().unwrap().clone();
    let by = |to: &str| {
        replies
            .iter()
            .find(|(r, _)| r == to)
            .map(|(_, b)| b.clone())
            .unwrap()
    };
    let ping = by("inbox.1");
    assert_eq!(ping["ok"]["device_id"], "pi-1");
    assert_eq!(ping["ok"]["uptime_s"], 65);
    let logs = by("inbox.2");
    assert_eq!(logs["ok"]["text"], "ready\n", "{logs}");
    assert_eq!(by("inbox.3")["error"]["code"], "not_found");
    assert_eq!(by("inbox.4")["error"]["code"], "bad_request");
    assert_eq!(by("inbox.5")["error"]["code"], "exec_disabled");
    let (_, stats) = agent.stop().await;
    assert_eq!(stats.commands, 5);
}

#[tokio::test(start_paused = true)]
async fn a_restarted_loop_resumes_from_its_disk_and_recreates_nothing() {
    let publisher = Recorder::default();
    let fake = fake();
    let disk = Disk::default();
    let agent = Agent::start(
        LoopOptions::default(),
        publisher.clone(),
        fake.clone(),
        disk.clone(),
    );
    agent.put("shop", 4, &web("a"));
    settle(Duration::from_secs(2)).await;
    agent.stop().await;
    let created = fake.with(|f| f.containers().len());

    let agent = Agent::start(
        LoopOptions::default(),
        publisher.clone(),
        fake.clone(),
        disk,
    );
    // The watch redelivers the same revision after the restart.
    agent.put("shop", 4, &web("a"));
    settle(Duration::from_secs(100)).await;
    assert_eq!(
        fake.with(|f| f.containers().len()),
        created,
        "nothing recreated"
    );
    assert_eq!(publisher.last_state("shop").unwrap().0, Phase::Running);
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_closed_source_ends_the_loop() {
    let agent = Agent::start(
        LoopOptions::default(),
        Recorder::default(),
        fake(),
        Disk::default(),
    );
    let Agent { inbox, done, stop } = agent;
    drop(inbox);
    let (exit, _) = done.await.unwrap();
    assert_eq!(exit, LoopExit::SourceClosed);
    drop(stop);
}

/// Puts three deployments: `aaa`, whose state the broker never acknowledges,
/// `big`, whose Running report is over the broker's 400-byte limit, and
/// `zzz`, which sorts after both. Returns the publisher after 30 s.
async fn one_stuck_one_too_large(bugs: Bugs) -> Recorder {
    let publisher = Recorder::default();
    publisher.limit.store(400, Ordering::SeqCst);
    publisher.stuck.lock().unwrap().insert("aaa".into());
    let agent = Agent::start_with_bugs(
        LoopOptions::default(),
        publisher.clone(),
        fake(),
        Disk::default(),
        bugs,
    );
    let services: Vec<String> = (0..16)
        .map(|i| format!(r#"{{"name":"service-{i}","image":"img/web:1"}}"#))
        .collect();
    agent.put("aaa", 1, &web("a"));
    agent.put(
        "big",
        2,
        &format!(r#"{{"services":[{}]}}"#, services.join(",")),
    );
    agent.put("zzz", 3, &web("z"));
    settle(Duration::from_secs(30)).await;
    agent.stop().await;
    publisher
}

#[tokio::test(start_paused = true)]
async fn a_report_that_cannot_be_published_never_holds_up_the_others() {
    // Issue 10, bug 2: one report the broker would not take was retried
    // forever, and the reports of deployments sorting after it never went out.
    let publisher = one_stuck_one_too_large(Bugs::default()).await;
    assert_eq!(publisher.last_state("aaa"), None);
    assert_eq!(
        publisher.last_state("zzz").map(|(p, r, _)| (p, r)),
        Some((Phase::Running, 3))
    );
    let reports = publisher.reports.lock().unwrap();
    let big = reports
        .iter()
        .rev()
        .find_map(|r| match r {
            Report::State { deployment, state } if deployment.as_str() == "big" => Some(state),
            _ => None,
        })
        .expect("big's summary was published");
    assert_eq!((big.phase, big.revision.get()), (Phase::Running, 2));
    assert!(big.container_ids.is_empty());
    assert!(
        big.message.contains("over the broker's size limit"),
        "{}",
        big.message
    );
}

#[tokio::test(start_paused = true)]
async fn the_head_of_line_switch_brings_bug_2_back() {
    let publisher = one_stuck_one_too_large(Bugs {
        head_of_line_reports: true,
        ..Bugs::default()
    })
    .await;
    assert_eq!(publisher.last_state("big"), None);
    assert_eq!(publisher.last_state("zzz"), None);
}
