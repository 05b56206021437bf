//! `podfleet-k8s-e2e`: the cluster tier's scenarios, run by `cargo xtask
//! e2e --k8s` once it has built (or found) the kube-apiserver, named by
//! `PODFLEET_KUBE_APISERVER`.
//!
//! It starts a throwaway cluster ([`e2e::k8s::Cluster`]: etcd and
//! kube-apiserver 1.20.2, no kubelet) with a token for the ServiceAccount
//! `podfleet:podfleet-operator`, applies deploy/operator as the
//! administrator (all but the Deployment, which has no node to run on;
//! that one is only dry-run), starts nats-server with the shipped
//! deploy/nats/podfleet.conf and real agents on podman stores of their
//! own, and runs the operator as a process (`podfleet-operator-e2e`, the
//! real command line) with the ServiceAccount's kubeconfig and the NATS
//! context file the manifests' Secret holds. So the operator has exactly
//! the rights rbac.yaml grants: a missing one shows as `Forbidden` in its
//! log, which fails the run.
//!
//! Everything administrative goes through kubectl, as a person would; the
//! ground truth of the devices is their own podman. The scenarios run in
//! order, each relying on what the ones before left, and it stops at the
//! first failure, printing the operators' and agents' logs. It ends with a
//! table of what each step took.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::future::Future;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitCode, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use e2e::agent::{tokio_runtime, Device as AgentDevice};
use e2e::k8s::{apiserver_from_env, Cluster, ServiceAccountUser};
use e2e::{eventually, test_image, NatsServer, TEST_IMAGE};
use futures_util::StreamExt;
use podfleet_core::wire::names::DESIRED_BUCKET;
use serde_json::Value;

const USAGE: &str =
    "usage: PODFLEET_KUBE_APISERVER=PATH podfleet-k8s-e2e --work DIR [--timing NAME=SECS]...

  --work DIR       the operators' logs and NATS context file go here
  --timing NAME=SECS
                   a step done before (provisioning, builds) for the closing table

PODFLEET_KUBE_APISERVER names the kube-apiserver that `cargo xtask k8s-apiserver` builds;
`cargo xtask e2e --k8s` does it all.";

/// The operator's manifests (kustomize).
const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/operator");
/// The shipped nats-server configuration: the operator connects as its
/// `podfleet-controller` user.
const NATS_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/nats/podfleet.conf");
/// The operator's namespace, and its ServiceAccount's.
const NS: &str = "podfleet";
/// The operator's ServiceAccount (rbac.yaml).
const SERVICE_ACCOUNT: &str = "podfleet-operator";
/// The Lease the replicas elect a leader with (the operator's default).
const LEASE: &str = "podfleet-operator";
/// What a FleetDeployment carries while its desired keys may exist.
const FINALIZER: &str = "podfleet.io/desired-keys";
/// The agents log in as the shipped configuration's break-glass user: it
/// has a user for rpi-01 and rpi-02 only, and what the devices may do is
/// the VM tier's and nats_permissions' business, not this tier's.
const AGENT_USER: [&str; 2] = ["podfleet-operator", "change-me-operator"];
/// The administrator's NATS login, to read the desired keys.
const ADMIN_USER: [&str; 2] = AGENT_USER;
/// The lease timings given to both replicas: shorter than the defaults
/// (15 s, 10 s, 2 s) so that the election scenario takes seconds.
const LEASE_DURATION: Duration = Duration::from_secs(8);
const LEASE_FLAGS: [&str; 6] = [
    "--lease-duration",
    "8s",
    "--renew-deadline",
    "5s",
    "--lease-retry",
    "1s",
];
/// How long a change may take to show (two cores, shared with compilers).
const SETTLE: Duration = Duration::from_secs(180);
/// How long RBAC changes may take to reach the authorizer's cache.
const RBAC_SETTLE: Duration = Duration::from_secs(30);
/// How long an operator may take to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// The workload: the fleet model's spec, as `podfleet apply` takes it.
const FLEET_DEPLOYMENT: &str = r#"
apiVersion: podfleet.io/v1alpha1
kind: FleetDeployment
metadata:
  name: web
  namespace: podfleet
spec:
  target:
    selector: site=lyon
  score:
    services:
      - name: web
        image: localhost/podfleet-test:busybox
        args: [sleep, "3600"]
    lifecycle:
      grace_period_secs: 1
"#;

/// A device labelled before its agent ever ran.
const JOINING_DEVICE: &str = r#"
apiVersion: podfleet.io/v1alpha1
kind: Device
metadata:
  name: rpi-03
  labels:
    site: lyon
spec:
  description: joins after the rollout
"#;

#[derive(Debug)]
struct Options {
    work: PathBuf,
    timings: Vec<(String, Duration)>,
}

fn main() -> ExitCode {
    let options = match parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("podfleet-k8s-e2e: {message}\n{USAGE}");
            return ExitCode::from(64);
        }
    };
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("podfleet-k8s-e2e: FAILED: {message}");
            ExitCode::FAILURE
        }
    }
}

