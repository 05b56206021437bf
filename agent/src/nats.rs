//! The NATS adapter: this device's desired state, commands and reports over
//! NATS JetStream.
//!
//! [`connect`] returns at once, even when no server is reachable: the
//! client connects in the background and retries forever. It yields a
//! [`NatsSource`] (the loop's [`DesiredSource`]) and a [`NatsPublisher`]
//! (its [`Publisher`]).
//!
//! A background task owns the watch and the command subscription and feeds
//! an mpsc channel, so [`NatsSource::next`] is a channel receive: cancel-safe,
//! and never blocked by the network. The task only moves bytes and time: every
//! decision is podfleet-core's sans-IO [`Session`] (the simulator's link
//! drives the same one). The task feeds it connects and disconnects, the
//! outcome of each watch it was asked to create (the ordered consumer's
//! `num_pending`), each watched message (subject, `KV-Operation` header,
//! stream sequence, `info.pending`, payload), command requests, created
//! buckets and the retry timer; it creates watches, forwards puts, deletes,
//! snapshots and commands to the loop, sends the refusals the session wrote
//! and logs what it skipped. After every (re)connect the session asks for a
//! fresh watch that delivers the newest entry of each of this device's keys
//! and then [`Inbound::Snapshot`], which is how deletes made while the agent
//! was away are noticed.
//!
//! # What goes over the wire, and why (see docs/operations.md)
//!
//! Every subject this module uses names the device, so a nats-server
//! configuration can grant a device exactly its own keys:
//!
//! - the watch is an ordered push consumer created on
//!   `$JS.API.CONSUMER.CREATE.KV_podfleet-desired.<name>.$KV.podfleet-desired.<device>.*`
//!   (the consumer has a name, so async-nats puts the filter into the
//!   subject; nats-server 2.9 checks that the filter in the body matches it).
//!   No `STREAM.INFO` and no direct get: both would need permissions that
//!   read any device's keys;
//! - state and heartbeats are plain JetStream publishes to
//!   `$KV.podfleet-state.<device>.<deployment>` and
//!   `$KV.podfleet-heartbeats.<device>` (a `KV-Operation: DEL` header for
//!   deletes), not `Store::put`, which would first ask for the stream's info;
//! - replies and deliveries use the inbox prefix from the configuration
//!   (by default `_INBOX.<device>`);
//! - commands arrive on `device-commands.<device>.*`;
//! - once connected, the task makes sure the KV buckets exist
//!   ([`crate::buckets::ensure_bucket`]: `$JS.API.STREAM.INFO.KV_<bucket>`,
//!   then `$JS.API.STREAM.CREATE.KV_<bucket>` for a missing one). A device
//!   user normally may not; the refusal (or timeout) is logged once at warn
//!   and the agent carries on.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::consumer::push::{Ordered, OrderedConfig};
use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy};
use async_nats::jetstream::message::PublishMessage;
use async_nats::{Client, ConnectOptions, Event, Subscriber};
use futures_util::StreamExt;
use podfleet_core::session::{
    self, CommandMessage, Input, Operation, Output, Session, SkipReason, WatchedEntry,
};
use podfleet_core::time::Backoff;
use podfleet_core::wire::names::{
    device_command_filter, heartbeat_key, DESIRED_BUCKET, HEARTBEAT_BUCKET, STATE_BUCKET,
};
use podfleet_core::wire::{DeploymentKey, DeploymentName, DeviceId};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::buckets::{self, BucketError, BucketSettings, Ensured};
use crate::event_loop::{
    Clock, DesiredSource, Inbound, PublishError, Publisher, Report, TokioClock,
};

/// The JetStream header that marks a KV delete or purge.
const KV_OPERATION: &str = "KV-Operation";
/// How many inbound messages wait for the loop before the task waits too.
const INBOUND_CAPACITY: usize = 256;

