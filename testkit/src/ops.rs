//! The operation vocabulary every driver of the reconciler shares: what a
//! device lives through, as [`Op`]s, and how they are played against the
//! real core through the [`Harness`] ([`Player`], [`run`]).
//!
//! The ops are desired-state puts (scores built from a small vocabulary so
//! that most are valid or nearly so, some of them damaged byte-wise, and
//! some raw bytes), deletes, redeliveries of the current and of older
//! revisions, watch reconnects (the bucket's values, then a resync), runtime
//! API faults (no answer or an error, with or without the effect), container
//! crashes, images removed or restored, time passing (through
//! init-container deadlines, the libpod wait/inspect race, stop graces and
//! setup scripts that take their time or hang) and agent restarts with the
//! cache kept or lost.
//!
//! A score has one of the three lifetimes: `persistent` (absent, `null` or
//! named), `per_run` or `no_launch`. A `persistent` or `per_run` service may
//! carry a setup script from [`scripts`] (one that provisions, at once or
//! after a while, one that reads stdin, one that fails with output, one
//! that hangs past the setup timeout); a `no_launch` service verifies one
//! of the containers of the world's [`base_system`] (running the right
//! image, stopped, on another image, or missing), which no op may touch.
//!
//! Three ways in:
//! - bytes: [`Op::decode_all`] reads any byte string as ops (one tag byte,
//!   then a few argument bytes each; a short input reads as zeros), so
//!   libFuzzer never wastes an input, and [`Op::encode`] is its inverse, for
//!   seed files;
//! - proptest: [`ops`] is a `Strategy` for op lists;
//! - code: build the values directly.
//!
//! This module only builds the world and plays the ops; the checks are the
//! harness's own: its oracle at every runtime operation and report and its
//! no-busy-loop assertion at every wake. A violation panics with the
//! invariant, the ops, what was sent and the end of the transcript; any
//! other panic is a crash of the core.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use proptest::prelude::*;

use crate::harness::{Harness, OpFault};
use crate::{base_system, images, scripts};
use podfleet_core::runtime::RuntimeErrorKind;
use podfleet_core::wire::{DeploymentName, DeviceId};
use podfleet_core::Config;
use serde_json::{json, Map, Value};

/// At most this many ops of an input are played, to keep every run short.
pub const MAX_OPS: usize = 64;

/// One thing that happens to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// The operator puts a score built from the vocabulary, as a new revision.
    Put {
        /// Which deployment.
        deployment: Deployment,
        /// The score.
        score: ScoreSketch,
    },
    /// The operator puts a vocabulary score damaged byte-wise.
    PutMutated {
        /// Which deployment.
        deployment: Deployment,
        /// The score before the damage.
        score: ScoreSketch,
        /// The damage.
        mutation: Mutation,
    },
    /// The operator, or something pretending to be it, puts raw bytes (read
    /// as UTF-8, lossily, as the harness takes text).
    PutRaw {
        /// Which deployment.
        deployment: Deployment,
        /// The payload.
        bytes: RawBytes,
    },
    /// The operator deletes the deployment, as a new revision.
    Delete {
        /// Which deployment.
        deployment: Deployment,
    },
    /// The watch delivers a revision again: `back` 0 is what the bucket holds
    /// now, more is an older put or delete arriving late.
    Redeliver {
        /// Which deployment.
        deployment: Deployment,
        /// How many revisions back.
        back: u8,
    },
    /// The watch reconnects: it delivers what the bucket holds, then ends
    /// its initial snapshot (a resync: exactly the deployments put and not
    /// deleted are present).
    Reconnect,
    /// Time passes.
    Advance(Wait),
    /// A service container exits by itself with `code`.
    Crash {
        /// Which deployment.
        deployment: Deployment,
        /// Which service of [`SERVICE_NAMES`] (modulo).
        service: u8,
        /// Its exit code.
        code: i8,
    },
    /// The next runtime operation named `op` fails. With `after_effect`, it
    /// takes effect first, and the error comes back at once even for a
    /// `stop` or `wait` still under way, as a client-side timeout would.
    Fault {
        /// Which operation.
        op: OpName,
        /// How it fails.
        kind: ErrorKind,
        /// Whether it takes effect before reporting the error ("create
        /// failed but the container exists anyway").
        after_effect: bool,
    },
    /// The agent restarts; pending runtime results are lost.
    RestartAgent {
        /// Whether the on-disk cache survives.
        keep_cache: bool,
        /// Whether NATS is reachable after the restart: the watch then
        /// redelivers what the bucket holds and resyncs.
        watch_snapshot: bool,
    },
    /// An image of [`IMAGES`] (modulo) disappears, or comes back.
    ToggleImage {
        /// Which image.
        image: u8,
    },
}

/// Raw payload bytes: a little-endian `u16` length, then that many bytes
/// (fewer when the input runs out), so that libFuzzer's dictionary and
/// comparison tokens land in them intact.
#[derive(Clone, PartialEq, Eq)]
pub struct RawBytes(pub Vec<u8>);

impl std::fmt::Debug for RawBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RawBytes({:?})", String::from_utf8_lossy(&self.0))
    }
}

/// The device's deployments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Deployment {
    /// `shop`.
    Shop,
    /// `cam`.
    Cam,
    /// `relay`.
    Relay,
}

impl Deployment {
    /// The deployment's name.
    pub fn name(self) -> &'static str {
        match self {
            Deployment::Shop => "shop",
            Deployment::Cam => "cam",
            Deployment::Relay => "relay",
        }
    }
}

/// How much time passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Tens of milliseconds: around the 200 ms libpod-race retry.
    CentiSeconds(u8),
    /// Seconds: init deadlines, stop graces, heartbeats.
    Seconds(u8),
    /// Minutes (at most 15): ticks and the capped backoffs.
    Minutes(u8),
}

impl Wait {
    /// The duration.
    pub fn duration(self) -> Duration {
        match self {
            Wait::CentiSeconds(n) => Duration::from_millis(10 * u64::from(n)),
            Wait::Seconds(n) => Duration::from_secs(u64::from(n)),
            Wait::Minutes(n) => Duration::from_secs(60 * u64::from(n % 16)),
        }
    }
}

/// A runtime operation the harness can fault: the wire's own name for it
/// (the decoder draws the seven container operations and the two a setup
/// script needs, `copy_file` and `exec`; never `Other`).
pub use podfleet_core::wire::RuntimeOperation as OpName;

/// How a faulted operation fails: the runtime does not answer, or answers
/// with an error.
///
/// One vocabulary, two distributions. The fuzzer's decoder
/// ([`Op::decode_all`]) draws only [`ErrorKind::Unavailable`] and
/// [`ErrorKind::Other`]: the fake runtime gives `NotFound`, `NameConflict`
/// and `ImageMissing` itself whenever they are true, and a fuzzer let loose
/// on injected ones finds a runtime that lies about its containers, which no
/// reconciler can be held to (docs/fuzzing.md, "Three rules keep the inputs
/// honest"). The property test's strategy ([`ops`]) also draws
/// [`ErrorKind::NotFound`] and [`ErrorKind::NameConflict`], each kind as
/// often, as the core's property test always did, with its one rule: a
/// `NotFound` on a `stop` is played as [`ErrorKind::Other`], since podman
/// answers a stop with 404 only when the container is gone, and a lying 404
/// would make any agent remove a live container without its grace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The runtime does not answer (or the call timed out client-side).
    Unavailable,
    /// Anything else.
    Other,
    /// The runtime says the container does not exist (played as
    /// [`ErrorKind::Other`] on a `stop`).
    NotFound,
    /// The runtime says the name is taken.
    NameConflict,
}