fn parse(args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut work = None;
    let mut timings = Vec::new();
    let mut args = args;
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--work" => work = Some(PathBuf::from(value()?)),
            "--timing" => {
                let v = value()?;
                let (name, secs) = v
                    .split_once('=')
                    .and_then(|(n, s)| Some((n.to_owned(), s.parse::<f64>().ok()?)))
                    .ok_or_else(|| format!("--timing {v:?}: expected NAME=SECONDS"))?;
                timings.push((name, Duration::from_secs_f64(secs)));
            }
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    Ok(Options {
        work: work.ok_or("--work is required")?,
        timings,
    })
}

/// One row of the closing table.
struct Row {
    name: String,
    took: Duration,
    outcome: &'static str,
}

/// The operator as a process: `podfleet-operator-e2e` with a kubeconfig
/// and a NATS context file, its output in `<work>/<identity>.log`. Killed
/// on drop.
struct OperatorProcess {
    identity: String,
    child: Option<Child>,
    log: PathBuf,
    metrics: u16,
}

impl OperatorProcess {
    /// Starts replica `identity` of the operator.
    fn start(fleet: &Fleet, kubeconfig: &Path, identity: &str) -> Self {
        let metrics = free_port();
        let log = fleet.work.join(format!("{identity}.log"));
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let mut command = Command::new(&fleet.operator_binary);
        // Nothing of this process's environment may stand in for a flag.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("PODFLEET_") || name.starts_with("POD_") || name == "RUST_LOG" {
                command.env_remove(&*name);
            }
        }
        command
            .args(["--namespace", NS, "--config"])
            .arg(&fleet.context_file)
            .args(["--server", &fleet.nats.url(), "--create-devices"])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
            .args(["--device-status-every", "1s", "--status-interval", "200ms"])
            .args(["--identity", identity])
            .args(LEASE_FLAGS)
            .arg("-v")
            .env("KUBECONFIG", kubeconfig)
            // Plain text in the log, for people and for the checks below.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", fleet.operator_binary.display()));
        Self {
            identity: identity.to_owned(),
            child: Some(child),
            log,
            metrics,
        }
    }

    /// Its output so far.
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET path` on its metrics endpoint: the status code and the body.
    fn http(&self, path: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, self.metrics)).ok()?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        let code = answer.split_whitespace().nth(1)?.parse().ok()?;
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Some((code, body.to_owned()))
    }

    /// The value of the sample `series` (name and labels, as printed) on
    /// `/metrics`.
    fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.http("/metrics")?;
        body.lines().find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|value| value.trim().parse().ok())
        })
    }

    /// Sends SIGTERM (as the kubelet would) and waits for the exit.
    fn terminate(&mut self) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("{} was stopped already", self.identity));
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
        assert!(sent.success(), "kill -TERM {} failed", child.id());
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not exit within {STOP_GRACE:?} of SIGTERM:\n{}",
                    self.identity,
                    tail(&self.log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What runs beside the cluster: nats-server, the devices, the operators.
struct Fleet {
    nats: NatsServer,
    devices: BTreeMap<String, AgentDevice>,
    operators: Vec<OperatorProcess>,
    agent_binary: PathBuf,
    operator_binary: PathBuf,
    /// The NATS context file, as the manifests' Secret holds it.
    context_file: PathBuf,
    work: PathBuf,
}

impl Fleet {
    /// Starts the agent of device `id` on a podman store of its own.
    fn start_device(&mut self, id: &str) {
        let args = [
            "--nats-user",
            AGENT_USER[0],
            "--nats-password",
            AGENT_USER[1],
        ];
        let mut device = AgentDevice::with_images(
            &self.agent_binary,
            id,
            &self.nats.url(),
            &args,
            &[TEST_IMAGE],
        );
        device.start_agent();
        self.devices.insert(id.to_owned(), device);
    }

    fn device(&self, id: &str) -> &AgentDevice {
        self.devices
            .get(id)
            .unwrap_or_else(|| panic!("no device {id}"))
    }

    /// The ids of the running containers of `deployment` on device `id`,
    /// by podman.
    fn running(&self, id: &str, deployment: &str) -> Vec<String> {
        self.device(id)
            .containers(deployment)
            .into_iter()
            .filter(|c| c.state == "running")
            .map(|c| c.id)
            .collect()
    }

    fn operator(&self, identity: &str) -> &OperatorProcess {
        self.operators
            .iter()
            .find(|o| o.identity == identity)
            .unwrap_or_else(|| panic!("no operator {identity}"))
    }

    fn operator_mut(&mut self, identity: &str) -> &mut OperatorProcess {
        self.operators
            .iter_mut()
            .find(|o| o.identity == identity)
            .unwrap_or_else(|| panic!("no operator {identity}"))
    }

    /// The lines of the operators' logs that say the API server (or
    /// nats-server) refused them for want of a permission.
    fn forbidden(&self) -> Vec<String> {
        self.operators
            .iter()
            .flat_map(|o| {
                o.log()
                    .lines()
                    .filter(|l| {
                        // kube's ApiError: `... is forbidden: User "..."
                        // cannot create resource ...: Forbidden`.
                        l.contains("is forbidden")
                            || l.contains("Forbidden")
                            || l.contains("Permissions Violation")
                    })
                    .map(|l| format!("{}: {l}", o.identity))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// What the scenarios share. Dropped in this order: the operators, agents
/// and nats-server first, so that none sees the API server vanish.
struct Ctx {
    fleet: Fleet,
    cluster: Cluster,
    operator_account: ServiceAccountUser,
}