/// How the agent proves who it is to nats-server.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// No credentials (a development server).
    None,
    /// A user name and password.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// A bearer token.
    Token(String),
    /// An NKey seed (`SU...`), read from a file.
    NKeySeed(String),
    /// A `.creds` file (JWT and NKey seed) for decentralised auth.
    CredsFile(PathBuf),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret.
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::UserPassword { user, .. } => write!(f, "UserPassword({user:?}, ***)"),
            Credentials::Token(_) => f.write_str("Token(***)"),
            Credentials::NKeySeed(_) => f.write_str("NKeySeed(***)"),
            Credentials::CredsFile(path) => write!(f, "CredsFile({})", path.display()),
        }
    }
}

impl std::fmt::Display for Credentials {
    /// The method, for people: `user rpi-01, password ***`; never a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::None => f.write_str("none"),
            Credentials::UserPassword { user, .. } => write!(f, "user {user}, password ***"),
            Credentials::Token(_) => f.write_str("token ***"),
            Credentials::NKeySeed(_) => f.write_str("NKey seed ***"),
            Credentials::CredsFile(path) => write!(f, "creds file {}", path.display()),
        }
    }
}

/// What [`connect`] needs.
#[derive(Debug, Clone)]
pub struct NatsSettings {
    /// This device.
    pub device: DeviceId,
    /// Server URLs, tried in turn.
    pub urls: Vec<String>,
    /// Credentials.
    pub credentials: Credentials,
    /// The prefix of every inbox this client subscribes to; per device, so
    /// the server can keep devices out of each other's replies.
    pub inbox_prefix: String,
    /// How long a publish may wait for JetStream's acknowledgement.
    pub request_timeout: Duration,
    /// The backoff between attempts to create the watch.
    pub watch_backoff: Backoff,
    /// The client name shown by the server.
    pub client_name: String,
    /// The KV buckets to create at connect when missing (existing ones are
    /// left as they are); empty to create none.
    pub buckets: Vec<BucketSettings>,
}

impl NatsSettings {
    /// Defaults for `device`: a local server, no credentials, inbox prefix
    /// `_INBOX.<device>`, a 5 s request timeout, watch retries after 1 s
    /// doubling to 30 s, and podfleet's three buckets
    /// ([`buckets::fleet_buckets`]) created when missing.
    pub fn new(device: DeviceId) -> Self {
        Self {
            inbox_prefix: default_inbox_prefix(&device),
            client_name: format!("podfleet-agent {device}"),
            device,
            urls: vec!["nats://127.0.0.1:4222".to_owned()],
            credentials: Credentials::None,
            request_timeout: Duration::from_secs(5),
            watch_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
            buckets: buckets::fleet_buckets().to_vec(),
        }
    }
}

/// `_INBOX.<device>`: the default inbox prefix of a device.
pub fn default_inbox_prefix(device: &DeviceId) -> String {
    format!("_INBOX.{device}")
}

/// Why the NATS adapter could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// The credentials file could not be read or parsed.
    #[error("cannot read the NATS credentials file {path}: {source}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The client could not be set up (a bad URL, a bad NKey seed...).
    #[error("cannot set up the NATS client: {0}")]
    Connect(String),
}

/// The client options that log in with `credentials`, and nothing else
/// set: the agent and the control plane add their own names, inboxes and
/// retry policies.
///
/// # Errors
/// [`NatsError::Credentials`] when a `.creds` file cannot be read or parsed.
pub async fn connect_options(credentials: &Credentials) -> Result<ConnectOptions, NatsError> {
    Ok(match credentials {
        Credentials::None => ConnectOptions::new(),
        Credentials::UserPassword { user, password } => {
            ConnectOptions::with_user_and_password(user.clone(), password.clone())
        }
        Credentials::Token(token) => ConnectOptions::with_token(token.clone()),
        Credentials::NKeySeed(seed) => ConnectOptions::with_nkey(seed.clone()),
        Credentials::CredsFile(path) => {
            ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|source| NatsError::Credentials {
                    path: path.clone(),
                    source,
                })?
        }
    })
}

