//! The `podfleet controller` process: moves bytes between NATS JetStream KV
//! and the sans-IO fleet [`Controller`], which decides.
//!
//! # What it does
//! 1. Connects ([`FleetClient::connect`], retried with backoff) and makes
//!    sure the buckets exist.
//! 2. Starts a *pass*: one ordered consumer per input bucket (deployments,
//!    devices, desired, state, heartbeats, status) delivering the newest entry of
//!    every key, then every change. Each entry is handed to a fresh
//!    [`Controller`]; once every consumer has delivered every key its
//!    bucket held just after the consumer was made (at once for an empty
//!    bucket), it hands in [`Input::Synced`].
//! 3. Carries out the controller's writes as pipelined JetStream publishes
//!    (up to [`ControllerOptions::max_in_flight`] unacknowledged at once);
//!    a refused desired-key write goes back as [`Input::WriteFailed`].
//! 4. Sleeps until [`Controller::poll_timeout`] and hands in
//!    [`Input::Timeout`].
//! 5. On a failed watch or a lost connection it drops the pass and starts
//!    over (step 2) with a fresh controller, which rewrites nothing that is
//!    already right.
//!
//! It never decides what a device should run: every decision is the core's.
//!
//! The same passes drive the Kubernetes operator: [`run_with`] takes a
//! [`Side`] that feeds the inputs which do not come from NATS (there, the
//! custom resources) and carries out the outputs that do not go to NATS
//! (there, the resources' statuses). `podfleet controller` runs with
//! [`NatsOnly`]: every input from NATS, every output to NATS.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, SelectAll};
use futures_util::{FutureExt, StreamExt};
use podfleet_agent::event_loop::{Clock, TokioClock};
use podfleet_core::fleet::controller::{Config, Input, Output};
use podfleet_core::fleet::Controller;
use podfleet_core::time::{Backoff, Timestamp};
use podfleet_core::wire::names::{kv_subject, DESIRED_BUCKET, STATE_BUCKET, STATUS_BUCKET};
use podfleet_core::wire::{DeploymentKey, DeploymentName};

use crate::client::{
    wall_clock, watched_entry, Bucket, BucketPlan, ClientError, FleetClient, SnapshotRead,
    KV_OPERATION,
};
use crate::context::Connection;

/// How the controller process runs.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// The core controller's knobs.
    pub config: Config,
    /// How long connecting (and each bucket check) may take.
    pub connect_timeout: Duration,
    /// How many writes may wait for their acknowledgement at once (below
    /// async-nats's own bound of 5,000 per JetStream context).
    pub max_in_flight: usize,
    /// The delay between attempts to connect, and before a pass that
    /// follows a failed one.
    pub restart_backoff: Backoff,
}

impl Default for ControllerOptions {
    /// The core's default [`Config`], a 5 s connect timeout, 512 writes in
    /// flight, restarts after 1 s doubling to 30 s.
    fn default() -> Self {
        Self {
            config: Config::default(),
            connect_timeout: Duration::from_secs(5),
            max_in_flight: 512,
            restart_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
        }
    }
}

/// Where a pass's inputs come from besides NATS, and who carries out the
/// outputs that do not go to NATS.
///
/// A pass starts a fresh [`Controller`], hands it [`Side::start`], then
/// every entry of [`Side::buckets`] and, whenever [`Side::ready`]
/// completes, [`Side::feed`]. It offers every output to [`Side::take`]
/// first; what the side hands back is written to NATS.
pub trait Side {
    /// The buckets the pass reads from NATS.
    fn buckets(&self) -> &[Bucket];
    /// Hands a fresh controller everything this side knows, before any
    /// bucket has been read.
    fn start(&mut self, controller: &mut Controller, now: Timestamp);
    /// Completes when this side has something for [`Side::feed`].
    fn ready(&mut self) -> impl Future<Output = ()> + Send;
    /// Hands the controller what this side learnt since.
    fn feed(&mut self, controller: &mut Controller, now: Timestamp);
    /// Carries out `output` if it is this side's, or hands it back for
    /// NATS.
    fn take(&mut self, output: Output) -> Option<Output>;
    /// Looks at the controller after each input it handled.
    fn observe(&mut self, controller: &Controller) {
        let _ = controller;
    }
    /// The pass ended (its controller is dropped); a new one starts later.
    fn stopped(&mut self) {}
}

/// The side of `podfleet controller`: every bucket is read from NATS and
/// every output written to NATS.
#[derive(Debug, Clone, Copy, Default)]
pub struct NatsOnly;

impl Side for NatsOnly {
    fn buckets(&self) -> &[Bucket] {
        &Bucket::ALL
    }

    fn start(&mut self, _: &mut Controller, _: Timestamp) {}

    fn ready(&mut self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }

    fn feed(&mut self, _: &mut Controller, _: Timestamp) {}

    fn take(&mut self, output: Output) -> Option<Output> {
        Some(output)
    }
}