impl ErrorKind {
    /// Every kind: the fuzzer's decoder draws the first two, the property
    /// test's strategy all four.
    const ALL: [ErrorKind; 4] = [
        ErrorKind::Unavailable,
        ErrorKind::Other,
        ErrorKind::NotFound,
        ErrorKind::NameConflict,
    ];

    /// The runtime error a fault of this kind on `op` injects.
    fn runtime_for(self, op: OpName) -> RuntimeErrorKind {
        match self {
            ErrorKind::Unavailable => RuntimeErrorKind::Unavailable,
            ErrorKind::Other => RuntimeErrorKind::Other,
            ErrorKind::NotFound if op == OpName::Stop => RuntimeErrorKind::Other,
            ErrorKind::NotFound => RuntimeErrorKind::NotFound,
            ErrorKind::NameConflict => RuntimeErrorKind::NameConflict,
        }
    }
}

/// Byte-wise damage to a payload; positions wrap around its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// Cut the payload at `at`.
    Truncate {
        /// Where.
        at: u16,
    },
    /// Replace the byte at `at`.
    Overwrite {
        /// Where.
        at: u16,
        /// The new byte.
        byte: u8,
    },
    /// Insert a byte before `at`.
    Insert {
        /// Where.
        at: u16,
        /// The byte.
        byte: u8,
    },
    /// Remove the byte at `at`.
    Remove {
        /// Where.
        at: u16,
    },
}

impl Mutation {
    /// Applies the damage.
    pub fn apply(self, mut bytes: Vec<u8>) -> Vec<u8> {
        let at = |at: u16, len: usize| usize::from(at) % len.max(1);
        match self {
            Mutation::Truncate { at: n } => bytes.truncate(at(n, bytes.len())),
            Mutation::Overwrite { at: n, byte } => {
                let i = at(n, bytes.len());
                if let Some(b) = bytes.get_mut(i) {
                    *b = byte;
                }
            }
            Mutation::Insert { at: n, byte } => {
                let i = at(n, bytes.len() + 1);
                bytes.insert(i, byte);
            }
            Mutation::Remove { at: n } => {
                let i = at(n, bytes.len());
                if i < bytes.len() {
                    bytes.remove(i);
                }
            }
        }
        bytes
    }
}

/// Service names: the first three valid and crashable by [`Op::Crash`],
/// then names that clash with an init container or break the rule.
pub const SERVICE_NAMES: [&str; 8] = ["web", "worker", "db", "migrate", "Web", "a.b", "", "-x"];
/// Images the world knows; their behaviours are set in [`world`].
pub const IMAGES: [&str; 11] = [
    "img/a:1",
    "img/a:2",
    "img/crash:1",
    "img/slow-stop:1",
    "img/ignore-stop:1",
    "img/init-ok:1",
    "img/init-fail:1",
    "img/init-hang:1",
    "img/init-race:1",
    "img/init-race-long:1",
    "img/missing:1",
];
/// The image that is missing when the world starts.
const MISSING_IMAGE: &str = images::MISSING;
/// Service images: the first seven valid (the steady ones, one that
/// crashes, one that exits 0 at once, as a `per_run` job does, and one
/// that is missing).
const SERVICE_IMAGES: [&str; 9] = [
    "img/a:1",
    "img/a:2",
    "img/crash:1",
    "img/slow-stop:1",
    "img/ignore-stop:1",
    "img/init-ok:1",
    "img/missing:1",
    "",
    " ",
];
const INIT_NAMES: [&str; 5] = ["migrate", "seed", "warm", "web", "Bad_init"];
/// Init images: within the valid ones, two in five succeed plainly, one
/// goes through the libpod race, one fails, one never exits.
const INIT_IMAGES: [&str; 9] = [
    "img/init-ok:1",
    "img/init-race:1",
    "img/init-ok:1",
    "img/init-fail:1",
    "img/init-hang:1",
    "img/init-race-long:1",
    "img/a:1",
    "img/missing:1",
    "",
];
/// Init timeouts: the first five valid (5 s is the simulator's for the
/// doomed init containers).
const INIT_TIMEOUTS: [u64; 7] = [20, 3, 1, 300, 5, 0, u64::MAX];
const ENV_KEYS: [&str; 5] = ["A", "MODE", "", "A=B", "NUL\0"];
const ENV_VALUES: [&str; 3] = ["1", "x", ""];
const VOLUMES: [(&str, &str); 6] = [
    ("/srv/data", "/data"),
    ("cache", "/cache"),
    ("", "/x"),
    ("/a", "relative"),
    ("/a:b", "/c"),
    ("/a", "/b:c"),
];
const HOST_PORTS: [u16; 4] = [8080, 80, 65535, 0];
const SIGNALS: [&str; 7] = [
    "SIGTERM", "SIGINT", "SIGKILL", "SIGWINCH", "SIGHUP", "SIGFOO", "sigterm",
];
const GRACES: [u64; 5] = [1, 2, 30, 0, u64::MAX];
const ARGS: [&[&str]; 3] = [&[], &["--port", "8080"], &["sh", "-c", "sleep 1"]];
/// Setup scripts: the catalogue's seven, then an empty one (refused).
const SETUP_SCRIPTS: [&str; 8] = [
    scripts::ALL[0],
    scripts::ALL[1],
    scripts::ALL[2],
    scripts::ALL[3],
    scripts::ALL[4],
    scripts::ALL[5],
    scripts::ALL[6],
    "",
];
/// The containers a `no_launch` service names: the base system's four,
/// a container of podfleet's own (another deployment's, still only
/// looked at), then a name podman refuses.
const CONTAINERS: [&str; 6] = [
    base_system::NAMES[0],
    base_system::NAMES[1],
    base_system::NAMES[2],
    base_system::NAMES[3],
    "shop_web",
    "-x",
];

/// A score's `lifetime` field as a sketch renders it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LifetimeField {
    /// Left out: persistent.
    Absent,
    /// `null`: persistent too.
    Null,
    /// A name, known or not.
    Named(&'static str),
}

/// Lifetimes: the first five valid, each score rendered with only the
/// fields its lifetime takes (a `no_launch` one leaves out what creates a
/// container; only a `no_launch` service names a container); then
/// `no_launch` and `per_run` with every field the sketch has, mostly
/// refused, and a lifetime no agent knows.
const LIFETIMES: [(LifetimeField, bool); 8] = [
    (LifetimeField::Absent, true),
    (LifetimeField::Named("per_run"), true),
    (LifetimeField::Named("no_launch"), true),
    (LifetimeField::Named("persistent"), true),
    (LifetimeField::Null, true),
    (LifetimeField::Named("no_launch"), false),
    (LifetimeField::Named("per_run"), false),
    (LifetimeField::Named("forever"), false),
];

