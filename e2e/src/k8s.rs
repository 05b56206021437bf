//! A throwaway Kubernetes control plane for the operator's cluster tests.
//!
//! [`Cluster::start`] runs Debian's etcd and a kube-apiserver 1.20.2 (built
//! from Debian's source package by `cargo xtask k8s-apiserver`, found
//! through [`APISERVER_ENV`]) on free loopback ports, with certificates
//! made by openssl for the occasion, static bearer tokens and RBAC, all in
//! a temporary directory that goes away with the processes on drop. It
//! writes a kubeconfig for the administrator (group `system:masters`) and
//! one per [`ServiceAccountUser`], whose token authenticates as that
//! ServiceAccount, so RoleBindings to the ServiceAccount apply to it.
//!
//! It is an API server only: no kube-controller-manager, scheduler or
//! kubelet. Custom resources, their status subresource, finalizers,
//! server-side apply, watches and RBAC are the apiserver's own and work;
//! what controllers do never happens: ServiceAccount token secrets and the
//! `default` ServiceAccounts are never made (ServiceAccount admission is
//! off, so Pods can still be created; none runs), owner references are
//! never garbage-collected and a deleted namespace stays `Terminating`.
//!
//! Nothing is skipped quietly: a missing program is an error naming its
//! Debian package, and a process that dies or is not ready in time is an
//! error carrying the end of both logs.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{find_program, free_port, log_file};

/// The environment variable naming the kube-apiserver binary that
/// `cargo xtask k8s-apiserver` built.
pub const APISERVER_ENV: &str = "PODFLEET_KUBE_APISERVER";

/// How long etcd may take to report itself healthy.
const ETCD_START_DEADLINE: Duration = Duration::from_secs(30);
/// How long the apiserver may take to answer `/readyz` with `ok` (it
/// installs its bootstrap RBAC policy and priority levels first).
const APISERVER_START_DEADLINE: Duration = Duration::from_secs(120);
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How many lines of each log an error carries.
const LOG_TAIL_LINES: usize = 40;
/// The cluster's name in the kubeconfigs.
const CLUSTER_NAME: &str = "podfleet-e2e";

/// The kube-apiserver binary named by [`APISERVER_ENV`].
///
/// # Errors
///
/// When the variable is unset or empty, or names no file: the message says
/// to build it with `cargo xtask k8s-apiserver`.
pub fn apiserver_from_env() -> Result<PathBuf, String> {
    let how = format!(
        "build it with `cargo xtask k8s-apiserver` (it prints the path; 15 to 20 min the first time) and run with {APISERVER_ENV}=$(cargo xtask k8s-apiserver)"
    );
    let path = std::env::var_os(APISERVER_ENV)
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| format!("{APISERVER_ENV} is not set: {how}"))?;
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{APISERVER_ENV}={} is not a file: {how}",
            path.display()
        ))
    }
}

/// A ServiceAccount a process of the tests runs as: its static token
/// authenticates user `system:serviceaccount:<namespace>:<name>` in groups
/// `system:serviceaccounts` and `system:serviceaccounts:<namespace>`, as
/// the ServiceAccount's own token would.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceAccountUser {
    /// The ServiceAccount's namespace.
    pub namespace: String,
    /// The ServiceAccount's name.
    pub name: String,
}

impl ServiceAccountUser {
    /// The ServiceAccount `name` in `namespace`.
    #[must_use]
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// `system:serviceaccount:<namespace>:<name>`, the user RBAC sees.
    #[must_use]
    pub fn user_name(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }

    fn groups(&self) -> String {
        format!(
            "system:serviceaccounts,system:serviceaccounts:{}",
            self.namespace
        )
    }
}

