//! A device's software: the production event loop, its publisher and
//! desired-state source, and the link that carries them to the fake broker.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use podfleet_agent::event_loop::{
    self, Clock, DesiredSource, Inbound, LoopOptions, LoopStats, PublishError, Publisher, Report,
};
use podfleet_core::session::{
    self, CommandMessage, Input, Operation, Output, Session, SkipReason, WatchedEntry,
};
use podfleet_core::wire::names::{
    kv_subject, COMMAND_SUBJECT_PREFIX, DESIRED_BUCKET, HEARTBEAT_BUCKET, STATE_BUCKET,
};
use podfleet_core::wire::{DeploymentState, FailureCause, Phase};
use podfleet_core::Config;
use podfleet_testkit::{Invariant, Oracle, Violation};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

use super::{
    lock, Delivery, Device, Dialer, Epoch, FaultyRuntime, Handed, SimClock, SimDisk, ACK_TIMEOUT,
    RECONNECT_DELAY,
};
use crate::broker::{Frame, IDLE_TIMEOUT, PING_INTERVAL};

/// What the agent's publisher asks the link to send.
#[derive(Debug)]
enum Outgoing {
    Write {
        bucket: &'static str,
        key: String,
        value: Option<Vec<u8>>,
        done: oneshot::Sender<Result<(), PublishError>>,
    },
    Respond {
        reply: u64,
        body: Vec<u8>,
    },
}

/// The agent's publisher: reports become KV writes over the link.
#[derive(Debug, Clone)]
struct SimPublisher {
    device: Device,
    clock: SimClock,
    link: mpsc::UnboundedSender<Outgoing>,
}

impl SimPublisher {
    async fn write(
        &self,
        bucket: &'static str,
        key: String,
        value: Option<Vec<u8>>,
    ) -> Result<(), PublishError> {
        let (done, answer) = oneshot::channel();
        self.link
            .send(Outgoing::Write {
                bucket,
                key,
                value,
                done,
            })
            .map_err(|_| PublishError::Failed("link gone".into()))?;
        match tokio::time::timeout(ACK_TIMEOUT, answer).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(error))) => Err(error),
            Ok(Err(_)) => Err(PublishError::Failed("connection lost".into())),
            Err(_) => Err(PublishError::Failed("no acknowledgement".into())),
        }
    }
}

impl SimPublisher {
    /// Writes a state or clear, recording it as the last one handed over
    /// and what became of it.
    async fn handed(
        &self,
        deployment: &str,
        state: Option<DeploymentState>,
        bucket: &'static str,
        key: String,
        value: Option<Vec<u8>>,
    ) -> Result<(), PublishError> {
        let d = &self.device;
        {
            let mut handed = lock(&d.published);
            let retry = handed
                .get(deployment)
                .is_some_and(|h| h.state == state && matches!(h.delivery, Delivery::Failed(_)));
            let since = self.clock.now();
            handed.insert(
                deployment.to_owned(),
                Handed {
                    state: state.clone(),
                    delivery: Delivery::InFlight { since, retry },
                },
            );
        }
        let result = self.write(bucket, key, value).await;
        if let Some(h) = lock(&d.published)
            .get_mut(deployment)
            .filter(|h| h.state == state)
        {
            h.delivery = match &result {
                Ok(()) => Delivery::Stored,
                Err(e) => Delivery::Failed(e.to_string()),
            };
        }
        result
    }
}

