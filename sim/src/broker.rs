//! A fake of the NATS subset podfleet uses, spoken over any byte stream.
//!
//! async-nats cannot run over turmoil's sockets, so the simulator has its own
//! broker: JetStream-style KV buckets (revisions per bucket, put, delete,
//! watch with an initial snapshot of the last value per key followed by live
//! updates, counted as a JetStream ordered consumer counts them: the watch's
//! pending entries at creation, and after each entry how many still follow)
//! and request/reply on subjects. It speaks newline-delimited JSON
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
//!
//! Like the real server it refuses a message larger than its payload limit
//! (`max_payload`, 1 MiB by default) with a [`Frame::TooLarge`]; that is not
//! an isolation violation.
//!
//! Values and bodies travel as JSON strings when they are UTF-8 (every
//! value podfleet writes is JSON), as arrays of numbers otherwise.

use std::collections::{BTreeMap, BTreeSet};
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
    /// Client -> broker: watch `bucket` keys starting with `prefix`: the
    /// newest entry of each, then live changes (a JetStream ordered
    /// consumer with `DeliverPolicy::LastPerSubject`).
    Watch {
        /// Matches the [`Frame::Watching`] or [`Frame::Denied`].
        id: u64,
        /// The bucket.
        bucket: String,
        /// The key prefix.
        prefix: String,
        /// Whether the snapshot includes delete markers (the newest entry of
        /// a deleted key), as a real KV watch does. The agent's watch never
        /// needed them; the fleet controller learns deleted deployments
        /// from them.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        deletes: bool,
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
        #[serde(with = "opt_text")]
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
    /// Broker -> client: the write or request `id` is larger than the
    /// broker's payload limit (NATS's "maximum payload exceeded").
    TooLarge {
        /// The write or request.
        id: u64,
        /// Its payload's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Broker -> watcher: the watch `id` exists and will deliver `pending`
    /// entries of initial snapshot (a consumer's `num_pending` at creation).
    Watching {
        /// The watch.
        id: u64,
        /// How many entries its initial snapshot holds.
        pending: u64,
    },
    /// Broker -> watcher: a key's value (`None`: deleted).
    Entry {
        /// The watch it belongs to, for a client with several.
        #[serde(default)]
        watch: u64,
        /// The key.
        key: String,
        /// The revision.
        revision: u64,
        /// How many entries the watch still has to deliver after this one
        /// (a JetStream message's `info.pending`): 0 for live changes.
        pending: u64,
        /// The value.
        #[serde(with = "opt_text")]
        value: Option<Vec<u8>>,
    },
    /// Client -> broker: a request.
    Request {
        /// Matches the [`Frame::Response`].
        id: u64,
        /// The subject.
        subject: String,
        /// The body.
        #[serde(with = "text")]
        body: Vec<u8>,
    },
    /// Broker -> subscriber: a request to answer with [`Frame::Respond`].
    Incoming {
        /// Where the answer goes.
        reply: u64,
        /// The subject.
        subject: String,
        /// The body.
        #[serde(with = "text")]
        body: Vec<u8>,
    },
    /// Subscriber -> broker: the answer to `reply`.
    Respond {
        /// The [`Frame::Incoming`] answered.
        reply: u64,
        /// The body.
        #[serde(with = "text")]
        body: Vec<u8>,
    },
    /// Broker -> requester: the answer to request `id` (`None`: nobody answered).
    Response {
        /// The request.
        id: u64,
        /// The answer.
        #[serde(with = "opt_text")]
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

/// How many earlier values of a key the broker keeps, as a JetStream KV
/// bucket with `history` set does.
const HISTORY: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stored {
    revision: u64,
    value: Option<Vec<u8>>,
    /// Earlier (revision, value) pairs, oldest first.
    older: Vec<(u64, Option<Vec<u8>>)>,
}

type Outbox = mpsc::UnboundedSender<Frame>;

/// One live watch.
#[derive(Debug)]
struct Watcher {
    id: u64,
    connection: u64,
    out: Outbox,
    /// Per key, the revisions this watch has delivered (the last few).
    sent: BTreeMap<String, BTreeSet<u64>>,
}

impl Watcher {
    fn send(&mut self, key: &str, revision: u64, value: Option<Vec<u8>>, pending: u64) {
        let sent = self.sent.entry(key.to_owned()).or_default();
        sent.insert(revision);
        while sent.len() > HISTORY + 1 {
            sent.pop_first();
        }
        let _ = self.out.send(Frame::Entry {
            watch: self.id,
            key: key.to_owned(),
            revision,
            pending,
            value,
        });
    }
}

#[derive(Debug, Default)]
struct State {
    /// Bucket -> key -> newest value (delete markers kept, as JetStream does).
    buckets: BTreeMap<String, BTreeMap<String, Stored>>,
    revision: u64,
    /// Live watches by (bucket, key prefix).
    watches: BTreeMap<(String, String), Vec<Watcher>>,
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
    /// The largest value or body accepted, in bytes (`None`: the default).
    max_payload: Option<usize>,
    /// The state bucket's largest value (its `max_value_size`), if any.
    max_state_value: Option<usize>,
}

/// NATS's default `max_payload`.
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// The broker's persistent state, shared by every connection.
#[derive(Debug, Clone, Default)]
pub struct Broker(Arc<Mutex<State>>);

impl Broker {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the payload limit: a write or request whose value is larger is
    /// refused with "maximum payload exceeded".
    #[must_use]
    pub fn with_max_payload(self, bytes: usize) -> Self {
        self.lock().max_payload = Some(bytes);
        self
    }

    /// Sets the state bucket's value limit (a KV bucket's
    /// `max_value_size`): a state larger than `bytes` is refused as too large.
    #[must_use]
    pub fn with_max_state_value(self, bytes: usize) -> Self {
        self.lock().max_state_value = Some(bytes);
        self
    }

    /// The payload limit in force.
    pub fn max_payload(&self) -> usize {
        self.lock().max_payload.unwrap_or(DEFAULT_MAX_PAYLOAD)
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
        for w in watchers.into_iter().flatten() {
            for (key, stored) in keys.range(prefix.to_owned()..) {
                if !key.starts_with(prefix) {
                    break;
                }
                let _ = w.out.send(Frame::Entry {
                    watch: w.id,
                    key: key.clone(),
                    revision: stored.revision,
                    pending: 0,
                    value: stored.value.clone(),
                });
            }
        }
    }

    /// Sends every watcher of `prefix`, for each key it has been sent two
    /// revisions of, the older of the last two again: an older revision
    /// after a newer one, as a watch can deliver around a reconnect. Returns
    /// how many entries went out.
    pub fn deliver_stale(&self, bucket: &str, prefix: &str) -> usize {
        let mut state = self.lock();
        let state = &mut *state;
        let Some(keys) = state.buckets.get(bucket) else {
            return 0;
        };
        let mut sent = 0;
        let watchers = state
            .watches
            .get_mut(&(bucket.to_owned(), prefix.to_owned()));
        for w in watchers.into_iter().flatten() {
            let mut stale = Vec::new();
            for (key, revisions) in &w.sent {
                let Some(stored) = keys.get(key) else {
                    continue;
                };
                let Some(&older) = revisions.iter().rev().nth(1) else {
                    continue;
                };
                let value = if older == stored.revision {
                    Some(stored.value.clone())
                } else {
                    stored
                        .older
                        .iter()
                        .find(|(r, _)| *r == older)
                        .map(|(_, v)| v.clone())
                };
                if let Some(value) = value {
                    stale.push((key.clone(), older, value));
                }
            }
            for (key, revision, value) in stale {
                let _ = w.out.send(Frame::Entry {
                    watch: w.id,
                    key,
                    revision,
                    pending: 0,
                    value,
                });
                sent += 1;
            }
        }
        sent
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
        // Full duplex, as a real server is: reading never waits for a write
        // to drain, so two large frames crossing cannot stall each other.
        let write_side = async {
            while let Some(frame) = rx.recv().await {
                if writer.write_all(&frame.to_line()).await.is_err() {
                    return;
                }
            }
        };
        let read_side = async {
            let mut silent_since = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    biased;
                    () = tokio::time::sleep_until(silent_since + IDLE_TIMEOUT) => return,
                    line = lines.next_line() => {
                        let Ok(Some(line)) = line else { return };
                        silent_since = tokio::time::Instant::now();
                        let Ok(frame) = serde_json::from_str::<Frame>(&line) else { return };
                        self.handle(connection, &mut client, frame, &tx);
                    }
                }
            }
        };
        tokio::select! {
            biased;
            () = read_side => {}
            () = write_side => {}
        }
        let mut state = self.lock();
        for watchers in state.watches.values_mut() {
            watchers.retain(|w| w.connection != connection);
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
            Frame::Watch {
                id,
                bucket,
                prefix,
                deletes,
            } => {
                if let Some(device) = &device {
                    if bucket != DESIRED_BUCKET || prefix != format!("{device}.") {
                        return refuse(&mut state, id, format!("watch {bucket} {prefix:?}"));
                    }
                }
                let mut watcher = Watcher {
                    id,
                    connection,
                    out: tx.clone(),
                    sent: BTreeMap::new(),
                };
                let snapshot: Vec<(&String, &Stored)> = state
                    .buckets
                    .get(&bucket)
                    .into_iter()
                    .flatten()
                    .filter(|(key, stored)| {
                        key.starts_with(&prefix) && (deletes || stored.value.is_some())
                    })
                    .collect();
                let mut pending = snapshot.len() as u64;
                let _ = tx.send(Frame::Watching { id, pending });
                for (key, stored) in snapshot {
                    pending -= 1;
                    watcher.send(key, stored.revision, stored.value.clone(), pending);
                }
                state
                    .watches
                    .entry((bucket, prefix))
                    .or_default()
                    .push(watcher);
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
                let mut limit = state.max_payload.unwrap_or(DEFAULT_MAX_PAYLOAD);
                if bucket == STATE_BUCKET {
                    limit = limit.min(state.max_state_value.unwrap_or(usize::MAX));
                }
                if let Some(size) = value.as_ref().map(Vec::len).filter(|&n| n > limit) {
                    let _ = tx.send(Frame::TooLarge { id, size, limit });
                    return;
                }
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
                let limit = state.max_payload.unwrap_or(DEFAULT_MAX_PAYLOAD);
                if body.len() > limit {
                    let size = body.len();
                    let _ = tx.send(Frame::TooLarge { id, size, limit });
                    return;
                }
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
            | Frame::TooLarge { .. }
            | Frame::Watching { .. }
            | Frame::Entry { .. }
            | Frame::Incoming { .. }
            | Frame::Response { .. }
            | Frame::Pong => {}
        }
    }
}

fn write(state: &mut State, bucket: &str, key: &str, value: Option<Vec<u8>>) -> u64 {
    state.revision += 1;
    let revision = state.revision;
    let keys = state.buckets.entry(bucket.to_owned()).or_default();
    let mut older = Vec::new();
    if let Some(previous) = keys.remove(key) {
        older = previous.older;
        older.push((previous.revision, previous.value));
        if older.len() > HISTORY {
            older.remove(0);
        }
    }
    keys.insert(
        key.to_owned(),
        Stored {
            revision,
            value: value.clone(),
            older,
        },
    );
    let mut copies = 1;
    if state.duplicates > 0 && bucket == DESIRED_BUCKET {
        state.duplicates -= 1;
        copies = 2;
    }
    for prefix in prefixes(key) {
        let watchers = state
            .watches
            .get_mut(&(bucket.to_owned(), prefix.to_owned()));
        for w in watchers.into_iter().flatten() {
            for _ in 0..copies {
                w.send(key, revision, value.clone(), 0);
            }
        }
    }
    revision
}

/// Bytes as a JSON string when they are UTF-8, else as an array of numbers.
mod text {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serialize, Serializer};

    pub(super) struct AsText<'a>(pub(super) &'a [u8]);

    impl Serialize for AsText<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            match std::str::from_utf8(self.0) {
                Ok(text) => s.serialize_str(text),
                Err(_) => self.0.serialize(s),
            }
        }
    }

    pub(super) struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string or an array of bytes")
        }

        fn visit_str<E: Error>(self, v: &str) -> Result<Vec<u8>, E> {
            Ok(v.as_bytes().to_vec())
        }

        fn visit_string<E: Error>(self, v: String) -> Result<Vec<u8>, E> {
            Ok(v.into_bytes())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        AsText(bytes).serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_any(BytesVisitor)
    }
}

