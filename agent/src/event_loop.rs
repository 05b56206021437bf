//! The agent's event loop, written once and driven by two shells.
//!
//! [`run`] feeds the podfleet-core [`Reconciler`] its inputs, carries out its
//! outputs and sleeps until its next deadline. It is generic over four small
//! traits, so the production agent (NATS, podman, tokio time, a state
//! directory) and the simulator (a fake broker over turmoil, the fake
//! runtime, simulated time, a simulated disk) run the very same code:
//!
//! - [`DesiredSource`]: desired-state puts and deletes for this device, the
//!   end of each initial snapshot (after start-up and after every
//!   reconnect), and command requests;
//! - [`Publisher`]: state and heartbeat puts, command replies;
//! - [`ContainerRuntime`]: the reconciler's runtime operations, its version
//!   queries, logs, exec;
//! - [`Clock`]: the time handed to the core and the sleep until its next wake;
//! - and a [`CacheStore`], the only thing that survives an agent crash.
//!
//! # What the loop guarantees
//!
//! - The loop never blocks on the network: reports go to the
//!   [`Outbox`], which keeps only the newest report
//!   per key (so it is bounded by the number of deployments), publishes one
//!   at a time, retries each failed key with its own capped backoff so that
//!   no report waits behind another, and replaces a state the broker
//!   refuses as too large by its summary. While NATS is away the reconciler
//!   keeps ticking.
//! - After every reconnect snapshot every known state and a heartbeat are
//!   republished, so the operator's view heals without waiting for a change.
//! - Runtime operations run concurrently; a `wait` that lasts an hour holds
//!   up nothing else, and neither does a version query (podman takes about
//!   a second to answer one).
//! - Wakes are taken in a fixed priority order (shutdown, runtime results,
//!   runtime versions, inbound messages, publish results, command work,
//!   timers), so a seeded simulation replays exactly.
//! - Shutdown returns at once and leaves every container running.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};
use futures_util::stream::{FuturesUnordered, StreamExt};
use podfleet_core::reconciler::{AgentCache, Input, Output, Reconciler, WakeReason};
use podfleet_core::runtime::{RuntimeError, RuntimeErrorKind};
use podfleet_core::time::{Backoff, Timestamp};
use podfleet_core::wire::text::Quoted;
use podfleet_core::wire::{
    CommandError, CommandReply, DeploymentName, DeploymentState, ErrorCode, ExecReply, ExecRequest,
    Heartbeat, LogsReply, LogsRequest, PingReply, Verb,
};
use podfleet_core::Config;

use crate::outbox::Outbox;
use crate::runtime::ContainerRuntime;

/// Time as the loop sees it.
///
/// `now` is what the core is handed; `sleep_until` must sleep on the same
/// timeline. Production uses [`TokioClock`]; under turmoil, tokio's clock is
/// the simulated one, so the same type serves the simulator.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
    /// Completes once `now()` has reached `at`.
    fn sleep_until(&self, at: Timestamp) -> impl Future<Output = ()> + Send;
}

/// A [`Clock`] on tokio's timer, counting from when it was made.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: tokio::time::Instant,
    /// What `now` says at `origin`.
    at_origin: Timestamp,
}

impl TokioClock {
    /// A clock whose origin is now.
    pub fn start() -> Self {
        Self::start_at(Timestamp::ZERO)
    }

    /// A clock that says `at` now. A shell that hands the core ages (of
    /// heartbeats, say) starts its clock at the wall clock, so that
    /// `now - age` is never clamped to the origin.
    pub fn start_at(at: Timestamp) -> Self {
        Self {
            origin: tokio::time::Instant::now(),
            at_origin: at,
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        self.at_origin + self.origin.elapsed()
    }

    fn sleep_until(&self, at: Timestamp) -> impl Future<Output = ()> + Send {
        tokio::time::sleep_until(self.origin + at.saturating_since(self.at_origin))
    }
}

pub use podfleet_core::session::{CommandRequest, Inbound};

/// The desired-state watch and the command subscription of one device.
pub trait DesiredSource: Send {
    /// The next inbound message; `None` once the source is closed for good.
    ///
    /// Must be cancel-safe: the loop drops this future when something else
    /// wakes it first, and nothing may be lost when it does.
    fn next(&mut self) -> impl Future<Output = Option<Inbound>> + Send;
}

/// A report on its way to the state or heartbeat bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Put this state at `<device>.<deployment>`.
    State {
        /// The deployment.
        deployment: DeploymentName,
        /// Its state.
        state: DeploymentState,
    },
    /// Delete `<device>.<deployment>` from the state bucket.
    Clear {
        /// The deployment.
        deployment: DeploymentName,
    },
    /// Put the device's heartbeat.
    Heartbeat(Heartbeat),
}

