//! The real-infrastructure harness.
//!
//! It starts its own podman API service ([`PodmanService`]) and nats-server
//! ([`NatsServer`]), builds its test image locally ([`test_image`], and the
//! demo web server's images with [`demo_image`]) and runs the production
//! agent ([`agent`]) and the `podfleet` CLI and controller ([`fleet`])
//! against them, checking both the reported state and podman's own ground
//! truth.
//!
//! Nothing here is skipped quietly: a missing tool panics with the Debian
//! package that provides it. Nothing is pulled from the internet: the test
//! image is built `FROM scratch` around the host's static busybox, and the
//! registry tier pushes such images to a registry of its own on loopback
//! ([`registry`]). Every `podman` this harness runs, the service included,
//! reads the project's own [`CONTAINERS_CONF`] (runc, lowered ulimits).

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

pub mod agent;
pub mod fleet;
pub mod k8s;
pub mod kube_fake;
pub mod registry;
pub mod vm;

/// The local image [`test_image`] builds: busybox on `scratch`, no
/// entrypoint, so a container's args are its whole command.
pub const TEST_IMAGE: &str = "localhost/podfleet-test:busybox";

/// The repository of the demo web server's images ([`demo_image`]).
pub const DEMO_IMAGE_REPOSITORY: &str = "localhost/podfleet-demo";

/// The containers.conf every podman invocation of the harness uses: runc as
/// the OCI runtime (crun fails on this host's hybrid cgroups) and ulimits low
/// enough for an unprivileged build host.
pub const CONTAINERS_CONF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/containers.conf");

/// How long the podman service may take to answer its first ping.
const PODMAN_START_DEADLINE: Duration = Duration::from_secs(30);
/// How long nats-server may take to accept connections.
const NATS_START_DEADLINE: Duration = Duration::from_secs(15);
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A `podman` command that reads [`CONTAINERS_CONF`]. Use it for every
/// podman CLI call in tests, so the CLI and the service agree.
///
/// # Panics
///
/// If podman or runc is not installed.
#[must_use]
pub fn podman() -> Command {
    require_podman();
    let mut command = Command::new("podman");
    command.env("CONTAINERS_CONF", CONTAINERS_CONF);
    command
}

/// A `podman system service` on a socket of its own, killed on drop.
///
/// It shares the host's container storage: images built with [`podman`] are
/// visible to it, and containers it started outlive it.
#[derive(Debug)]
pub struct PodmanService {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    /// `--root`, `--runroot` and `--tmpdir` of an isolated service.
    store: Option<[PathBuf; 3]>,
    /// The registries.conf (`CONTAINERS_REGISTRIES_CONF`) of a service that
    /// pulls from a test registry.
    registries_conf: Option<PathBuf>,
    _dir: TempDir,
}

impl PodmanService {
    /// Starts the service and waits until its socket answers a ping.
    ///
    /// # Panics
    ///
    /// If podman or runc is missing (naming the Debian package), or the
    /// service does not answer within 30 s (with its log).
    #[must_use]
    pub fn start() -> Self {
        Self::launch(temp_dir("podfleet-podman-"), None)
    }

    /// Starts a service on container storage of its own (`--root`,
    /// `--runroot`, `--tmpdir` in its temporary directory) holding only
    /// [`TEST_IMAGE`]: a device of its own, whose containers no other test
    /// sees, and which are force-removed on drop. Use
    /// [`PodmanService::podman`] to look at it.
    ///
    /// # Panics
    ///
    /// As [`PodmanService::start`], or if the test image cannot be copied in.
    #[must_use]
    pub fn start_isolated() -> Self {
        Self::start_isolated_with(&[])
    }

    /// As [`PodmanService::start_isolated`], with `images` (built on the
    /// host's storage beforehand, e.g. by [`demo_image`]) copied in besides
    /// [`TEST_IMAGE`]. Nothing is pulled: the store holds exactly these.
    ///
    /// # Panics
    ///
    /// As [`PodmanService::start`], or if an image cannot be copied in.
    #[must_use]
    pub fn start_isolated_with(images: &[&str]) -> Self {
        Self::isolated(images, None)
    }

