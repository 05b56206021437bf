//! Structure-aware fuzzing of the reconciler: an [`arbitrary`] sequence of
//! [`Step`]s played against the real core through
//! [`podfleet_testkit::Harness`].
//!
//! The steps are what a device lives through: desired-state puts (scores
//! built from a small vocabulary so that most are valid or nearly so, some
//! of them damaged byte-wise, and some raw bytes), deletes, redeliveries of
//! the current and of older revisions, watch reconnects (the bucket's
//! values, then a resync), runtime API faults (no answer or an error, with
//! or without the effect), container crashes, missing images, time passing
//! (through init-container deadlines, the libpod wait/inspect race and stop
//! graces) and agent restarts with the cache kept or lost.
//!
//! This module only builds the world and plays the inputs; the checks are
//! the harness's own, the ones the simulator uses: its oracle at every
//! runtime operation and report (no two containers for one service, no
//! healthy container recreated, nothing older started once a newer revision
//! was seen, init containers first, graceful replace by recorded id,
//! truthful Running reports) and its no-busy-loop assertion at every wake.
//! A violation panics with the invariant, the steps, what was sent and the
//! end of the transcript; any other panic is a crash of the core.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use arbitrary::Arbitrary;
use podfleet_testkit::{images, Harness, OpFault};
use podfleet_core::runtime::RuntimeErrorKind;
use podfleet_core::wire::{DeploymentName, DeviceId};
use podfleet_core::Config;
use serde_json::{json, Map, Value};

/// At most this many steps of an input are played, to keep every run short.
pub const MAX_STEPS: usize = 64;

/// One thing that happens to the device.
#[derive(Debug, Clone, PartialEq, Eq, Arbitrary)]
pub enum Step {
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

impl<'a> Arbitrary<'a> for RawBytes {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let len = usize::from(u16::arbitrary(u)?);
        let bytes = u.bytes(len.min(u.len()))?;
        Ok(Self(bytes.to_vec()))
    }
}

impl std::fmt::Debug for RawBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RawBytes({:?})", String::from_utf8_lossy(&self.0))
    }
}

/// The device's deployments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Arbitrary)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Arbitrary)]
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

/// A runtime operation the harness can fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Arbitrary)]
pub enum OpName {
    /// `list`.
    List,
    /// `create`.
    Create,
    /// `start`.
    Start,
    /// `wait`.
    Wait,
    /// `inspect`.
    Inspect,
    /// `stop`.
    Stop,
    /// `remove`.
    Remove,
}

impl OpName {
    /// The name the harness's fault map uses.
    pub fn name(self) -> &'static str {
        match self {
            OpName::List => "list",
            OpName::Create => "create",
            OpName::Start => "start",
            OpName::Wait => "wait",
            OpName::Inspect => "inspect",
            OpName::Stop => "stop",
            OpName::Remove => "remove",
        }
    }
}

/// How a faulted operation fails: the runtime does not answer, or answers
/// with an error. `NotFound`, `NameConflict` and `ImageMissing` are not
/// injected: the fake runtime gives them itself whenever they are true, and
/// injected where they are false they would model a runtime that lies about
/// its containers, which no reconciler can be held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Arbitrary)]
pub enum ErrorKind {
    /// The runtime does not answer (or the call timed out client-side).
    Unavailable,
    /// Anything else.
    Other,
}

impl ErrorKind {
    fn runtime(self) -> RuntimeErrorKind {
        match self {
            ErrorKind::Unavailable => RuntimeErrorKind::Unavailable,
            ErrorKind::Other => RuntimeErrorKind::Other,
        }
    }
}

/// Byte-wise damage to a payload; positions wrap around its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Arbitrary)]
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

/// Service names: the first three valid and crashable by [`Step::Crash`],
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
const SERVICE_IMAGES: [&str; 8] = [
    "img/a:1",
    "img/a:2",
    "img/crash:1",
    "img/slow-stop:1",
    "img/ignore-stop:1",
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
const INIT_TIMEOUTS: [u64; 6] = [20, 3, 1, 300, 0, u64::MAX];
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
#[derive(Debug, Clone, PartialEq, Eq, Arbitrary)]
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
}

