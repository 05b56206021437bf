//! [`Harness`]: a shell without IO around a [`Reconciler`].
//!
//! It executes the reconciler's commands on a [`FakeRuntime`], always
//! advancing to the earliest deadline (the reconciler's, a container's exit,
//! a delayed result), checks every step with the [`Oracle`] and records a
//! transcript. The core's scenario and property tests, the simulator's
//! discrete tier and the fuzzer build on it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

use podfleet_core::reconciler::{AgentCache, CommandId, Config, Input, Output, Reconciler};
use podfleet_core::runtime::{
    RuntimeError, RuntimeErrorKind, RuntimeOp, RuntimeReply, RuntimeResult,
};
use podfleet_core::time::Timestamp;
use podfleet_core::wire::{DeploymentName, DeploymentState, Heartbeat, Revision};

use crate::oracle::Oracle;
use crate::runtime::{Completion, FakeRuntime};
use crate::violation::Violation;

/// A fault the [`Harness`] applies to the next runtime operation of a kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpFault {
    /// The operation fails with this error and does nothing.
    Fail(RuntimeErrorKind),
    /// The operation takes effect but reports this error ("create failed
    /// but the container exists anyway").
    FailAfterEffect(RuntimeErrorKind),
}

#[derive(Debug)]
struct Pending {
    id: CommandId,
    container: String,
    /// Handed over once the container no longer runs.
    result: RuntimeResult,
    /// Handed over at this time instead, if the container still runs then.
    due: Option<(Timestamp, RuntimeResult)>,
}

/// Drives a [`Reconciler`] against a [`FakeRuntime`] in virtual time. See
/// the [module docs](self).
#[derive(Debug)]
pub struct Harness {
    config: Config,
    /// The reconciler under test.
    pub reconciler: Reconciler,
    /// The runtime it drives.
    pub runtime: FakeRuntime,
    /// Virtual now.
    pub now: Timestamp,
    /// The cache as last persisted.
    pub cache: Option<AgentCache>,
    /// The latest published state of each deployment.
    pub states: BTreeMap<DeploymentName, DeploymentState>,
    /// Every state publication, in order.
    pub published: Vec<(DeploymentName, DeploymentState)>,
    /// Every heartbeat, in order.
    pub heartbeats: Vec<Heartbeat>,
    /// Every runtime operation issued, in order, with its time.
    pub ops: Vec<(Timestamp, RuntimeOp)>,
    /// A readable log of everything that happened.
    pub transcript: String,
    /// Faults for the next operation of a given name ("create", "start"...,
    /// and "version" for the version query).
    pub faults: BTreeMap<&'static str, VecDeque<OpFault>>,
    /// Results ready to deliver, with their delivery time.
    ready: VecDeque<(Timestamp, CommandId, RuntimeResult)>,
    pending: Vec<Pending>,
    /// Each operation not answered yet, for the oracle to learn from its
    /// answer ([`Oracle::saw_answer`]).
    asked: BTreeMap<CommandId, RuntimeOp>,
    /// Whether heartbeats go into the transcript.
    pub log_heartbeats: bool,
    /// The invariant checks, told everything the reconciler is told.
    pub oracle: Oracle,
    /// Invariant violations found so far.
    pub violations: Vec<Violation>,
    /// Runtime operations that failed so far (injected or not).
    pub errors: u64,
    /// How often the reconciler asked the runtime its version.
    pub version_queries: u32,
}

impl Harness {
    /// A harness with an empty runtime, starting at time zero.
    pub fn new(config: Config) -> Self {
        let now = Timestamp::ZERO;
        let mut h = Self {
            reconciler: Reconciler::new(config.clone(), None, now),
            config,
            runtime: FakeRuntime::new(),
            now,
            cache: None,
            states: BTreeMap::new(),
            published: Vec::new(),
            heartbeats: Vec::new(),
            ops: Vec::new(),
            transcript: String::new(),
            faults: BTreeMap::new(),
            ready: VecDeque::new(),
            pending: Vec::new(),
            asked: BTreeMap::new(),
            log_heartbeats: false,
            oracle: Oracle::default(),
            violations: Vec::new(),
            errors: 0,
            version_queries: 0,
        };
        h.drain();
        h
    }

