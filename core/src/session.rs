//! The NATS session of one device: every decision about its desired-state
//! watch and its command requests, and none of its IO.
//!
//! [`Session`] decides when to (re)create the watch of this device's keys,
//! what each watched entry means, when the watch's initial snapshot is
//! complete, when to retry a watch that failed, and which command requests
//! reach the agent loop. It never touches a socket and never reads a clock:
//! the production adapter (`podfleet-agent`'s `nats` module, over async-nats)
//! and the simulator's link (over its fake broker) drive the same code, so
//! the simulator exercises the production adapter's decisions.
//!
//! The watch part is not device-bound: [`KeyFilter`] says which keys of
//! which bucket are wanted, so a fleet-wide watcher can classify entries
//! with [`KeyFilter::classify`] the same way.
//!
//! # The drive loop
//!
//! 1. Create it with [`Session::new`].
//! 2. Feed exactly one input with [`handle`](Session::handle) (the
//!    connection came or went, a watch was created or failed, a watched
//!    entry or a command request arrived, buckets were created, or
//!    [`Input::Timeout`]: the deadline passed), always with the current time.
//! 3. Drain [`poll_output`](Session::poll_output) until it returns `None`:
//!    create a watch on [`Output::StartWatch`] and feed back its outcome
//!    ([`Input::WatchStarted`] with the consumer's pending count, or
//!    [`Input::WatchFailed`]); hand puts, deletes, snapshots and commands to
//!    the agent loop; send [`Output::Reply`] bytes; log [`Output::Skipped`].
//! 4. Sleep until [`poll_timeout`](Session::poll_timeout) (the watch retry)
//!    or the next input, whichever comes first, then go to step 2.
//!
//! # Guarantees
//!
//! - After every [`Input::Connected`] a fresh watch is asked for, so its
//!   snapshot reveals what changed while the device was away.
//! - A snapshot ends with the entry after which nothing is pending (at
//!   once for an empty bucket), even when that entry is skipped, and holds
//!   exactly the deployments whose newest entry is a put.
//! - A watch that fails or ends is retried after a capped backoff; the
//!   failures reset when a watch starts and on every reconnect, and a
//!   bucket just created is worth a retry at once.
//! - A command request without a reply subject, or for another device, is
//!   never handed on; one whose subject does not parse is refused with a
//!   `bad_request` reply.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use crate::time::{Backoff, Timestamp};
use crate::wire::names::{device_key_filter, kv_subject, DESIRED_BUCKET};
use crate::wire::{
    CommandError, CommandReply, CommandSubject, DeploymentKey, DeploymentName, DeviceId, ErrorCode,
    Revision, Verb,
};

/// The session's tunables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    device: DeviceId,
    watch_backoff: Backoff,
    #[cfg(feature = "bugs")]
    bugs: Bugs,
}

impl Config {
    /// Defaults for `device`: watch retries after 1 s doubling to 30 s.
    pub fn new(device: DeviceId) -> Self {
        Self {
            device,
            watch_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
            #[cfg(feature = "bugs")]
            bugs: Bugs::default(),
        }
    }

    /// The backoff between attempts to create the watch.
    pub fn watch_backoff(mut self, backoff: Backoff) -> Self {
        self.watch_backoff = backoff;
        self
    }

    /// The device this session serves.
    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    /// Switches on deliberate bugs so that tests can prove the simulator
    /// notices. Exists only with the `bugs` feature.
    #[cfg(feature = "bugs")]
    pub fn inject_bugs(mut self, bugs: Bugs) -> Self {
        self.bugs = bugs;
        self
    }
}

/// Deliberate bugs of the session, each breaking one invariant, for tests
/// that prove the simulator notices. All off by default; exists only with
/// the `bugs` feature.
#[cfg(feature = "bugs")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bugs {
    /// The snapshot completes one entry before the last, so its `present`
    /// set misses the last deployment.
    pub snapshot_one_early: bool,
}

/// Which keys a watch wants: one bucket, and one device's keys or every
/// device's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFilter {
    bucket: String,
    /// `$KV.<bucket>.`, which every entry's subject starts with.
    prefix: String,
    device: Option<DeviceId>,
}

impl KeyFilter {
    /// The desired-state keys of `device`.
    pub fn desired_of(device: DeviceId) -> Self {
        Self::new(DESIRED_BUCKET.to_owned(), Some(device))
    }

    /// Every `<device>.<deployment>` key of `bucket`, for a fleet-wide
    /// watcher.
    pub fn every_device(bucket: impl Into<String>) -> Self {
        Self::new(bucket.into(), None)
    }

