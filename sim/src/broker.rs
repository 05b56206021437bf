//! A fake of the NATS subset podfleet uses, spoken over any byte stream.
//!
//! async-nats cannot run over turmoil's sockets, so the simulator has its own
//! broker: JetStream-style KV buckets (revisions per bucket, put, delete,
//! watch with an initial snapshot of the last value per key followed by live
//! updates) and request/reply on subjects. It speaks newline-delimited JSON
//! [`Frame`]s over a stream: a turmoil TCP stream in the turmoil tier, an
//! in-memory pipe in the fleet tier.
//!
//! Like the real server it enforces per-device permissions: a device may
//! watch only its own desired keys, write only its own state and heartbeat,
//! and answer only its own command subject. A refused attempt is recorded,
//! because podfleet's isolation invariant is that an agent never even tries.
//!
//! The KV data lives in [`Broker`], outside any connection, so it survives a
//! broker restart as JetStream's file store does; watches and subscriptions
//! do not.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use podfleet_core::wire::names::{
    COMMAND_SUBJECT_PREFIX, DESIRED_BUCKET, HEARTBEAT_BUCKET, STATE_BUCKET,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// How long a connection may stay silent before the other side gives up on
/// it. Turmoil drops TCP segments on a partitioned link without telling
/// anyone, exactly like a cable pulled out: only a missing pong shows it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(25);
/// How often clients ping.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);

/// One message on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Client -> broker, first frame: who is connecting.
    Hello {
        /// `operator` or `device:<id>`.
        client: String,
    },
    /// Client -> broker: watch `bucket` keys starting with `prefix`.
    Watch {
        /// The bucket.
        bucket: String,
        /// The key prefix.
        prefix: String,
    },
    /// Client -> broker: answer requests on subjects starting with `prefix`.
    Subscribe {
        /// The subject prefix.
        prefix: String,
    },
    /// Client -> broker: put (`value: Some`) or delete a key.
    Write {
        /// Matches the [`Frame::Ack`].
        id: u64,
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// The value, or `None` to delete.
        value: Option<Vec<u8>>,
    },
    /// Broker -> client: the write `id` is stored at `revision`.
    Ack {
        /// The write.
        id: u64,
        /// Its revision.
        revision: u64,
    },
    /// Broker -> client: the write or watch `id` was refused.
    Denied {
        /// The write (0 for a watch or subscribe).
        id: u64,
        /// Why.
        reason: String,
    },
    /// Broker -> watcher: a key's value (`None`: deleted).
    Entry {
        /// The key.
        key: String,
        /// The revision.
        revision: u64,
        /// The value.
        value: Option<Vec<u8>>,
    },
    /// Broker -> watcher: the initial snapshot is complete.
    Synced,
    /// Client -> broker: a request.
    Request {
        /// Matches the [`Frame::Response`].
        id: u64,
        /// The subject.
        subject: String,
        /// The body.
        body: Vec<u8>,
    },
    /// Broker -> subscriber: a request to answer with [`Frame::Respond`].
    Incoming {
        /// Where the answer goes.
        reply: u64,
        /// The subject.
        subject: String,
        /// The body.
        body: Vec<u8>,
    },
    /// Subscriber -> broker: the answer to `reply`.
    Respond {
        /// The [`Frame::Incoming`] answered.
        reply: u64,
        /// The body.
        body: Vec<u8>,
    },
    /// Broker -> requester: the answer to request `id` (`None`: nobody answered).
    Response {
        /// The request.
        id: u64,
        /// The answer.
        body: Option<Vec<u8>>,
    },
    /// Either way: are you there?
    Ping,
    /// The answer to [`Frame::Ping`].
    Pong,
}