type Scenario = for<'a> fn(&'a mut Ctx) -> Pin<Box<dyn Future<Output = ()> + 'a>>;

/// The scenarios, in the order they run (each relies on the ones before).
const SCENARIOS: [(&str, Scenario); 7] = [
    ("devices appear", |c| Box::pin(devices_appear(c))),
    ("rollout", |c| Box::pin(rollout(c))),
    ("relabel out", |c| Box::pin(relabel_out(c))),
    ("device joins", |c| Box::pin(device_joins(c))),
    ("events and metrics", |c| Box::pin(events_and_metrics(c))),
    ("leader election", |c| Box::pin(leader_election(c))),
    ("deletion", |c| Box::pin(deletion(c))),
];

fn run(options: &Options) -> Result<(), String> {
    let apiserver = apiserver_from_env()?;
    let mut rows: Vec<Row> = options
        .timings
        .iter()
        .map(|(name, took)| Row {
            name: name.clone(),
            took: *took,
            outcome: "ok",
        })
        .collect();
    fs::create_dir_all(&options.work)
        .map_err(|e| format!("cannot create {}: {e}", options.work.display()))?;
    let rt = tokio_runtime();

    step(&format!(
        "start etcd and kube-apiserver ({})",
        apiserver.display()
    ));
    let operator_account = ServiceAccountUser::new(NS, SERVICE_ACCOUNT);
    let cluster = Cluster::start(&apiserver, std::slice::from_ref(&operator_account))
        .map_err(|e| format!("the cluster did not start: {e}"))?;
    rows.push(Row {
        name: "cluster start".into(),
        took: cluster.started_in(),
        outcome: "ok",
    });
    println!(
        "podfleet-k8s-e2e: cluster ready at {}: {}",
        cluster.server(),
        kubectl(&cluster, &["version", "-o", "json"])
            .ok()
            .and_then(|v| serde_json::from_str::<Value>(&v).ok())
            .and_then(|v| v["serverVersion"]["gitVersion"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "?".into())
    );

    step("apply deploy/operator (all but the Deployment), as the administrator");
    let started = Instant::now();
    let applied = caught(|| install(&cluster, &operator_account));
    rows.push(Row {
        name: "manifests".into(),
        took: started.elapsed(),
        outcome: if applied.is_ok() { "ok" } else { "FAILED" },
    });
    let mut failure = applied.err().map(|e| format!("manifests: {e}"));

    let mut ctx = None;
    if failure.is_none() {
        step("start nats-server (deploy/nats/podfleet.conf), agents rpi-01 and rpi-02, operator-a");
        let started = Instant::now();
        let fleet = caught(|| rt.block_on(start_fleet(&cluster, &operator_account, &options.work)));
        rows.push(Row {
            name: "fleet start".into(),
            took: started.elapsed(),
            outcome: if fleet.is_ok() { "ok" } else { "FAILED" },
        });
        match fleet {
            Ok(fleet) => {
                ctx = Some(Ctx {
                    fleet,
                    cluster,
                    operator_account,
                });
            }
            Err(e) => failure = Some(format!("fleet start: {e}")),
        }
    }

    for (name, scenario) in SCENARIOS {
        let Some(ctx) = ctx.as_mut().filter(|_| failure.is_none()) else {
            rows.push(Row {
                name: name.into(),
                took: Duration::ZERO,
                outcome: "not run",
            });
            continue;
        };
        step(&format!("scenario: {name}"));
        let started = Instant::now();
        let mut result = caught(|| rt.block_on(scenario(ctx)));
        // Whatever the scenario checked, a refusal by RBAC fails it.
        let forbidden = ctx.fleet.forbidden();
        if result.is_ok() && !forbidden.is_empty() {
            result = Err(format!(
                "the operator was refused (fix deploy/operator/rbac.yaml, or the NATS user of nats-secret.yaml):\n{}",
                forbidden.join("\n")
            ));
        }
        let took = started.elapsed();
        let outcome = match result {
            Ok(()) => "ok",
            Err(why) => {
                failure = Some(format!("scenario {name}: {why}"));
                "FAILED"
            }
        };
        println!(
            "podfleet-k8s-e2e: {name}: {outcome} in {:.1} s",
            took.as_secs_f64()
        );
        rows.push(Row {
            name: name.into(),
            took,
            outcome,
        });
    }

    if let Some(ctx) = &ctx {
        report_logs(ctx, failure.is_some());
    }
    println!("{}", table(&rows));
    let scenarios = &rows[rows.len() - SCENARIOS.len()..];
    let passed = scenarios.iter().filter(|r| r.outcome == "ok").count();
    println!("k8s: {passed} passed, {} failed", scenarios.len() - passed);
    drop(ctx);
    failure.map_or(Ok(()), Err)
}

/// Runs `f`, turning a panic into its message.
fn caught<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    panic::catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "a panic without a message".into())
    })
}