/// Why a publish did not go through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The broker did not take it (not connected, no acknowledgement in
    /// time, refused): the loop keeps the report and tries again later.
    #[error("publish failed: {0}")]
    Failed(String),
    /// The encoded report is larger than the broker accepts (its
    /// `max_payload`, or the bucket's largest value): trying again cannot
    /// help. The loop publishes a summary of a state in its place.
    #[error("a report of {size} bytes is over the broker's limit{}", limit.map(|l| format!(" of {l} bytes")).unwrap_or_default())]
    TooLarge {
        /// The encoded report's size.
        size: usize,
        /// The limit, when the broker said it.
        limit: Option<usize>,
    },
}

/// Where reports and replies go.
pub trait Publisher: Clone + Send + Sync + 'static {
    /// Writes one report; an error leaves it in the outbox for a retry.
    fn publish(&self, report: Report) -> impl Future<Output = Result<(), PublishError>> + Send;
    /// Sends a command reply to `reply_to`. Replies are not retried: the
    /// requester has its own timeout.
    fn reply(
        &self,
        reply_to: String,
        body: Vec<u8>,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
}

/// Why the cache could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("agent cache: {0}")]
pub struct CacheError(pub String);

/// The device disk the agent's cache lives on.
pub trait CacheStore: Send {
    /// The cache written last, or `None` when there is none.
    ///
    /// # Errors
    /// A cache that cannot be read or decoded; the loop then starts without
    /// one (the runtime's labels are enough to adopt healthy containers).
    fn load(&mut self) -> Result<Option<AgentCache>, CacheError>;
    /// Replaces the cache, atomically: after a crash the old or the new one
    /// is found, never a torn mix.
    ///
    /// # Errors
    /// The write failed; the loop logs it and carries on.
    fn store(&mut self, cache: &AgentCache) -> Result<(), CacheError>;
}

/// The loop's own settings (the reconciler's are in [`Config`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopOptions {
    /// Whether the `exec` command may run anything.
    pub exec_enabled: bool,
    /// The most bytes of log text a `logs` reply carries.
    pub logs_max_bytes: usize,
    /// The most bytes of each output stream an `exec` reply carries.
    pub exec_max_bytes: usize,
    /// The longest an `exec` may run, whatever the request asks.
    pub exec_max_timeout: Duration,
    /// The backoff between attempts to publish a report.
    pub publish_backoff: Backoff,
}

impl Default for LoopOptions {
    fn default() -> Self {
        Self {
            exec_enabled: false,
            logs_max_bytes: 64 * 1024,
            exec_max_bytes: 64 * 1024,
            exec_max_timeout: Duration::from_secs(300),
            publish_backoff: Backoff {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(30),
            },
        }
    }
}

/// Why [`run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopExit {
    /// The shutdown future completed.
    Shutdown,
    /// The desired-state source closed for good.
    SourceClosed,
}

/// Counters for tests, traces and the performance figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoopStats {
    /// Runtime operations started.
    pub runtime_ops: u64,
    /// Reports published successfully.
    pub published: u64,
    /// Publish attempts that failed (and were retried).
    pub publish_failures: u64,
    /// Commands answered.
    pub commands: u64,
    /// Cache writes that failed.
    pub cache_failures: u64,
}

type Pending<T> = FuturesUnordered<BoxFuture<'static, T>>;