impl Frame {
    /// The frame as one line.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("frames have no maps with non-string keys");
        line.push(b'\n');
        line
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stored {
    revision: u64,
    value: Option<Vec<u8>>,
}

type Outbox = mpsc::UnboundedSender<Frame>;

#[derive(Debug, Default)]
struct State {
    /// Bucket -> key -> newest value (delete markers kept, as JetStream does).
    buckets: BTreeMap<String, BTreeMap<String, Stored>>,
    revision: u64,
    /// Live watches by (bucket, key prefix): (connection, its outbox).
    watches: BTreeMap<(String, String), Vec<(u64, Outbox)>>,
    /// Live subscriptions by subject prefix.
    subscriptions: BTreeMap<String, Vec<(u64, Outbox)>>,
    /// Requests waiting for an answer: reply id -> (requester, request id).
    pending: BTreeMap<u64, (Outbox, u64)>,
    next_reply: u64,
    next_connection: u64,
    /// Refused attempts, in words.
    refusals: Vec<String>,
    /// Deliver each live entry twice to the next `duplicates` watch frames.
    duplicates: u32,
}

/// The broker's persistent state, shared by every connection.
#[derive(Debug, Clone, Default)]
pub struct Broker(Arc<Mutex<State>>);

impl Broker {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every live (non-deleted) key of `bucket` with its revision and value.
    pub fn entries(&self, bucket: &str) -> BTreeMap<String, (u64, Vec<u8>)> {
        self.lock()
            .buckets
            .get(bucket)
            .into_iter()
            .flatten()
            .filter_map(|(k, s)| Some((k.clone(), (s.revision, s.value.clone()?))))
            .collect()
    }

    /// Attempts the permissions refused, in words.
    pub fn refusals(&self) -> Vec<String> {
        self.lock().refusals.clone()
    }

    /// Forgets every watch and subscription: the server process restarted.
    pub fn restart(&self) {
        let mut state = self.lock();
        state.watches.clear();
        state.subscriptions.clear();
        state.pending.clear();
    }

    /// The next `n` live entries are delivered twice.
    pub fn duplicate_next(&self, n: u32) {
        self.lock().duplicates += n;
    }

    /// Sends every watcher of `prefix` the current value of each of its keys
    /// again, as a JetStream watch does after an internal reconnect.
    pub fn redeliver(&self, bucket: &str, prefix: &str) {
        let state = self.lock();
        let Some(keys) = state.buckets.get(bucket) else {
            return;
        };
        let watchers = state.watches.get(&(bucket.to_owned(), prefix.to_owned()));
        for (_, out) in watchers.into_iter().flatten() {
            for (key, stored) in keys.range(prefix.to_owned()..) {
                if !key.starts_with(prefix) {
                    break;
                }
                let _ = out.send(Frame::Entry {
                    key: key.clone(),
                    revision: stored.revision,
                    value: stored.value.clone(),
                });
            }
        }
    }

