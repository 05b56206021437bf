//! A container registry on loopback for the registry tier: Debian's
//! `docker-registry` (distribution 2.8) with htpasswd authentication, in
//! front of it a TCP proxy in this process that can be throttled, and the
//! files a device needs to pull from it (a registries.conf that marks it as
//! plain HTTP, a containers-auth.json with its login).
//!
//! Images reach it with `podman push` from the host's storage
//! ([`Registry::push`]); what it holds is read back over its own HTTP API
//! ([`Registry::digest`]), never from podman. It never touches the network
//! beyond 127.0.0.1.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tempfile::TempDir;

use crate::{
    await_listening, find_program, free_port, log_file, podman, read_log, temp_dir, test_image,
};

/// The user the registry accepts.
pub const REGISTRY_USER: &str = "podfleet";
/// Its password.
pub const REGISTRY_PASSWORD: &str = "e2e-registry-secret";

/// The repository of [`variant_image`]'s images on the host.
pub const VARIANT_REPOSITORY: &str = "localhost/podfleet-variant";

/// How long the registry may take to accept connections.
const START_DEADLINE: Duration = Duration::from_secs(15);
/// How often the proxy's threads look at their stop flag.
const PROXY_TICK: Duration = Duration::from_millis(20);

/// A running `docker-registry` on `127.0.0.1`, behind a proxy on the port
/// every client uses ([`Registry::host`]). Killed on drop.
///
/// Its storage survives [`stop`](Registry::stop) and
/// [`resume`](Registry::resume); while it is stopped the public port
/// refuses connections, as an unreachable registry would.
#[derive(Debug)]
pub struct Registry {
    child: Option<Child>,
    /// The port the proxy listens on: the registry's address for clients.
    port: u16,
    /// The port the registry itself listens on.
    backend: u16,
    proxy: Option<Proxy>,
    /// Bytes per second from the registry to its clients; 0 is unlimited.
    rate: Arc<AtomicU64>,
    /// When the registry last sent a client a byte, in ns since the epoch.
    last_answer: Arc<AtomicU64>,
    dir: TempDir,
}