    fn log(&mut self, line: std::fmt::Arguments<'_>) {
        let _ = writeln!(self.transcript, "{:>9} {}", self.now.to_string(), line);
    }

    /// Puts desired state for `deployment` at `revision`.
    pub fn put(&mut self, deployment: &str, revision: u64, json: &str) {
        let name = DeploymentName::new(deployment).expect("test deployment names are valid");
        self.log(format_args!("desired put {deployment} rev {revision}"));
        self.oracle.saw_put(deployment, revision, json.as_bytes());
        self.reconciler.handle(
            self.now,
            Input::DesiredPut {
                deployment: name,
                revision: Revision::new(revision),
                value: json.as_bytes(),
            },
        );
        self.drain();
    }

    /// Deletes the desired state of `deployment` at `revision`.
    pub fn delete(&mut self, deployment: &str, revision: u64) {
        let name = DeploymentName::new(deployment).expect("test deployment names are valid");
        self.log(format_args!("desired delete {deployment} rev {revision}"));
        self.oracle.saw_delete(deployment, revision);
        self.reconciler.handle(
            self.now,
            Input::DesiredDelete {
                deployment: name,
                revision: Revision::new(revision),
            },
        );
        self.drain();
    }

    /// Tells the reconciler the desired bucket holds exactly `present`.
    pub fn resync(&mut self, present: &BTreeSet<DeploymentName>) {
        self.log(format_args!("desired resync {} keys", present.len()));
        self.oracle.saw_resync(present);
        self.reconciler
            .handle(self.now, Input::DesiredResync { present });
        self.drain();
    }

    /// Simulates an agent restart: pending results are lost, the reconciler
    /// starts afresh from the persisted cache (or none).
    pub fn restart_agent(&mut self, keep_cache: bool) {
        self.log(format_args!(
            "agent restart (cache {})",
            if keep_cache { "kept" } else { "lost" }
        ));
        self.ready.clear();
        self.pending.clear();
        self.asked.clear();
        if !keep_cache {
            self.cache = None;
        }
        self.oracle.saw_agent_start(self.cache.as_ref());
        self.reconciler = Reconciler::new(self.config.clone(), self.cache.clone(), self.now);
        self.drain();
    }

    /// Crashes the container named `name`, if it runs, with exit `code`.
    pub fn crash(&mut self, name: &str, code: i64) -> bool {
        let Some(id) = self.runtime.by_name(name).map(|c| c.id.clone()) else {
            return false;
        };
        if !self.runtime.is_running(&id) {
            return false;
        }
        self.log(format_args!(
            "fault: {name} ({id}) crashes with exit {code}"
        ));
        let now = self.now;
        self.runtime.crash(now, &id, code);
        true
    }

    /// Runs until virtual time reaches `now + d`.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    /// Runs until virtual time reaches `until`, always jumping to the
    /// earliest next thing: a ready result, a container exit, a deadline.
    pub fn run_until(&mut self, until: Timestamp) {
        let mut idle_wakes = 0u32;
        loop {
            if let Some((at, _, _)) = self.ready.front() {
                if *at <= self.now {
                    if let Some((_, id, result)) = self.ready.pop_front() {
                        self.deliver(id, result);
                    }
                    continue;
                }
            }
            let mut next = until;
            next = next.min(self.reconciler.poll_timeout().at);
            if let Some(at) = self.runtime.next_event() {
                next = next.min(at);
            }
            if let Some((at, _, _)) = self.ready.front() {
                next = next.min(*at);
            }
            for (at, _) in self.pending.iter().filter_map(|p| p.due.as_ref()) {
                next = next.min(*at);
            }
            let next = next.max(self.now);
            self.now = next;
            self.runtime.advance(next);
            self.resolve_pending();
            let wake = self.reconciler.poll_timeout();
            if wake.at <= self.now {
                let before = self.ops.len() + self.published.len();
                self.reconciler.handle(self.now, Input::Timeout);
                self.drain();
                let progress = self.ops.len() + self.published.len() != before;
                if !progress && self.reconciler.poll_timeout().at <= self.now {
                    idle_wakes += 1;
                    assert!(
                        idle_wakes < 1000,
                        "livelock: the reconciler keeps asking to be woken at {} for {:?} and does nothing\n{}",
                        self.now,
                        wake.reason,
                        self.transcript
                    );
                } else {
                    idle_wakes = 0;
                }
            }
            let idle = self.ready.front().is_none_or(|(at, _, _)| *at > self.now);
            if self.now >= until && idle {
                return;
            }
        }
    }