impl Publisher for SimPublisher {
    async fn publish(&self, report: Report) -> Result<(), PublishError> {
        let d = &self.device;
        match report {
            Report::State { deployment, state } => {
                let now = self.clock.now();
                d.check(|oracle, fake, out| {
                    oracle.check_published(now, &deployment, &state, fake, out);
                });
                if state.summarised {
                    d.world.probe("report summarised");
                }
                if state.attempt >= 6 && state.phase != Phase::Running {
                    d.world.probe("retry backoff cap reached");
                }
                if state.restarts.values().any(|r| r.count >= 2) {
                    d.world.probe("crash loop restarted");
                }
                match &state.cause {
                    Some(FailureCause::InvalidScore { error }) if error.contains("…\" (") => {
                        d.world.probe("oversized value quoted cut");
                    }
                    Some(FailureCause::InitContainerTimedOut { .. }) => {
                        d.world.probe("init container timed out");
                    }
                    Some(FailureCause::InitContainerExited { .. }) => {
                        d.world.probe("init container failed");
                    }
                    Some(FailureCause::SetupScriptFailed {
                        exit_code: Some(_), ..
                    }) => d.world.probe("setup script failed"),
                    // The reconciler's words when it walks away at its
                    // setup timeout.
                    Some(FailureCause::SetupScriptFailed {
                        exit_code: None,
                        output,
                        ..
                    }) if output.starts_with("no exit after") => {
                        d.world.probe("setup script timed out");
                    }
                    Some(FailureCause::RunFailed { .. }) => d.world.probe("run completed"),
                    _ => {}
                }
                if state.phase == Phase::Succeeded {
                    d.world.probe("run completed");
                }
                if !state.verified.is_empty() {
                    d.world.probe("container verified");
                }
                d.world.trace(
                    now,
                    &d.who(),
                    format_args!(
                        "publish {deployment}: {:?} rev {} {:?}",
                        state.phase, state.revision, state.container_ids
                    ),
                );
                let value =
                    serde_json::to_vec(&state).map_err(|e| PublishError::Failed(e.to_string()))?;
                let key = format!("{}.{deployment}", d.id);
                self.handed(
                    deployment.as_str(),
                    Some(state),
                    STATE_BUCKET,
                    key,
                    Some(value),
                )
                .await
            }
            Report::Clear { deployment } => {
                let key = format!("{}.{deployment}", d.id);
                self.handed(deployment.as_str(), None, STATE_BUCKET, key, None)
                    .await
            }
            Report::Heartbeat(heartbeat) => {
                let value = serde_json::to_vec(&heartbeat)
                    .map_err(|e| PublishError::Failed(e.to_string()))?;
                self.write(HEARTBEAT_BUCKET, d.id.to_string(), Some(value))
                    .await
            }
        }
    }

    async fn reply(&self, reply_to: String, body: Vec<u8>) -> Result<(), PublishError> {
        let reply = reply_to
            .parse()
            .map_err(|_| PublishError::Failed(format!("bad reply subject {reply_to:?}")))?;
        self.link
            .send(Outgoing::Respond { reply, body })
            .map_err(|_| PublishError::Failed("link gone".into()))
    }
}

/// The agent's desired-state source: what the link hands over. The oracle
/// learns each input here, at the moment the reconciler is handed it.
struct ChannelSource {
    inbox: mpsc::UnboundedReceiver<Inbound>,
    oracle: Arc<Mutex<Oracle>>,
}

impl DesiredSource for ChannelSource {
    async fn next(&mut self) -> Option<Inbound> {
        let inbound = self.inbox.recv().await?;
        let mut oracle = lock(&self.oracle);
        match &inbound {
            Inbound::Put {
                deployment,
                revision,
                value,
            } => oracle.saw_put(deployment.as_str(), revision.get(), value),
            Inbound::Delete {
                deployment,
                revision,
            } => oracle.saw_delete(deployment.as_str(), revision.get()),
            Inbound::Snapshot { present } => oracle.saw_resync(present),
            Inbound::Command(_) => {}
        }
        Some(inbound)
    }
}