/// Starts the NATS client, which connects in the background and retries
/// forever, and the task that watches this device's keys.
///
/// Must be called within a tokio runtime.
///
/// # Errors
/// [`NatsError`] for settings that can never work: an unreadable creds file,
/// an invalid URL or seed. An unreachable server is not an error.
pub async fn connect(settings: NatsSettings) -> Result<(NatsSource, NatsPublisher), NatsError> {
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let client = connect_options(&settings.credentials)
        .await?
        .name(&settings.client_name)
        .custom_inbox_prefix(&settings.inbox_prefix)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .request_timeout(Some(settings.request_timeout))
        .event_callback(move |event| {
            let events_tx = events_tx.clone();
            async move {
                // The receiver is gone only when the agent is shutting down.
                let _ = events_tx.send(event);
            }
        })
        .connect(settings.urls.join(","))
        .await
        .map_err(|e| NatsError::Connect(e.to_string()))?;
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_CAPACITY);
    let publisher = NatsPublisher {
        client: client.clone(),
        device: settings.device.clone(),
        timeout: settings.request_timeout,
    };
    let clock = TokioClock::start();
    let session = Session::new(
        session::Config::new(settings.device.clone()).watch_backoff(settings.watch_backoff),
        clock.now(),
    );
    let watcher = Watcher {
        js: async_nats::jetstream::new(client.clone()),
        client,
        device: settings.device,
        session,
        clock,
        inbound: inbound_tx,
        buckets: settings.buckets,
        request_timeout: settings.request_timeout,
    };
    tokio::spawn(watcher.run(events_rx));
    Ok((
        NatsSource {
            inbound: inbound_rx,
        },
        publisher,
    ))
}

/// The loop's [`DesiredSource`] over NATS: the receiving end of the
/// background task's channel.
#[derive(Debug)]
pub struct NatsSource {
    inbound: mpsc::Receiver<Inbound>,
}

impl DesiredSource for NatsSource {
    async fn next(&mut self) -> Option<Inbound> {
        self.inbound.recv().await
    }
}

/// The loop's [`Publisher`] over NATS JetStream.
#[derive(Debug, Clone)]
pub struct NatsPublisher {
    client: Client,
    device: DeviceId,
    timeout: Duration,
}

impl NatsPublisher {
    async fn kv_publish(
        &self,
        subject: String,
        message: PublishMessage,
        size: usize,
    ) -> Result<(), PublishError> {
        let js = async_nats::jetstream::new(self.client.clone());
        let attempt = async {
            let ack = js
                .send_publish(subject.clone(), message)
                .await
                .map_err(|e| e.to_string())?;
            ack.await.map(drop).map_err(|e| e.to_string())
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(())) => Ok(()),
            // JetStream's answer when a value is over the bucket's
            // `max_value_size` (the stream's max_msg_size, error 10054);
            // async-nats passes it on as text only.
            Ok(Err(e)) if e.contains("message size exceeds maximum") => {
                Err(PublishError::TooLarge { size, limit: None })
            }
            Ok(Err(e)) => Err(PublishError::Failed(format!("{subject}: {e}"))),
            Err(_) => Err(PublishError::Failed(format!(
                "{subject}: no acknowledgement within {:?}",
                self.timeout
            ))),
        }
    }

    fn state_subject(&self, deployment: &DeploymentName) -> String {
        let key = DeploymentKey {
            device: self.device.clone(),
            deployment: deployment.clone(),
        };
        kv_subject(STATE_BUCKET, &key.to_key())
    }
}

impl Publisher for NatsPublisher {
    async fn publish(&self, report: Report) -> Result<(), PublishError> {
        let mut size = 0;
        let (subject, message) = match report {
            Report::State { deployment, state } => {
                let body = serde_json::to_vec(&state)
                    .map_err(|e| PublishError::Failed(format!("state not encoded: {e}")))?;
                // The server would close the connection over an oversized
                // message; refuse it here so the loop sends a summary.
                let limit = self.client.server_info().max_payload;
                if limit > 0 && body.len() > limit {
                    return Err(PublishError::TooLarge {
                        size: body.len(),
                        limit: Some(limit),
                    });
                }
                size = body.len();
                (
                    self.state_subject(&deployment),
                    PublishMessage::build().payload(body.into()),
                )
            }
            Report::Clear { deployment } => (
                self.state_subject(&deployment),
                PublishMessage::build().header(KV_OPERATION, "DEL"),
            ),
            Report::Heartbeat(heartbeat) => {
                let body = serde_json::to_vec(&heartbeat)
                    .map_err(|e| PublishError::Failed(format!("heartbeat not encoded: {e}")))?;
                size = body.len();
                (
                    kv_subject(HEARTBEAT_BUCKET, &heartbeat_key(&self.device)),
                    PublishMessage::build().payload(body.into()),
                )
            }
        };
        self.kv_publish(subject, message, size).await
    }