/// Picks from `vocabulary`, favouring its first `good` entries: an index
/// byte below 224 stays among them, so most picks are valid.
fn pick<T: Copy>(vocabulary: &[T], good: usize, index: u8) -> T {
    let slot = if index < 224 {
        usize::from(index) % good
    } else {
        usize::from(index) % vocabulary.len()
    };
    vocabulary[slot]
}

/// A score described by vocabulary indices; [`ScoreSketch::to_json`] renders it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoreSketch {
    /// The first service: a score without one is refused, so every sketch
    /// has it.
    pub service: ServiceSketch,
    /// More services (the first three are used).
    pub more_services: Vec<ServiceSketch>,
    /// The init containers (the first three are used).
    pub init_containers: Vec<InitSketch>,
    /// The stop policy.
    pub lifecycle: Option<LifecycleSketch>,
    /// Adds a field this agent does not know, as a newer operator would.
    pub unknown_field: bool,
    /// Index into the lifetimes: 0 (absent), 3 (`"persistent"`) and 4
    /// (`null`) are persistent, 1 `per_run`, 2 `no_launch`.
    pub lifetime: u8,
}

/// One service of a [`ScoreSketch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSketch {
    /// Index into the service names.
    pub name: u8,
    /// Index into the service images.
    pub image: u8,
    /// Index into the argument lists.
    pub args: u8,
    /// An environment variable: key and value indices.
    pub env: Option<(u8, u8)>,
    /// A volume index and whether it is read-only.
    pub volume: Option<(u8, bool)>,
    /// A host port index, whether the container port is 0, and UDP.
    pub port: Option<(u8, bool, bool)>,
    /// Index into the setup scripts ([`scripts::ALL`], in order), for a
    /// `persistent` or `per_run` score.
    pub setup_script: Option<u8>,
    /// Index into the containers a `no_launch` service verifies
    /// ([`base_system::NAMES`], in order, then others); `None` verifies the
    /// one named as the service.
    pub container: Option<u8>,
}

impl ServiceSketch {
    /// A service of name `name` on image `image` (indices), with nothing
    /// else: the first argument list, no env, volume, port, script or
    /// verified container.
    pub fn plain(name: u8, image: u8) -> Self {
        Self {
            name,
            image,
            args: 0,
            env: None,
            volume: None,
            port: None,
            setup_script: None,
            container: None,
        }
    }
}

/// One init container of a [`ScoreSketch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitSketch {
    /// Index into the init names.
    pub name: u8,
    /// Index into the init images.
    pub image: u8,
    /// Index into the timeouts; `None` leaves the default.
    pub timeout: Option<u8>,
    /// An environment variable: key and value indices.
    pub env: Option<(u8, u8)>,
}

/// The stop policy of a [`ScoreSketch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleSketch {
    /// Index into the signals; `None` leaves the default.
    pub signal: Option<u8>,
    /// Index into the grace periods; `None` leaves the default.
    pub grace: Option<u8>,
}

fn env_of(env: Option<(u8, u8)>) -> Map<String, Value> {
    let mut map = Map::new();
    if let Some((key, value)) = env {
        map.insert(
            pick(&ENV_KEYS, 2, key).to_owned(),
            Value::from(pick(&ENV_VALUES, 3, value)),
        );
    }
    map
}

impl ScoreSketch {
    /// The score's JSON text.
    pub fn to_json(&self) -> String {
        let (lifetime, fitted) = pick(&LIFETIMES, 5, self.lifetime);
        let no_launch = lifetime == LifetimeField::Named("no_launch");
        // A fitted score leaves out what its lifetime does not take.
        let creates = !(fitted && no_launch);
        let names_container = !fitted || no_launch;
        // Valid names go round the three valid ones from where the first
        // service's byte says, so that services rarely share a name.
        let offset = usize::from(self.service.name);
        let services: Vec<Value> = std::iter::once(&self.service)
            .chain(self.more_services.iter().take(3))
            .enumerate()
            .map(|(position, s)| {
                let name = if s.name < 224 {
                    SERVICE_NAMES[(offset + position) % 3]
                } else {
                    pick(&SERVICE_NAMES, 3, s.name)
                };
                let mut service = json!({
                    "name": name,
                    "image": pick(&SERVICE_IMAGES, 7, s.image),
                });
                if let Some(container) = s.container.filter(|_| names_container) {
                    service["container"] = json!(pick(&CONTAINERS, 5, container));
                }
                if !creates {
                    return service;
                }
                service["args"] = json!(ARGS[usize::from(s.args) % ARGS.len()]);
                service["env"] = Value::Object(env_of(s.env));
                if let Some((volume, read_only)) = s.volume {
                    let (source, target) = pick(&VOLUMES, 2, volume);
                    service["volumes"] =
                        json!([{ "source": source, "target": target, "read_only": read_only }]);
                }
                if let Some((host, zero, udp)) = s.port {
                    service["ports"] = json!([{
                        "host_port": pick(&HOST_PORTS, 3, host),
                        "container_port": if zero { 0 } else { 80 },
                        "protocol": if udp { "udp" } else { "tcp" },
                    }]);
                }
                if let Some(script) = s.setup_script {
                    service["setup_script"] = json!(pick(&SETUP_SCRIPTS, 7, script));
                }
                service
            })
            .collect();
        let mut score = json!({ "services": services });
        match lifetime {
            LifetimeField::Absent => {}
            LifetimeField::Null => score["lifetime"] = Value::Null,
            LifetimeField::Named(name) => score["lifetime"] = json!(name),
        }
        if self.unknown_field {
            score["placement"] = json!({ "arch": "arm64" });
        }
        if !creates {
            return score.to_string();
        }
        let inits: Vec<Value> = self
            .init_containers
            .iter()
            .take(3)
            .map(|i| {
                let mut init = json!({
                    "name": pick(&INIT_NAMES, 3, i.name),
                    "image": pick(&INIT_IMAGES, 5, i.image),
                    "env": env_of(i.env),
                });
                if let Some(timeout) = i.timeout {
                    init["timeout"] = json!(pick(&INIT_TIMEOUTS, 5, timeout));
                }
                init
            })
            .collect();
        score["init_containers"] = Value::Array(inits);
        if let Some(lifecycle) = &self.lifecycle {
            let mut policy = Map::new();
            if let Some(signal) = lifecycle.signal {
                policy.insert("stop_signal".into(), json!(pick(&SIGNALS, 5, signal)));
            }
            if let Some(grace) = lifecycle.grace {
                policy.insert("grace_period_secs".into(), json!(pick(&GRACES, 3, grace)));
            }
            score["lifecycle"] = Value::Object(policy);
        }
        score.to_string()
    }
}

/// The fake runtime with the test kit's image catalogue and the
/// [`base_system`]'s containers, and a harness with default timings (30 s
/// tick, 15 s heartbeat, 200 ms libpod-race retry, 5 min setup timeout).
pub fn world() -> Harness {
    let config = Config::new(DeviceId::new("fuzz").expect("a valid device id"), "fuzz");
    let mut h = Harness::new(config);
    images::install(&mut h.runtime);
    base_system::install(&mut h.runtime);
    h
}

/// What the desired-state bucket held for one deployment, revision by revision.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Put(String),
    Deleted,
}