/// Why a [`Cluster`] could not be started.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClusterError {
    /// A program is not installed.
    MissingProgram {
        /// The program.
        program: &'static str,
        /// How to get it.
        install: &'static str,
    },
    /// The apiserver binary given is not a file.
    NoApiserver(PathBuf),
    /// Preparing the cluster's files failed (temporary directory,
    /// certificates, tokens, kubeconfigs).
    Setup {
        /// What was being done.
        what: String,
        /// What went wrong.
        error: String,
    },
    /// etcd or the apiserver exited while starting.
    Exited {
        /// `etcd` or `kube-apiserver`.
        process: &'static str,
        /// Its exit status.
        status: ExitStatus,
        /// The end of both logs.
        logs: String,
    },
    /// etcd or the apiserver was not ready in time.
    NotReady {
        /// `etcd` or `kube-apiserver`.
        process: &'static str,
        /// How long it was given.
        waited: Duration,
        /// Its last answer to the readiness probe.
        last_answer: String,
        /// The end of both logs.
        logs: String,
    },
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingProgram { program, install } => {
                write!(f, "{program} is not installed: {install}")
            }
            Self::NoApiserver(path) => write!(
                f,
                "{} is not a file: build kube-apiserver with `cargo xtask k8s-apiserver`",
                path.display()
            ),
            Self::Setup { what, error } => write!(f, "could not {what}: {error}"),
            Self::Exited {
                process,
                status,
                logs,
            } => write!(f, "{process} exited while starting ({status})\n{logs}"),
            Self::NotReady {
                process,
                waited,
                last_answer,
                logs,
            } => write!(
                f,
                "{process} was not ready within {waited:?} (last answer: {last_answer})\n{logs}"
            ),
        }
    }
}

impl std::error::Error for ClusterError {}

fn setup(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |e| ClusterError::Setup {
        what,
        error: e.to_string(),
    }
}

/// A running etcd and kube-apiserver on loopback, both killed and their
/// directory removed on drop.
///
/// ```no_run
/// use e2e::k8s::{apiserver_from_env, Cluster, ServiceAccountUser};
///
/// let operator = ServiceAccountUser::new("podfleet-system", "podfleet-operator");
/// let cluster = Cluster::start(&apiserver_from_env()?, &[operator.clone()])?;
/// let namespaces = cluster.kubectl().args(["get", "namespaces"]).output()?;
/// let refused = cluster.kubectl_as(&operator).args(["get", "pods"]).output()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Cluster {
    apiserver: Option<Child>,
    etcd: Option<Child>,
    server: String,
    ca_cert: PathBuf,
    admin_kubeconfig: PathBuf,
    kubeconfigs: BTreeMap<ServiceAccountUser, PathBuf>,
    kubectl: PathBuf,
    apiserver_log: PathBuf,
    etcd_log: PathBuf,
    started_in: Duration,
    dir: TempDir,
}

impl Cluster {
    /// Starts etcd and the `apiserver` binary (see [`apiserver_from_env`])
    /// and returns once the apiserver answers `/readyz` with `ok`; each of
    /// `service_accounts` gets a token and a kubeconfig.
    ///
    /// # Errors
    ///
    /// If etcd, openssl or kubectl (which probes readiness) is missing,
    /// naming the package, if the files cannot be made, or if etcd or the
    /// apiserver exits or is not ready in time (with the end of both logs).
    pub fn start(
        apiserver: &Path,
        service_accounts: &[ServiceAccountUser],
    ) -> Result<Self, ClusterError> {
        let start = Instant::now();
        if !apiserver.is_file() {
            return Err(ClusterError::NoApiserver(apiserver.to_owned()));
        }
        let etcd = program(
            "etcd",
            "install Debian's etcd-server (`apt-get install -y etcd-server`; `cargo xtask k8s-apiserver` does)",
        )?;
        let openssl = program("openssl", "install it with `apt-get install -y openssl`")?;
        let kubectl = program(
            "kubectl",
            "install a kubectl of 1.24 or later (Debian's kubernetes-client is 1.20 and lacks --subresource)",
        )?;
        let dir = tempfile::Builder::new()
            .prefix("podfleet-k8s-")
            .tempdir()
            .map_err(setup("create a temporary directory"))?;
        let pki = dir.path().join("pki");
        fs::create_dir(&pki).map_err(setup("create the pki directory"))?;
        make_certificates(&openssl, &pki)?;

        let admin_token = random_token()?;
        let mut tokens = format!("{admin_token},admin,admin,\"system:masters\"\n");
        let mut sa_tokens = BTreeMap::new();
        for account in service_accounts {
            let token = random_token()?;
            tokens.push_str(&format!(
                "{token},{},{},\"{}\"\n",
                account.user_name(),
                account.user_name(),
                account.groups()
            ));
            sa_tokens.insert(account.clone(), token);
        }
        let token_file = dir.path().join("tokens.csv");
        fs::write(&token_file, tokens).map_err(setup("write the token file"))?;

        let [etcd_port, peer_port, apiserver_port] = distinct_free_ports();
        let server = format!("https://127.0.0.1:{apiserver_port}");
        let ca_cert = pki.join("ca.crt");
        let admin_kubeconfig = dir.path().join("admin.kubeconfig");
        write_kubeconfig(&admin_kubeconfig, &server, &ca_cert, "admin", &admin_token)?;
        let mut kubeconfigs = BTreeMap::new();
        for (account, token) in &sa_tokens {
            let path = dir
                .path()
                .join(format!("{}.{}.kubeconfig", account.namespace, account.name));
            write_kubeconfig(&path, &server, &ca_cert, &account.user_name(), token)?;
            kubeconfigs.insert(account.clone(), path);
        }

        let mut cluster = Self {
            apiserver: None,
            etcd: None,
            server,
            ca_cert,
            admin_kubeconfig,
            kubeconfigs,
            kubectl,
            apiserver_log: dir.path().join("kube-apiserver.log"),
            etcd_log: dir.path().join("etcd.log"),
            started_in: Duration::ZERO,
            dir,
        };
        // From here on, an error drops `cluster`, which kills what started.
        cluster.start_etcd(&etcd, etcd_port, peer_port)?;
        cluster.start_apiserver(apiserver, etcd_port, apiserver_port, &token_file)?;
        cluster.started_in = start.elapsed();
        Ok(cluster)
    }