    async fn reply(&self, reply_to: String, body: Vec<u8>) -> Result<(), PublishError> {
        let send = self.client.publish(reply_to.clone(), body.into());
        match tokio::time::timeout(self.timeout, send).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(PublishError::Failed(format!("reply to {reply_to}: {e}"))),
            Err(_) => Err(PublishError::Failed(format!(
                "reply to {reply_to}: timed out"
            ))),
        }
    }
}

pub use podfleet_core::wire::names::kv_subject;

/// The stream behind a KV bucket.
pub fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// The background task: moves bytes and time between async-nats and the
/// [`Session`], which decides.
struct Watcher {
    client: Client,
    js: async_nats::jetstream::Context,
    device: DeviceId,
    session: Session,
    clock: TokioClock,
    inbound: mpsc::Sender<Inbound>,
    buckets: Vec<BucketSettings>,
    request_timeout: Duration,
}

/// What became of each bucket the agent made sure of.
type BucketOutcomes = Vec<(String, Result<Ensured, BucketError>)>;

impl Watcher {
    async fn run(mut self, mut events: mpsc::UnboundedReceiver<Event>) {
        let mut commands = match self
            .client
            .subscribe(device_command_filter(&self.device))
            .await
        {
            Ok(subscriber) => Some(subscriber),
            Err(error) => {
                tracing::error!(%error, "cannot subscribe to the command subject; commands are off");
                None
            }
        };
        let mut watch: Option<Ordered> = None;
        // Asked again after each connect until an attempt gets answers;
        // a refusal is warned about once.
        let mut buckets_pending = !self.buckets.is_empty();
        let mut ensuring: Option<JoinHandle<BucketOutcomes>> = None;
        let mut warned = false;
        // Bucket-check subjects the server said this user may not publish to.
        let mut denied = BTreeSet::new();
        loop {
            while let Some(output) = self.session.poll_output() {
                match output {
                    Output::StartWatch => {
                        watch = None;
                        let outcome = self.start_watch().await;
                        let now = self.clock.now();
                        match outcome {
                            Ok((messages, pending)) => {
                                tracing::info!(entries = pending, "watching the desired state");
                                watch = Some(messages);
                                self.session.handle(now, Input::WatchStarted { pending });
                            }
                            Err(error) => {
                                self.session.handle(now, Input::WatchFailed);
                                let retry_in = self
                                    .session
                                    .poll_timeout()
                                    .map(|at| at.saturating_since(now));
                                if ensuring.is_some() {
                                    // Likely a bucket the check is about to create.
                                    tracing::debug!(%error, ?retry_in, "cannot watch the desired state while the buckets are checked");
                                } else {
                                    tracing::warn!(%error, ?retry_in, "cannot watch the desired state");
                                }
                            }
                        }
                    }
                    Output::Reply { reply_to, body } => {
                        if let Err(error) = self.client.publish(reply_to, body.into()).await {
                            tracing::debug!(%error, "command refusal not sent");
                        }
                    }
                    Output::Skipped { reason } => log_skip(&reason),
                    Output::Deliver(inbound) => {
                        if let Inbound::Put {
                            deployment,
                            revision,
                            ..
                        } = &inbound
                        {
                            tracing::debug!(%deployment, revision = revision.get(), "desired entry");
                        }
                        if self.inbound.send(inbound).await.is_err() {
                            return;
                        }
                    }
                    other => {
                        tracing::error!(output = ?other, "a session output this task does not carry out; dropped")
                    }
                }
            }
            let retry_at = self.session.poll_timeout();
            let retry = async {
                match retry_at {
                    Some(at) => self.clock.sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = self.inbound.closed() => return,
                event = events.recv() => match event {
                    Some(Event::Connected) => {
                        tracing::info!("connected to NATS");
                        if buckets_pending && ensuring.is_none() {
                            ensuring = Some(tokio::spawn(ensure_buckets(
                                self.client.clone(),
                                self.buckets.clone(),
                                self.request_timeout,
                            )));
                        }
                        watch = None;
                        self.session.handle(self.clock.now(), Input::Connected);
                    }
                    Some(Event::Disconnected) => {
                        tracing::warn!("disconnected from NATS; the agent carries on without it");
                        watch = None;
                        self.session.handle(self.clock.now(), Input::Disconnected);
                    }
                    Some(Event::ServerError(error)) => {
                        let text = error.to_string();
                        match bucket_check_denied(&text, &self.buckets) {
                            // The bucket warning says it, once.
                            Some(subject) => {
                                tracing::debug!(%subject, "the bucket check is not permitted");
                                denied.insert(subject);
                            }
                            None => tracing::warn!(error = %text, "NATS server error"),
                        }
                    }
                    Some(other) => tracing::debug!(event = %other, "NATS event"),
                    None => return,
                },
                message = next_command(&mut commands) => match message {
                    Some(message) => {
                        let command = CommandMessage {
                            subject: message.subject.to_string(),
                            reply_to: message.reply.as_ref().map(|r| r.to_string()),
                            payload: message.payload.to_vec(),
                        };
                        self.session.handle(self.clock.now(), Input::Command(command));
                    }
                    None => {
                        tracing::error!("the command subscription ended; commands are off");
                        commands = None;
                    }
                },
                message = next_entry(&mut watch) => match message {
                    Some(Ok(message)) => {
                        if let Some(entry) = watched_entry(&message) {
                            self.session.handle(self.clock.now(), Input::Entry(entry));
                        }
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "the desired-state watch failed; making a new one");
                        watch = None;
                        self.session.handle(self.clock.now(), Input::WatchEnded);
                    }
                    None => {
                        tracing::warn!("the desired-state watch ended; making a new one");
                        watch = None;
                        self.session.handle(self.clock.now(), Input::WatchEnded);
                    }
                },
                outcomes = next_outcomes(&mut ensuring) => {
                    ensuring = None;
                    let outcomes = outcomes.unwrap_or_else(|error| {
                        tracing::warn!(%error, "the bucket check did not finish");
                        Vec::new()
                    });
                    let (created, repeat) = log_buckets(&outcomes, &denied, &mut warned);
                    buckets_pending = repeat;
                    if created {
                        // The watch may have failed for want of the bucket.
                        self.session.handle(self.clock.now(), Input::BucketsCreated);
                    }
                }
                () = retry => self.session.handle(self.clock.now(), Input::Timeout),
            }
        }
    }