/// Runs the fleet controller until `shutdown` completes.
///
/// # Errors
/// Only for what retrying cannot mend: credentials the server refuses and
/// settings that can never work. An unreachable server is retried forever.
pub async fn run_controller(
    connection: Connection,
    plan: BucketPlan,
    options: ControllerOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_with(connection, plan, options, NatsOnly, shutdown).await
}

/// Runs the fleet controller with `side` until `shutdown` completes, as
/// [`run_controller`] does.
///
/// # Errors
/// As [`run_controller`].
pub async fn run_with<S: Side>(
    connection: Connection,
    plan: BucketPlan,
    options: ControllerOptions,
    mut side: S,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let backoff = options.restart_backoff;
    let mut failures = 0;
    let client = loop {
        let connect = FleetClient::connect(&connection, &plan, options.connect_timeout);
        let error = tokio::select! {
            () = &mut shutdown => return Ok(()),
            outcome = connect => match outcome {
                Ok(client) => break client,
                Err(error @ (ClientError::CredentialsRefused { .. } | ClientError::InvalidSettings { .. })) => {
                    return Err(error.into())
                }
                Err(error) => error,
            },
        };
        let delay = backoff.delay(failures);
        failures += 1;
        tracing::warn!(%error, retry_in = ?delay, "cannot start the controller");
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    };
    tracing::info!(url = client.url(), "controller connected");
    failures = 0;
    loop {
        let ended = tokio::select! {
            () = &mut shutdown => break,
            ended = run_pass(&client, &options, &mut side) => ended,
        };
        side.stopped();
        if ended.synced {
            failures = 0;
        }
        let delay = backoff.delay(failures);
        failures += 1;
        tracing::warn!(reason = %ended.reason, restart_in = ?delay, "starting over with a fresh controller");
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    tracing::info!("controller shutting down");
    // Writes already handed to the client go out before it is dropped.
    let _ = tokio::time::timeout(options.connect_timeout, client.nats().flush()).await;
    Ok(())
}

/// Why a pass ended, and whether it got as far as [`Input::Synced`].
struct PassEnd {
    synced: bool,
    reason: String,
}

/// A write the controller asked for, as it is logged and reported.
#[derive(Debug, Clone)]
enum Write {
    PutDesired(DeploymentKey),
    DeleteDesired(DeploymentKey),
    DeleteState(DeploymentKey),
    PutStatus(DeploymentName),
    DeleteStatus(DeploymentName),
}

/// A write's acknowledgement: the new revision, or why it failed.
type Acked = (Write, Result<u64, String>);

/// One controller from a fresh read of the buckets until a watch fails or
/// the connection is lost.
async fn run_pass<S: Side>(
    client: &FleetClient,
    options: &ControllerOptions,
    side: &mut S,
) -> PassEnd {
    let mut link = client.link();
    let ended = |synced: bool, reason: String| PassEnd { synced, reason };
    while !link.borrow_and_update().connected {
        if link.changed().await.is_err() {
            return ended(false, "the client is gone".into());
        }
    }
    let disconnects = link.borrow().disconnects;
    let buckets = side.buckets().to_vec();
    let watches = buckets.iter().map(|bucket| client.watch_bucket(*bucket));
    let watches = match futures_util::future::try_join_all(watches).await {
        Ok(watches) => watches,
        Err(error) => return ended(false, error.to_string()),
    };
    let mut snapshots = Vec::with_capacity(watches.len());
    let mut entries: SelectAll<_> = SelectAll::new();
    for (watch, bucket) in watches.into_iter().zip(buckets.iter().copied()) {
        snapshots.push(watch.snapshot);
        entries.push(watch.messages.map(move |m| (bucket, m)).boxed());
    }
    // On the wall clock's scale, so that a heartbeat's age never reaches
    // back past the clock's origin.
    let clock = TokioClock::start_at(wall_clock());
    let mut controller = Controller::new(options.config.clone(), clock.now());
    side.start(&mut controller, clock.now());
    let mut read = 0u64;
    if snapshots.iter().all(SnapshotRead::is_complete) {
        controller.handle(clock.now(), Input::Synced);
        tracing::info!("every bucket is empty; converging");
    }
    let mut queue: VecDeque<Output> = VecDeque::new();
    let mut in_flight: FuturesUnordered<BoxFuture<'static, Acked>> = FuturesUnordered::new();
    loop {
        while let Some(output) = controller.poll_output() {
            queue.extend(side.take(output));
        }
        side.observe(&controller);
        while in_flight.len() < options.max_in_flight {
            let Some(output) = queue.pop_front() else {
                break;
            };
            match send(client, output).await {
                Ok(Some(ack)) => in_flight.push(ack),
                Ok(None) => {}
                Err((write, error)) => acked(&mut controller, &clock, write, Err(error)),
            }
        }
        let wake = controller.poll_timeout();
        let sleep = async {
            match wake {
                Some(wake) => clock.sleep_until(wake.at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            changed = link.changed() => {
                let now = *link.borrow_and_update();
                if changed.is_err() || now.disconnects != disconnects || !now.connected {
                    return ended(controller.is_synced(), "the connection to NATS was lost".into());
                }
            }
            Some((write, result)) = in_flight.next(), if !in_flight.is_empty() => {
                acked(&mut controller, &clock, write, result);
            }
            entry = entries.next() => {
                let Some((bucket, message)) = entry else {
                    return ended(controller.is_synced(), "every watch ended".into());
                };
                let message = match message {
                    Ok(message) => message,
                    Err(error) => {
                        return ended(
                            controller.is_synced(),
                            format!("the watch of {} failed: {error}", bucket.name()),
                        )
                    }
                };
                let Some((entry, written)) = watched_entry(&message) else {
                    continue;
                };
                if let Some(index) = buckets.iter().position(|b| *b == bucket) {
                    snapshots[index].deliver(&entry);
                }
                if let Some(fed) = bucket.classify(entry, written) {
                    controller.handle(clock.now(), fed.into_input(wall_clock()));
                }
                read += 1;
                if !controller.is_synced() && snapshots.iter().all(SnapshotRead::is_complete) {
                    controller.handle(clock.now(), Input::Synced);
                    tracing::info!(entries = read, "read every bucket; converging");
                }
            }
            () = sleep => controller.handle(clock.now(), Input::Timeout),
            () = side.ready() => side.feed(&mut controller, clock.now()),
        }
    }
}

/// Logs a write's outcome and reports a refused desired-key write.
fn acked(
    controller: &mut Controller,
    clock: &TokioClock,
    write: Write,
    result: Result<u64, String>,
) {
    match (write, result) {
        (Write::PutDesired(key), Ok(revision)) => {
            tracing::info!(device = %key.device, deployment = %key.deployment, revision, "desired key written");
        }
        (Write::DeleteDesired(key), Ok(revision)) => {
            tracing::info!(device = %key.device, deployment = %key.deployment, revision, "desired key deleted");
        }
        (Write::DeleteState(key), Ok(revision)) => {
            tracing::info!(device = %key.device, deployment = %key.deployment, revision, "orphaned report deleted");
        }
        (Write::PutStatus(name), Ok(revision)) => {
            tracing::debug!(deployment = %name, revision, "status written");
        }
        (Write::DeleteStatus(name), Ok(revision)) => {
            tracing::info!(deployment = %name, revision, "status deleted");
        }
        (Write::PutDesired(key) | Write::DeleteDesired(key), Err(error)) => {
            tracing::warn!(device = %key.device, deployment = %key.deployment, %error, "desired key write refused; will retry");
            controller.handle(clock.now(), Input::WriteFailed { key, error });
        }
        (Write::DeleteState(key), Err(error)) => {
            tracing::warn!(device = %key.device, deployment = %key.deployment, %error, "orphaned report not deleted");
        }
        (Write::PutStatus(name) | Write::DeleteStatus(name), Err(error)) => {
            tracing::warn!(deployment = %name, %error, "status write refused");
        }
    }
}

/// Publishes the write and returns its acknowledgement, or why it could not
/// be sent; `Ok(None)` (logged) for an output this shell does not know.
async fn send(
    client: &FleetClient,
    output: Output,
) -> Result<Option<BoxFuture<'static, Acked>>, (Write, String)> {
    let delete = || PublishMessage::build().header(KV_OPERATION, "DEL");
    let (subject, message, write) = match output {
        Output::PutDesired { key, payload } => (
            kv_subject(DESIRED_BUCKET, &key.to_key()),
            PublishMessage::build().payload(payload.to_vec().into()),
            Write::PutDesired(key),
        ),
        Output::DeleteDesired { key } => (
            kv_subject(DESIRED_BUCKET, &key.to_key()),
            delete(),
            Write::DeleteDesired(key),
        ),
        Output::DeleteState { key } => (
            kv_subject(STATE_BUCKET, &key.to_key()),
            delete(),
            Write::DeleteState(key),
        ),
        Output::PutStatus { name, status } => {
            let body = match serde_json::to_vec(&status) {
                Ok(body) => body,
                Err(e) => return Err((Write::PutStatus(name), e.to_string())),
            };
            (
                kv_subject(STATUS_BUCKET, name.as_str()),
                PublishMessage::build().payload(body.into()),
                Write::PutStatus(name),
            )
        }
        Output::DeleteStatus { name } => (
            kv_subject(STATUS_BUCKET, name.as_str()),
            delete(),
            Write::DeleteStatus(name),
        ),
        other => {
            tracing::error!(output = ?other, "a controller output this shell does not carry out; dropped");
            return Ok(None);
        }
    };
    match client.jetstream().send_publish(subject, message).await {
        Ok(ack) => Ok(Some(
            async move {
                let result = ack.await.map(|a| a.sequence).map_err(|e| e.to_string());
                (write, result)
            }
            .boxed(),
        )),
        Err(error) => Err((write, error.to_string())),
    }
}
