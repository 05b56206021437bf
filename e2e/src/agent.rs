//! The production agent as the e2e tests run it: a child process
//! ([`AgentProcess`]) on a device of its own (an isolated podman service and
//! a state directory, [`Device`]), and an admin NATS client ([`Broker`]) that
//! writes desired state and reads what the agent reports.
//!
//! Ground truth comes from podman itself ([`Device::containers`]), never
//! from the agent's own reports.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use podfleet_agent::buckets;
use podfleet_core::wire::names::{DESIRED_BUCKET, HEARTBEAT_BUCKET, STATE_BUCKET};
use podfleet_core::wire::{DeploymentState, Heartbeat};
use serde::Deserialize;
use tempfile::TempDir;

use crate::PodmanService;

/// How often the waits below look again.
pub const POLL: Duration = Duration::from_millis(100);

/// Waits until `$probe` (an expression that may `.await`) yields
/// `Some(value)`, checking every [`POLL`], and returns the value; panics
/// naming `$what` once `$timeout` has passed.
#[macro_export]
macro_rules! eventually {
    ($what:expr, $timeout:expr, $probe:expr) => {{
        let timeout: std::time::Duration = $timeout;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(value) = $probe {
                break value;
            }
            if std::time::Instant::now() > deadline {
                panic!("timed out after {timeout:?} waiting for {}", $what);
            }
            tokio::time::sleep($crate::agent::POLL).await;
        }
    }};
}

/// A running `podfleet-agent`, with its output in a log file. Killed on
/// drop; its log is printed if the test is failing.
#[derive(Debug)]
pub struct AgentProcess {
    child: Option<Child>,
    log: PathBuf,
    /// What it is, for the log printed on a failing test.
    what: String,
}

impl AgentProcess {
    /// Starts `binary` with `args`, appending its output to `log`.
    ///
    /// # Panics
    ///
    /// If it cannot be started.
    #[must_use]
    pub fn spawn(binary: &Path, args: &[String], log: &Path) -> Self {
        Self::spawn_as("agent", binary, args, log)
    }

    /// As [`AgentProcess::spawn`], for another long-running podfleet
    /// process (the controller): `what` names it when its log is printed.
    ///
    /// # Panics
    ///
    /// If it cannot be started.
    #[must_use]
    pub fn spawn_as(what: &str, binary: &Path, args: &[String], log: &Path) -> Self {
        let out = fs::File::options()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let child = Command::new(binary)
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        Self {
            child: Some(child),
            log: log.to_owned(),
            what: what.to_owned(),
        }
    }

    /// The process id.
    ///
    /// # Panics
    ///
    /// If the agent was already stopped.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("the agent runs")
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL, as a crash or `kill -9` would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (e.g. `"TERM"`) and waits up to `timeout` for the exit.
    ///
    /// # Panics
    ///
    /// If the signal cannot be sent or the agent does not exit in time.
    pub fn signal_and_wait(&mut self, signal: &str, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("the agent runs");
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
        assert!(sent.success(), "kill -{signal} failed");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "the {} did not exit within {timeout:?} of SIG{signal}:\n{}",
                    self.what,
                    self.log()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Everything the agent logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "--- {} log {} ---\n{}",
                self.what,
                self.log.display(),
                self.log()
            );
        }
    }
}

/// One container as `podman ps -a` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PsEntry {
    /// The full id.
    #[serde(rename = "Id")]
    pub id: String,
    /// Its names.
    #[serde(rename = "Names")]
    pub names: Vec<String>,
    /// `running`, `exited`, `created`...
    #[serde(rename = "State")]
    pub state: String,
    /// Its labels.
    #[serde(rename = "Labels", default)]
    pub labels: Option<BTreeMap<String, String>>,
}

impl PsEntry {
    /// The `io.podfleet.service` label.
    #[must_use]
    pub fn service(&self) -> &str {
        self.labels
            .as_ref()
            .and_then(|l| l.get("io.podfleet.service"))
            .map_or("", String::as_str)
    }