/// Plays `ops` (at most [`MAX_OPS`]) and then lets the device settle
/// with every fault healed.
///
/// # Panics
/// With the violated invariant, the ops and the transcript's tail when
/// the harness finds a violation; any other panic is the core's own.
pub fn run(ops: &[Op]) {
    let ops = &ops[..ops.len().min(MAX_OPS)];
    let mut player = Player::default();
    for (index, step) in ops.iter().enumerate() {
        player.play(step);
        player.check(ops, Some(index));
    }
    player.h.faults.clear();
    player.h.run_for(Duration::from_secs(600));
    player.check(ops, None);
}

/// Plays ops against a [`Harness`], keeping the desired-state bucket's
/// history so that redeliveries and reconnects say what a real watch would.
#[derive(Debug)]
pub struct Player {
    /// The harness the ops are played on.
    pub h: Harness,
    revision: u64,
    /// Per deployment, every revision the bucket held, oldest first.
    history: BTreeMap<Deployment, Vec<(u64, Entry)>>,
    /// Deployments whose current bucket entry this agent has been told (and,
    /// across restarts, kept in its cache): only for those can an older
    /// revision arrive late.
    /// A fresh watch never delivers an old revision, and an agent that lost
    /// its cache cannot tell an old revision from a new one.
    knows_current: BTreeSet<Deployment>,
    /// Images the runtime does not have.
    missing_images: BTreeSet<&'static str>,
    /// The counters when the running agent started.
    agent_start: AgentStart,
    /// What was sent, in words, for the failure message.
    pub script: String,
}

/// What [`Player::play`] did with an op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Played {
    /// It reached the device.
    Done,
    /// There was nothing to do it to: a redelivery of a deployment never
    /// written, a crash of a service with no running container.
    Nothing,
    /// The watch delivered the revision `back` revisions before the
    /// bucket's current one (0: the current one) of the deployment again.
    Redelivered {
        /// How many revisions back.
        back: usize,
    },
}

/// Where the running agent's lifetime began: the harness's counters when it
/// last restarted (zeros for the first agent), so that a check can tell
/// what happened since.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentStart {
    /// How many events the fake runtime had recorded.
    pub runtime_events: usize,
    /// How many runtime operations had failed ([`Harness::errors`]).
    pub errors: u64,
}

impl Default for Player {
    fn default() -> Self {
        Self::new(world())
    }
}

impl Player {
    /// A player on `h`, whose runtime has the image catalogue installed.
    pub fn new(h: Harness) -> Self {
        Self {
            h,
            revision: 0,
            history: BTreeMap::new(),
            knows_current: BTreeSet::new(),
            missing_images: BTreeSet::from([MISSING_IMAGE]),
            agent_start: AgentStart::default(),
            script: String::new(),
        }
    }

    /// What the desired-state bucket holds now: per deployment put and not
    /// deleted since, its revision and payload.
    pub fn desired(&self) -> BTreeMap<String, (u64, String)> {
        self.current()
            .into_iter()
            .map(|(d, revision, text)| (d.name().to_owned(), (revision, text)))
            .collect()
    }

    /// The harness's counters when the running agent started.
    pub fn agent_start(&self) -> AgentStart {
        self.agent_start
    }

    fn put(&mut self, deployment: Deployment, text: String) {
        self.revision += 1;
        let _ = writeln!(
            self.script,
            "put {} rev {}: {text}",
            deployment.name(),
            self.revision
        );
        self.h.put(deployment.name(), self.revision, &text);
        self.history
            .entry(deployment)
            .or_default()
            .push((self.revision, Entry::Put(text)));
        self.knows_current.insert(deployment);
    }

    fn deliver(&mut self, deployment: Deployment, revision: u64, entry: &Entry) {
        let _ = writeln!(
            self.script,
            "redeliver {} rev {revision}",
            deployment.name()
        );
        match entry {
            Entry::Put(text) => self.h.put(deployment.name(), revision, text),
            Entry::Deleted => self.h.delete(deployment.name(), revision),
        }
    }

    fn current(&self) -> Vec<(Deployment, u64, String)> {
        self.history
            .iter()
            .filter_map(|(d, revisions)| match revisions.last() {
                Some((revision, Entry::Put(text))) => Some((*d, *revision, text.clone())),
                _ => None,
            })
            .collect()
    }

    /// The watch's initial snapshot: the current values, then the resync.
    /// The reconciler relies on that order (a resync sweeps containers of
    /// deployments it does not know), so ops never resync on their own.
    fn reconnect(&mut self) {
        for (deployment, revision, text) in self.current() {
            self.deliver(deployment, revision, &Entry::Put(text));
            self.knows_current.insert(deployment);
        }
        let present: BTreeSet<DeploymentName> = self
            .current()
            .iter()
            .filter_map(|(d, _, _)| DeploymentName::new(d.name()).ok())
            .collect();
        let _ = writeln!(self.script, "resync {} present", present.len());
        self.h.resync(&present);
    }

    /// Plays one op, and says what it did.
    pub fn play(&mut self, step: &Op) -> Played {
        match step {
            Op::Put { deployment, score } => self.put(*deployment, score.to_json()),
            Op::PutMutated {
                deployment,
                score,
                mutation,
            } => {
                let bytes = mutation.apply(score.to_json().into_bytes());
                self.put(*deployment, String::from_utf8_lossy(&bytes).into_owned());
            }
            Op::PutRaw { deployment, bytes } => {
                self.put(*deployment, String::from_utf8_lossy(&bytes.0).into_owned());
            }
            Op::Delete { deployment } => {
                self.revision += 1;
                let _ = writeln!(
                    self.script,
                    "delete {} rev {}",
                    deployment.name(),
                    self.revision
                );
                self.h.delete(deployment.name(), self.revision);
                self.history
                    .entry(*deployment)
                    .or_default()
                    .push((self.revision, Entry::Deleted));
                self.knows_current.insert(*deployment);
            }
            Op::Redeliver { deployment, back } => {
                let Some(revisions) = self.history.get(deployment) else {
                    return Played::Nothing;
                };
                let back = if self.knows_current.contains(deployment) {
                    usize::from(*back) % revisions.len()
                } else {
                    0
                };
                let Some((revision, entry)) = revisions.get(revisions.len() - 1 - back).cloned()
                else {
                    return Played::Nothing;
                };
                self.deliver(*deployment, revision, &entry);
                if back == 0 {
                    self.knows_current.insert(*deployment);
                }
                return Played::Redelivered { back };
            }
            Op::Reconnect => self.reconnect(),
            Op::Advance(wait) => {
                let d = wait.duration();
                let _ = writeln!(self.script, "advance {d:?}");
                self.h.run_for(d);
            }
            Op::Crash {
                deployment,
                service,
                code,
            } => {
                let service = SERVICE_NAMES[usize::from(*service) % 3];
                let name = format!("{}_{service}", deployment.name());
                if !self.h.crash(&name, i64::from(*code)) {
                    return Played::Nothing;
                }
                let _ = writeln!(self.script, "crash {name} exit {code}");
            }
            Op::Fault {
                op,
                kind,
                after_effect,
            } => {
                let kind = kind.runtime_for(*op);
                let fault = if *after_effect {
                    OpFault::FailAfterEffect(kind)
                } else {
                    OpFault::Fail(kind)
                };
                let _ = writeln!(self.script, "next {} fails: {fault:?}", op.as_str());
                self.h
                    .faults
                    .entry(op.as_str())
                    .or_default()
                    .push_back(fault);
            }
            Op::RestartAgent {
                keep_cache,
                watch_snapshot,
            } => {
                let _ = writeln!(
                    self.script,
                    "agent restart, cache {}, watch {}",
                    if *keep_cache { "kept" } else { "lost" },
                    if *watch_snapshot {
                        "resyncs"
                    } else {
                        "offline"
                    }
                );
                // The agent keeps across a restart what its cache holds: a
                // deployment's newest valid revision, or its tombstone. One
                // it had only seen invalid revisions of is not in it, and is
                // as new to the restarted agent as after a lost cache.
                let cache = self.h.cache.as_ref().filter(|_| *keep_cache);
                self.knows_current.retain(|d| {
                    let name = DeploymentName::new(d.name()).ok();
                    cache.zip(name).is_some_and(|(cache, name)| {
                        cache.deployments.contains_key(&name)
                            || cache.tombstones.contains_key(&name)
                    })
                });
                self.h.restart_agent(*keep_cache);
                self.agent_start = AgentStart {
                    runtime_events: self.h.runtime.events().len(),
                    errors: self.h.errors,
                };
                if *watch_snapshot {
                    self.reconnect();
                }
            }
            Op::ToggleImage { image } => {
                let image = IMAGES[usize::from(*image) % IMAGES.len()];
                if self.missing_images.remove(image) {
                    let _ = writeln!(self.script, "image {image} is back");
                    self.h.runtime.add_image(image);
                } else {
                    let _ = writeln!(self.script, "image {image} is gone");
                    self.missing_images.insert(image);
                    self.h.runtime.remove_image(image);
                }
            }
        }
        Played::Done
    }