    /// Creates an ordered consumer of the newest entry of each of this
    /// device's keys (see the module docs for the subjects it uses), and
    /// says how many entries it will deliver first.
    async fn start_watch(&self) -> Result<(Ordered, u64), String> {
        let inbox = self.client.new_inbox();
        // The inbox's last token is a fresh NUID: a unique consumer name.
        let unique = inbox.rsplit('.').next().unwrap_or_default();
        let config = OrderedConfig {
            deliver_subject: inbox.clone(),
            name: Some(format!("podfleet-{}-{unique}", self.device)),
            description: Some(format!("podfleet-agent watch of {}", self.device)),
            filter_subject: self.session.filter().subject_filter(),
            replay_policy: ReplayPolicy::Instant,
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..OrderedConfig::default()
        };
        let consumer = self
            .js
            .create_consumer_on_stream(config, kv_stream(DESIRED_BUCKET))
            .await
            .map_err(|e| e.to_string())?;
        let pending = consumer.cached_info().num_pending;
        let messages = consumer.messages().await.map_err(|e| e.to_string())?;
        Ok((messages, pending))
    }
}

/// A watched KV message as the sans-IO session and fleet controller take
/// it; `None` (logged) for one without JetStream metadata.
pub fn watched_entry(message: &async_nats::jetstream::Message) -> Option<WatchedEntry> {
    let Ok(info) = message.info() else {
        tracing::warn!(subject = %message.subject, "watched message without JetStream metadata; skipped");
        return None;
    };
    let operation = message
        .headers
        .as_ref()
        .and_then(|h| h.get(KV_OPERATION))
        .map(|v| v.as_str());
    Some(WatchedEntry {
        subject: message.subject.to_string(),
        operation: Operation::from_header(operation),
        revision: info.stream_sequence,
        pending: info.pending,
        payload: message.payload.to_vec(),
    })
}