    /// Whether it is an init container.
    #[must_use]
    pub fn is_init(&self) -> bool {
        self.labels
            .as_ref()
            .is_some_and(|l| l.get("io.podfleet.init").is_some_and(|v| v == "true"))
    }
}

/// `(service, id)` of the running containers of `ps`: what podman runs,
/// to compare with [`reported`].
#[must_use]
pub fn running(ps: &[PsEntry]) -> BTreeSet<(String, String)> {
    ps.iter()
        .filter(|c| c.state == "running")
        .map(|c| (c.service().to_owned(), c.id.clone()))
        .collect()
}

/// `(service, id)` of the containers `state` reports.
#[must_use]
pub fn reported(state: &DeploymentState) -> BTreeSet<(String, String)> {
    state
        .container_ids
        .iter()
        .map(|(s, id)| (s.to_string(), id.clone()))
        .collect()
}

/// A device: its own podman service and store, a state directory, and
/// the agent that manages them.
#[derive(Debug)]
pub struct Device {
    // Dropped in this order: the agent, its podman, then their files.
    /// The agent, while it runs.
    pub agent: Option<AgentProcess>,
    podman: PodmanService,
    dir: TempDir,
    /// The device id.
    pub id: String,
    binary: PathBuf,
    args: Vec<String>,
}

impl Device {
    /// A device `id` whose agent is `binary`, connected to `nats_url`, with
    /// a 1 s tick and heartbeat and the extra `args`. Nothing runs yet.
    ///
    /// # Panics
    ///
    /// As [`PodmanService::start_isolated`].
    #[must_use]
    pub fn new(binary: &Path, id: &str, nats_url: &str, args: &[&str]) -> Self {
        Self::with_images(binary, id, nats_url, args, &[])
    }

    /// As [`Device::new`], with `images` in the device's store besides
    /// [`TEST_IMAGE`](crate::TEST_IMAGE) (see
    /// [`PodmanService::start_isolated_with`]).
    ///
    /// # Panics
    ///
    /// As [`PodmanService::start_isolated_with`].
    #[must_use]
    pub fn with_images(
        binary: &Path,
        id: &str,
        nats_url: &str,
        args: &[&str],
        images: &[&str],
    ) -> Self {
        Self::on(
            binary,
            id,
            nats_url,
            args,
            PodmanService::start_isolated_with(images),
        )
    }

    /// As [`Device::new`], on `podman`, an isolated service started by the
    /// caller (e.g. with [`PodmanService::start_isolated_with_registries`]).
    ///
    /// # Panics
    ///
    /// If the state directory cannot be made.
    #[must_use]
    pub fn on(
        binary: &Path,
        id: &str,
        nats_url: &str,
        args: &[&str],
        podman: PodmanService,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("podfleet-agent-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let mut all: Vec<String> = [
            "--device-id",
            id,
            "--nats-urls",
            nats_url,
            "--podman-socket",
            &podman.socket().display().to_string(),
            "--state-dir",
            &dir.path().join("state").display().to_string(),
            "--tick-interval",
            "1s",
            "--heartbeat-interval",
            "1s",
            "--log-level",
            "info,podfleet_agent=debug",
        ]
        .iter()
        .map(|&a| a.to_owned())
        .collect();
        all.extend(args.iter().map(|&a| a.to_owned()));
        Self {
            id: id.to_owned(),
            binary: binary.to_owned(),
            podman,
            dir,
            args: all,
            agent: None,
        }
    }

    /// Starts the agent (again).
    pub fn start_agent(&mut self) {
        let log = self.agent_log();
        self.agent = Some(AgentProcess::spawn(&self.binary, &self.args, &log));
    }

    /// The running agent.
    ///
    /// # Panics
    ///
    /// If it is not running.
    pub fn agent(&mut self) -> &mut AgentProcess {
        self.agent.as_mut().expect("the agent was started")
    }

    /// The agent's arguments (without the binary).
    #[must_use]
    pub fn agent_args(&self) -> &[String] {
        &self.args
    }