    /// Panics with the violations found, if any, `index` naming the op
    /// after which they were (`None`: after settling).
    pub fn check(&self, ops: &[Op], index: Option<usize>) {
        if self.h.violations.is_empty() {
            return;
        }
        let when = match index {
            Some(i) => format!("after step {i} ({:?})", ops[i]),
            None => "after healing every fault and settling for 10 min".to_owned(),
        };
        let transcript: Vec<&str> = self.h.transcript.lines().collect();
        let tail = transcript[transcript.len().saturating_sub(80)..].join("\n");
        panic!(
            "invariant violated {when}:\n  {}\n\nops: {ops:#?}\n\nwhat was sent:\n{}\ntranscript (last 80 lines):\n{tail}",
            self.h
                .violations
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n  "),
            self.script
        );
    }
}

/// The byte format of [`Op::decode_all`] and [`Op::encode`]: every value
/// reads from any bytes (past the end, as zeros) and writes the bytes that
/// read back as itself.
trait Codec: Sized {
    fn decode(r: &mut Reader<'_>) -> Self;
    fn encode(&self, out: &mut Vec<u8>);
}

/// Bytes being decoded; past the end it reads zeros.
struct Reader<'a> {
    bytes: &'a [u8],
    draw: Draw,
}

/// Which distribution a [`Reader`] decodes: the two differ only in the
/// [`ErrorKind`]s drawn (see there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Draw {
    /// [`Op::decode_all`]'s: no `NotFound` or `NameConflict`.
    Fuzzer,
    /// [`ops`]'s: every kind.
    Property,
}

impl Reader<'_> {
    fn byte(&mut self) -> u8 {
        match self.bytes.split_first() {
            Some((&b, rest)) => {
                self.bytes = rest;
                b
            }
            None => 0,
        }
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let (taken, rest) = self.bytes.split_at(n.min(self.bytes.len()));
        self.bytes = rest;
        taken
    }

    /// An index below `count`, from one byte.
    fn index(&mut self, count: u8) -> u8 {
        self.byte() % count
    }
}

impl Codec for u8 {
    fn decode(r: &mut Reader<'_>) -> Self {
        r.byte()
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(*self);
    }
}

impl Codec for i8 {
    fn decode(r: &mut Reader<'_>) -> Self {
        i8::from_le_bytes([r.byte()])
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend(self.to_le_bytes());
    }
}

impl Codec for u16 {
    fn decode(r: &mut Reader<'_>) -> Self {
        u16::from_le_bytes([r.byte(), r.byte()])
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend(self.to_le_bytes());
    }
}

impl Codec for bool {
    fn decode(r: &mut Reader<'_>) -> Self {
        r.byte() & 1 == 1
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

impl<T: Codec> Codec for Option<T> {
    fn decode(r: &mut Reader<'_>) -> Self {
        bool::decode(r).then(|| T::decode(r))
    }
    fn encode(&self, out: &mut Vec<u8>) {
        self.is_some().encode(out);
        if let Some(value) = self {
            value.encode(out);
        }
    }
}

impl<A: Codec, B: Codec> Codec for (A, B) {
    fn decode(r: &mut Reader<'_>) -> Self {
        let a = A::decode(r);
        (a, B::decode(r))
    }
    fn encode(&self, out: &mut Vec<u8>) {
        self.0.encode(out);
        self.1.encode(out);
    }
}

impl<A: Codec, B: Codec, C: Codec> Codec for (A, B, C) {
    fn decode(r: &mut Reader<'_>) -> Self {
        let a = A::decode(r);
        let b = B::decode(r);
        (a, b, C::decode(r))
    }
    fn encode(&self, out: &mut Vec<u8>) {
        self.0.encode(out);
        self.1.encode(out);
        self.2.encode(out);
    }
}

/// A list of at most three (the sketches use no more): a count byte, then
/// the items.
impl<T: Codec> Codec for Vec<T> {
    fn decode(r: &mut Reader<'_>) -> Self {
        let n = r.index(4);
        (0..n).map(|_| T::decode(r)).collect()
    }
    fn encode(&self, out: &mut Vec<u8>) {
        let n = u8::try_from(self.len()).ok().filter(|&n| n < 4);
        let n = n.expect("a sketch list holds at most three items");
        out.push(n);
        for item in self {
            item.encode(out);
        }
    }
}

/// A little-endian `u16` length, then that many bytes (fewer when the input
/// runs out), so that libFuzzer's dictionary and comparison tokens land in
/// them intact.
impl Codec for RawBytes {
    fn decode(r: &mut Reader<'_>) -> Self {
        let len = u16::decode(r);
        Self(r.take(usize::from(len)).to_vec())
    }
    fn encode(&self, out: &mut Vec<u8>) {
        let len = u16::try_from(self.0.len()).expect("a payload under 64 KiB");
        len.encode(out);
        out.extend(&self.0);
    }
}

/// A fieldless enum: one byte, its index modulo the variants.
macro_rules! indexed {
    ($ty:ty, [$($variant:expr),+ $(,)?]) => {
        impl Codec for $ty {
            fn decode(r: &mut Reader<'_>) -> Self {
                const ALL: &[$ty] = &[$($variant),+];
                #[allow(clippy::cast_possible_truncation)]
                let count = ALL.len() as u8;
                ALL[usize::from(r.index(count))]
            }
            fn encode(&self, out: &mut Vec<u8>) {
                const ALL: &[$ty] = &[$($variant),+];
                let i = ALL.iter().position(|v| v == self).unwrap_or(0);
                out.push(u8::try_from(i).unwrap_or(0));
            }
        }
    };
}

indexed!(
    Deployment,
    [Deployment::Shop, Deployment::Cam, Deployment::Relay]
);
indexed!(
    OpName,
    [
        OpName::List,
        OpName::Create,
        OpName::Start,
        OpName::Wait,
        OpName::Inspect,
        OpName::Stop,
        OpName::Remove,
        OpName::CopyFile,
        OpName::Exec,
    ]
);
/// One byte: an index into [`ErrorKind::ALL`], read modulo the kinds the
/// reader draws.
impl Codec for ErrorKind {
    fn decode(r: &mut Reader<'_>) -> Self {
        let count = match r.draw {
            Draw::Fuzzer => 2,
            Draw::Property => 4,
        };
        ErrorKind::ALL[usize::from(r.index(count))]
    }
    fn encode(&self, out: &mut Vec<u8>) {
        let i = ErrorKind::ALL.iter().position(|k| k == self).unwrap_or(0);
        out.push(u8::try_from(i).unwrap_or(0));
    }
}

impl Codec for Wait {
    fn decode(r: &mut Reader<'_>) -> Self {
        match r.index(3) {
            0 => Wait::CentiSeconds(r.byte()),
            1 => Wait::Seconds(r.byte()),
            _ => Wait::Minutes(r.byte()),
        }
    }
    fn encode(&self, out: &mut Vec<u8>) {
        let (tag, n) = match self {
            Wait::CentiSeconds(n) => (0u8, n),
            Wait::Seconds(n) => (1, n),
            Wait::Minutes(n) => (2, n),
        };
        (tag, *n).encode(out);
    }
}

impl Codec for Mutation {
    fn decode(r: &mut Reader<'_>) -> Self {
        match r.index(4) {
            0 => Mutation::Truncate { at: u16::decode(r) },
            1 => {
                let (at, byte) = Codec::decode(r);
                Mutation::Overwrite { at, byte }
            }
            2 => {
                let (at, byte) = Codec::decode(r);
                Mutation::Insert { at, byte }
            }
            _ => Mutation::Remove { at: u16::decode(r) },
        }
    }
    fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Mutation::Truncate { at } => (0u8, at).encode(out),
            Mutation::Overwrite { at, byte } => (1u8, at, byte).encode(out),
            Mutation::Insert { at, byte } => (2u8, at, byte).encode(out),
            Mutation::Remove { at } => (3u8, at).encode(out),
        }
    }
}