    fn new(bucket: String, device: Option<DeviceId>) -> Self {
        Self {
            prefix: kv_subject(&bucket, ""),
            bucket,
            device,
        }
    }

    /// The subject filter a consumer of these keys uses.
    pub fn subject_filter(&self) -> String {
        match &self.device {
            Some(device) => kv_subject(&self.bucket, &device_key_filter(device)),
            None => kv_subject(&self.bucket, "*.*"),
        }
    }

    /// What a watched entry means, or why it is none of this filter's
    /// business.
    ///
    /// # Errors
    /// The [`SkipReason`]: a subject outside the bucket, a key that does not
    /// parse, or another device's key.
    pub fn classify(&self, entry: WatchedEntry) -> Result<Change, SkipReason> {
        let Some(key) = entry.subject.strip_prefix(&self.prefix) else {
            return Err(SkipReason::NotInBucket {
                subject: entry.subject,
            });
        };
        let parsed = DeploymentKey::parse(key).map_err(|e| SkipReason::BadKey {
            key: key.to_owned(),
            error: e.to_string(),
        })?;
        if let Some(device) = &self.device {
            if &parsed.device != device {
                return Err(SkipReason::OtherDevice {
                    key: key.to_owned(),
                    device: parsed.device,
                });
            }
        }
        let revision = Revision::new(entry.revision);
        Ok(match entry.operation {
            Operation::Put => Change::Put {
                key: parsed,
                revision,
                value: entry.payload,
            },
            Operation::Delete | Operation::Purge => Change::Delete {
                key: parsed,
                revision,
            },
        })
    }
}

/// A KV entry's operation, from its `KV-Operation` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// A value (no header).
    Put,
    /// `DEL`: the key was deleted.
    Delete,
    /// `PURGE`: the key and its history were purged.
    Purge,
}

impl Operation {
    /// The operation a `KV-Operation` header value names; no header, or
    /// one this version does not know, is a put.
    pub fn from_header(value: Option<&str>) -> Self {
        match value {
            Some("DEL") => Operation::Delete,
            Some("PURGE") => Operation::Purge,
            _ => Operation::Put,
        }
    }
}

/// One message a watch delivered, as the broker sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchedEntry {
    /// Its subject, `$KV.<bucket>.<key>`.
    pub subject: String,
    /// Put, delete or purge.
    pub operation: Operation,
    /// The KV revision (the stream sequence).
    pub revision: u64,
    /// How many entries the watch still had to deliver after this one
    /// (a JetStream ordered consumer's `info.pending`).
    pub pending: u64,
    /// The value (empty for a delete).
    pub payload: Vec<u8>,
}

/// What a watched entry means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The key holds a value at `revision`.
    Put {
        /// The key.
        key: DeploymentKey,
        /// Its revision.
        revision: Revision,
        /// The raw value.
        value: Vec<u8>,
    },
    /// The key was deleted or purged at `revision`.
    Delete {
        /// The key.
        key: DeploymentKey,
        /// The delete marker's revision.
        revision: Revision,
    },
}

/// Why a watched entry or a command request was not handed on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SkipReason {
    /// The entry's subject is not in the watched bucket.
    #[error("subject {subject:?} is not in the watched bucket")]
    NotInBucket {
        /// The subject.
        subject: String,
    },
    /// The entry's key is not `<device>.<deployment>`.
    #[error("{error}")]
    BadKey {
        /// The key.
        key: String,
        /// Why it does not parse.
        error: String,
    },
    /// The entry's key belongs to another device.
    #[error("key {key:?} belongs to device {device}")]
    OtherDevice {
        /// The key.
        key: String,
        /// Its device.
        device: DeviceId,
    },
    /// An entry arrived while no watch was live.
    #[error("entry {subject:?} arrived while no watch was live")]
    NoWatch {
        /// The subject.
        subject: String,
    },
    /// A command request came without a reply subject.
    #[error("command on {subject:?} without a reply subject")]
    NoReplySubject {
        /// The request's subject.
        subject: String,
    },
    /// A command request names another device.
    #[error("command for device {device}")]
    CommandForOtherDevice {
        /// The device it names.
        device: DeviceId,
    },
}

/// A command request as it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandMessage {
    /// Its subject, `device-commands.<device>.<verb>`.
    pub subject: String,
    /// Where the reply goes, if anywhere.
    pub reply_to: Option<String>,
    /// The request body.
    pub payload: Vec<u8>,
}