/// Logs what the session skipped.
fn log_skip(reason: &SkipReason) {
    match reason {
        SkipReason::NoReplySubject { subject } => {
            tracing::warn!(%subject, "command without a reply subject; ignored");
        }
        SkipReason::CommandForOtherDevice { device } => {
            tracing::warn!(%device, "command for another device; ignored");
        }
        SkipReason::NoWatch { .. } => tracing::debug!(%reason, "entry skipped"),
        other => tracing::warn!(reason = %other, "desired-state entry skipped"),
    }
}

/// Makes sure of every bucket, all at once so a refused user waits one
/// timeout, not three.
async fn ensure_buckets(
    client: Client,
    settings: Vec<BucketSettings>,
    timeout: Duration,
) -> BucketOutcomes {
    let checks = settings.iter().map(|bucket| {
        let client = &client;
        async move {
            let outcome = buckets::ensure_bucket(client, bucket, timeout).await;
            (bucket.name().to_owned(), outcome)
        }
    });
    futures_util::future::join_all(checks).await
}

/// The subject of a bucket check (`$JS.API.STREAM.INFO.KV_<bucket>` or
/// `...CREATE...`) of one of `buckets`, when the server error `text` is a
/// permissions violation for publishing to it.
fn bucket_check_denied(text: &str, buckets: &[BucketSettings]) -> Option<String> {
    let (_, rest) = text.split_once("Permissions Violation for Publish to \"")?;
    let (subject, _) = rest.split_once('"')?;
    buckets
        .iter()
        .flat_map(|bucket| bucket_check_subjects(bucket.name()))
        .find(|check| check == subject)
}

/// The subjects a bucket check publishes to.
fn bucket_check_subjects(bucket: &str) -> [String; 2] {
    let stream = kv_stream(bucket);
    [
        format!("$JS.API.STREAM.INFO.{stream}"),
        format!("$JS.API.STREAM.CREATE.{stream}"),
    ]
}

/// Logs what became of the buckets: creations at info, existing buckets
/// whose settings differ at info, failures once at warn with what to do
/// (a timeout on a subject in `denied` is a missing permission). Returns
/// whether a bucket was created, and whether to ask again at the next
/// connect (a request failed under a lost connection).
fn log_buckets(
    outcomes: &BucketOutcomes,
    denied: &BTreeSet<String>,
    warned: &mut bool,
) -> (bool, bool) {
    let mut created = false;
    let mut failed = Vec::new();
    for (bucket, outcome) in outcomes {
        match outcome {
            Ok(Ensured::Created) => {
                created = true;
                tracing::info!(%bucket, "created the NATS KV bucket");
            }
            Ok(Ensured::Existing { differences }) if !differences.is_empty() => {
                let differences: Vec<String> = differences.iter().map(|d| d.to_string()).collect();
                tracing::info!(
                    %bucket,
                    differences = %differences.join(", "),
                    "the NATS KV bucket exists with other settings; it is left as it is"
                );
            }
            Ok(_) => tracing::debug!(%bucket, "the NATS KV bucket exists"),
            Err(error) => failed.push((bucket.as_str(), error)),
        }
    }
    if failed.is_empty() {
        return (created, false);
    }
    let repeat = failed.iter().any(|(_, error)| error.is_transient());
    let errors: Vec<String> = failed
        .iter()
        .map(|(bucket, error)| match error {
            BucketError::TimedOut { subject, .. } if denied.contains(subject) => {
                format!("bucket {bucket}: this user may not publish to {subject}")
            }
            other => other.to_string(),
        })
        .collect();
    if *warned {
        tracing::debug!(errors = %errors.join("; "), "the NATS KV buckets are still unchecked");
    } else {
        *warned = true;
        let subjects: Vec<String> = failed
            .iter()
            .flat_map(|(bucket, _)| bucket_check_subjects(bucket))
            .collect();
        tracing::warn!(
            errors = %errors.join("; "),
            "cannot make sure the NATS KV buckets exist; carrying on. If an admin created them, \
             nothing is wrong (set nats_create_buckets = false to skip this check). Otherwise \
             create them as an admin (docs/operations.md, section 6) or let this user publish to {}",
            subjects.join(", ")
        );
    }
    (created, repeat)
}