    fn resolve_pending(&mut self) {
        let mut still = Vec::new();
        for p in std::mem::take(&mut self.pending) {
            if !self.runtime.is_running(&p.container) {
                schedule(&mut self.ready, self.now, p.id, p.result);
                continue;
            }
            match p.due {
                Some((at, result)) if at <= self.now => {
                    schedule(&mut self.ready, self.now, p.id, result);
                }
                _ => still.push(p),
            }
        }
        self.pending = still;
    }

    fn deliver(&mut self, id: CommandId, result: RuntimeResult) {
        self.log(format_args!("  <- {id} {}", describe_result(&result)));
        if result.is_err() {
            self.errors += 1;
        }
        if matches!(result, Ok(RuntimeReply::Listed { .. })) {
            self.oracle.saw_list();
        }
        if let Some(op) = self.asked.remove(&id) {
            self.oracle.saw_answer(&op, &result);
        }
        self.reconciler
            .handle(self.now, Input::RuntimeResult { id, result });
        self.drain();
    }

    /// Drains the reconciler's outputs, executing runtime operations.
    fn drain(&mut self) {
        while let Some(output) = self.reconciler.poll_output() {
            match output {
                Output::Runtime { id, op } => self.execute(id, op),
                Output::PublishState { deployment, state } => {
                    self.log(format_args!(
                        "publish {deployment}: {:?} rev {} {:?}{}",
                        state.phase,
                        state.revision,
                        state.message,
                        state
                            .cause
                            .as_ref()
                            .map(|c| format!(" cause {c:?}"))
                            .unwrap_or_default()
                    ));
                    self.oracle.check_published(
                        self.now,
                        &deployment,
                        &state,
                        &self.runtime,
                        &mut self.violations,
                    );
                    self.states.insert(deployment.clone(), state.clone());
                    self.published.push((deployment, state));
                }
                Output::ClearState { deployment } => {
                    self.log(format_args!("clear {deployment}"));
                    self.states.remove(&deployment);
                }
                Output::QueryRuntimeVersion => {
                    // Answered at once and kept out of the transcript: it
                    // changes no container.
                    let result = match self.faults.get_mut("version").and_then(VecDeque::pop_front)
                    {
                        Some(OpFault::Fail(kind) | OpFault::FailAfterEffect(kind)) => {
                            Err(RuntimeError::new(kind, "injected version failure"))
                        }
                        None => Ok(self.runtime.version()),
                    };
                    self.version_queries += 1;
                    self.reconciler
                        .handle(self.now, Input::RuntimeVersion { result });
                }
                Output::Heartbeat(hb) => {
                    if self.log_heartbeats {
                        self.log(format_args!("heartbeat {:?}", hb.runtime));
                    }
                    self.heartbeats.push(hb);
                }
                Output::PersistCache(cache) => self.cache = Some(cache),
                Output::QueryPullProgress { id, image } => {
                    // Answered at once from the fake's pulls; the reports
                    // it leads to are in the transcript.
                    let progress = self.runtime.pull_progress(&image);
                    self.reconciler
                        .handle(self.now, Input::PullProgress { id, progress });
                }
                other => panic!("the harness does not know the output {other:?}"),
            }
        }
    }