impl Codec for ServiceSketch {
    fn decode(r: &mut Reader<'_>) -> Self {
        let (name, image, args) = Codec::decode(r);
        let (env, volume, port) = Codec::decode(r);
        let (setup_script, container) = Codec::decode(r);
        Self {
            name,
            image,
            args,
            env,
            volume,
            port,
            setup_script,
            container,
        }
    }
    fn encode(&self, out: &mut Vec<u8>) {
        (self.name, self.image, self.args).encode(out);
        (self.env, self.volume, self.port).encode(out);
        (self.setup_script, self.container).encode(out);
    }
}

impl Codec for InitSketch {
    fn decode(r: &mut Reader<'_>) -> Self {
        let (name, image) = Codec::decode(r);
        let (timeout, env) = Codec::decode(r);
        Self {
            name,
            image,
            timeout,
            env,
        }
    }
    fn encode(&self, out: &mut Vec<u8>) {
        (self.name, self.image).encode(out);
        (self.timeout, self.env).encode(out);
    }
}

impl Codec for LifecycleSketch {
    fn decode(r: &mut Reader<'_>) -> Self {
        let (signal, grace) = Codec::decode(r);
        Self { signal, grace }
    }
    fn encode(&self, out: &mut Vec<u8>) {
        (self.signal, self.grace).encode(out);
    }
}

impl Codec for ScoreSketch {
    fn decode(r: &mut Reader<'_>) -> Self {
        let lifetime = u8::decode(r);
        let service = ServiceSketch::decode(r);
        let (more_services, init_containers) = Codec::decode(r);
        let (lifecycle, unknown_field) = Codec::decode(r);
        Self {
            service,
            more_services,
            init_containers,
            lifecycle,
            unknown_field,
            lifetime,
        }
    }
    fn encode(&self, out: &mut Vec<u8>) {
        self.lifetime.encode(out);
        self.service.encode(out);
        self.more_services.encode(out);
        self.init_containers.encode(out);
        (self.lifecycle.clone(), self.unknown_field).encode(out);
    }
}

/// How many kinds of [`Op`] there are: the tag byte is read modulo this.
const OP_KINDS: u8 = 11;

impl Codec for Op {
    fn decode(r: &mut Reader<'_>) -> Self {
        match r.index(OP_KINDS) {
            0 => {
                let (deployment, score) = Codec::decode(r);
                Op::Put { deployment, score }
            }
            1 => {
                let (deployment, score, mutation) = Codec::decode(r);
                Op::PutMutated {
                    deployment,
                    score,
                    mutation,
                }
            }
            2 => {
                let (deployment, bytes) = Codec::decode(r);
                Op::PutRaw { deployment, bytes }
            }
            3 => Op::Delete {
                deployment: Codec::decode(r),
            },
            4 => {
                let (deployment, back) = Codec::decode(r);
                Op::Redeliver { deployment, back }
            }
            5 => Op::Reconnect,
            6 => Op::Advance(Wait::decode(r)),
            7 => {
                let (deployment, service, code) = Codec::decode(r);
                Op::Crash {
                    deployment,
                    service,
                    code,
                }
            }
            8 => {
                let (op, kind, after_effect) = Codec::decode(r);
                Op::Fault {
                    op,
                    kind,
                    after_effect,
                }
            }
            9 => {
                let (keep_cache, watch_snapshot) = Codec::decode(r);
                Op::RestartAgent {
                    keep_cache,
                    watch_snapshot,
                }
            }
            _ => Op::ToggleImage {
                image: Codec::decode(r),
            },
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Op::Put { deployment, score } => {
                out.push(0);
                deployment.encode(out);
                score.encode(out);
            }
            Op::PutMutated {
                deployment,
                score,
                mutation,
            } => {
                out.push(1);
                deployment.encode(out);
                score.encode(out);
                mutation.encode(out);
            }
            Op::PutRaw { deployment, bytes } => {
                out.push(2);
                deployment.encode(out);
                bytes.encode(out);
            }
            Op::Delete { deployment } => (3u8, *deployment).encode(out),
            Op::Redeliver { deployment, back } => (4u8, *deployment, *back).encode(out),
            Op::Reconnect => out.push(5),
            Op::Advance(wait) => {
                out.push(6);
                wait.encode(out);
            }
            Op::Crash {
                deployment,
                service,
                code,
            } => {
                out.push(7);
                (*deployment, *service, *code).encode(out);
            }
            Op::Fault {
                op,
                kind,
                after_effect,
            } => {
                out.push(8);
                (*op, *kind, *after_effect).encode(out);
            }
            Op::RestartAgent {
                keep_cache,
                watch_snapshot,
            } => (9u8, *keep_cache, *watch_snapshot).encode(out),
            Op::ToggleImage { image } => (10u8, *image).encode(out),
        }
    }
}