    /// As [`PodmanService::start_isolated_with`], reading `registries_conf`
    /// (`CONTAINERS_REGISTRIES_CONF`) instead of the host's registries.conf,
    /// as does [`PodmanService::podman`]: how a device is told that a test
    /// registry ([`registry::Registry`]) speaks plain HTTP.
    ///
    /// # Panics
    ///
    /// As [`PodmanService::start_isolated_with`].
    #[must_use]
    pub fn start_isolated_with_registries(images: &[&str], registries_conf: &Path) -> Self {
        Self::isolated(images, Some(registries_conf.to_owned()))
    }

    fn isolated(images: &[&str], registries_conf: Option<PathBuf>) -> Self {
        let dir = temp_dir("podfleet-device-");
        let store = ["root", "runroot", "tmp"].map(|d| dir.path().join(d));
        let test = test_image();
        let mut all = vec![test];
        all.extend(images.iter().copied().filter(|image| *image != test));
        for image in all {
            copy_image(image, &store);
        }
        Self::launch_with(dir, Some(store), registries_conf)
    }

    fn launch(dir: TempDir, store: Option<[PathBuf; 3]>) -> Self {
        Self::launch_with(dir, store, None)
    }

    fn launch_with(
        dir: TempDir,
        store: Option<[PathBuf; 3]>,
        registries_conf: Option<PathBuf>,
    ) -> Self {
        let socket = dir.path().join("podman.sock");
        let log = dir.path().join("podman-service.log");
        let child = Self::spawn(&socket, &log, store.as_ref(), registries_conf.as_deref());
        let mut service = Self {
            child,
            socket,
            log,
            store,
            registries_conf,
            _dir: dir,
        };
        service.wait_ready();
        service
    }