    fn start_etcd(&mut self, etcd: &Path, port: u16, peer_port: u16) -> Result<(), ClusterError> {
        let client = format!("http://127.0.0.1:{port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let mut command = Command::new(etcd);
        command
            .arg("--name=podfleet-e2e")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("etcd").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=podfleet-e2e={peer}"))
            .stdin(Stdio::null())
            .stdout(log_file(&self.etcd_log))
            .stderr(log_file(&self.etcd_log));
        if cfg!(target_arch = "aarch64") {
            // etcd 3.4 refuses to start on arm64 unless told it may.
            command.env("ETCD_UNSUPPORTED_ARCH", "arm64");
        }
        self.etcd = Some(command.spawn().map_err(setup("start etcd"))?);
        let deadline = Instant::now() + ETCD_START_DEADLINE;
        let mut last_answer;
        loop {
            match http_get(port, "/health") {
                Ok(answer) if answer.contains("\"health\":\"true\"") => return Ok(()),
                Ok(answer) => last_answer = answer,
                Err(error) => last_answer = error,
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                return Err(ClusterError::NotReady {
                    process: "etcd",
                    waited: ETCD_START_DEADLINE,
                    last_answer,
                    logs: self.log_tails(),
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    fn start_apiserver(
        &mut self,
        apiserver: &Path,
        etcd_port: u16,
        port: u16,
        token_file: &Path,
    ) -> Result<(), ClusterError> {
        let pki = self.dir.path().join("pki");
        let file = |name: &str| pki.join(name).display().to_string();
        let mut command = Command::new(apiserver);
        command
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
            .arg(format!("--cert-dir={}", pki.display()))
            .arg(format!("--tls-cert-file={}", file("server.crt")))
            .arg(format!("--tls-private-key-file={}", file("server.key")))
            .arg(format!("--client-ca-file={}", file("ca.crt")))
            .arg(format!("--token-auth-file={}", token_file.display()))
            .arg("--authorization-mode=RBAC")
            .arg(format!("--service-account-key-file={}", file("sa.pub")))
            .arg(format!(
                "--service-account-signing-key-file={}",
                file("sa.key")
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg("--service-cluster-ip-range=10.96.0.0/12")
            // Its admission wants the `default` ServiceAccount of a Pod's
            // namespace, which only kube-controller-manager makes.
            .arg("--disable-admission-plugins=ServiceAccount")
            // The `kubernetes` Service's endpoints would be 127.0.0.1,
            // which Endpoints validation refuses; nothing here needs them.
            .arg("--endpoint-reconciler-type=none")
            .arg("--profiling=false")
            .stdin(Stdio::null())
            .stdout(log_file(&self.apiserver_log))
            .stderr(log_file(&self.apiserver_log));
        self.apiserver = Some(command.spawn().map_err(setup("start kube-apiserver"))?);
        let deadline = Instant::now() + APISERVER_START_DEADLINE;
        let mut last_answer;
        loop {
            // kubectl's TLS and token, rather than a client of our own.
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                match self.kubectl().args(["get", "--raw", "/readyz"]).output() {
                    Ok(output)
                        if output.status.success() && output.stdout.trim_ascii() == b"ok" =>
                    {
                        return Ok(())
                    }
                    Ok(output) => last_answer = answer(&output),
                    Err(e) => {
                        return Err(ClusterError::Setup {
                            what: format!("run {}", self.kubectl.display()),
                            error: e.to_string(),
                        })
                    }
                }
            } else {
                last_answer = format!("nothing listens on port {port} yet");
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                return Err(ClusterError::NotReady {
                    process: "kube-apiserver",
                    waited: APISERVER_START_DEADLINE,
                    last_answer,
                    logs: self.log_tails(),
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// An error if etcd or the apiserver has exited.
    fn check_alive(&mut self) -> Result<(), ClusterError> {
        let exited = |child: &mut Option<Child>| {
            let status = child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if status.is_some() {
                *child = None;
            }
            status
        };
        let (process, status) = if let Some(status) = exited(&mut self.etcd) {
            ("etcd", status)
        } else if let Some(status) = exited(&mut self.apiserver) {
            ("kube-apiserver", status)
        } else {
            return Ok(());
        };
        Err(ClusterError::Exited {
            process,
            status,
            logs: self.log_tails(),
        })
    }

    /// The end of the apiserver's and etcd's logs, for error messages.
    #[must_use]
    pub fn log_tails(&self) -> String {
        format!(
            "--- end of {} ---\n{}\n--- end of {} ---\n{}",
            self.apiserver_log.display(),
            tail(&self.apiserver_log),
            self.etcd_log.display(),
            tail(&self.etcd_log)
        )
    }

    /// The apiserver's URL, `https://127.0.0.1:<port>`.
    #[must_use]
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The CA certificate (PEM) that signed the apiserver's serving
    /// certificate, which is valid for `127.0.0.1` and `localhost`.
    #[must_use]
    pub fn ca_cert(&self) -> &Path {
        &self.ca_cert
    }

    /// The kubeconfig of user `admin`, in group `system:masters`.
    #[must_use]
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// The kubeconfig that authenticates as `account`, if it was one of
    /// those given to [`Cluster::start`].
    #[must_use]
    pub fn kubeconfig(&self, account: &ServiceAccountUser) -> Option<&Path> {
        self.kubeconfigs.get(account).map(PathBuf::as_path)
    }

    /// `kubectl` as the administrator, with a discovery cache of the
    /// cluster's own (never `~/.kube/cache`).
    #[must_use]
    pub fn kubectl(&self) -> Command {
        self.kubectl_with(&self.admin_kubeconfig)
    }

    /// `kubectl` as `account`.
    ///
    /// # Panics
    ///
    /// If `account` was not given to [`Cluster::start`].
    #[must_use]
    pub fn kubectl_as(&self, account: &ServiceAccountUser) -> Command {
        let kubeconfig = self.kubeconfig(account).unwrap_or_else(|| {
            panic!(
                "{} was not given to Cluster::start, so it has no token",
                account.user_name()
            )
        });
        self.kubectl_with(kubeconfig)
    }

    fn kubectl_with(&self, kubeconfig: &Path) -> Command {
        let mut command = Command::new(&self.kubectl);
        command
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!(
                "--cache-dir={}",
                self.dir.path().join("kube-cache").display()
            ))
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null());
        command
    }

    /// How long [`Cluster::start`] took, from its call to `/readyz`
    /// answering `ok`.
    #[must_use]
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The apiserver's output so far.
    #[must_use]
    pub fn apiserver_log(&self) -> String {
        fs::read_to_string(&self.apiserver_log).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in [self.apiserver.take(), self.etcd.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn program(name: &'static str, install: &'static str) -> Result<PathBuf, ClusterError> {
    find_program(name).ok_or(ClusterError::MissingProgram {
        program: name,
        install,
    })
}

/// Three different ports that were free a moment ago.
fn distinct_free_ports() -> [u16; 3] {
    loop {
        let ports = [free_port(), free_port(), free_port()];
        if ports[0] != ports[1] && ports[1] != ports[2] && ports[0] != ports[2] {
            return ports;
        }
    }
}

/// A CA, the apiserver's serving certificate signed by it (for 127.0.0.1
/// and localhost) and the ServiceAccount token signing key pair, in `pki`.
fn make_certificates(openssl: &Path, pki: &Path) -> Result<(), ClusterError> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run_openssl(
        openssl,
        pki,
        "make the CA",
        &[
            &["req", "-x509", "-days", "2", "-subj", "/CN=podfleet-e2e-ca"],
            &ec[..],
            &["-keyout", "ca.key", "-out", "ca.crt"],
            &["-addext", "basicConstraints=critical,CA:TRUE"],
            &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ]
        .concat(),
    )?;
    run_openssl(
        openssl,
        pki,
        "make the apiserver's key",
        &[
            &["req", "-new", "-subj", "/CN=kube-apiserver"],
            &ec[..],
            &["-keyout", "server.key", "-out", "server.csr"],
        ]
        .concat(),
    )?;
    fs::write(
        pki.join("server.ext"),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .map_err(setup("write server.ext"))?;
    run_openssl(
        openssl,
        pki,
        "sign the apiserver's certificate",
        &[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ],
    )?;
    run_openssl(
        openssl,
        pki,
        "make the ServiceAccount signing key",
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "sa.key",
        ],
    )?;
    run_openssl(
        openssl,
        pki,
        "extract the ServiceAccount public key",
        &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"],
    )
}

fn run_openssl(openssl: &Path, dir: &Path, what: &str, args: &[&str]) -> Result<(), ClusterError> {
    let output = Command::new(openssl)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(setup(what))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(ClusterError::Setup {
            what: what.to_owned(),
            error: format!("openssl {} failed: {}", args.join(" "), answer(&output)),
        })
    }
}

/// 128 random bits from the kernel, in hex.
fn random_token() -> Result<String, ClusterError> {
    let mut bytes = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .map_err(setup("read /dev/urandom"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca_cert: &Path,
    user: &str,
    token: &str,
) -> Result<(), ClusterError> {
    // JSON is YAML, and serde_json quotes whatever needs it.
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": CLUSTER_NAME,
            "cluster": {
                "server": server,
                "certificate-authority": ca_cert.display().to_string(),
            },
        }],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{
            "name": CLUSTER_NAME,
            "context": {"cluster": CLUSTER_NAME, "user": user, "namespace": "default"},
        }],
        "current-context": CLUSTER_NAME,
    });
    let text = serde_json::to_string_pretty(&config).map_err(|e| ClusterError::Setup {
        what: format!("encode {}", path.display()),
        error: e.to_string(),
    })?;
    fs::write(path, text).map_err(setup(format!("write {}", path.display())))
}

/// A plain HTTP GET of `path` on `127.0.0.1:port`: the answer, or why
/// there is none.
fn http_get(port: u16, path: &str) -> Result<String, String> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .map_err(|e| format!("cannot connect to port {port}: {e}"))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// A command's status, stdout and stderr, for messages.
fn answer(output: &Output) -> String {
    format!(
        "{}: {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout).trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    )
}

/// The last [`LOG_TAIL_LINES`] lines of `path`.
fn tail(path: &Path) -> String {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| format!("(no log at {}: {e})", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_account_user_is_named_as_kubernetes_names_it() {
        let account = ServiceAccountUser::new("podfleet-system", "podfleet-operator");
        assert_eq!(
            account.user_name(),
            "system:serviceaccount:podfleet-system:podfleet-operator"
        );
        assert_eq!(
            account.groups(),
            "system:serviceaccounts,system:serviceaccounts:podfleet-system"
        );
    }

    #[test]
    fn tokens_are_32_hex_digits_and_differ() {
        let a = random_token().unwrap();
        let b = random_token().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn a_missing_apiserver_is_refused_by_naming_the_xtask() {
        let error = Cluster::start(Path::new("/nonexistent/kube-apiserver"), &[]).unwrap_err();
        assert!(
            error.to_string().contains("cargo xtask k8s-apiserver"),
            "{error}"
        );
    }
}