impl Registry {
    /// Starts a registry with an empty store, accepting
    /// [`REGISTRY_USER`] / [`REGISTRY_PASSWORD`].
    ///
    /// # Panics
    ///
    /// If `docker-registry` or `htpasswd` is missing (naming the Debian
    /// package), or the registry does not accept connections within 15 s
    /// (with its log).
    #[must_use]
    pub fn start() -> Self {
        let program = registry_program();
        let dir = temp_dir("podfleet-registry-");
        let htpasswd = dir.path().join("htpasswd");
        fs::write(&htpasswd, bcrypt_htpasswd(REGISTRY_USER, REGISTRY_PASSWORD))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", htpasswd.display()));
        let backend = free_port();
        let port = free_port();
        let storage = dir.path().join("storage");
        fs::create_dir_all(&storage)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", storage.display()));
        // No http.secret: one instance, so uploads need no shared one.
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{backend}\n\
             auth:\n  htpasswd:\n    realm: podfleet-e2e\n    path: {htpasswd}\n",
            storage = storage.display(),
            htpasswd = htpasswd.display(),
        );
        fs::write(dir.path().join("config.yml"), config)
            .unwrap_or_else(|e| panic!("cannot write the registry's config: {e}"));
        fs::write(
            dir.path().join("registries.conf"),
            format!("[[registry]]\nlocation = \"127.0.0.1:{port}\"\ninsecure = true\n"),
        )
        .unwrap_or_else(|e| panic!("cannot write registries.conf: {e}"));
        let auth = base64(format!("{REGISTRY_USER}:{REGISTRY_PASSWORD}").as_bytes());
        fs::write(
            dir.path().join("auth.json"),
            format!("{{\"auths\": {{\"127.0.0.1:{port}\": {{\"auth\": \"{auth}\"}}}}}}\n"),
        )
        .unwrap_or_else(|e| panic!("cannot write auth.json: {e}"));
        let mut registry = Self {
            child: None,
            port,
            backend,
            proxy: None,
            rate: Arc::new(AtomicU64::new(0)),
            last_answer: Arc::new(AtomicU64::new(0)),
            dir,
        };
        registry.spawn(&program);
        registry
    }

    /// `127.0.0.1:<port>`: the registry's name in image references.
    #[must_use]
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `<host>/<name>`, e.g. `image("podfleet/app:1")`.
    #[must_use]
    pub fn image(&self, name: &str) -> String {
        format!("{}/{name}", self.host())
    }

    /// A registries.conf that marks this registry as plain HTTP (for
    /// `CONTAINERS_REGISTRIES_CONF`).
    #[must_use]
    pub fn registries_conf(&self) -> PathBuf {
        self.dir.path().join("registries.conf")
    }

    /// A containers-auth.json holding this registry's login.
    #[must_use]
    pub fn auth_file(&self) -> PathBuf {
        self.dir.path().join("auth.json")
    }

    /// The registry's output so far, across restarts (one access log line
    /// per request).
    #[must_use]
    pub fn log(&self) -> String {
        read_log(&self.log_path())
    }

    /// Pushes `local` (an image in the host's storage) as `name` (e.g.
    /// `podfleet/app:1`) with `podman push`, and returns the digest the
    /// registry now serves for it.
    ///
    /// # Panics
    ///
    /// If the push fails (with podman's output).
    pub fn push(&self, local: &str, name: &str) -> String {
        let target = self.image(name);
        let output = podman()
            .args(["push", "--quiet", "--tls-verify=false", "--creds"])
            .arg(format!("{REGISTRY_USER}:{REGISTRY_PASSWORD}"))
            .args([local, &target])
            .output()
            .unwrap_or_else(|e| panic!("cannot run podman push: {e}"));
        assert!(
            output.status.success(),
            "podman push {local} {target} failed with {}:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let (repository, reference) = name
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{name} has no tag"));
        self.digest(repository, reference)
    }

    /// The digest the registry serves for `repository` at `reference` (a
    /// tag or digest), from `HEAD /v2/<repository>/manifests/<reference>`'s
    /// `Docker-Content-Digest` header, asked as a client that takes OCI and
    /// Docker manifests.
    ///
    /// # Panics
    ///
    /// If the registry does not answer 200 with the header.
    #[must_use]
    pub fn digest(&self, repository: &str, reference: &str) -> String {
        let credentials = base64(format!("{REGISTRY_USER}:{REGISTRY_PASSWORD}").as_bytes());
        let request = format!(
            "HEAD /v2/{repository}/manifests/{reference} HTTP/1.0\r\n\
             Host: 127.0.0.1:{port}\r\n\
             Authorization: Basic {credentials}\r\n\
             Accept: application/vnd.oci.image.manifest.v1+json\r\n\
             Accept: application/vnd.oci.image.index.v1+json\r\n\
             Accept: application/vnd.docker.distribution.manifest.v2+json\r\n\
             Accept: application/vnd.docker.distribution.manifest.list.v2+json\r\n\r\n",
            port = self.port,
        );
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, self.backend))
            .unwrap_or_else(|e| panic!("cannot connect to the registry: {e}"));
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        stream
            .write_all(request.as_bytes())
            .unwrap_or_else(|e| panic!("cannot send to the registry: {e}"));
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        let ok = answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200");
        let digest = answer.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("docker-content-digest")
                .then(|| value.trim().to_owned())
        });
        match digest {
            Some(digest) if ok => digest,
            _ => panic!("HEAD /v2/{repository}/manifests/{reference} answered:\n{answer}"),
        }
    }

    /// When the registry last sent a client a byte (the end of the last
    /// transfer), in nanoseconds since the Unix epoch as podman's events
    /// count them; 0 before the first.
    #[must_use]
    pub fn last_answer_at(&self) -> u128 {
        u128::from(self.last_answer.load(Ordering::SeqCst))
    }

    /// Limits what the registry sends to `bytes_per_second` per connection
    /// from now on (`None`: unlimited), to make a pull last.
    pub fn throttle(&self, bytes_per_second: Option<u64>) {
        self.rate
            .store(bytes_per_second.unwrap_or(0), Ordering::SeqCst);
    }

    /// Kills the registry and closes its port: clients' connections are
    /// cut and new ones are refused.
    pub fn stop(&mut self) {
        if let Some(proxy) = self.proxy.take() {
            proxy.stop();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a stopped registry again on the same ports and storage.
    ///
    /// # Panics
    ///
    /// As [`Registry::start`].
    pub fn resume(&mut self) {
        if self.child.is_none() {
            self.spawn(&registry_program());
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    fn spawn(&mut self, program: &Path) {
        let log = self.log_path();
        let mut child = Command::new(program)
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log_file(&log))
            .stderr(log_file(&log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        await_listening(
            &mut child,
            "docker-registry",
            self.backend,
            START_DEADLINE,
            || self.log(),
        );
        self.child = Some(child);
        self.proxy = Some(Proxy::start(
            self.port,
            self.backend,
            self.rate.clone(),
            self.last_answer.clone(),
        ));
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP proxy from `127.0.0.1:<port>` to the registry, whose answers can
/// be throttled. Connections are two pumping threads each; all of them
/// end when the proxy is stopped, and the listener closes.
#[derive(Debug)]
struct Proxy {
    stopped: Arc<AtomicBool>,
    acceptor: JoinHandle<()>,
    pumps: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    fn start(port: u16, backend: u16, rate: Arc<AtomicU64>, last: Arc<AtomicU64>) -> Self {
        // std sets SO_REUSEADDR: the port binds again after a stop.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
            .unwrap_or_else(|e| panic!("the registry's proxy cannot listen on {port}: {e}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("cannot make the proxy's listener non-blocking: {e}"));
        let stopped = Arc::new(AtomicBool::new(false));
        let pumps = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let stopped = stopped.clone();
            let pumps = pumps.clone();
            thread::spawn(move || {
                while !stopped.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let Ok(server) = TcpStream::connect((Ipv4Addr::LOCALHOST, backend))
                            else {
                                let _ = client.shutdown(Shutdown::Both);
                                continue;
                            };
                            let started = connect_pumps(client, server, &stopped, &rate, &last);
                            pumps
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .extend(started);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(PROXY_TICK),
                        Err(_) => thread::sleep(PROXY_TICK),
                    }
                }
            })
        };
        Self {
            stopped,
            acceptor,
            pumps,
        }
    }

    fn stop(self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = self.acceptor.join();
        let pumps = std::mem::take(&mut *self.pumps.lock().unwrap_or_else(PoisonError::into_inner));
        for pump in pumps {
            let _ = pump.join();
        }
    }
}

/// The two threads of one proxied connection: requests go through as they
/// come, answers at most at `rate` bytes per second (0: unlimited).
fn connect_pumps(
    client: TcpStream,
    server: TcpStream,
    stopped: &Arc<AtomicBool>,
    rate: &Arc<AtomicU64>,
    last: &Arc<AtomicU64>,
) -> Vec<JoinHandle<()>> {
    let streams = (|| {
        for stream in [&client, &server] {
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(PROXY_TICK))?;
            stream.set_nodelay(true)?;
        }
        Ok::<_, std::io::Error>((client.try_clone()?, server.try_clone()?))
    })();
    let Ok((client_writer, server_writer)) = streams else {
        return Vec::new();
    };
    let unlimited = Arc::new(AtomicU64::new(0));
    vec![
        pump(client, server_writer, stopped.clone(), unlimited, None),
        pump(
            server,
            client_writer,
            stopped.clone(),
            rate.clone(),
            Some(last.clone()),
        ),
    ]
}

/// Copies `from` to `to` until either end closes or the proxy stops,
/// sleeping after each chunk as long as `rate` asks, and noting in `last`
/// when it last wrote.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    stopped: Arc<AtomicBool>,
    rate: Arc<AtomicU64>,
    last: Option<Arc<AtomicU64>>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut buffer = vec![0_u8; 16 * 1024];
        while !stopped.load(Ordering::SeqCst) {
            let rate = rate.load(Ordering::SeqCst);
            // A tenth of a second's worth at a time, so the rate is smooth.
            let chunk = match usize::try_from(rate / 10) {
                Ok(chunk) if rate > 0 => chunk.clamp(1, buffer.len()),
                _ => buffer.len(),
            };
            let n = match from.read(&mut buffer[..chunk]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue
                }
                Err(_) => break,
            };
            if to.write_all(&buffer[..n]).is_err() {
                break;
            }
            if let Some(last) = &last {
                last.store(unix_nanos(), Ordering::SeqCst);
            }
            let n = u64::try_from(n).unwrap_or(u64::MAX);
            if let Some(micros) = n.saturating_mul(1_000_000).checked_div(rate) {
                thread::sleep(Duration::from_micros(micros));
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        let _ = from.shutdown(Shutdown::Read);
    })
}

/// Builds `localhost/podfleet-variant:<variant>` (`<variant>-<padding>`
/// with padding) unless it exists, once per process, and returns its name:
/// [`TEST_IMAGE`](crate::TEST_IMAGE) with `/variant` holding `variant`, so
/// that every variant has an image id and a digest of its own, and with
/// `padding` bytes of incompressible noise in `/padding`, a layer of that
/// size for a pull to take time over. Built `--pull=never`.
///
/// # Panics
///
/// As [`test_image`], or if the build fails (with its output).
pub fn variant_image(variant: &str, padding: usize) -> String {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let name = if padding == 0 {
        format!("{VARIANT_REPOSITORY}:{variant}")
    } else {
        format!("{VARIANT_REPOSITORY}:{variant}-{padding}")
    };
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    if built.contains(&name) {
        return name;
    }
    let base = test_image();
    let exists = podman()
        .args(["image", "exists", &name])
        .status()
        .unwrap_or_else(|e| panic!("cannot run podman: {e}"));
    if !exists.success() {
        let context = temp_dir("podfleet-variant-");
        fs::write(context.path().join("variant"), format!("{variant}\n"))
            .unwrap_or_else(|e| panic!("cannot write the variant file: {e}"));
        fs::write(context.path().join("padding"), noise(variant, padding))
            .unwrap_or_else(|e| panic!("cannot write the padding file: {e}"));
        fs::write(
            context.path().join("Containerfile"),
            format!("FROM {base}\nCOPY variant /variant\nCOPY padding /padding\n"),
        )
        .unwrap_or_else(|e| panic!("cannot write the Containerfile: {e}"));
        let output = podman()
            .args(["build", "--pull=never", "--tag", &name])
            .arg(context.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run podman build: {e}"));
        assert!(
            output.status.success(),
            "podman build of {name} failed with {}:\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    built.push(name.clone());
    name
}

/// `len` bytes that gzip cannot shrink, the same for the same `seed`
/// (xorshift64 seeded with the FNV-1a hash of `seed`).
fn noise(seed: &str, len: usize) -> Vec<u8> {
    let mut state = seed.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) | 1;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// The registry's program, or a panic naming its package.
fn registry_program() -> PathBuf {
    static FOUND: OnceLock<PathBuf> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            find_program("docker-registry").unwrap_or_else(|| {
                panic!(
                    "docker-registry is not installed (not on PATH nor in /usr/sbin): \
                     the registry tests need it; install it with \
                     `apt-get install -y docker-registry` (or run `cargo xtask provision`)"
                )
            })
        })
        .clone()
}

/// `user:<bcrypt hash>` as `htpasswd -Bbn` writes it.
fn bcrypt_htpasswd(user: &str, password: &str) -> String {
    let htpasswd = find_program("htpasswd").unwrap_or_else(|| {
        panic!(
            "htpasswd is not installed: the registry tests make their bcrypt password file \
             with it; install it with `apt-get install -y apache2-utils` \
             (or run `cargo xtask provision`)"
        )
    });
    let output = Command::new(htpasswd)
        .args(["-Bbn", user, password])
        .output()
        .unwrap_or_else(|e| panic!("cannot run htpasswd: {e}"));
    assert!(
        output.status.success(),
        "htpasswd -Bbn failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned() + "\n"
}

/// Standard base64 with padding (HTTP basic auth, containers-auth.json).
pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Now, in nanoseconds since the Unix epoch.
fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_pads_like_rfc_4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"u:p+?/"), "dTpwKz8v");
    }
}
