//! The control plane as the e2e tests and the demo run it: the `podfleet`
//! CLI as a child process per command ([`Podfleet`]), `podfleet
//! controller` as a long-running one, and a [`Fleet`] of both with real
//! agents on devices of their own ([`Device`]) around one nats-server.
//!
//! Everything goes through the binaries, as a person would type it; the
//! only state shared with the processes is the broker and the files in the
//! fleet's directory.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use tempfile::TempDir;

use crate::agent::{AgentProcess, Device};
use crate::NatsServer;

/// The `podfleet` and `podfleet-agent` binaries a fleet runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The CLI and controller (`podfleet`, or the e2e crate's copy
    /// `podfleet-e2e`).
    pub podfleet: PathBuf,
    /// The device agent (`podfleet-agent`, or `podfleet-agent-e2e`).
    pub agent: PathBuf,
}

impl Binaries {
    /// The e2e crate's copies, `podfleet-e2e` and `podfleet-agent-e2e`,
    /// from the directory of the running executable: cargo puts every
    /// binary of a package in the same `target/<profile>/`.
    ///
    /// # Errors
    ///
    /// When one is missing, saying how to build it.
    pub fn beside_current_exe() -> Result<Self, String> {
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot tell where this executable is: {e}"))?;
        let dir = exe
            .parent()
            .ok_or_else(|| format!("{} has no directory", exe.display()))?;
        let find = |name: &str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(format!(
                    "{} is missing: build it with `cargo build -p e2e --bins`",
                    path.display()
                ))
            }
        };
        Ok(Self {
            podfleet: find("podfleet-e2e")?,
            agent: find("podfleet-agent-e2e")?,
        })
    }
}