/// Runs the agent until `shutdown` completes or `source` closes.
///
/// The reconciler starts from the cache in `store`, if one loads. `stats`
/// is updated as the loop goes, for whoever holds the reference after it
/// returns (tests, the simulator).
#[allow(clippy::too_many_arguments)]
pub async fn run<S, P, R, C, K>(
    config: Config,
    options: LoopOptions,
    mut source: S,
    publisher: P,
    runtime: R,
    clock: C,
    mut store: K,
    shutdown: impl Future<Output = ()> + Send,
    stats: &mut LoopStats,
) -> LoopExit
where
    S: DesiredSource,
    P: Publisher,
    R: ContainerRuntime,
    C: Clock,
    K: CacheStore,
{
    let cache = match store.load() {
        Ok(cache) => cache,
        Err(error) => {
            tracing::warn!(%error, "starting without the agent cache");
            None
        }
    };
    #[cfg(feature = "bugs")]
    let head_of_line = config.bugs().head_of_line_reports;
    let mut reconciler = Reconciler::new(config, cache, clock.now());
    let outbox = Outbox::new(options.publish_backoff);
    #[cfg(feature = "bugs")]
    let outbox = outbox.with_head_of_line_bug(head_of_line);
    let mut outbox = outbox;
    let mut publishing: Option<BoxFuture<'static, (Report, Result<(), PublishError>)>> = None;
    let mut ops: Pending<(podfleet_core::reconciler::CommandId, _)> = FuturesUnordered::new();
    let mut versions: Pending<Result<String, RuntimeError>> = FuturesUnordered::new();
    let mut commands: Pending<(String, Vec<u8>)> = FuturesUnordered::new();
    let mut replies: Pending<Result<(), PublishError>> = FuturesUnordered::new();
    let mut shutdown: Pin<Box<dyn Future<Output = ()> + Send + '_>> = Box::pin(shutdown);

    loop {
        let now = clock.now();
        let mut progress = Vec::new();
        while let Some(output) = reconciler.poll_output() {
            match output {
                Output::QueryPullProgress { id, image } => {
                    progress.push((id, runtime.pull_progress(&image)));
                }
                Output::Runtime { id, op } => {
                    stats.runtime_ops += 1;
                    tracing::debug!(id = id.get(), op = op.name(), container = ?op.container(), "runtime op");
                    let runtime = runtime.clone();
                    ops.push(async move { (id, runtime.execute(op).await) }.boxed());
                }
                Output::PublishState { deployment, state } => {
                    tracing::info!(%deployment, phase = ?state.phase, revision = state.revision.get(), "state");
                    outbox.push(now, Report::State { deployment, state });
                }
                Output::ClearState { deployment } => {
                    tracing::info!(%deployment, "state cleared");
                    outbox.push(now, Report::Clear { deployment });
                }
                Output::QueryRuntimeVersion => {
                    let runtime = runtime.clone();
                    versions.push(async move { runtime.version().await }.boxed());
                }
                Output::Heartbeat(heartbeat) => outbox.push(now, Report::Heartbeat(heartbeat)),
                Output::PersistCache(cache) => {
                    if let Err(error) = store.store(&cache) {
                        stats.cache_failures += 1;
                        tracing::warn!(%error, "agent cache not written");
                    }
                }
                other => tracing::error!(?other, "an output this loop does not carry out; dropped"),
            }
        }
        if !progress.is_empty() {
            // Answered at once: the figures are in memory. Their reports
            // come out of the next round of outputs.
            for (id, progress) in progress {
                reconciler.handle(now, Input::PullProgress { id, progress });
            }
            continue;
        }
        if publishing.is_none() {
            // A state whose deployment is being torn down no longer holds;
            // the clear comes after.
            outbox.retain_states(|d| reconciler.deployment_state(d).is_some());
            if let Some(report) = outbox.poll_transmit(now) {
                let publisher = publisher.clone();
                publishing = Some(
                    async move {
                        let result = publisher.publish(report.clone()).await;
                        (report, result)
                    }
                    .boxed(),
                );
            }
        }

        let wake = reconciler.poll_timeout();
        let wake_at = earliest(Some(wake.at), outbox.poll_timeout());
        let sleep = async {
            match wake_at {
                Some(at) => clock.sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let published = async {
            match publishing.as_mut() {
                Some(flight) => flight.await,
                None => std::future::pending().await,
            }
        };

        tokio::select! {
            biased;
            () = &mut shutdown => return LoopExit::Shutdown,
            Some((id, result)) = ops.next(), if !ops.is_empty() => {
                if let Err(e) = &result {
                    if e.kind == RuntimeErrorKind::Unavailable {
                        tracing::warn!(error = %e.message, "container runtime unavailable");
                    }
                }
                reconciler.handle(clock.now(), Input::RuntimeResult { id, result });
            }
            Some(result) = versions.next(), if !versions.is_empty() => {
                match &result {
                    Ok(version) => tracing::info!(version = %Quoted(version), "container runtime version"),
                    Err(e) => tracing::debug!(error = %e.message, "container runtime version not known"),
                }
                reconciler.handle(clock.now(), Input::RuntimeVersion { result });
            }
            inbound = source.next() => {
                let now = clock.now();
                match inbound {
                    None => return LoopExit::SourceClosed,
                    Some(Inbound::Put { deployment, revision, value }) => {
                        tracing::debug!(%deployment, revision = revision.get(), bytes = value.len(), "desired put");
                        reconciler.handle(now, Input::DesiredPut { deployment, revision, value: &value });
                    }
                    Some(Inbound::Delete { deployment, revision }) => {
                        tracing::debug!(%deployment, revision = revision.get(), "desired delete");
                        reconciler.handle(now, Input::DesiredDelete { deployment, revision });
                    }
                    Some(Inbound::Snapshot { present }) => {
                        tracing::info!(deployments = present.len(), "desired state in sync");
                        reconciler.handle(now, Input::DesiredResync { present: &present });
                        republish(&reconciler, &mut outbox, now);
                    }
                    Some(Inbound::Command(request)) => {
                        stats.commands += 1;
                        commands.push(answer(&reconciler, &options, &runtime, now, request));
                    }
                }
            }
            (report, result) = published => {
                publishing = None;
                if result.is_ok() {
                    stats.published += 1;
                } else {
                    stats.publish_failures += 1;
                }
                outbox.handle_result(clock.now(), report, result);
            }
            Some((reply_to, body)) = commands.next(), if !commands.is_empty() => {
                let publisher = publisher.clone();
                replies.push(async move { publisher.reply(reply_to, body).await }.boxed());
            }
            Some(result) = replies.next(), if !replies.is_empty() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "command reply not sent");
                }
            }
            () = sleep => {
                let now = clock.now();
                if wake.at <= now {
                    if !matches!(wake.reason, WakeReason::Heartbeat | WakeReason::Tick) {
                        tracing::debug!(reason = ?wake.reason, "wake");
                    }
                    reconciler.handle(now, Input::Timeout);
                }
            }
        }
    }
}