/// [`text`] for an optional value.
mod opt_text {
    use serde::de::{Deserializer, Visitor};
    use serde::Serializer;

    use super::text::{AsText, BytesVisitor};

    #[allow(clippy::ref_option)]
    pub(super) fn serialize<S: Serializer>(
        bytes: &Option<Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_some(&AsText(b)),
            None => s.serialize_none(),
        }
    }

    struct OptVisitor;

    impl<'de> Visitor<'de> for OptVisitor {
        type Value = Option<Vec<u8>>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("null, a string or an array of bytes")
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(BytesVisitor).map(Some)
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        d.deserialize_option(OptVisitor)
    }
}

/// The prefixes a watch or subscription can use to match `key`: the empty
/// one and each one ending at a dot.
fn prefixes(key: &str) -> impl Iterator<Item = &str> {
    std::iter::once("").chain(key.match_indices('.').map(move |(i, _)| &key[..=i]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(
        broker: &Broker,
        n: u64,
        who: &str,
    ) -> (String, mpsc::UnboundedReceiver<Frame>, Outbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut client = String::new();
        broker.handle(n, &mut client, Frame::Hello { client: who.into() }, &tx);
        (client, rx, tx)
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<Frame>) -> Vec<Frame> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    fn put(broker: &Broker, key: &str, value: &[u8]) {
        let (mut client, mut rx, tx) = connect(broker, 99, "operator");
        broker.handle(
            99,
            &mut client,
            Frame::Write {
                id: 1,
                bucket: DESIRED_BUCKET.into(),
                key: key.into(),
                value: Some(value.to_vec()),
            },
            &tx,
        );
        assert!(matches!(drain(&mut rx)[..], [Frame::Ack { .. }]));
    }

    #[test]
    fn a_stale_delivery_sends_an_older_revision_after_the_newer_one() {
        let broker = Broker::default();
        put(&broker, "dev-0.shop", b"one");
        let (mut client, mut rx, tx) = connect(&broker, 1, "device:dev-0");
        let watch = Frame::Watch {
            id: 1,
            bucket: DESIRED_BUCKET.into(),
            prefix: "dev-0.".into(),
            deletes: false,
        };
        broker.handle(1, &mut client, watch, &tx);
        put(&broker, "dev-0.shop", b"two");
        let revisions = |frames: Vec<Frame>| -> Vec<(u64, Vec<u8>)> {
            frames
                .into_iter()
                .filter_map(|f| match f {
                    Frame::Entry {
                        revision, value, ..
                    } => Some((revision, value.unwrap_or_default())),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(
            revisions(drain(&mut rx)),
            [(1, b"one".to_vec()), (2, b"two".to_vec())]
        );
        assert_eq!(broker.deliver_stale(DESIRED_BUCKET, "dev-0."), 1);
        assert_eq!(revisions(drain(&mut rx)), [(1, b"one".to_vec())]);
    }

    #[test]
    fn a_watch_counts_its_snapshot_down_as_jetstream_does() {
        let broker = Broker::default();
        put(&broker, "dev-0.a", b"1");
        put(&broker, "dev-0.b", b"2");
        put(&broker, "dev-1.c", b"3");
        let (mut client, mut rx, tx) = connect(&broker, 1, "device:dev-0");
        let watch = Frame::Watch {
            id: 7,
            bucket: DESIRED_BUCKET.into(),
            prefix: "dev-0.".into(),
            deletes: false,
        };
        broker.handle(1, &mut client, watch, &tx);
        put(&broker, "dev-0.a", b"4");
        let counts: Vec<(String, u64)> = drain(&mut rx)
            .into_iter()
            .map(|f| match f {
                Frame::Watching { id, pending } => (format!("watching {id}"), pending),
                Frame::Entry { key, pending, .. } => (key, pending),
                other => panic!("{other:?}"),
            })
            .collect();
        let expected = [
            ("watching 7", 2),
            ("dev-0.a", 1),
            ("dev-0.b", 0),
            ("dev-0.a", 0),
        ];
        assert_eq!(counts, expected.map(|(k, n)| (k.to_owned(), n)).to_vec());
    }

    #[test]
    fn a_write_over_the_payload_limit_is_denied_and_is_not_an_isolation_refusal() {
        let broker = Broker::default().with_max_payload(8);
        let (mut client, mut rx, tx) = connect(&broker, 1, "device:dev-0");
        let write = |id, value: &[u8]| Frame::Write {
            id,
            bucket: STATE_BUCKET.into(),
            key: "dev-0.shop".into(),
            value: Some(value.to_vec()),
        };
        broker.handle(1, &mut client, write(1, b"12345678"), &tx);
        broker.handle(1, &mut client, write(2, b"123456789"), &tx);
        let frames = drain(&mut rx);
        assert!(matches!(frames[0], Frame::Ack { id: 1, .. }), "{frames:?}");
        assert!(
            matches!(
                frames[1],
                Frame::TooLarge {
                    id: 2,
                    size: 9,
                    limit: 8
                }
            ),
            "{frames:?}"
        );
        assert!(broker.refusals().is_empty());
        assert_eq!(Broker::default().max_payload(), DEFAULT_MAX_PAYLOAD);
    }

    #[test]
    fn values_travel_as_text_when_they_can() {
        let entry = |value: &[u8]| Frame::Entry {
            watch: 1,
            key: "k".into(),
            revision: 1,
            pending: 0,
            value: Some(value.to_vec()),
        };
        let line = entry(br#"{"a":1}"#).to_line();
        assert!(String::from_utf8_lossy(&line).contains(r#""value":"{\"a\":1}""#));
        for value in [&br#"{"a":1}"#[..], &[0xff, 0, 7][..]] {
            let line = entry(value).to_line();
            let back: Frame = serde_json::from_slice(&line).unwrap();
            assert_eq!(back, entry(value));
        }
        let gone = Frame::Entry {
            watch: 1,
            key: "k".into(),
            revision: 2,
            pending: 0,
            value: None,
        };
        assert_eq!(
            serde_json::from_slice::<Frame>(&gone.to_line()).unwrap(),
            gone
        );
    }
}