    fn execute(&mut self, id: CommandId, op: RuntimeOp) {
        self.log(format_args!("  -> {id} {}", describe_op(&op)));
        self.oracle
            .check_op(self.now, &op, &self.runtime, &mut self.violations);
        self.ops.push((self.now, op.clone()));
        self.asked.insert(id, op.clone());
        let fault = self.faults.get_mut(op.name()).and_then(VecDeque::pop_front);
        let completion = match fault {
            Some(OpFault::Fail(kind)) => Completion::Ready(Err(RuntimeError::new(
                kind,
                format!("injected {} failure", op.name()),
            ))),
            Some(OpFault::FailAfterEffect(kind)) => {
                let _ = self.runtime.execute(&op);
                Completion::Ready(Err(RuntimeError::new(
                    kind,
                    format!("injected {} failure after effect", op.name()),
                )))
            }
            None => self.runtime.execute(&op),
        };
        self.oracle
            .check_state(self.now, &self.runtime, &mut self.violations);
        match completion {
            Completion::Ready(result) => schedule(&mut self.ready, self.now, id, result),
            Completion::At { at, result } => {
                schedule(&mut self.ready, at.max(self.now), id, result);
            }
            Completion::WhenStopped {
                id: container,
                result,
            } => self.pending.push(Pending {
                id,
                container,
                result,
                due: None,
            }),
            Completion::AtUnlessStopped {
                at,
                result,
                id: container,
                stopped,
            } => self.pending.push(Pending {
                id,
                container,
                result: stopped,
                due: Some((at, result)),
            }),
        }
    }
}

/// Queues `result` for delivery at `at`, after everything due by then.
fn schedule(
    ready: &mut VecDeque<(Timestamp, CommandId, RuntimeResult)>,
    at: Timestamp,
    id: CommandId,
    result: RuntimeResult,
) {
    let i = ready.partition_point(|(t, _, _)| *t <= at);
    ready.insert(i, (at, id, result));
}

/// A runtime operation in a few words, for transcripts.
pub fn describe_op(op: &RuntimeOp) -> String {
    match op {
        RuntimeOp::List => "list".into(),
        RuntimeOp::Create { spec } => format!(
            "create {} image {} rev {}",
            spec.name,
            spec.image,
            spec.labels
                .get(podfleet_core::runtime::LABEL_REVISION)
                .map_or("?", String::as_str)
        ),
        RuntimeOp::Stop {
            container,
            signal,
            grace,
        } => format!("stop {container} {signal} grace {}s", grace.as_secs()),
        RuntimeOp::Remove { container, force } => {
            format!("remove {container}{}", if *force { " force" } else { "" })
        }
        RuntimeOp::InspectImage { image } | RuntimeOp::Pull { image } => {
            format!("{} {image}", op.name())
        }
        RuntimeOp::ListImages => "list_images".into(),
        RuntimeOp::RemoveImage { id } => format!("remove_image {id}"),
        other => format!("{} {}", other.name(), other.container().unwrap_or("")),
    }
}

/// A runtime operation's result in a few words, for transcripts and traces.
pub fn describe_result(result: &RuntimeResult) -> String {
    match result {
        Ok(RuntimeReply::Listed { containers }) => format!("listed {}", containers.len()),
        Ok(RuntimeReply::Created { id }) => format!("created {id}"),
        Ok(RuntimeReply::Inspected { status }) => {
            format!("inspected {} exit {:?}", status.state, status.exit_code)
        }
        Ok(RuntimeReply::Stopped { outcome }) => format!("stopped {outcome:?}"),
        Ok(RuntimeReply::ImageInspected { image: None }) => "image absent".into(),
        Ok(RuntimeReply::ImageInspected { image: Some(i) }) => format!("image present {}", i.id),
        Ok(RuntimeReply::Pulled { image }) => format!(
            "pulled {}",
            image.digest.as_deref().unwrap_or(image.id.as_str())
        ),
        Ok(RuntimeReply::ImagesListed { images, disk }) => format!(
            "images listed {}{}",
            images.len(),
            disk.map_or(String::new(), |d| format!(" disk {}%", d.percent()))
        ),
        Ok(RuntimeReply::ImageRemoved) => "image removed".into(),
        Ok(other) => format!("{other:?}").to_lowercase(),
        Err(e) => format!("error {e}"),
    }
}