    /// Where the agent's output goes.
    #[must_use]
    pub fn agent_log(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// The device's podman service.
    #[must_use]
    pub fn podman(&self) -> &PodmanService {
        &self.podman
    }

    /// The device's podman service, e.g. to [restart](PodmanService::restart) it.
    pub fn podman_mut(&mut self) -> &mut PodmanService {
        &mut self.podman
    }

    /// A scratch directory on the host, e.g. for bind mounts.
    #[must_use]
    pub fn scratch(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        path
    }

    /// Every container of `deployment` on this device, as podman sees it.
    ///
    /// # Panics
    ///
    /// If podman fails.
    #[must_use]
    pub fn containers(&self, deployment: &str) -> Vec<PsEntry> {
        let output = self
            .podman
            .podman()
            .args(["ps", "--all", "--format", "json", "--filter"])
            .arg(format!("label=io.podfleet.deployment={deployment}"))
            .output()
            .unwrap_or_else(|e| panic!("cannot run podman ps: {e}"));
        assert!(
            output.status.success(),
            "podman ps failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "podman ps said something else than JSON ({e}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    /// `podman inspect --format <format> <container>`.
    ///
    /// # Panics
    ///
    /// If podman fails.
    #[must_use]
    pub fn inspect(&self, container: &str, format: &str) -> String {
        let output = self
            .podman
            .podman()
            .args(["inspect", "--format", format, container])
            .output()
            .unwrap_or_else(|e| panic!("cannot run podman inspect: {e}"));
        assert!(
            output.status.success(),
            "podman inspect {container} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

/// An admin NATS client: creates the buckets, writes desired state, reads
/// reports, sends commands.
#[derive(Debug, Clone)]
pub struct Broker {
    /// The client.
    pub client: async_nats::Client,
    desired: kv::Store,
    state: kv::Store,
    heartbeats: kv::Store,
}

impl Broker {
    /// Connects with `options` and creates the three buckets when missing,
    /// with the agent's own [`buckets::ensure_bucket`] and settings.
    ///
    /// # Panics
    ///
    /// If the server refuses.
    pub async fn connect(url: &str, options: async_nats::ConnectOptions) -> Self {
        let client = options
            .connect(url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
        for bucket in buckets::fleet_buckets() {
            buckets::ensure_bucket(&client, &bucket, Duration::from_secs(10))
                .await
                .unwrap_or_else(|e| panic!("cannot create the buckets: {e}"));
        }
        Self::open(client).await
    }

    /// An admin client on `client` for buckets that exist already; nothing
    /// is created.
    ///
    /// # Panics
    ///
    /// If a bucket is missing.
    pub async fn open(client: async_nats::Client) -> Self {
        let js = jetstream::new(client.clone());
        let store = |name: &'static str| {
            let js = js.clone();
            async move {
                js.get_key_value(name)
                    .await
                    .unwrap_or_else(|e| panic!("no bucket {name}: {e}"))
            }
        };
        Self {
            desired: store(DESIRED_BUCKET).await,
            state: store(STATE_BUCKET).await,
            heartbeats: store(HEARTBEAT_BUCKET).await,
            client,
        }
    }

    /// The reported-state bucket, e.g. to watch it.
    #[must_use]
    pub fn state_store(&self) -> &kv::Store {
        &self.state
    }

    /// Waits until the client is connected (after a server restart).
    ///
    /// # Panics
    ///
    /// If it does not reconnect within 30 s.
    pub async fn wait_connected(&self) {
        let connected =
            || self.client.connection_state() == async_nats::connection::State::Connected;
        crate::eventually!("the admin client to reconnect", Duration::from_secs(30), {
            connected().then_some(())
        });
    }

    /// Puts `value` at `<device>.<deployment>` in the desired bucket and
    /// returns the revision.
    ///
    /// # Panics
    ///
    /// If the put fails.
    pub async fn put(&self, device: &str, deployment: &str, value: impl Into<Vec<u8>>) -> u64 {
        let value: Vec<u8> = value.into();
        let key = format!("{device}.{deployment}");
        // Retried: just after a server restart the client may not have
        // noticed yet that its connection is gone.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.desired.put(&key, value.clone().into()).await {
                Ok(revision) => return revision,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("put {key} failed ({e}); trying again");
                    tokio::time::sleep(POLL).await;
                }
                Err(e) => panic!("cannot put {key}: {e}"),
            }
        }
    }

    /// Puts a raw key in the desired bucket (for keys that do not parse).
    ///
    /// # Panics
    ///
    /// If the put fails.
    pub async fn put_key(&self, key: &str, value: &str) -> u64 {
        self.desired
            .put(key, value.to_owned().into())
            .await
            .unwrap_or_else(|e| panic!("cannot put {key}: {e}"))
    }

    /// Deletes `<device>.<deployment>` from the desired bucket.
    ///
    /// # Panics
    ///
    /// If the delete fails.
    pub async fn delete(&self, device: &str, deployment: &str) {
        self.desired
            .delete(format!("{device}.{deployment}"))
            .await
            .unwrap_or_else(|e| panic!("cannot delete {device}.{deployment}: {e}"));
    }

    /// The reported state of `<device>.<deployment>`, if any.
    ///
    /// # Panics
    ///
    /// If the read fails or the value does not decode.
    pub async fn state(&self, device: &str, deployment: &str) -> Option<DeploymentState> {
        let bytes = self
            .state
            .get(format!("{device}.{deployment}"))
            .await
            .unwrap_or_else(|e| panic!("cannot read state {device}.{deployment}: {e}"))?;
        Some(serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "state {device}.{deployment} does not decode ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        }))
    }

    /// The device's last heartbeat, if any.
    ///
    /// # Panics
    ///
    /// If the read fails (other than timing out: `None` then) or the value
    /// does not decode.
    pub async fn heartbeat(&self, device: &str) -> Option<Heartbeat> {
        let bytes = match self.heartbeats.get(device).await {
            Ok(bytes) => bytes?,
            // A read that got no answer in time (a loaded machine) is read
            // again by the caller's `eventually!`, which fails in the end.
            Err(e) if e.to_string().contains("timed out") => {
                eprintln!("reading heartbeat {device} timed out; trying again");
                return None;
            }
            Err(e) => panic!("cannot read heartbeat {device}: {e}"),
        };
        Some(
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("heartbeat {device} does not decode: {e}")),
        )
    }

    /// Waits until the state of `<device>.<deployment>` satisfies `check`.
    ///
    /// # Panics
    ///
    /// After `timeout`, with the last state seen.
    pub async fn wait_state(
        &self,
        device: &str,
        deployment: &str,
        timeout: Duration,
        check: impl Fn(&DeploymentState) -> bool,
    ) -> DeploymentState {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.state(device, deployment).await;
            if let Some(state) = state.as_ref().filter(|s| check(s)) {
                return state.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{device}.{deployment}: no matching state within {timeout:?}; last: {state:#?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Sends a command and decodes the reply as JSON.
    ///
    /// # Panics
    ///
    /// If no reply comes within 30 s or it is not JSON.
    pub async fn command(&self, device: &str, verb: &str, body: &str) -> serde_json::Value {
        let subject = format!("device-commands.{device}.{verb}");
        let reply = tokio::time::timeout(
            Duration::from_secs(30),
            self.client.request(subject.clone(), body.to_owned().into()),
        )
        .await
        .unwrap_or_else(|_| panic!("no reply on {subject} within 30 s"))
        .unwrap_or_else(|e| panic!("request on {subject} failed: {e}"));
        serde_json::from_slice(&reply.payload).unwrap_or_else(|e| {
            panic!(
                "reply on {subject} is not JSON ({e}): {}",
                String::from_utf8_lossy(&reply.payload)
            )
        })
    }
}

/// A current-thread tokio runtime for one test.
///
/// # Panics
///
/// If tokio cannot start.
#[must_use]
pub fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("cannot start tokio: {e}"))
}