/// One service of a [`ScoreSketch`].
#[derive(Debug, Clone, PartialEq, Eq, Arbitrary)]
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
}

/// One init container of a [`ScoreSketch`].
#[derive(Debug, Clone, PartialEq, Eq, Arbitrary)]
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
#[derive(Debug, Clone, PartialEq, Eq, Arbitrary)]
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
                    "image": pick(&SERVICE_IMAGES, 5, s.image),
                    "args": ARGS[usize::from(s.args) % ARGS.len()],
                    "env": env_of(s.env),
                });
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
                service
            })
            .collect();
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
                    init["timeout"] = json!(pick(&INIT_TIMEOUTS, 4, timeout));
                }
                init
            })
            .collect();
        let mut score = json!({ "services": services, "init_containers": inits });
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
        if self.unknown_field {
            score["placement"] = json!({ "arch": "arm64" });
        }
        score.to_string()
    }
}

/// The fake runtime with the test kit's image catalogue, and a harness with default
/// timings (30 s tick, 15 s heartbeat, 200 ms libpod-race retry).
pub fn world() -> Harness {
    let config = Config::new(DeviceId::new("fuzz").expect("a valid device id"), "fuzz");
    let mut h = Harness::new(config);
    images::install(&mut h.runtime);
    h
}

/// What the desired-state bucket held for one deployment, revision by revision.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Put(String),
    Deleted,
}

/// Plays `steps` (at most [`MAX_STEPS`]) and then lets the device settle
/// with every fault healed.
///
/// # Panics
/// With the violated invariant, the steps and the transcript's tail when
/// the harness finds a violation; any other panic is the core's own.
pub fn run(steps: &[Step]) {
    let steps = &steps[..steps.len().min(MAX_STEPS)];
    let mut player = Player::new();
    for (index, step) in steps.iter().enumerate() {
        player.play(step);
        player.check(steps, Some(index));
    }
    player.h.faults.clear();
    player.h.run_for(Duration::from_secs(600));
    player.check(steps, None);
}

struct Player {
    h: Harness,
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
    /// What was sent, in words, for the failure message.
    script: String,
}