impl Op {
    /// Reads `bytes` as ops, one after another until the bytes run out:
    /// every byte string reads as some list of valid ops.
    /// Injected runtime faults are only [`ErrorKind::Unavailable`] and
    /// [`ErrorKind::Other`] (see [`ErrorKind`]).
    pub fn decode_all(bytes: &[u8]) -> Vec<Op> {
        decode_all_drawing(bytes, Draw::Fuzzer)
    }

    /// Appends the bytes [`Op::decode_all`] reads back as this op.
    ///
    /// # Panics
    /// When a sketch lists more than three services or init containers, or
    /// a raw payload is 64 KiB or more: the format has no room for them.
    pub fn encode(&self, out: &mut Vec<u8>) {
        Codec::encode(self, out);
    }

    /// The bytes [`Op::decode_all`] reads back as `ops` (when their faults
    /// are of the kinds it draws).
    ///
    /// # Panics
    /// As [`Op::encode`].
    pub fn encode_all(ops: &[Op]) -> Vec<u8> {
        let mut out = Vec::new();
        for op in ops {
            op.encode(&mut out);
        }
        out
    }
}

fn decode_all_drawing(bytes: &[u8], draw: Draw) -> Vec<Op> {
    let mut r = Reader { bytes, draw };
    let mut ops = Vec::new();
    while !r.bytes.is_empty() {
        ops.push(<Op as Codec>::decode(&mut r));
    }
    ops
}

/// A `Strategy` for one op: some bytes, read as an op, drawing every
/// [`ErrorKind`] (unlike [`Op::decode_all`]). Shrinking shrinks the bytes,
/// towards the simplest ops.
pub fn op() -> impl Strategy<Value = Op> {
    proptest::collection::vec(any::<u8>(), 1..48).prop_map(|bytes| {
        let mut r = Reader {
            bytes: &bytes,
            draw: Draw::Property,
        };
        <Op as Codec>::decode(&mut r)
    })
}