    /// Serves one client connection until it closes or goes silent.
    pub async fn serve<R, W>(&self, reader: R, mut writer: W)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
        let connection = {
            let mut state = self.lock();
            state.next_connection += 1;
            state.next_connection
        };
        let mut lines = BufReader::new(reader).lines();
        let mut client = String::new();
        let mut silent_since = tokio::time::Instant::now();
        loop {
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(silent_since + IDLE_TIMEOUT) => break,
                frame = rx.recv() => {
                    let Some(frame) = frame else { break };
                    if writer.write_all(&frame.to_line()).await.is_err() {
                        break;
                    }
                }
                line = lines.next_line() => {
                    let Ok(Some(line)) = line else { break };
                    silent_since = tokio::time::Instant::now();
                    let Ok(frame) = serde_json::from_str::<Frame>(&line) else { break };
                    self.handle(connection, &mut client, frame, &tx);
                }
            }
        }
        let mut state = self.lock();
        for watchers in state.watches.values_mut() {
            watchers.retain(|(c, _)| *c != connection);
        }
        for subscribers in state.subscriptions.values_mut() {
            subscribers.retain(|(c, _)| *c != connection);
        }
    }

    fn handle(&self, connection: u64, client: &mut String, frame: Frame, tx: &Outbox) {
        let mut state = self.lock();
        let device = client.strip_prefix("device:").map(str::to_owned);
        let refuse = |state: &mut State, id: u64, what: String| {
            state.refusals.push(format!("{client}: {what}"));
            let _ = tx.send(Frame::Denied { id, reason: what });
        };
        match frame {
            Frame::Hello { client: who } => *client = who,
            Frame::Ping => {
                let _ = tx.send(Frame::Pong);
            }
            Frame::Watch { bucket, prefix } => {
                if let Some(device) = &device {
                    if bucket != DESIRED_BUCKET || prefix != format!("{device}.") {
                        return refuse(&mut state, 0, format!("watch {bucket} {prefix:?}"));
                    }
                }
                for (key, stored) in state.buckets.get(&bucket).into_iter().flatten() {
                    if key.starts_with(&prefix) && stored.value.is_some() {
                        let _ = tx.send(Frame::Entry {
                            key: key.clone(),
                            revision: stored.revision,
                            value: stored.value.clone(),
                        });
                    }
                }
                let _ = tx.send(Frame::Synced);
                state
                    .watches
                    .entry((bucket, prefix))
                    .or_default()
                    .push((connection, tx.clone()));
            }
            Frame::Subscribe { prefix } => {
                if let Some(device) = &device {
                    if prefix != format!("{COMMAND_SUBJECT_PREFIX}.{device}.") {
                        return refuse(&mut state, 0, format!("subscribe {prefix:?}"));
                    }
                }
                state
                    .subscriptions
                    .entry(prefix)
                    .or_default()
                    .push((connection, tx.clone()));
            }
            Frame::Write {
                id,
                bucket,
                key,
                value,
            } => {
                if let Some(device) = &device {
                    let own = match bucket.as_str() {
                        STATE_BUCKET => key.starts_with(&format!("{device}.")),
                        HEARTBEAT_BUCKET => key == *device,
                        _ => false,
                    };
                    if !own {
                        return refuse(&mut state, id, format!("write {bucket} {key:?}"));
                    }
                }
                let revision = write(&mut state, &bucket, &key, value);
                let _ = tx.send(Frame::Ack { id, revision });
            }
            Frame::Request { id, subject, body } => {
                let target = prefixes(&subject)
                    .find_map(|p| state.subscriptions.get(p)?.first())
                    .map(|(_, out)| out.clone());
                match target {
                    Some(out) => {
                        state.next_reply += 1;
                        let reply = state.next_reply;
                        state.pending.insert(reply, (tx.clone(), id));
                        let _ = out.send(Frame::Incoming {
                            reply,
                            subject,
                            body,
                        });
                    }
                    None => {
                        let _ = tx.send(Frame::Response { id, body: None });
                    }
                }
            }
            Frame::Respond { reply, body } => {
                if let Some((out, id)) = state.pending.remove(&reply) {
                    let _ = out.send(Frame::Response {
                        id,
                        body: Some(body),
                    });
                }
            }
            // Frames only the broker sends.
            Frame::Ack { .. }
            | Frame::Denied { .. }
            | Frame::Entry { .. }
            | Frame::Synced
            | Frame::Incoming { .. }
            | Frame::Response { .. }
            | Frame::Pong => {}
        }
    }
}

fn write(state: &mut State, bucket: &str, key: &str, value: Option<Vec<u8>>) -> u64 {
    state.revision += 1;
    let revision = state.revision;
    state.buckets.entry(bucket.to_owned()).or_default().insert(
        key.to_owned(),
        Stored {
            revision,
            value: value.clone(),
        },
    );
    let mut copies = 1;
    if state.duplicates > 0 && bucket == DESIRED_BUCKET {
        state.duplicates -= 1;
        copies = 2;
    }
    for prefix in prefixes(key) {
        let watchers = state.watches.get(&(bucket.to_owned(), prefix.to_owned()));
        for (_, out) in watchers.into_iter().flatten() {
            for _ in 0..copies {
                let _ = out.send(Frame::Entry {
                    key: key.to_owned(),
                    revision,
                    value: value.clone(),
                });
            }
        }
    }
    revision
}

/// The prefixes a watch or subscription can use to match `key`: the empty
/// one and each one ending at a dot.
fn prefixes(key: &str) -> impl Iterator<Item = &str> {
    std::iter::once("").chain(key.match_indices('.').map(move |(i, _)| &key[..=i]))
}