fn earliest(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// Queues every known state and a fresh heartbeat (after a reconnect).
fn republish(reconciler: &Reconciler, outbox: &mut Outbox, now: Timestamp) {
    for deployment in reconciler.deployments() {
        if let Some(state) = reconciler.deployment_state(deployment) {
            outbox.push(
                now,
                Report::State {
                    deployment: deployment.clone(),
                    state: state.clone(),
                },
            );
        }
    }
    outbox.push(now, Report::Heartbeat(reconciler.heartbeat(now)));
}

fn encode<T: serde::Serialize>(reply: &CommandReply<T>) -> Vec<u8> {
    serde_json::to_vec(reply).unwrap_or_else(|e| {
        // Only a non-string map key could fail here; none of our replies has one.
        format!(r#"{{"error":{{"code":"internal","message":"reply not encoded: {e}"}}}}"#)
            .into_bytes()
    })
}

fn error_reply(code: ErrorCode, message: impl Into<String>) -> Vec<u8> {
    encode::<()>(&CommandReply::Error(CommandError::new(code, message)))
}

fn runtime_error_code(kind: RuntimeErrorKind) -> ErrorCode {
    match kind {
        RuntimeErrorKind::NotFound => ErrorCode::NotFound,
        RuntimeErrorKind::Unavailable => ErrorCode::RuntimeUnavailable,
        _ => ErrorCode::Internal,
    }
}

/// The work that answers one command. Ping and every refusal are decided
/// here and now; logs and exec run on the runtime without holding the loop.
fn answer<R: ContainerRuntime>(
    reconciler: &Reconciler,
    options: &LoopOptions,
    runtime: &R,
    now: Timestamp,
    request: CommandRequest,
) -> BoxFuture<'static, (String, Vec<u8>)> {
    let reply_to = request.reply_to;
    let ready = |reply_to: String, body: Vec<u8>| async move { (reply_to, body) }.boxed();
    let container = |deployment: &DeploymentName, service: &str| {
        reconciler
            .service_container(deployment, service)
            .map(str::to_owned)
            .ok_or_else(|| {
                error_reply(
                    ErrorCode::NotFound,
                    format!(
                        "no running container for service {} of deployment {}",
                        Quoted(service),
                        Quoted(deployment.as_str())
                    ),
                )
            })
    };
    match request.verb {
        Verb::Ping => {
            let heartbeat = reconciler.heartbeat(now);
            let body = encode(&CommandReply::Ok(PingReply {
                device_id: heartbeat.device_id,
                agent_version: heartbeat.agent_version,
                uptime_s: heartbeat.uptime_s,
            }));
            ready(reply_to, body)
        }
        Verb::Logs => {
            let request: LogsRequest = match serde_json::from_slice(&request.body) {
                Ok(r) => r,
                Err(e) => {
                    let body = error_reply(ErrorCode::BadRequest, format!("logs request: {e}"));
                    return ready(reply_to, body);
                }
            };
            let id = match container(&request.deployment, &request.service) {
                Ok(id) => id,
                Err(body) => return ready(reply_to, body),
            };
            let runtime = runtime.clone();
            let max_bytes = options.logs_max_bytes;
            async move {
                let body = match runtime.logs(&id, request.tail_lines, max_bytes).await {
                    Ok(out) => encode(&CommandReply::Ok(LogsReply {
                        container_id: id,
                        text: out.text,
                        truncated: out.truncated,
                    })),
                    Err(e) => error_reply(runtime_error_code(e.kind), e.message),
                };
                (reply_to, body)
            }
            .boxed()
        }
        Verb::Exec => {
            if !options.exec_enabled {
                let body = error_reply(
                    ErrorCode::ExecDisabled,
                    "exec is disabled in this agent's configuration (allow_exec = false)",
                );
                return ready(reply_to, body);
            }
            let request: ExecRequest = match serde_json::from_slice(&request.body) {
                Ok(r) => r,
                Err(e) => {
                    let body = error_reply(ErrorCode::BadRequest, format!("exec request: {e}"));
                    return ready(reply_to, body);
                }
            };
            if request.argv.is_empty() {
                let body = error_reply(ErrorCode::BadRequest, "exec request: argv is empty");
                return ready(reply_to, body);
            }
            let id = match container(&request.deployment, &request.service) {
                Ok(id) => id,
                Err(body) => return ready(reply_to, body),
            };
            let timeout = Duration::from_secs(request.timeout_secs).min(options.exec_max_timeout);
            let runtime = runtime.clone();
            let max_bytes = options.exec_max_bytes;
            async move {
                let body = match runtime.exec(&id, &request.argv, timeout, max_bytes).await {
                    Ok(out) => encode(&CommandReply::Ok(ExecReply {
                        exit_code: out.exit_code,
                        stdout: out.stdout,
                        stderr: out.stderr,
                        truncated: out.truncated,
                        timed_out: out.timed_out,
                    })),
                    Err(e) => error_reply(runtime_error_code(e.kind), e.message),
                };
                (reply_to, body)
            }
            .boxed()
        }
    }
}