/// The operators' warnings (what 1.20 or the RBAC may have refused), and
/// on a failure the ends of every log.
fn report_logs(ctx: &Ctx, failed: bool) {
    for operator in &ctx.fleet.operators {
        let log = operator.log();
        // Each kind of warning once, with how often it came, without its
        // time stamp and cut short.
        let mut warnings: BTreeMap<String, usize> = BTreeMap::new();
        for line in log
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        {
            let message = line.split_once(' ').map_or(line, |(_, rest)| rest);
            let short: String = message.chars().take(220).collect();
            *warnings.entry(short).or_default() += 1;
        }
        println!(
            "--- {}: {} warnings and errors in {} ---",
            operator.identity,
            warnings.values().sum::<usize>(),
            operator.log.display()
        );
        for (message, count) in &warnings {
            println!("  {count:>4} x {message}");
        }
        if failed {
            println!(
                "--- {} (last 60 lines) ---\n{}",
                operator.identity,
                tail(&log, 60)
            );
        }
    }
    if failed {
        for (id, device) in &ctx.fleet.devices {
            let log = fs::read_to_string(device.agent_log()).unwrap_or_default();
            println!("--- agent {id} (last 30 lines) ---\n{}", tail(&log, 30));
        }
        println!("{}", ctx.cluster.log_tails());
    }
}

fn step(what: &str) {
    println!("podfleet-k8s-e2e: {what}");
}

/// Prints how far into a scenario `what` was reached.
fn lap(since: Instant, what: &str) {
    println!("  {:>6.1} s  {what}", since.elapsed().as_secs_f64());
}

fn table(rows: &[Row]) -> String {
    let mut out = "\ntimings (kube-apiserver 1.20.2):\n".to_owned();
    let total: Duration = rows.iter().map(|r| r.took).sum();
    for row in rows {
        let _ = writeln!(
            out,
            "  {:<22} {:>8.1} s  {}",
            row.name,
            row.took.as_secs_f64(),
            row.outcome
        );
    }
    let _ = write!(out, "  {:<22} {:>8.1} s", "total", total.as_secs_f64());
    out
}