/// One request/reply command admitted for this device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRequest {
    /// The verb from the subject.
    pub verb: Verb,
    /// The request body (JSON).
    pub body: Vec<u8>,
    /// Where the reply goes: an inbox subject, opaque to the loop.
    pub reply_to: String,
}

/// Something that happened to the session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Input {
    /// The connection to the broker is up (first time or again).
    Connected,
    /// The connection is down.
    Disconnected,
    /// The watch asked for by [`Output::StartWatch`] exists; it will deliver
    /// `pending` entries of initial snapshot.
    WatchStarted {
        /// The consumer's pending count at creation.
        pending: u64,
    },
    /// Creating the watch failed.
    WatchFailed,
    /// The live watch failed or its message stream ended.
    WatchEnded,
    /// The watch delivered an entry.
    Entry(WatchedEntry),
    /// A request arrived on the command subscription.
    Command(CommandMessage),
    /// A KV bucket was just created: a watch that failed for want of it is
    /// worth retrying at once.
    BucketsCreated,
    /// Time has passed: act on the deadline [`Session::poll_timeout`] gave.
    Timeout,
}

/// What the session hands the agent loop: desired state and commands for
/// this device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A desired-state value at KV `revision`.
    Put {
        /// The deployment, parsed from the key.
        deployment: DeploymentName,
        /// The key's revision.
        revision: Revision,
        /// The raw value; decoding it is the reconciler's job.
        value: Vec<u8>,
    },
    /// The desired-state key was deleted (or purged) at `revision`.
    Delete {
        /// The deployment.
        deployment: DeploymentName,
        /// The revision of the delete marker.
        revision: Revision,
    },
    /// The initial snapshot after a (re)connect is complete: these are all
    /// the deployments the bucket holds for this device.
    Snapshot {
        /// Every deployment present.
        present: BTreeSet<DeploymentName>,
    },
    /// A request on this device's command subject.
    Command(CommandRequest),
}

/// Something the caller must do or pass on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Output {
    /// Create a new watch of [`Session::filter`]'s keys (the newest entry
    /// of each, then live changes) and report how it went.
    StartWatch,
    /// Hand this to the agent loop.
    Deliver(Inbound),
    /// Send `body` to `reply_to` (a refusal the session answered itself).
    Reply {
        /// The reply subject.
        reply_to: String,
        /// The encoded reply.
        body: Vec<u8>,
    },
    /// An entry or request was skipped, for the log.
    Skipped {
        /// Why.
        reason: SkipReason,
    },
}

/// Where the watch stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum WatchState {
    /// Not connected: no watch, none wanted until [`Input::Connected`].
    Offline,
    /// [`Output::StartWatch`] was emitted; its outcome is awaited.
    Starting,
    /// The watch delivers its initial snapshot.
    Syncing { present: BTreeSet<DeploymentName> },
    /// The snapshot is complete; entries are live changes.
    Live,
    /// The watch failed; the next attempt is at `retry_at`.
    Waiting { retry_at: Timestamp },
}

/// One device's NATS session. See the [module docs](self) for the drive
/// loop.
#[derive(Debug)]
pub struct Session {
    config: Config,
    filter: KeyFilter,
    watch: WatchState,
    /// Watch attempts that failed since the last success or reconnect.
    failures: u32,
    outputs: VecDeque<Output>,
}

impl Session {
    /// A session for `config.device()`, not yet connected.
    pub fn new(config: Config, _now: Timestamp) -> Self {
        Self {
            filter: KeyFilter::desired_of(config.device.clone()),
            config,
            watch: WatchState::Offline,
            failures: 0,
            outputs: VecDeque::new(),
        }
    }