/// What one `podfleet` command did.
#[derive(Debug)]
pub struct CliRun {
    /// The command line, as `podfleet get devices`.
    pub command: String,
    /// How it exited.
    pub status: ExitStatus,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

impl CliRun {
    /// The exit code; `None` when a signal ended it.
    #[must_use]
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl fmt::Display for CliRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` exited with {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

/// The `podfleet` CLI aimed at one fleet: `PODFLEET_SERVER` and
/// `PODFLEET_CONFIG` set, every other `PODFLEET_*` variable and `RUST_LOG`
/// of the caller's environment removed.
#[derive(Debug, Clone)]
pub struct Podfleet {
    binary: PathBuf,
    server: String,
    config: PathBuf,
}

impl Podfleet {
    /// `binary` talking to `server`, reading the config file `config`.
    #[must_use]
    pub fn new(binary: &Path, server: &str, config: &Path) -> Self {
        Self {
            binary: binary.to_owned(),
            server: server.to_owned(),
            config: config.to_owned(),
        }
    }

    /// The binary.
    #[must_use]
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The server URL it is given in `PODFLEET_SERVER`.
    #[must_use]
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The config file it is given in `PODFLEET_CONFIG`.
    #[must_use]
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// `podfleet args...`, not started.
    #[must_use]
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        for variable in [
            "PODFLEET_CONTEXT",
            "PODFLEET_USER",
            "PODFLEET_PASSWORD",
            "PODFLEET_CREDS",
            "PODFLEET_REQUEST_TIMEOUT",
            "RUST_LOG",
        ] {
            command.env_remove(variable);
        }
        command
            .env("PODFLEET_SERVER", &self.server)
            .env("PODFLEET_CONFIG", &self.config)
            .env("COLUMNS", "200")
            .args(args)
            .stdin(Stdio::null());
        command
    }

    /// Runs `podfleet args...` to its end, capturing its output.
    ///
    /// # Panics
    ///
    /// If it cannot be started.
    #[must_use]
    pub fn run(&self, args: &[&str]) -> CliRun {
        let output = self
            .command(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.binary.display()));
        CliRun {
            command: format!("podfleet {}", args.join(" ")),
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Runs `podfleet args...` and returns its standard output.
    ///
    /// # Panics
    ///
    /// Unless it exits 0, with its output.
    #[must_use]
    pub fn ok(&self, args: &[&str]) -> String {
        let run = self.run(args);
        assert!(run.status.success(), "{run}");
        run.stdout
    }
}

/// A nats-server, `podfleet controller` and devices with real agents, each
/// on an isolated podman store holding the fleet's images, in a directory
/// of its own. Dropped in order: the devices (agents killed, containers
/// removed), the controller, the server, the directory. On a failing test
/// the agents' and the controller's logs are printed.
#[derive(Debug)]
pub struct Fleet {
    devices: BTreeMap<String, Device>,
    controller: Option<AgentProcess>,
    podfleet: Podfleet,
    nats: NatsServer,
    agent: PathBuf,
    agent_args: Vec<String>,
    /// The controller's arguments besides [`Fleet::controller_args`]'s own.
    controller_extra: Vec<String>,
    images: Vec<String>,
    dir: TempDir,
}

impl Fleet {
    /// Starts a nats-server with JetStream and `podfleet controller`
    /// against it; devices come with [`Fleet::add_device`]. Their agents
    /// get `agent_args` besides [`Device::new`]'s, and their stores hold
    /// `images` besides the test image.
    ///
    /// The directory holds a config file whose current context `fleet`
    /// names the server ([`Podfleet::config`]), and the controller's log.
    ///
    /// # Panics
    ///
    /// As [`NatsServer::start`], or if the controller cannot be started.
    #[must_use]
    pub fn start(binaries: &Binaries, images: &[String], agent_args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("podfleet-fleet-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        Self::start_in(dir, binaries, images, agent_args)
    }

    /// As [`Fleet::start`], in `dir` (deleted on drop).
    ///
    /// # Panics
    ///
    /// As [`Fleet::start`].
    #[must_use]
    pub fn start_in(
        dir: TempDir,
        binaries: &Binaries,
        images: &[String],
        agent_args: &[&str],
    ) -> Self {
        Self::launch(dir, binaries, images, agent_args, &[])
    }

    /// As [`Fleet::start`], with `podfleet controller` given
    /// `controller_args` too, at every start: e.g. `--offline-after 8s`, so
    /// that a test sees a stopped agent's device go offline in seconds.
    ///
    /// # Panics
    ///
    /// As [`Fleet::start`].
    #[must_use]
    pub fn start_with_controller_args(
        binaries: &Binaries,
        images: &[String],
        agent_args: &[&str],
        controller_args: &[&str],
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("podfleet-fleet-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        Self::launch(dir, binaries, images, agent_args, controller_args)
    }

    fn launch(
        dir: TempDir,
        binaries: &Binaries,
        images: &[String],
        agent_args: &[&str],
        controller_args: &[&str],
    ) -> Self {
        let nats = NatsServer::start();
        let config = dir.path().join("config.toml");
        fs::write(
            &config,
            format!(
                "current-context = \"fleet\"\n\n[contexts.fleet]\nserver = \"{}\"\n",
                nats.url()
            ),
        )
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        let mut fleet = Self {
            devices: BTreeMap::new(),
            controller: None,
            podfleet: Podfleet::new(&binaries.podfleet, &nats.url(), &config),
            nats,
            agent: binaries.agent.clone(),
            agent_args: agent_args.iter().map(|&a| a.to_owned()).collect(),
            controller_extra: controller_args.iter().map(|&a| a.to_owned()).collect(),
            images: images.to_vec(),
            dir,
        };
        fleet.start_controller();
        fleet
    }

    /// The fleet's directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The nats-server.
    #[must_use]
    pub fn nats(&self) -> &NatsServer {
        &self.nats
    }

    /// The `podfleet` CLI, aimed at this fleet.
    #[must_use]
    pub fn cli(&self) -> &Podfleet {
        &self.podfleet
    }

    /// The controller's arguments: `controller --config FILE --server URL
    /// -v`, then those given to [`Fleet::start_with_controller_args`].
    #[must_use]
    pub fn controller_args(&self) -> Vec<String> {
        let mut args = [
            "controller",
            "--config",
            &self.podfleet.config().display().to_string(),
            "--server",
            &self.nats.url(),
            "-v",
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(self.controller_extra.iter().cloned());
        args
    }

    /// Where the controller's output goes, across restarts.
    #[must_use]
    pub fn controller_log(&self) -> PathBuf {
        self.dir.path().join("controller.log")
    }

    /// Starts `podfleet controller` (again).
    ///
    /// # Panics
    ///
    /// If it cannot be started.
    pub fn start_controller(&mut self) {
        self.controller = Some(AgentProcess::spawn_as(
            "controller",
            self.podfleet.binary(),
            &self.controller_args(),
            &self.controller_log(),
        ));
    }

    /// The running controller.
    ///
    /// # Panics
    ///
    /// If it is not running.
    pub fn controller(&mut self) -> &mut AgentProcess {
        self.controller
            .as_mut()
            .expect("the controller was started")
    }

    /// SIGKILLs the controller, as a crash would.
    pub fn kill_controller(&mut self) {
        if let Some(mut controller) = self.controller.take() {
            controller.kill9();
        }
    }

    /// Everything the controller logged so far, across restarts.
    #[must_use]
    pub fn controller_output(&self) -> String {
        fs::read_to_string(self.controller_log()).unwrap_or_default()
    }

    /// A new device `id` on an isolated store with the fleet's images,
    /// labelled with `labels` (`key=value`) through `podfleet label device`
    /// when there are any. Its agent is not started: call
    /// [`Device::start_agent`].
    ///
    /// # Panics
    ///
    /// As [`Device::with_images`], if the label command fails, or if the
    /// fleet has a device `id` already.
    pub fn add_device(&mut self, id: &str, labels: &[&str]) -> &mut Device {
        assert!(!self.devices.contains_key(id), "{id} was added already");
        let args: Vec<&str> = self.agent_args.iter().map(String::as_str).collect();
        let images: Vec<&str> = self.images.iter().map(String::as_str).collect();
        let device = Device::with_images(&self.agent, id, &self.nats.url(), &args, &images);
        if !labels.is_empty() {
            let mut command = vec!["label", "device", id];
            command.extend_from_slice(labels);
            let _ = self.podfleet.ok(&command);
        }
        self.devices.entry(id.to_owned()).or_insert(device)
    }

    /// The device `id`.
    ///
    /// # Panics
    ///
    /// If there is none.
    #[must_use]
    pub fn device(&self, id: &str) -> &Device {
        self.devices
            .get(id)
            .unwrap_or_else(|| panic!("no device {id} in the fleet"))
    }

    /// The device `id`, e.g. to start or kill its agent.
    ///
    /// # Panics
    ///
    /// If there is none.
    pub fn device_mut(&mut self, id: &str) -> &mut Device {
        self.devices
            .get_mut(id)
            .unwrap_or_else(|| panic!("no device {id} in the fleet"))
    }

    /// Every device, in id order.
    pub fn devices(&self) -> impl Iterator<Item = &Device> {
        self.devices.values()
    }
}

/// Every live key of the desired bucket `store` with its revision: what
/// the tests compare to prove that nothing was written.
///
/// # Panics
///
/// If the bucket cannot be read.
pub async fn desired_revisions(store: &kv::Store) -> BTreeMap<String, u64> {
    let keys: Vec<String> = store
        .keys()
        .await
        .expect("the desired bucket's keys can be listed")
        .filter_map(|k| async move { k.ok() })
        .collect()
        .await;
    let mut revisions = BTreeMap::new();
    for key in keys {
        let entry = store
            .entry(key.clone())
            .await
            .expect("a desired key can be read");
        if let Some(entry) = entry {
            if entry.operation == kv::Operation::Put {
                revisions.insert(key, entry.revision);
            }
        }
    }
    revisions
}