    fn spawn(
        socket: &Path,
        log: &Path,
        store: Option<&[PathBuf; 3]>,
        registries_conf: Option<&Path>,
    ) -> Child {
        let mut command = podman();
        if let Some(store) = store {
            command = store_args(command, store);
        }
        if let Some(conf) = registries_conf {
            command.env("CONTAINERS_REGISTRIES_CONF", conf);
        }
        command
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .stdin(Stdio::null())
            .stdout(log_file(log))
            .stderr(log_file(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `podman system service`: {e}"))
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + PODMAN_START_DEADLINE;
        while !ping(&self.socket) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "`podman system service` exited with {status}:\n{}",
                    read_log(&self.log)
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "podman's API socket {} did not answer within {PODMAN_START_DEADLINE:?}:\n{}",
                    self.socket.display(),
                    read_log(&self.log)
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Kills the service and starts it again on the same socket, store and
    /// configuration, as a device's reboot or a podman upgrade would;
    /// returns once it answers. Containers are left as they are (conmon
    /// keeps them); stop them with [`PodmanService::podman`] for a reboot.
    ///
    /// # Panics
    ///
    /// As [`PodmanService::start`].
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The old service's socket file would answer nothing.
        let _ = fs::remove_file(&self.socket);
        self.child = Self::spawn(
            &self.socket,
            &self.log,
            self.store.as_ref(),
            self.registries_conf.as_deref(),
        );
        self.wait_ready();
    }

    /// The API socket's path.
    #[must_use]
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The service's output so far.
    #[must_use]
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// A [`podman`] command on this service's storage (the host's, unless
    /// the service is isolated).
    #[must_use]
    pub fn podman(&self) -> Command {
        let mut command = match &self.store {
            Some(store) => store_args(podman(), store),
            None => podman(),
        };
        if let Some(conf) = &self.registries_conf {
            command.env("CONTAINERS_REGISTRIES_CONF", conf);
        }
        command
    }
}

impl Drop for PodmanService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.store.is_some() {
            // Containers outlive the service (conmon keeps them); an
            // isolated device takes its containers with it.
            let _ = self
                .podman()
                .args(["rm", "--all", "--force", "--time", "0"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if let Some([root, ..]) = &self.store {
                kill_exec_monitors(root);
            }
        }
    }
}

/// Kills the conmon processes still working for the store `root`.
///
/// conmon keeps an `exec` session's monitor alive for minutes after the
/// program ended (podman's `--exit-delay`), then runs `podman container
/// cleanup --root <root>`, which would recreate the store after its
/// temporary directory is gone. Only processes whose arguments name this
/// store's own (unique, temporary) root exactly are touched.
fn kill_exec_monitors(root: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let root = root.as_os_str().as_bytes();
    let Ok(processes) = fs::read_dir("/proc") else {
        return;
    };
    for process in processes.flatten() {
        let Some(pid) = process
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = fs::read(process.path().join("cmdline")) else {
            continue;
        };
        let mut args = cmdline.split(|&b| b == 0);
        let is_conmon = args
            .next()
            .is_some_and(|program| program.ends_with(b"conmon"));
        if is_conmon && args.any(|arg| arg == root) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// `command` with the storage flags of an isolated service.
fn store_args(mut command: Command, [root, runroot, tmp]: &[PathBuf; 3]) -> Command {
    command
        .arg("--root")
        .arg(root)
        .arg("--runroot")
        .arg(runroot)
        .arg("--tmpdir")
        .arg(tmp);
    command
}

/// Copies `image` from the host's storage into the isolated `store`
/// (`podman save | podman load`).
fn copy_image(image: &str, store: &[PathBuf; 3]) {
    let mut save = podman()
        .args(["save", "--format", "oci-archive", image])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run podman save: {e}"));
    let archive = save
        .stdout
        .take()
        .unwrap_or_else(|| panic!("podman save has no stdout"));
    let loaded = store_args(podman(), store)
        .args(["load", "--quiet"])
        .stdin(archive)
        .output()
        .unwrap_or_else(|e| panic!("cannot run podman load: {e}"));
    let saved = match save.wait() {
        Ok(status) if status.success() => None,
        Ok(status) => Some(format!("podman save exited with {status}")),
        Err(e) => Some(format!("podman save could not be waited for: {e}")),
    };
    if !loaded.status.success() || saved.is_some() {
        panic!(
            "copying {image} into an isolated store failed ({}; podman load exited with {}):\n{}",
            saved.as_deref().unwrap_or("podman save succeeded"),
            loaded.status,
            String::from_utf8_lossy(&loaded.stderr)
        );
    }
}

/// Whether the Docker-compatible API on `socket` answers `GET /_ping`.
fn ping(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /_ping HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer.starts_with(b"HTTP/1.0 200") || answer.starts_with(b"HTTP/1.1 200")
}

/// A `nats-server -js` on a free local port with a store directory of its
/// own, killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    /// The usual port while the server runs elsewhere.
    home: Option<u16>,
    config: Option<PathBuf>,
    log: PathBuf,
    dir: TempDir,
}

impl NatsServer {
    /// Starts a server with JetStream and default settings.
    ///
    /// # Panics
    ///
    /// If nats-server is missing (naming the Debian package) or does not
    /// accept connections within 15 s (with its log).
    #[must_use]
    pub fn start() -> Self {
        Self::launch(None)
    }

    /// Starts a server that also reads the configuration file `config`
    /// (accounts, limits...); the port and store directory given on the
    /// command line win over the file's.
    ///
    /// # Panics
    ///
    /// As [`NatsServer::start`].
    #[must_use]
    pub fn start_with_config(config: impl Into<PathBuf>) -> Self {
        Self::launch(Some(config.into()))
    }

    fn launch(config: Option<PathBuf>) -> Self {
        let dir = temp_dir("podfleet-nats-");
        let mut server = Self {
            child: None,
            port: free_port(),
            home: None,
            config,
            log: dir.path().join("nats-server.log"),
            dir,
        };
        server.spawn();
        server
    }

    /// `nats://127.0.0.1:<port>`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The store directory given as `-sd` (JetStream keeps its data in its
    /// `jetstream` subdirectory), kept across [`restart`](Self::restart).
    #[must_use]
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The server's output so far, across restarts.
    #[must_use]
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// Kills the server and starts it again on the same port with the same
    /// store, as a device's broker restart would; returns once it accepts
    /// connections again.
    ///
    /// # Panics
    ///
    /// As [`NatsServer::start`].
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Kills the server; clients see a broker that is down.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts a stopped server again on the same port and store.
    ///
    /// # Panics
    ///
    /// As [`NatsServer::start`].
    pub fn resume(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    /// Restarts the server on another free port with the same store and
    /// returns its URL: clients of the usual port are cut off while
    /// changes are made through this one. [`come_home`](Self::come_home)
    /// undoes it.
    ///
    /// # Panics
    ///
    /// As [`NatsServer::start`].
    pub fn move_away(&mut self) -> String {
        self.kill();
        self.home.get_or_insert(self.port);
        self.port = free_port();
        self.spawn();
        self.url()
    }

    /// Restarts the server on its usual port after [`move_away`](Self::move_away).
    ///
    /// # Panics
    ///
    /// As [`NatsServer::start`].
    pub fn come_home(&mut self) {
        self.kill();
        if let Some(home) = self.home.take() {
            self.port = home;
        }
        self.spawn();
    }

    fn spawn(&mut self) {
        let binary = find_program("nats-server").unwrap_or_else(|| {
            panic!(
                "nats-server is not installed (not on PATH nor in /usr/sbin): \
                 the e2e tests need it; install it with `apt-get install -y nats-server`"
            )
        });
        let mut command = Command::new(binary);
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        command
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store_dir())
            .stdin(Stdio::null())
            .stdout(log_file(&self.log))
            .stderr(log_file(&self.log));
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nats-server: {e}"));
        await_listening(
            &mut child,
            "nats-server",
            self.port,
            NATS_START_DEADLINE,
            || self.log(),
        );
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Builds [`TEST_IMAGE`] unless it exists, once per process, and returns
/// its name.
///
/// The image is the host's static busybox (`/bin/busybox`) copied onto
/// `scratch`, with its applets installed as symlinks in `/bin` by a `RUN`
/// of busybox itself, and `sh` as the default command.
///
/// # Panics
///
/// If podman, runc or a static busybox is missing (naming the Debian
/// package), or the build fails (with its output).
pub fn test_image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let exists = podman()
            .args(["image", "exists", TEST_IMAGE])
            .status()
            .unwrap_or_else(|e| panic!("cannot run podman: {e}"));
        if !exists.success() {
            build_test_image();
        }
    });
    TEST_IMAGE
}

fn build_test_image() {
    let busybox = Path::new("/bin/busybox");
    let install = "install it with `apt-get install -y busybox-static`";
    if !busybox.exists() {
        panic!("/bin/busybox is missing: the e2e test image is built from it; {install}");
    }
    if is_dynamic_elf(busybox) {
        panic!("/bin/busybox is dynamically linked and cannot run on scratch; {install}");
    }
    let context = temp_dir("podfleet-image-");
    fs::copy(busybox, context.path().join("busybox"))
        .unwrap_or_else(|e| panic!("cannot copy /bin/busybox into the build context: {e}"));
    fs::write(
        context.path().join("Containerfile"),
        "FROM scratch\n\
         COPY busybox /bin/busybox\n\
         RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
         CMD [\"sh\"]\n",
    )
    .unwrap_or_else(|e| panic!("cannot write the Containerfile: {e}"));
    let output = podman()
        .args(["build", "--pull=never", "--tag", TEST_IMAGE])
        .arg(context.path())
        .output()
        .unwrap_or_else(|e| panic!("cannot run podman build: {e}"));
    if !output.status.success() {
        panic!(
            "podman build of {TEST_IMAGE} failed with {}:\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The demo web server's image for `version`, `localhost/podfleet-demo:<version>`,
/// built by [`demo_image`].
#[must_use]
pub fn demo_image_name(version: u32) -> String {
    format!("{DEMO_IMAGE_REPOSITORY}:{version}")
}

/// Builds `localhost/podfleet-demo:<version>` unless it exists, once per
/// process and version, and returns its name.
///
/// It is [`TEST_IMAGE`] with `/www/index.html` saying
/// `podfleet demo v<version>` and busybox's httpd serving it on port 8080
/// as its command (`-vv`: every request is logged on stderr, so `podfleet
/// logs` has something to show). Built `--pull=never`, like the test image.
///
/// httpd runs as PID 1 and so ignores SIGTERM: a manifest running it wants
/// a short `lifecycle.grace_period_secs`.
///
/// # Panics
///
/// As [`test_image`], or if the build fails (with its output).
pub fn demo_image(version: u32) -> String {
    static BUILT: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());
    let name = demo_image_name(version);
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    if built.contains(&version) {
        return name;
    }
    let base = test_image();
    let exists = podman()
        .args(["image", "exists", &name])
        .status()
        .unwrap_or_else(|e| panic!("cannot run podman: {e}"));
    if !exists.success() {
        let context = temp_dir("podfleet-demo-image-");
        fs::write(
            context.path().join("index.html"),
            format!("podfleet demo v{version}\n"),
        )
        .unwrap_or_else(|e| panic!("cannot write index.html: {e}"));
        fs::write(
            context.path().join("Containerfile"),
            format!(
                "FROM {base}\n\
                 COPY index.html /www/index.html\n\
                 EXPOSE 8080\n\
                 CMD [\"httpd\", \"-f\", \"-vv\", \"-p\", \"8080\", \"-h\", \"/www\"]\n"
            ),
        )
        .unwrap_or_else(|e| panic!("cannot write the Containerfile: {e}"));
        let output = podman()
            .args(["build", "--pull=never", "--tag", &name])
            .arg(context.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run podman build: {e}"));
        if !output.status.success() {
            panic!(
                "podman build of {name} failed with {}:\n{}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    built.insert(version);
    name
}

/// Whether `path` is a little-endian 64-bit ELF with an interpreter
/// (PT_INTERP), i.e. dynamically linked. Other formats count as static: the
/// build then fails with podman's own words.
fn is_dynamic_elf(path: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    let Ok(elf) = fs::read(path) else {
        return false;
    };
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .and_then(|b| b.try_into().ok())
            .map(u16::from_le_bytes)
    };
    let u32_at = |at: usize| {
        elf.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    // Magic, ELFCLASS64, ELFDATA2LSB.
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(phnum)).any(|i| u32_at(phoff + i * usize::from(phentsize)) == Some(PT_INTERP))
}

/// A name prefix no other test run uses: `<tag><pid>x<nanos>`, valid as
/// the start of a container name.
#[must_use]
pub fn unique_prefix(tag: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{tag}{}x{nanos}", std::process::id())
}

/// Panics, naming the package, unless podman and the runc that
/// [`CONTAINERS_CONF`] selects are installed.
fn require_podman() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        if find_program("podman").is_none() {
            panic!(
                "podman is not installed (not on PATH): the e2e tests need it; \
                 install it with `apt-get install -y podman`"
            );
        }
        if find_program("runc").is_none() {
            panic!(
                "runc is not installed: e2e/containers.conf selects it as podman's OCI runtime; \
                 install it with `apt-get install -y runc`"
            );
        }
    });
}

/// `name` on PATH, or in the sbin directories a non-root PATH may lack.
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

pub(crate) fn temp_dir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"))
}

/// `path` opened for appending, so a restarted process adds to its log.
pub(crate) fn log_file(path: &Path) -> File {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open the log file {}: {e}", path.display()))
}

pub(crate) fn read_log(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| format!("(no log at {}: {e})", path.display()))
}

/// A TCP port that was free a moment ago.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("cannot find a free TCP port: {e}"))
}

/// Waits until `child`, the program `what`, accepts connections on the
/// loopback `port`.
///
/// # Panics
///
/// If it exits first, or does not listen `within` (then it is killed),
/// with `log()`.
pub(crate) fn await_listening(
    child: &mut Child,
    what: &str,
    port: u16,
    within: Duration,
    log: impl Fn() -> String,
) {
    let deadline = Instant::now() + within;
    while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited with {status}:\n{}", log());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "{what} did not accept connections on port {port} within {within:?}:\n{}",
                log()
            );
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Publishes `(subject, payload)` pairs to JetStream with at most
/// `in_flight` acknowledgements outstanding: the raw-puts baseline the
/// control plane's benchmarks compare against.
///
/// # Panics
///
/// If a publish or its acknowledgement fails.
pub async fn pipelined_puts(
    js: &async_nats::jetstream::Context,
    items: Vec<(String, Vec<u8>)>,
    in_flight: usize,
) {
    use futures_util::stream::FuturesUnordered;
    use futures_util::{FutureExt, StreamExt};
    use std::future::IntoFuture;
    let mut acks = FuturesUnordered::new();
    for (subject, payload) in items {
        if acks.len() >= in_flight {
            let ack: Result<_, async_nats::jetstream::context::PublishError> =
                acks.next().await.expect("an ack");
            ack.expect("stored");
        }
        let ack = js
            .publish(subject, payload.into())
            .await
            .expect("published");
        acks.push(ack.into_future().boxed());
    }
    while let Some(ack) = acks.next().await {
        ack.expect("stored");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_prefixes_are_valid_container_name_starts() {
        let prefix = unique_prefix("t");
        assert!(prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-'));
        assert!(prefix.starts_with('t'));
    }

    #[test]
    fn elf_interpreters_are_detected() {
        assert!(is_dynamic_elf(Path::new("/bin/sh")) || !Path::new("/bin/sh").exists());
        assert!(!is_dynamic_elf(Path::new(CONTAINERS_CONF)));
    }
}