    /// The keys the watch covers.
    pub fn filter(&self) -> &KeyFilter {
        &self.filter
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Feeds one input.
    pub fn handle(&mut self, now: Timestamp, input: Input) {
        match input {
            Input::Connected => {
                // A fresh watch, so its snapshot reveals what changed meanwhile.
                self.failures = 0;
                self.start_watch();
            }
            Input::Disconnected => self.watch = WatchState::Offline,
            Input::WatchStarted { pending } => {
                if self.watch == WatchState::Starting {
                    self.failures = 0;
                    self.watch = WatchState::Syncing {
                        present: BTreeSet::new(),
                    };
                    if self.snapshot_ends(pending) {
                        self.finish_snapshot();
                    }
                }
            }
            Input::WatchFailed => {
                if self.watch == WatchState::Starting {
                    self.retry_later(now);
                }
            }
            Input::WatchEnded => {
                if matches!(self.watch, WatchState::Syncing { .. } | WatchState::Live) {
                    self.retry_later(now);
                }
            }
            Input::Timeout => self.timeout(now),
            Input::Entry(entry) => self.on_entry(entry),
            Input::Command(message) => self.on_command(message),
            Input::BucketsCreated => {
                if matches!(self.watch, WatchState::Waiting { .. }) {
                    self.failures = 0;
                    self.start_watch();
                }
            }
        }
    }

    /// Time has passed: retry the watch if its backoff is over.
    fn timeout(&mut self, now: Timestamp) {
        if let WatchState::Waiting { retry_at } = self.watch {
            if now >= retry_at {
                self.start_watch();
            }
        }
    }

    /// The next thing to do, or `None` when there is nothing until new input.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When to hand in [`Input::Timeout`]: the next watch
    /// attempt, if one is waiting.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        match self.watch {
            WatchState::Waiting { retry_at } => Some(retry_at),
            _ => None,
        }
    }

    /// Whether the watch's initial snapshot is complete.
    pub fn is_synced(&self) -> bool {
        self.watch == WatchState::Live
    }

    fn start_watch(&mut self) {
        self.watch = WatchState::Starting;
        self.outputs.push_back(Output::StartWatch);
    }

    fn retry_later(&mut self, now: Timestamp) {
        let delay = self.config.watch_backoff.delay(self.failures);
        self.failures = self.failures.saturating_add(1);
        self.watch = WatchState::Waiting {
            retry_at: now + delay,
        };
    }

    /// Whether an entry with `pending` entries after it ends the snapshot.
    fn snapshot_ends(&self, pending: u64) -> bool {
        #[cfg(feature = "bugs")]
        if self.config.bugs.snapshot_one_early {
            return pending <= 1;
        }
        pending == 0
    }

    fn finish_snapshot(&mut self) {
        if let WatchState::Syncing { present } =
            std::mem::replace(&mut self.watch, WatchState::Live)
        {
            self.outputs
                .push_back(Output::Deliver(Inbound::Snapshot { present }));
        }
    }

    fn on_entry(&mut self, entry: WatchedEntry) {
        if !matches!(self.watch, WatchState::Syncing { .. } | WatchState::Live) {
            self.outputs.push_back(Output::Skipped {
                reason: SkipReason::NoWatch {
                    subject: entry.subject,
                },
            });
            return;
        }
        let pending = entry.pending;
        match self.filter.classify(entry) {
            Ok(change) => {
                let output = match change {
                    Change::Put {
                        key,
                        revision,
                        value,
                    } => {
                        if let WatchState::Syncing { present } = &mut self.watch {
                            present.insert(key.deployment.clone());
                        }
                        Inbound::Put {
                            deployment: key.deployment,
                            revision,
                            value,
                        }
                    }
                    Change::Delete { key, revision } => {
                        if let WatchState::Syncing { present } = &mut self.watch {
                            present.remove(&key.deployment);
                        }
                        Inbound::Delete {
                            deployment: key.deployment,
                            revision,
                        }
                    }
                };
                self.outputs.push_back(Output::Deliver(output));
            }
            Err(reason) => self.outputs.push_back(Output::Skipped { reason }),
        }
        if matches!(self.watch, WatchState::Syncing { .. }) && self.snapshot_ends(pending) {
            self.finish_snapshot();
        }
    }

    fn on_command(&mut self, message: CommandMessage) {
        let Some(reply_to) = message.reply_to else {
            self.outputs.push_back(Output::Skipped {
                reason: SkipReason::NoReplySubject {
                    subject: message.subject,
                },
            });
            return;
        };
        let output = match CommandSubject::parse(&message.subject) {
            Ok(subject) if subject.device == self.config.device => {
                Output::Deliver(Inbound::Command(CommandRequest {
                    verb: subject.verb,
                    body: message.payload,
                    reply_to,
                }))
            }
            Ok(subject) => Output::Skipped {
                reason: SkipReason::CommandForOtherDevice {
                    device: subject.device,
                },
            },
            Err(error) => Output::Reply {
                reply_to,
                body: refusal(ErrorCode::BadRequest, error.to_string()),
            },
        };
        self.outputs.push_back(output);
    }
}

/// An encoded error reply.
fn refusal(code: ErrorCode, message: String) -> Vec<u8> {
    serde_json::to_vec(&CommandReply::<()>::Error(CommandError::new(code, message)))
        .expect("an error reply always serialises: it has no maps")
}

#[cfg(test)]
mod tests;