async fn next_outcomes(
    task: &mut Option<JoinHandle<BucketOutcomes>>,
) -> Result<BucketOutcomes, tokio::task::JoinError> {
    match task {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

async fn next_command(commands: &mut Option<Subscriber>) -> Option<async_nats::Message> {
    match commands {
        Some(subscriber) => subscriber.next().await,
        None => std::future::pending().await,
    }
}

async fn next_entry(
    watch: &mut Option<Ordered>,
) -> Option<
    Result<async_nats::jetstream::Message, async_nats::jetstream::consumer::push::OrderedError>,
> {
    match watch {
        Some(messages) => messages.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podfleet_core::session::KeyFilter;

    fn device() -> DeviceId {
        DeviceId::new("rpi-01").unwrap()
    }

    #[test]
    fn subjects_name_the_device() {
        assert_eq!(
            KeyFilter::desired_of(device()).subject_filter(),
            "$KV.podfleet-desired.rpi-01.*"
        );
        assert_eq!(kv_stream(STATE_BUCKET), "KV_podfleet-state");
        assert_eq!(default_inbox_prefix(&device()), "_INBOX.rpi-01");
    }

    #[test]
    fn only_bucket_checks_of_our_buckets_count_as_denied() {
        let buckets = crate::buckets::fleet_buckets();
        let error =
            |subject: &str| format!("nats: Permissions Violation for Publish to \"{subject}\"");
        assert_eq!(
            bucket_check_denied(&error("$JS.API.STREAM.INFO.KV_podfleet-state"), &buckets),
            Some("$JS.API.STREAM.INFO.KV_podfleet-state".to_owned())
        );
        assert_eq!(
            bucket_check_denied(
                &error("$JS.API.STREAM.CREATE.KV_podfleet-desired"),
                &buckets
            ),
            Some("$JS.API.STREAM.CREATE.KV_podfleet-desired".to_owned())
        );
        for other in [
            error("$JS.API.STREAM.INFO.KV_other"),
            error("$KV.podfleet-state.rpi-02.x"),
            "nats: Permissions Violation for Subscription to \"$JS.API.STREAM.INFO.KV_podfleet-state\"".to_owned(),
            "nats: authorization violation".to_owned(),
        ] {
            assert_eq!(bucket_check_denied(&other, &buckets), None, "{other}");
        }
    }

    #[test]
    fn credentials_never_print_secrets() {
        let user = Credentials::UserPassword {
            user: "rpi-01".into(),
            password: "hunter2".into(),
        };
        assert_eq!(user.to_string(), "user rpi-01, password ***");
        let shown = format!(
            "{:?} {:?} {:?} {} {} {}",
            Credentials::UserPassword {
                user: "rpi-01".into(),
                password: "hunter2".into()
            },
            Credentials::Token("tok".into()),
            Credentials::NKeySeed("SUAB".into()),
            user,
            Credentials::Token("tok".into()),
            Credentials::NKeySeed("SUAB".into()),
        );
        assert!(
            !shown.contains("hunter2") && !shown.contains("tok)") && !shown.contains("SUAB"),
            "{shown}"
        );
    }
}