/// Applies the kustomization without its Deployment, waits for the CRDs,
/// dry-runs the whole of it on the server, and checks what the
/// ServiceAccount may and may not do.
fn install(cluster: &Cluster, account: &ServiceAccountUser) {
    let t0 = Instant::now();
    let rendered = must(kubectl(cluster, &["kustomize", DEPLOY]));
    let (kept, dropped) = without_kind(&rendered, "Deployment");
    assert_eq!(dropped, 1, "the kustomization has one Deployment");
    must(kubectl_in(cluster, &["apply", "-f", "-"], &kept));
    must(kubectl(
        cluster,
        &[
            "wait",
            "--for=condition=Established",
            "crd/fleetdeployments.podfleet.io",
            "crd/devices.podfleet.io",
            "--timeout=60s",
        ],
    ));
    lap(t0, "applied; the CRDs are established");
    // The Deployment (and the rest) as the API server validates them; a
    // dry run, as no node could run its pods.
    let dry = must(kubectl(
        cluster,
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "--field-manager=podfleet-e2e",
            "-k",
            DEPLOY,
        ],
    ));
    assert!(
        dry.contains("deployment.apps/podfleet-operator serverside-applied (server dry run)"),
        "{dry}"
    );
    lap(t0, "the whole kustomization passes a server-side dry run");
    let can_i = |verb: &str, resource: &str, extra: &[&str]| {
        let mut args = vec!["auth", "can-i", verb, resource];
        args.extend_from_slice(extra);
        let output = cluster.kubectl_as(account).args(&args).output();
        output
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let ns = ["-n", NS];
    let status = ["-n", NS, "--subresource=status"];
    let allowed: [(&str, &str, &[&str]); 9] = [
        ("watch", "fleetdeployments.podfleet.io", &ns),
        ("patch", "fleetdeployments.podfleet.io", &ns),
        ("patch", "fleetdeployments.podfleet.io", &status),
        ("watch", "devices.podfleet.io", &[]),
        ("create", "devices.podfleet.io", &[]),
        ("patch", "devices.podfleet.io", &["--subresource=status"]),
        ("update", "leases.coordination.k8s.io", &ns),
        ("create", "events.events.k8s.io", &ns),
        ("patch", "events.events.k8s.io", &ns),
    ];
    let refused: [(&str, &str, &[&str]); 7] = [
        ("delete", "fleetdeployments.podfleet.io", &ns),
        ("create", "fleetdeployments.podfleet.io", &ns),
        ("patch", "devices.podfleet.io", &[]),
        ("delete", "devices.podfleet.io", &[]),
        ("get", "secrets", &ns),
        ("list", "fleetdeployments.podfleet.io", &["-n", "default"]),
        ("update", "leases.coordination.k8s.io", &["-n", "default"]),
    ];
    let deadline = Instant::now() + RBAC_SETTLE;
    for (verb, resource, extra) in allowed {
        while can_i(verb, resource, extra) != "yes" {
            assert!(
                Instant::now() < deadline,
                "rbac.yaml does not let {} {verb} {resource} {}",
                account.user_name(),
                extra.join(" ")
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    for (verb, resource, extra) in refused {
        assert_eq!(
            can_i(verb, resource, extra),
            "no",
            "rbac.yaml lets {} {verb} {resource} {}: more than the operator needs",
            account.user_name(),
            extra.join(" ")
        );
    }
    lap(
        t0,
        "the ServiceAccount may do what the operator does, and no more",
    );
}

/// nats-server with the shipped configuration, rpi-01 and rpi-02, and
/// operator-a with the context file of the Secret, leading.
async fn start_fleet(cluster: &Cluster, account: &ServiceAccountUser, work: &Path) -> Fleet {
    let t0 = Instant::now();
    let here = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let beside = |name: &str| {
        let path = here.join(name);
        assert!(
            path.is_file(),
            "{} is missing: build it with `cargo build -p e2e --bin {name}` (cargo xtask e2e --k8s does)",
            path.display()
        );
        path
    };
    test_image();
    // The operator reads its NATS connection as the pods would: the
    // Secret's config.toml, the server overridden by --server.
    let config = must(kubectl(
        cluster,
        &[
            "get",
            "secret",
            "podfleet-operator-nats",
            "-n",
            NS,
            "-o",
            r#"go-template={{index .data "config.toml" | base64decode}}"#,
        ],
    ));
    let context_file = work.join("operator-nats.toml");
    fs::write(&context_file, &config)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", context_file.display()));
    let mut fleet = Fleet {
        nats: NatsServer::start_with_config(NATS_CONFIG),
        devices: BTreeMap::new(),
        operators: Vec::new(),
        agent_binary: beside("podfleet-agent-e2e"),
        operator_binary: beside("podfleet-operator-e2e"),
        context_file,
        work: work.to_owned(),
    };
    for id in ["rpi-01", "rpi-02"] {
        fleet.start_device(id);
    }
    lap(t0, "nats-server and two agents started");
    let kubeconfig = cluster
        .kubeconfig(account)
        .unwrap_or_else(|| panic!("no kubeconfig for {}", account.user_name()))
        .to_owned();
    let operator = OperatorProcess::start(&fleet, &kubeconfig, "operator-a");
    fleet.operators.push(operator);
    eventually!("operator-a to hold the lease", SETTLE, {
        (lease_holder(cluster).as_deref() == Some("operator-a")).then_some(())
    });
    eventually!(
        "operator-a to be ready (synced with NATS)",
        SETTLE,
        (fleet
            .operator("operator-a")
            .http("/readyz")
            .map(|(code, _)| code)
            == Some(200))
        .then_some(())
    );
    lap(t0, "operator-a leads and is ready");
    fleet
}

async fn devices_appear(c: &mut Ctx) {
    let t0 = Instant::now();
    let devices = eventually!("a Device for each agent, online", SETTLE, {
        let list = get_json(&c.cluster, &["get", "devices"]);
        let items = list["items"].as_array().cloned().unwrap_or_default();
        let names: Vec<&str> = items
            .iter()
            .filter_map(|d| d["metadata"]["name"].as_str())
            .collect();
        (names == ["rpi-01", "rpi-02"] && items.iter().all(|d| d["status"]["online"] == true))
            .then_some(items)
    });
    lap(t0, "rpi-01 and rpi-02 created by the operator, online");
    for device in &devices {
        let status = &device["status"];
        assert_eq!(status["arch"], std::env::consts::ARCH, "{device:#}");
        assert!(status["agentVersion"].is_string(), "{device:#}");
        assert!(status["runtimeVersion"].is_string(), "{device:#}");
        assert!(status["lastSeen"].is_string(), "{device:#}");
    }
    print_indented(&must(kubectl(&c.cluster, &["get", "devices"])));
}

async fn rollout(c: &mut Ctx) {
    let t0 = Instant::now();
    must(kubectl(
        &c.cluster,
        &["label", "devices", "rpi-01", "rpi-02", "site=lyon"],
    ));
    must(kubectl_in(
        &c.cluster,
        &["apply", "-f", "-"],
        FLEET_DEPLOYMENT,
    ));
    must(kubectl(
        &c.cluster,
        &[
            "wait",
            "--for=condition=Available=True",
            "fleetdeployment/web",
            "-n",
            NS,
            &format!("--timeout={}s", SETTLE.as_secs()),
        ],
    ));
    lap(t0, "web is Available (kubectl wait)");
    let fd = fleet_deployment(&c.cluster).unwrap_or_else(|| panic!("web is gone"));
    assert_eq!(
        fd["metadata"]["finalizers"],
        serde_json::json!([FINALIZER]),
        "{fd:#}"
    );
    let status = &fd["status"];
    assert_eq!(
        (
            &status["targeted"],
            &status["running"],
            &status["observedGeneration"]
        ),
        (&Value::from(2), &Value::from(2), &Value::from(1)),
        "{fd:#}"
    );
    assert_eq!(
        condition(&fd, "Degraded"),
        ("False".into(), "Healthy".into())
    );
    let managers: Vec<(String, String)> = fd["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["manager"].as_str().unwrap_or("").to_owned(),
                m["operation"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert!(
        managers.contains(&("podfleet-operator".into(), "Apply".into())),
        "the status is not a server-side apply of podfleet-operator: {managers:?}"
    );
    for id in ["rpi-01", "rpi-02"] {
        assert_eq!(
            c.fleet.running(id, "web").len(),
            1,
            "{id} runs web, by its podman"
        );
    }
    lap(t0, "podman runs web on rpi-01 and rpi-02");
    eventually!("the Devices' statuses to show web running", SETTLE, {
        ["rpi-01", "rpi-02"]
            .iter()
            .all(|id| {
                let device = get_json(&c.cluster, &["get", "device", id]);
                device["status"]["deployments"]["web"]["phase"] == "running"
                    && device["status"]["deploymentCount"] == 1
            })
            .then_some(())
    });
    lap(t0, "the Devices' statuses say web runs");
    print_indented(&must(kubectl(
        &c.cluster,
        &["get", "fleetdeployments", "-n", NS],
    )));
}

async fn relabel_out(c: &mut Ctx) {
    let t0 = Instant::now();
    let kept = c.fleet.running("rpi-01", "web");
    must(kubectl(
        &c.cluster,
        &["label", "device", "rpi-02", "site=paris", "--overwrite"],
    ));
    eventually!(
        "rpi-02 to remove web",
        SETTLE,
        c.fleet
            .device("rpi-02")
            .containers("web")
            .is_empty()
            .then_some(())
    );
    lap(t0, "rpi-02 no longer has web");
    assert_eq!(
        c.fleet.running("rpi-01", "web"),
        kept,
        "rpi-01's container was touched"
    );
    eventually!("web to target 1 device, running", SETTLE, {
        fleet_deployment(&c.cluster)
            .filter(|fd| {
                fd["status"]["targeted"] == 1
                    && fd["status"]["running"] == 1
                    && condition(fd, "Available").0 == "True"
            })
            .map(drop)
    });
    lap(t0, "the status says 1 targeted, 1 running");
    eventually!("rpi-02's Device status to drop web", SETTLE, {
        let device = get_json(&c.cluster, &["get", "device", "rpi-02"]);
        (device["status"]["deploymentCount"] == 0
            && device["status"]["deployments"]["web"].is_null())
        .then_some(())
    });
    lap(t0, "rpi-02's Device status lists no deployment");
}

async fn device_joins(c: &mut Ctx) {
    let t0 = Instant::now();
    must(kubectl_in(
        &c.cluster,
        &["apply", "-f", "-"],
        JOINING_DEVICE,
    ));
    c.fleet.start_device("rpi-03");
    lap(
        t0,
        "Device rpi-03 (site=lyon) created, then its agent started",
    );
    eventually!(
        "rpi-03 to run web",
        SETTLE,
        (c.fleet.running("rpi-03", "web").len() == 1).then_some(())
    );
    lap(t0, "podman runs web on rpi-03");
    eventually!("web to run on rpi-01 and rpi-03", SETTLE, {
        fleet_deployment(&c.cluster)
            .filter(|fd| {
                fd["status"]["targeted"] == 2
                    && fd["status"]["running"] == 2
                    && condition(fd, "Available").0 == "True"
            })
            .map(drop)
    });
    eventually!("rpi-03's status to show it online", SETTLE, {
        let device = get_json(&c.cluster, &["get", "device", "rpi-03"]);
        (device["status"]["online"] == true).then_some(())
    });
    lap(t0, "the status says 2 running; rpi-03 online");
}

async fn events_and_metrics(c: &mut Ctx) {
    let t0 = Instant::now();
    let described = eventually!("kubectl describe to show the rollout's events", SETTLE, {
        let described = must(kubectl(
            &c.cluster,
            &["describe", "fleetdeployment", "web", "-n", NS],
        ));
        ["RolloutStarted", "RolloutComplete", "TargetsChanged"]
            .iter()
            .all(|reason| described.contains(reason))
            .then_some(described)
    });
    let events_section = described
        .split_once("\nEvents:")
        .map_or("", |(_, events)| events);
    print_indented(events_section.trim_start_matches('\n'));
    let events = get_json(&c.cluster, &["get", "events.events.k8s.io", "-n", NS]);
    let ours: Vec<&Value> = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["regarding"]["name"] == "web")
        .collect();
    assert!(
        !ours.is_empty(),
        "no events.k8s.io/v1 event about web: {events:#}"
    );
    for event in &ours {
        assert_eq!(
            event["reportingController"], "podfleet-operator",
            "{event:#}"
        );
        assert_eq!(event["reportingInstance"], "operator-a", "{event:#}");
        assert_eq!(event["regarding"]["kind"], "FleetDeployment", "{event:#}");
    }
    lap(t0, "kubectl describe shows the operator's events");

    let a = c.fleet.operator("operator-a");
    let series = [
        ("podfleet_operator_leader", 1.0),
        ("podfleet_operator_nats_connected", 1.0),
        (
            "podfleet_operator_deployment_devices{phase=\"running\"}",
            2.0,
        ),
    ];
    for (name, want) in series {
        assert_eq!(
            a.metric(name),
            Some(want),
            "{name} on operator-a's /metrics"
        );
    }
    for name in [
        "podfleet_operator_reconciles_total{result=\"ok\"}",
        "podfleet_operator_status_patches_total",
        "podfleet_operator_device_writes_total",
    ] {
        let value = a.metric(name).unwrap_or(0.0);
        assert!(value > 0.0, "{name} is {value} on operator-a's /metrics");
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(a.http(path).map(|(code, _)| code), Some(200), "{path}");
    }
    lap(
        t0,
        &format!(
            "/metrics: {} reconciles, {} status patches, {} Device writes",
            a.metric("podfleet_operator_reconciles_total{result=\"ok\"}")
                .unwrap_or(0.0),
            a.metric("podfleet_operator_status_patches_total")
                .unwrap_or(0.0),
            a.metric("podfleet_operator_device_writes_total")
                .unwrap_or(0.0)
        ),
    );
}

async fn leader_election(c: &mut Ctx) {
    let t0 = Instant::now();
    let lease = get_json(&c.cluster, &["get", "lease", LEASE, "-n", NS]);
    assert_eq!(lease["spec"]["holderIdentity"], "operator-a", "{lease:#}");
    let transitions = lease["spec"]["leaseTransitions"].as_i64().unwrap_or(0);
    let kubeconfig = c
        .cluster
        .kubeconfig(&c.operator_account)
        .unwrap_or_else(|| panic!("no kubeconfig for the operator"))
        .to_owned();
    let b = OperatorProcess::start(&c.fleet, &kubeconfig, "operator-b");
    c.fleet.operators.push(b);
    eventually!("operator-b to stand by, ready", SETTLE, {
        let b = c.fleet.operator("operator-b");
        (b.http("/readyz").map(|(code, _)| code) == Some(200)
            && b.metric("podfleet_operator_leader") == Some(0.0))
        .then_some(())
    });
    lap(t0, "operator-b started: standing by, ready");
    // Longer than a lease: operator-a renews it, operator-b never takes it.
    let watch_until = Instant::now() + LEASE_DURATION + Duration::from_secs(4);
    while Instant::now() < watch_until {
        assert_eq!(
            lease_holder(&c.cluster).as_deref(),
            Some("operator-a"),
            "the lease changed hands while operator-a ran"
        );
        assert_eq!(
            c.fleet
                .operator("operator-b")
                .metric("podfleet_operator_leader"),
            Some(0.0),
            "operator-b leads beside operator-a"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    lap(t0, "operator-a kept the lease for longer than its duration");
    let stopped = Instant::now();
    let status = c.fleet.operator_mut("operator-a").terminate();
    assert!(status.success(), "operator-a exited with {status}");
    assert!(
        c.fleet
            .operator("operator-a")
            .log()
            .contains("released the lease"),
        "operator-a did not release the lease"
    );
    lap(t0, "operator-a stopped by SIGTERM, lease released");
    eventually!(
        "operator-b to take the lease",
        SETTLE,
        (lease_holder(&c.cluster).as_deref() == Some("operator-b")).then_some(())
    );
    lap(
        t0,
        &format!(
            "operator-b holds the lease, {:.1} s after the SIGTERM",
            stopped.elapsed().as_secs_f64()
        ),
    );
    let lease = get_json(&c.cluster, &["get", "lease", LEASE, "-n", NS]);
    assert_eq!(
        lease["spec"]["leaseTransitions"].as_i64(),
        Some(transitions + 1),
        "{lease:#}"
    );
    eventually!(
        "operator-b to report itself leader",
        SETTLE,
        (c.fleet
            .operator("operator-b")
            .metric("podfleet_operator_leader")
            == Some(1.0))
        .then_some(())
    );
    // operator-b acts: rpi-02 comes back into site=lyon.
    must(kubectl(
        &c.cluster,
        &["label", "device", "rpi-02", "site=lyon", "--overwrite"],
    ));
    eventually!(
        "rpi-02 to run web again",
        SETTLE,
        (c.fleet.running("rpi-02", "web").len() == 1).then_some(())
    );
    eventually!("web to run on 3 devices", SETTLE, {
        fleet_deployment(&c.cluster)
            .filter(|fd| fd["status"]["running"] == 3 && fd["status"]["targeted"] == 3)
            .map(drop)
    });
    eventually!("an event from operator-b", SETTLE, {
        let events = get_json(&c.cluster, &["get", "events.events.k8s.io", "-n", NS]);
        events["items"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["reportingInstance"] == "operator-b")
            .then_some(())
    });
    lap(t0, "operator-b acted on a relabel: web on 3 devices");
}

async fn deletion(c: &mut Ctx) {
    let t0 = Instant::now();
    let nats_url = c.fleet.nats.url();
    let keys = desired_keys(&nats_url, "web").await;
    assert_eq!(keys, ["rpi-01.web", "rpi-02.web", "rpi-03.web"]);
    // With NATS away the keys cannot be deleted: the object must stay.
    c.fleet.nats.stop();
    must(kubectl(
        &c.cluster,
        &["delete", "fleetdeployment", "web", "-n", NS, "--wait=false"],
    ));
    lap(t0, "nats-server stopped; web deleted (kubectl delete)");
    eventually!("the operator to report the teardown pending", SETTLE, {
        c.fleet
            .operator("operator-b")
            .log()
            .contains("desired keys are still in NATS")
            .then_some(())
    });
    let fd = fleet_deployment(&c.cluster)
        .unwrap_or_else(|| panic!("web went while its desired keys could not be deleted"));
    assert!(fd["metadata"]["deletionTimestamp"].is_string(), "{fd:#}");
    assert_eq!(
        fd["metadata"]["finalizers"],
        serde_json::json!([FINALIZER]),
        "{fd:#}"
    );
    for id in ["rpi-01", "rpi-02", "rpi-03"] {
        assert_eq!(c.fleet.running(id, "web").len(), 1, "{id} still runs web");
    }
    lap(
        t0,
        "the teardown is pending: web stays, with its finalizer; the devices run on",
    );
    c.fleet.nats.resume();
    eventually!(
        "web to go once nats-server is back",
        SETTLE,
        fleet_deployment(&c.cluster).is_none().then_some(())
    );
    lap(t0, "nats-server back: web is gone");
    assert_eq!(
        desired_keys(&nats_url, "web").await,
        Vec::<String>::new(),
        "desired keys left after the finalizer was released"
    );
    for id in ["rpi-01", "rpi-02", "rpi-03"] {
        eventually!(
            format!("{id} to have no web container"),
            SETTLE,
            c.fleet
                .device(id)
                .containers("web")
                .is_empty()
                .then_some(())
        );
    }
    lap(t0, "no desired key, no container left");
    eventually!("every Device status to list no deployment", SETTLE, {
        let devices = get_json(&c.cluster, &["get", "devices"]);
        devices["items"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|d| d["status"]["deploymentCount"] == 0)
            .then_some(())
    });
    let b = c.fleet.operator("operator-b");
    for phase in ["pending", "running", "failed"] {
        let series = format!("podfleet_operator_deployment_devices{{phase=\"{phase}\"}}");
        eventually!(
            format!("{series} to be 0 on operator-b once web is gone"),
            SETTLE,
            (b.metric(&series) == Some(0.0)).then_some(())
        );
    }
    lap(t0, "the Devices' statuses and /metrics forget web");
    let events = get_json(&c.cluster, &["get", "events.events.k8s.io", "-n", NS]);
    assert!(
        events["items"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["reason"] == "TornDown" && e["regarding"]["name"] == "web"),
        "no TornDown event: {events:#}"
    );
}

/// The desired keys of `deployment`, as the administrator reads them.
async fn desired_keys(url: &str, deployment: &str) -> Vec<String> {
    let client = async_nats::ConnectOptions::with_user_and_password(
        ADMIN_USER[0].into(),
        ADMIN_USER[1].into(),
    )
    .connect(url)
    .await
    .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    let store: kv::Store = async_nats::jetstream::new(client)
        .get_key_value(DESIRED_BUCKET)
        .await
        .unwrap_or_else(|e| panic!("no bucket {DESIRED_BUCKET}: {e}"));
    let suffix = format!(".{deployment}");
    let mut keys: Vec<String> = match store.keys().await {
        Ok(keys) => keys.filter_map(|k| async move { k.ok() }).collect().await,
        Err(e) => panic!("cannot list {DESIRED_BUCKET}: {e}"),
    };
    keys.retain(|k| k.ends_with(&suffix));
    keys.sort();
    keys
}

/// The FleetDeployment `web` as the administrator reads it, if it exists.
fn fleet_deployment(cluster: &Cluster) -> Option<Value> {
    let json = must(kubectl(
        cluster,
        &[
            "get",
            "fleetdeployment",
            "web",
            "-n",
            NS,
            "--ignore-not-found",
            "--show-managed-fields",
            "-o",
            "json",
        ],
    ));
    (!json.trim().is_empty()).then(|| parse_json(&json))
}

/// `(status, reason)` of the condition `type_` of a FleetDeployment.
fn condition(fd: &Value, type_: &str) -> (String, String) {
    fd["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_owned(),
                c["reason"].as_str().unwrap_or("").to_owned(),
            )
        })
        .unwrap_or_default()
}

/// The Lease's holder, if the Lease exists.
fn lease_holder(cluster: &Cluster) -> Option<String> {
    let json = must(kubectl(
        cluster,
        &[
            "get",
            "lease",
            LEASE,
            "-n",
            NS,
            "--ignore-not-found",
            "-o",
            "json",
        ],
    ));
    if json.trim().is_empty() {
        return None;
    }
    parse_json(&json)["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

/// `kubectl <args> -o json` as the administrator, parsed.
fn get_json(cluster: &Cluster, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    parse_json(&must(kubectl(cluster, &all)))
}

fn parse_json(json: &str) -> Value {
    serde_json::from_str(json).unwrap_or_else(|e| panic!("kubectl printed no JSON ({e}): {json}"))
}

/// `kubectl <args>` as the administrator: its stdout, or why it failed.
fn kubectl(cluster: &Cluster, args: &[&str]) -> Result<String, String> {
    answer(args, cluster.kubectl().args(args).output())
}

/// As [`kubectl`], with `stdin` fed to it.
fn kubectl_in(cluster: &Cluster, args: &[&str], stdin: &str) -> Result<String, String> {
    let child = cluster
        .kubectl()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let output = child.and_then(|mut child| {
        if let Some(mut pipe) = child.stdin.take() {
            pipe.write_all(stdin.as_bytes())?;
        }
        child.wait_with_output()
    });
    answer(args, output)
}

fn answer(args: &[&str], output: std::io::Result<Output>) -> Result<String, String> {
    let output = output.map_err(|e| format!("cannot run kubectl {}: {e}", args.join(" ")))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "kubectl {} failed ({}): {}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The value, or a panic (the scenario fails) with the error.
fn must(result: Result<String, String>) -> String {
    result.unwrap_or_else(|e| panic!("{e}"))
}

/// The documents of a kustomize stream without those of `kind`, and how
/// many were left out.
fn without_kind(stream: &str, kind: &str) -> (String, usize) {
    let line = format!("kind: {kind}");
    let mut kept = Vec::new();
    let mut dropped = 0;
    for document in stream.split("\n---\n") {
        if document.lines().any(|l| l == line) {
            dropped += 1;
        } else {
            kept.push(document);
        }
    }
    (kept.join("\n---\n"), dropped)
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A TCP port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("cannot find a free TCP port: {e}"))
}