/// The agent side of the broker connection, reconnecting forever. It moves
/// frames and time between the broker and the production [`Session`], which
/// decides as it does in the NATS adapter: after every (re)connect a fresh
/// watch, whose initial snapshot ends in an [`Inbound::Snapshot`] once no
/// entry is pending; what each entry means; which commands reach the agent.
/// What stays here is the simulator's own: the isolation invariant (an entry
/// of another device's key), the delivery probes, and the acknowledgements
/// of its wire protocol.
async fn link<D: Dialer>(
    device: Device,
    dialer: D,
    clock: SimClock,
    to_agent: mpsc::UnboundedSender<Inbound>,
    mut from_agent: mpsc::UnboundedReceiver<Outgoing>,
) {
    let who = device.who();
    let world = device.world.clone();
    let config = session::Config::new(device.id.clone()).inject_bugs(device.session_bugs);
    let mut session = Session::new(config, clock.now());
    let mut connects = 0u32;
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    loop {
        let Ok((reader, mut writer)) = dialer.dial(&format!("device:{who}")).await else {
            tokio::time::sleep(RECONNECT_DELAY).await;
            continue;
        };
        connects += 1;
        world.trace(clock.now(), &who, format_args!("connected (#{connects})"));
        let hello = [
            Frame::Hello {
                client: format!("device:{who}"),
            },
            Frame::Subscribe {
                prefix: format!("{COMMAND_SUBJECT_PREFIX}.{}.", device.id),
            },
        ];
        // Full duplex, as a real client is: the loop below hands frames to
        // the write side and never waits for them to drain, so two large
        // frames crossing cannot stall each other.
        let (wtx, mut wrx) = mpsc::unbounded_channel::<Vec<u8>>();
        for frame in &hello {
            let _ = wtx.send(frame.to_line());
        }
        let write_side = async {
            while let Some(line) = wrx.recv().await {
                if writer.write_all(&line).await.is_err() {
                    return;
                }
            }
        };
        let mut lines = BufReader::new(reader).lines();
        let mut acks: BTreeMap<u64, oneshot::Sender<Result<(), PublishError>>> = BTreeMap::new();
        let mut next_id = 0u64;
        let mut watch_id = None;
        let mut ping = tokio::time::interval(PING_INTERVAL);
        let mut silent_since = tokio::time::Instant::now();
        session.handle(clock.now(), Input::Connected);
        let read_side = async {
            loop {
                // Carry out what the session decided.
                while let Some(output) = session.poll_output() {
                    let inbound = match output {
                        Output::StartWatch => {
                            next_id += 1;
                            watch_id = Some(next_id);
                            let prefix = if device.watch_everyone {
                                String::new()
                            } else {
                                format!("{}.", device.id)
                            };
                            let watch = Frame::Watch {
                                id: next_id,
                                bucket: DESIRED_BUCKET.into(),
                                prefix,
                                deletes: false,
                            };
                            let _ = wtx.send(watch.to_line());
                            continue;
                        }
                        Output::Reply { reply_to, body } => {
                            if let Ok(reply) = reply_to.parse() {
                                let _ = wtx.send(Frame::Respond { reply, body }.to_line());
                            }
                            continue;
                        }
                        Output::Skipped {
                            reason:
                                SkipReason::OtherDevice { key, .. } | SkipReason::BadKey { key, .. },
                        } => {
                            world.violation(
                                Violation::new(
                                    Invariant::Isolation,
                                    format!("the agent received key {key:?}, not one of its own"),
                                )
                                .on(&who),
                            );
                            continue;
                        }
                        Output::Skipped { reason } => {
                            world.trace(clock.now(), &who, format_args!("skipped: {reason}"));
                            continue;
                        }
                        Output::Deliver(inbound) => inbound,
                        other => {
                            world.violation(Violation::new(
                                Invariant::Other,
                                format!("{who}: the link does not carry out the session output {other:?}"),
                            ));
                            continue;
                        }
                    };
                    match &inbound {
                        Inbound::Put {
                            deployment,
                            revision,
                            ..
                        }
                        | Inbound::Delete {
                            deployment,
                            revision,
                        } => {
                            let key = format!("{}.{deployment}", device.id);
                            let revision = revision.get();
                            let last = seen.get(&key).copied();
                            seen.insert(key, last.unwrap_or(0).max(revision));
                            match last {
                                Some(l) if l == revision => world.probe("duplicate delivery"),
                                Some(l) if l > revision => {
                                    world.probe("older revision delivered late")
                                }
                                _ => {}
                            }
                        }
                        Inbound::Snapshot { .. } if connects > 1 => {
                            world.probe("resync after reconnect")
                        }
                        _ => {}
                    }
                    let _ = to_agent.send(inbound);
                }
                let retry_at = session.poll_timeout();
                let retry = async {
                    match retry_at {
                        Some(at) => clock.sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    () = tokio::time::sleep_until(silent_since + IDLE_TIMEOUT) => return true,
                    line = lines.next_line() => {
                        let Ok(Some(line)) = line else { return true };
                        silent_since = tokio::time::Instant::now();
                        let Ok(frame) = serde_json::from_str::<Frame>(&line) else { return true };
                        let now = clock.now();
                        match frame {
                            Frame::Watching { id, pending } if Some(id) == watch_id => {
                                session.handle(now, Input::WatchStarted { pending });
                            }
                            Frame::Denied { id, .. } if Some(id) == watch_id => {
                                watch_id = None;
                                session.handle(now, Input::WatchFailed);
                            }
                            Frame::Entry { key, revision, pending, value, .. } => {
                                let entry = WatchedEntry {
                                    subject: kv_subject(DESIRED_BUCKET, &key),
                                    operation: if value.is_some() { Operation::Put } else { Operation::Delete },
                                    revision,
                                    pending,
                                    payload: value.unwrap_or_default(),
                                };
                                session.handle(now, Input::Entry(entry));
                            }
                            Frame::Ack { id, .. } => {
                                if let Some(done) = acks.remove(&id) {
                                    let _ = done.send(Ok(()));
                                }
                            }
                            Frame::Denied { id, reason } => {
                                if let Some(done) = acks.remove(&id) {
                                    let _ = done.send(Err(PublishError::Failed(reason)));
                                }
                            }
                            Frame::TooLarge { id, size, limit } => {
                                if let Some(done) = acks.remove(&id) {
                                    let limit = Some(limit);
                                    let _ = done.send(Err(PublishError::TooLarge { size, limit }));
                                }
                            }
                            Frame::Incoming { reply, subject, body } => {
                                let command = CommandMessage {
                                    subject,
                                    reply_to: Some(reply.to_string()),
                                    payload: body,
                                };
                                session.handle(now, Input::Command(command));
                            }
                            _ => {}
                        }
                    }
                    out = from_agent.recv() => {
                        let Some(out) = out else { return false };
                        let frame = match out {
                            Outgoing::Write { bucket, key, value, done } => {
                                if done.is_closed() {
                                    continue;
                                }
                                next_id += 1;
                                acks.insert(next_id, done);
                                Frame::Write { id: next_id, bucket: bucket.into(), key, value }
                            }
                            Outgoing::Respond { reply, body } => Frame::Respond { reply, body },
                        };
                        let _ = wtx.send(frame.to_line());
                    }
                    _ = ping.tick() => {
                        let _ = wtx.send(Frame::Ping.to_line());
                    }
                    () = retry => session.handle(clock.now(), Input::Timeout),
                }
            }
        };
        let reconnect = tokio::select! {
            biased;
            again = read_side => again,
            () = write_side => true,
        };
        world.trace(clock.now(), &who, "disconnected");
        session.handle(clock.now(), Input::Disconnected);
        drop(acks);
        if !reconnect {
            return;
        }
        tokio::time::sleep(RECONNECT_DELAY).await;
    }
}

/// The software of one device: the production event loop and its link.
pub async fn device_software<D: Dialer>(device: Device, dialer: D, clock: SimClock) {
    *lock(&device.epoch) = Epoch {
        events: device.fake.with(|f| f.events().len()),
        errors: 0,
    };
    let cache = lock(&device.disk).clone();
    lock(&device.oracle).saw_agent_start(cache.as_ref());
    let (to_agent, inbox) = mpsc::unbounded_channel();
    let (outbox, from_agent) = mpsc::unbounded_channel();
    let link = link(device.clone(), dialer, clock.clone(), to_agent, from_agent);
    let config = Config::new(device.id.clone(), "sim")
        .setup_timeout(crate::plan::SETUP_TIMEOUT)
        .inject_bugs(device.bugs);
    let publisher = SimPublisher {
        device: device.clone(),
        clock: clock.clone(),
        link: outbox,
    };
    let runtime = FaultyRuntime {
        device: device.clone(),
        clock: clock.clone(),
    };
    let mut stats = LoopStats::default();
    let agent = event_loop::run(
        config,
        LoopOptions::default(),
        ChannelSource {
            inbox,
            oracle: Arc::clone(&device.oracle),
        },
        publisher,
        runtime,
        clock,
        SimDisk(device.disk.clone()),
        std::future::pending(),
        &mut stats,
    );
    tokio::select! {
        biased;
        () = link => {}
        _ = agent => {}
    }
}