/// A `Strategy` for lists of `len` ops.
pub fn ops(len: std::ops::Range<usize>) -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op(), len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web_on(image: u8) -> ScoreSketch {
        ScoreSketch {
            service: ServiceSketch::plain(0, image),
            more_services: Vec::new(),
            init_containers: Vec::new(),
            lifecycle: None,
            unknown_field: false,
            lifetime: 0,
        }
    }

    /// A sketch with every field set: a script, a container to verify,
    /// an init container and a stop policy.
    fn everything(lifetime: u8, script: u8, container: u8) -> ScoreSketch {
        let mut score = web_on(0);
        score.lifetime = lifetime;
        score.service.env = Some((0, 0));
        score.service.volume = Some((0, false));
        score.service.port = Some((0, false, false));
        score.service.setup_script = Some(script);
        score.service.container = Some(container);
        score.init_containers = vec![InitSketch {
            name: 0,
            image: 0,
            timeout: None,
            env: None,
        }];
        score.lifecycle = Some(LifecycleSketch {
            signal: Some(0),
            grace: Some(0),
        });
        score
    }

    #[test]
    fn each_lifetime_renders_a_score_with_only_the_fields_it_takes() {
        use podfleet_core::wire::{Lifetime, PodmanV0Score};
        let parse = |sketch: &ScoreSketch| PodmanV0Score::from_json(sketch.to_json().as_bytes());
        let expected = [
            Lifetime::Persistent,
            Lifetime::PerRun,
            Lifetime::NoLaunch,
            Lifetime::Persistent,
            Lifetime::Persistent,
        ];
        for (index, lifetime) in (0u8..).zip(expected) {
            let score =
                parse(&everything(index, 0, 0)).unwrap_or_else(|e| panic!("lifetime {index}: {e}"));
            assert_eq!(score.lifetime(), lifetime);
            let service = &score.services[0];
            if lifetime == Lifetime::NoLaunch {
                assert_eq!(service.container.as_deref(), Some(base_system::PROXY));
                assert!(service.setup_script.is_none() && score.init_containers.is_empty());
            } else {
                assert_eq!(service.setup_script.as_deref(), Some(scripts::PROVISIONS));
                assert!(service.container.is_none());
            }
        }
        // The rest: every field kept, so refused, and a lifetime no agent
        // knows.
        for byte in [229, 230, 231] {
            assert!(parse(&everything(byte, 0, 0)).is_err(), "{byte}");
        }
        // Every script of the catalogue, and every base-system container.
        for (index, script) in (0u8..).zip(scripts::ALL) {
            let score = parse(&everything(1, index, 0)).expect("a valid per_run score");
            assert_eq!(score.services[0].setup_script.as_deref(), Some(script));
        }
        for (index, name) in (0u8..).zip(base_system::NAMES) {
            let score = parse(&everything(2, 0, index)).expect("a valid no_launch score");
            assert_eq!(score.services[0].container_name(), name);
        }
    }

    /// A no_launch sketch verifying `container` (a [`base_system`] index)
    /// on img/a:1.
    fn verifying(container: u8) -> ScoreSketch {
        let mut score = web_on(0);
        score.lifetime = 2;
        score.service.container = Some(container);
        score
    }

    #[test]
    fn the_world_has_a_base_system_to_verify_and_never_to_touch() {
        use podfleet_core::wire::{FailureCause, Phase, VerifiedStatus};
        let verdict = |container: u8| {
            let player = played(&[
                Op::Put {
                    deployment: Deployment::Cam,
                    score: verifying(container),
                },
                Op::Advance(Wait::Minutes(2)),
            ]);
            let cam = DeploymentName::new("cam").expect("valid");
            let state = &player.h.states[&cam];
            assert!(player.h.violations.is_empty(), "{:?}", player.h.violations);
            assert!(
                !player.h.ops.iter().any(|(_, op)| op.is_mutation()),
                "{}",
                player.h.transcript
            );
            match (&state.phase, &state.cause) {
                (Phase::Running, None) => VerifiedStatus::Running,
                (_, Some(FailureCause::Unverified { status, .. })) => *status,
                other => panic!("{other:?}"),
            }
        };
        let verdicts: Vec<VerifiedStatus> = (0..4).map(verdict).collect();
        assert_eq!(
            verdicts,
            [
                VerifiedStatus::Running,
                VerifiedStatus::Stopped,
                VerifiedStatus::Drifted,
                VerifiedStatus::Missing
            ]
        );
    }

    /// Plays `ops` on a world whose reconciler has `bugs`, and says which
    /// invariants were found broken.
    fn caught(bugs: podfleet_core::reconciler::Bugs, ops: &[Op]) -> Vec<crate::Invariant> {
        let config = Config::new(DeviceId::new("fuzz").expect("valid"), "fuzz").inject_bugs(bugs);
        let mut h = Harness::new(config);
        images::install(&mut h.runtime);
        base_system::install(&mut h.runtime);
        let mut player = Player::new(h);
        for step in ops {
            player.play(step);
        }
        player.h.violations.iter().map(|v| v.invariant).collect()
    }

    #[test]
    fn the_lifetime_bugs_are_within_the_vocabularys_reach() {
        use crate::Invariant;
        use podfleet_core::reconciler::Bugs;
        // Verifying the stopped container of the base system.
        let verify = [
            Op::Put {
                deployment: Deployment::Relay,
                score: verifying(1),
            },
            Op::Advance(Wait::Minutes(1)),
        ];
        let bug = Bugs {
            start_unverified: true,
            ..Bugs::default()
        };
        assert_eq!(caught(Bugs::default(), &verify), []);
        assert!(caught(bug, &verify).contains(&Invariant::OnlyOwnContainers));
        // An agent restart while a setup script hangs: the container has no
        // marker.
        let mut hangs = web_on(0);
        hangs.service.setup_script = Some(6);
        let restart = [
            Op::Put {
                deployment: Deployment::Shop,
                score: hangs,
            },
            Op::Advance(Wait::Seconds(30)),
            Op::RestartAgent {
                keep_cache: true,
                watch_snapshot: true,
            },
            Op::Advance(Wait::Minutes(1)),
        ];
        let bug = Bugs {
            trust_unprovisioned: true,
            ..Bugs::default()
        };
        assert_eq!(caught(Bugs::default(), &restart), []);
        assert!(caught(bug, &restart).contains(&Invariant::TruthfulReports));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_and_encode_back(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let ops = Op::decode_all(&bytes);
            prop_assert_eq!(Op::decode_all(&Op::encode_all(&ops)), ops);
        }

        #[test]
        fn generated_ops_round_trip(ops in ops(0..20)) {
            prop_assert_eq!(decode_all_drawing(&Op::encode_all(&ops), Draw::Property), ops);
        }

        #[test]
        fn the_fuzzer_injects_no_lies(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            for op in Op::decode_all(&bytes) {
                if let Op::Fault { kind, .. } = op {
                    prop_assert!(matches!(kind, ErrorKind::Unavailable | ErrorKind::Other), "{kind:?}");
                }
            }
        }
    }

    #[test]
    fn the_property_test_draws_every_error_kind_and_never_a_not_found_stop() {
        let fault = |kind: u8| [8, 5, kind, 0];
        let kinds: Vec<Op> = (0..4)
            .flat_map(|k| decode_all_drawing(&fault(k), Draw::Property))
            .collect();
        let kind_of = |op: &Op| match op {
            Op::Fault { kind, .. } => *kind,
            other => panic!("not a fault: {other:?}"),
        };
        assert_eq!(
            kinds.iter().map(kind_of).collect::<Vec<_>>(),
            ErrorKind::ALL
        );
        assert_eq!(
            Op::decode_all(&fault(2))
                .iter()
                .map(kind_of)
                .collect::<Vec<_>>(),
            [ErrorKind::Unavailable]
        );
        let stop = |kind: ErrorKind| kind.runtime_for(OpName::Stop);
        assert_eq!(stop(ErrorKind::NotFound), RuntimeErrorKind::Other);
        assert_eq!(
            ErrorKind::NotFound.runtime_for(OpName::Remove),
            RuntimeErrorKind::NotFound
        );
        assert_eq!(
            stop(ErrorKind::NameConflict),
            RuntimeErrorKind::NameConflict
        );
    }

    fn played(ops: &[Op]) -> Player {
        let mut player = Player::default();
        for step in ops {
            player.play(step);
        }
        player
    }

    #[test]
    fn an_agent_that_lost_its_cache_gets_no_stale_revision() {
        // A fresh agent cannot tell an old revision from a new one, and a
        // fresh watch never sends one: the fuzzer delivers the current one.
        let shop = Deployment::Shop;
        let player = played(&[
            Op::Put {
                deployment: shop,
                score: web_on(0),
            },
            Op::Put {
                deployment: shop,
                score: web_on(1),
            },
            Op::RestartAgent {
                keep_cache: false,
                watch_snapshot: false,
            },
            Op::Redeliver {
                deployment: shop,
                back: 1,
            },
        ]);
        assert!(
            player.script.ends_with("redeliver shop rev 2\n"),
            "{}",
            player.script
        );
        // With its cache, the late revision does arrive, and is ignored.
        let player = played(&[
            Op::Put {
                deployment: shop,
                score: web_on(0),
            },
            Op::Put {
                deployment: shop,
                score: web_on(1),
            },
            Op::RestartAgent {
                keep_cache: true,
                watch_snapshot: false,
            },
            Op::Redeliver {
                deployment: shop,
                back: 1,
            },
            Op::Advance(Wait::Minutes(1)),
        ]);
        assert!(
            player.script.contains("redeliver shop rev 1\n"),
            "{}",
            player.script
        );
        assert!(player.h.violations.is_empty(), "{:?}", player.h.violations);
        // A cache keeps no deployment it has only seen invalid revisions of.
        let player = played(&[
            Op::Put {
                deployment: shop,
                score: web_on(0),
            },
            Op::RestartAgent {
                keep_cache: false,
                watch_snapshot: false,
            },
            Op::PutRaw {
                deployment: shop,
                bytes: RawBytes(b"{".to_vec()),
            },
            Op::RestartAgent {
                keep_cache: true,
                watch_snapshot: false,
            },
            Op::Redeliver {
                deployment: shop,
                back: 1,
            },
        ]);
        assert!(
            player.script.ends_with("redeliver shop rev 2\n"),
            "{}",
            player.script
        );
    }

    #[test]
    fn a_reconnect_delivers_the_bucket_before_the_resync() {
        // The reconciler's resync sweeps containers of deployments it does
        // not know, so it must follow the snapshot's values, as it does in
        // a real watch.
        let shop = Deployment::Shop;
        let ops = [
            Op::Put {
                deployment: shop,
                score: web_on(0),
            },
            Op::Advance(Wait::Seconds(5)),
            Op::RestartAgent {
                keep_cache: false,
                watch_snapshot: false,
            },
            Op::Reconnect,
            Op::Advance(Wait::Minutes(1)),
        ];
        let player = played(&ops);
        assert!(
            player
                .script
                .contains("redeliver shop rev 1\nresync 1 present\n"),
            "{}",
            player.script
        );
        run(&ops);
    }

    /// Plays one input and prints what was sent and the whole transcript:
    /// `PODFLEET_FUZZ_INPUT=artifacts/reconciler/crash-... cargo test --lib
    /// show_reconciler_input -- --ignored --nocapture` (in fuzz/, on stable),
    /// the first step in turning a crash into a unit test.
    #[test]
    #[ignore = "a tool: needs PODFLEET_FUZZ_INPUT"]
    fn show_reconciler_input() {
        let path =
            std::env::var("PODFLEET_FUZZ_INPUT").expect("PODFLEET_FUZZ_INPUT names an input file");
        let data = std::fs::read(&path).expect("the input file reads");
        let ops = Op::decode_all(&data);
        let ops = &ops[..ops.len().min(MAX_OPS)];
        println!("{ops:#?}");
        let mut player = Player::default();
        for step in ops {
            player.play(step);
        }
        player.h.faults.clear();
        player.h.run_for(Duration::from_secs(600));
        println!(
            "{}\n{}\nviolations: {:?}",
            player.script, player.h.transcript, player.h.violations
        );
    }
}