impl Player {
    fn new() -> Self {
        Self {
            h: world(),
            revision: 0,
            history: BTreeMap::new(),
            knows_current: BTreeSet::new(),
            missing_images: BTreeSet::from([MISSING_IMAGE]),
            script: String::new(),
        }
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
    /// deployments it does not know), so steps never resync on their own.
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

    fn play(&mut self, step: &Step) {
        match step {
            Step::Put { deployment, score } => self.put(*deployment, score.to_json()),
            Step::PutMutated {
                deployment,
                score,
                mutation,
            } => {
                let bytes = mutation.apply(score.to_json().into_bytes());
                self.put(*deployment, String::from_utf8_lossy(&bytes).into_owned());
            }
            Step::PutRaw { deployment, bytes } => {
                self.put(*deployment, String::from_utf8_lossy(&bytes.0).into_owned());
            }
            Step::Delete { deployment } => {
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
            Step::Redeliver { deployment, back } => {
                let Some(revisions) = self.history.get(deployment) else {
                    return;
                };
                let back = if self.knows_current.contains(deployment) {
                    usize::from(*back) % revisions.len()
                } else {
                    0
                };
                let Some((revision, entry)) = revisions.get(revisions.len() - 1 - back).cloned()
                else {
                    return;
                };
                self.deliver(*deployment, revision, &entry);
                if back == 0 {
                    self.knows_current.insert(*deployment);
                }
            }
            Step::Reconnect => self.reconnect(),
            Step::Advance(wait) => {
                let d = wait.duration();
                let _ = writeln!(self.script, "advance {d:?}");
                self.h.run_for(d);
            }
            Step::Crash {
                deployment,
                service,
                code,
            } => {
                let service = SERVICE_NAMES[usize::from(*service) % 3];
                let name = format!("{}_{service}", deployment.name());
                if self.h.crash(&name, i64::from(*code)) {
                    let _ = writeln!(self.script, "crash {name} exit {code}");
                }
            }
            Step::Fault {
                op,
                kind,
                after_effect,
            } => {
                let fault = if *after_effect {
                    OpFault::FailAfterEffect(kind.runtime())
                } else {
                    OpFault::Fail(kind.runtime())
                };
                let _ = writeln!(self.script, "next {} fails: {fault:?}", op.name());
                self.h.faults.entry(op.name()).or_default().push_back(fault);
            }
            Step::RestartAgent {
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
                if *watch_snapshot {
                    self.reconnect();
                }
            }
            Step::ToggleImage { image } => {
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
    }

    fn check(&self, steps: &[Step], index: Option<usize>) {
        if self.h.violations.is_empty() {
            return;
        }
        let when = match index {
            Some(i) => format!("after step {i} ({:?})", steps[i]),
            None => "after healing every fault and settling for 10 min".to_owned(),
        };
        let transcript: Vec<&str> = self.h.transcript.lines().collect();
        let tail = transcript[transcript.len().saturating_sub(80)..].join("\n");
        panic!(
            "invariant violated {when}:\n  {}\n\nsteps: {steps:#?}\n\nwhat was sent:\n{}\ntranscript (last 80 lines):\n{tail}",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn web_on(image: u8) -> ScoreSketch {
        ScoreSketch {
            service: ServiceSketch {
                name: 0,
                image,
                args: 0,
                env: None,
                volume: None,
                port: None,
            },
            more_services: Vec::new(),
            init_containers: Vec::new(),
            lifecycle: None,
            unknown_field: false,
        }
    }

    fn played(steps: &[Step]) -> Player {
        let mut player = Player::new();
        for step in steps {
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
            Step::Put {
                deployment: shop,
                score: web_on(0),
            },
            Step::Put {
                deployment: shop,
                score: web_on(1),
            },
            Step::RestartAgent {
                keep_cache: false,
                watch_snapshot: false,
            },
            Step::Redeliver {
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
            Step::Put {
                deployment: shop,
                score: web_on(0),
            },
            Step::Put {
                deployment: shop,
                score: web_on(1),
            },
            Step::RestartAgent {
                keep_cache: true,
                watch_snapshot: false,
            },
            Step::Redeliver {
                deployment: shop,
                back: 1,
            },
            Step::Advance(Wait::Minutes(1)),
        ]);
        assert!(
            player.script.contains("redeliver shop rev 1\n"),
            "{}",
            player.script
        );
        assert!(player.h.violations.is_empty(), "{:?}", player.h.violations);
        // A cache keeps no deployment it has only seen invalid revisions of.
        let player = played(&[
            Step::Put {
                deployment: shop,
                score: web_on(0),
            },
            Step::RestartAgent {
                keep_cache: false,
                watch_snapshot: false,
            },
            Step::PutRaw {
                deployment: shop,
                bytes: RawBytes(b"{".to_vec()),
            },
            Step::RestartAgent {
                keep_cache: true,
                watch_snapshot: false,
            },
            Step::Redeliver {
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
        let steps = [
            Step::Put {
                deployment: shop,
                score: web_on(0),
            },
            Step::Advance(Wait::Seconds(5)),
            Step::RestartAgent {
                keep_cache: false,
                watch_snapshot: false,
            },
            Step::Reconnect,
            Step::Advance(Wait::Minutes(1)),
        ];
        let player = played(&steps);
        assert!(
            player
                .script
                .contains("redeliver shop rev 1\nresync 1 present\n"),
            "{}",
            player.script
        );
        run(&steps);
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
        let steps = Vec::<Step>::arbitrary_take_rest(arbitrary::Unstructured::new(&data))
            .expect("the input decodes into steps");
        let steps = &steps[..steps.len().min(MAX_STEPS)];
        println!("{steps:#?}");
        let mut player = Player::new();
        for step in steps {
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
