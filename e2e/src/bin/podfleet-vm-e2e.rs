//! `podfleet-vm-e2e`: the VM tier's scenarios, run by `cargo xtask e2e
//! --arch aarch64|x86_64` once it has built the agent for the guest and the
//! guest's image.
//!
//! It starts nats-server on the host with the shipped configuration
//! (deploy/nats/podfleet.conf), boots the guest, installs the agent the way
//! docs/operations.md tells a user to (binary, configuration, the systemd
//! unit, `--check-config`, `systemctl enable --now`), then runs the
//! scenarios in order. Each one checks the KV state and the guest's own
//! podman (`podman ps -a`, `podman inspect` over ssh). It stops at the first
//! failure, printing the agent's journal, and ends with a table of what
//! each step took.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::future::Future;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::{ConnectOptions, Event};
use e2e::agent::{reported, running, tokio_runtime, Broker, PsEntry};
use e2e::vm::{Accel, Arch, GuestImage, Vm, HOST_FROM_GUEST};
use e2e::{eventually, NatsServer, TEST_IMAGE};
use podfleet_agent::podman::PodmanRuntime;
use podfleet_core::wire::names::HEARTBEAT_BUCKET;
use podfleet_core::wire::{FailureCause, Phase};
use podfleet_testkit::conformance::{run_check, Fixture, CHECKS};
use serde_json::{json, Value};

const USAGE: &str = "usage: podfleet-vm-e2e --arch ARCH --kernel PATH --initrd PATH --disk PATH --ssh-key PATH --agent PATH --work DIR [--timing NAME=SECS]... [--keep]

  --arch ARCH      x86_64 or aarch64: the guest's architecture
  --kernel, --initrd, --disk
                   the guest image cargo xtask e2e built (raw ext4 root file system)
  --ssh-key PATH   the private key root's authorized_keys accepts
  --agent PATH     podfleet-agent built for ARCH
  --work DIR       logs (QEMU, console) go here
  --timing NAME=SECS
                   a step done before (build, image) for the closing table
  --keep           leave the guest running at the end (also PODFLEET_E2E_KEEP=1)";

const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/nats/podfleet.conf");
const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/systemd/podfleet-agent.service"
);
/// The device the guest is: its user in deploy/nats/podfleet.conf.
const DEVICE: &str = "rpi-01";
/// Another device of that file, whose keys the guest must never act on.
const OTHER: &str = "rpi-02";
/// How long a change may take to converge on the guest (TCG emulation of
/// another architecture is slow: starting a container takes seconds).
const SETTLE: Duration = Duration::from_secs(240);
/// The guest's memory.
const MEMORY_MIB: u32 = 2048;
/// Where the scenarios' bind-mounted files live in the guest.
const GUEST_DIR: &str = "/var/lib/podfleet-e2e";

#[derive(Debug)]
struct Options {
    image: GuestImage,
    agent: PathBuf,
    work: PathBuf,
    timings: Vec<(String, Duration)>,
    keep: bool,
}

fn main() -> ExitCode {
    let options = match parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("podfleet-vm-e2e: {message}\n{USAGE}");
            return ExitCode::from(64);
        }
    };
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("podfleet-vm-e2e: FAILED: {message}");
            ExitCode::FAILURE
        }
    }
}

fn parse(args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut values: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut arch = None;
    let mut timings = Vec::new();
    let mut keep = std::env::var("PODFLEET_E2E_KEEP").is_ok_and(|v| v == "1");
    let mut args = args;
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--arch" => arch = Some(value()?.parse::<Arch>()?),
            "--kernel" | "--initrd" | "--disk" | "--ssh-key" | "--agent" | "--work" => {
                let v = value()?;
                values.insert(arg.trim_start_matches("--").to_owned(), PathBuf::from(v));
            }
            "--timing" => {
                let v = value()?;
                let (name, secs) = v
                    .split_once('=')
                    .and_then(|(n, s)| Some((n.to_owned(), s.parse::<f64>().ok()?)))
                    .ok_or_else(|| format!("--timing {v:?}: expected NAME=SECONDS"))?;
                timings.push((name, Duration::from_secs_f64(secs)));
            }
            "--keep" => keep = true,
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    let mut take = |name: &str| {
        let path = values
            .remove(name)
            .ok_or_else(|| format!("--{name} is required"))?;
        if name != "work" && !path.exists() {
            return Err(format!("--{name} {}: no such file", path.display()));
        }
        Ok::<_, String>(path)
    };
    Ok(Options {
        image: GuestImage {
            arch: arch.ok_or("--arch is required")?,
            kernel: take("kernel")?,
            initrd: take("initrd")?,
            disk: take("disk")?,
            ssh_key: take("ssh-key")?,
        },
        agent: take("agent")?,
        work: take("work")?,
        timings,
        keep,
    })
}

/// One row of the closing table.
struct Row {
    name: String,
    took: Duration,
    outcome: &'static str,
}

/// What the scenarios share.
struct Ctx<'a> {
    vm: &'a mut Vm,
    nats: &'a mut NatsServer,
    admin: &'a Broker,
}

type Scenario = for<'a, 'b> fn(&'a mut Ctx<'b>) -> Pin<Box<dyn Future<Output = ()> + 'a>>;

/// The scenarios, in the order they run (each may rely on the ones before
/// having left the guest clean).
const SCENARIOS: [(&str, Scenario); 6] = [
    ("ping", |c| Box::pin(ping(c))),
    ("isolation", |c| Box::pin(isolation(c))),
    ("deploy lifecycle", |c| Box::pin(lifecycle(c))),
    ("podman conformance", |c| Box::pin(conformance(c))),
    ("reboot", |c| Box::pin(reboot(c))),
    ("offline autonomy", |c| Box::pin(offline(c))),
];

fn run(options: &Options) -> Result<(), String> {
    let arch = options.image.arch;
    let accel = Accel::detect(arch)?;
    let mut rows: Vec<Row> = options
        .timings
        .iter()
        .map(|(name, took)| Row {
            name: name.clone(),
            took: *took,
            outcome: "ok",
        })
        .collect();
    let rt = tokio_runtime();
    let mut nats = NatsServer::start_with_config(CONFIG);
    let admin = rt.block_on(Broker::connect(
        &nats.url(),
        ConnectOptions::with_user_and_password(
            "podfleet-operator".into(),
            "change-me-operator".into(),
        ),
    ));
    step(&format!("boot {arch} guest ({accel}) to ssh"));
    let started = Instant::now();
    let mut vm = Vm::boot(&options.image, &options.work, accel, MEMORY_MIB)?;
    rows.push(Row {
        name: "boot to ssh".into(),
        took: started.elapsed(),
        outcome: "ok",
    });
    println!(
        "podfleet-vm-e2e: guest up: {}; podman {}; kernel {}",
        vm.sh(". /etc/os-release && echo \"$PRETTY_NAME\"")?,
        vm.sh("podman version --format '{{.Server.Version}}'")?,
        vm.sh("uname -rm")?
    );
    let started = Instant::now();
    step("install the agent as docs/operations.md says");
    let mut failure = install(&vm, &options.agent, nats.port())
        .err()
        .map(|e| format!("install: {e}"));
    rows.push(Row {
        name: "install".into(),
        took: started.elapsed(),
        outcome: if failure.is_some() { "FAILED" } else { "ok" },
    });

    for (name, scenario) in SCENARIOS {
        if failure.is_some() {
            rows.push(Row {
                name: name.into(),
                took: Duration::ZERO,
                outcome: "not run",
            });
            continue;
        }
        step(&format!("scenario: {name}"));
        let started = Instant::now();
        let mut ctx = Ctx {
            vm: &mut vm,
            nats: &mut nats,
            admin: &admin,
        };
        let result = panic::catch_unwind(AssertUnwindSafe(|| rt.block_on(scenario(&mut ctx))));
        let took = started.elapsed();
        let outcome = if let Err(payload) = result {
            let why = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "a panic without a message".into());
            failure = Some(format!("scenario {name}: {why}"));
            "FAILED"
        } else {
            "ok"
        };
        println!(
            "podfleet-vm-e2e: {name}: {outcome} in {:.1} s",
            took.as_secs_f64()
        );
        rows.push(Row {
            name: name.into(),
            took,
            outcome,
        });
    }
    if failure.is_some() {
        nats.resume();
        println!("--- the agent's journal in the guest (last 120 lines) ---");
        match vm.sh("journalctl -u podfleet-agent --no-pager -n 120") {
            Ok(journal) => println!("{journal}"),
            Err(e) => println!("(cannot read it: {e})"),
        }
        println!(
            "--- the guest's console (last 30 lines) ---\n{}",
            vm.console_tail(30)
        );
    }
    println!("{}", table(arch, accel, &rows));
    // The count CI adds to the test suite's: the scenarios.
    let scenarios = &rows[rows.len() - SCENARIOS.len()..];
    let passed = scenarios.iter().filter(|r| r.outcome == "ok").count();
    println!(
        "vm-{arch}: {passed} passed, {} failed",
        scenarios.len() - passed
    );
    if options.keep {
        println!("podfleet-vm-e2e: PODFLEET_E2E_KEEP: {}", vm.keep());
    }
    drop(vm);
    failure.map_or(Ok(()), Err)
}

/// Prints how far into a scenario `what` was reached.
fn lap(since: Instant, what: &str) {
    println!("  {:>6.1} s  {what}", since.elapsed().as_secs_f64());
}

fn step(what: &str) {
    println!("podfleet-vm-e2e: {what}");
}

fn table(arch: Arch, accel: Accel, rows: &[Row]) -> String {
    let mut out = format!("\ntimings ({arch}, {accel}):\n");
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

/// Installs the agent in the guest as docs/operations.md section 2 tells a
/// user to, with a configuration for device [`DEVICE`] that reaches the
/// host's nats-server, and builds the test image in the guest from its own
/// busybox-static (there is no registry).
fn install(vm: &Vm, agent: &Path, nats_port: u16) -> Result<(), String> {
    let t0 = Instant::now();
    vm.copy_in(agent, "/usr/local/bin/podfleet-agent", "0755")?;
    vm.sh("install -d -m 0750 /etc/podfleet")?;
    let config = format!(
        "device_id = \"{DEVICE}\"\n\
         nats_urls = [\"nats://{HOST_FROM_GUEST}:{nats_port}\"]\n\
         nats_user = \"{DEVICE}\"\n\
         nats_password = \"change-me-{DEVICE}\"\n\
         # The operator made the buckets; a device may not.\n\
         nats_create_buckets = false\n\
         state_dir = \"/var/lib/podfleet\"\n\
         tick_interval = \"5s\"\n\
         heartbeat_interval = \"5s\"\n\
         restart_backoff_initial = \"2s\"\n\
         allow_exec = false\n"
    );
    vm.write("/etc/podfleet/agent.toml", "0640", config.as_bytes())?;
    lap(t0, "binary copied");
    vm.sh("podfleet-agent --config /etc/podfleet/agent.toml --check-config")?;
    vm.copy_in(
        Path::new(UNIT),
        "/etc/systemd/system/podfleet-agent.service",
        "0644",
    )?;
    // systemd ignores what it does not understand with a warning only:
    // the unit must draw none.
    let verify = vm.run("systemd-analyze verify podfleet-agent.service 2>&1")?;
    let said = String::from_utf8_lossy(&verify.stdout);
    if said.contains("podfleet-agent.service:") || !verify.status.success() {
        return Err(format!(
            "systemd-analyze verify objects to the unit:\n{said}"
        ));
    }
    lap(t0, "configuration checked, unit verified");
    // The test image, made as e2e::test_image makes it on the host: the
    // guest's own static busybox on scratch, its applets installed as
    // symlinks by a `RUN` of busybox itself, `sh` as the command.
    vm.sh(&format!(
        "set -e; podman image exists {TEST_IMAGE} && exit 0; d=$(mktemp -d); \
         cp /bin/busybox $d/busybox; \
         printf 'FROM scratch\\nCOPY busybox /bin/busybox\\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\\nCMD [\"sh\"]\\n' > $d/Containerfile; \
         podman build --quiet --pull=never --tag {TEST_IMAGE} $d >/dev/null; rm -r $d"
    ))?;
    lap(t0, "test image built");
    vm.sh(&format!("install -d {GUEST_DIR}/signals {GUEST_DIR}/work"))?;
    vm.sh(
        "systemctl enable --now podman.socket && systemctl daemon-reload && \
         systemctl enable --now podfleet-agent && systemctl is-active podfleet-agent",
    )?;
    Ok(())
}

/// The guest's containers of `deployment`, as its podman lists them.
fn guest_ps(vm: &Vm, deployment: &str) -> Vec<PsEntry> {
    let out = vm
        .sh(&format!(
            "podman ps --all --format json --filter label=io.podfleet.deployment={deployment}"
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("podman ps said something else than JSON ({e}): {out}"))
}

/// Every podfleet deployment the guest's podman has a container of.
fn guest_deployments(vm: &Vm) -> BTreeSet<String> {
    let out = vm
        .sh("podman ps --all --filter label=io.podfleet.deployment --format '{{index .Labels \"io.podfleet.deployment\"}}'")
        .unwrap_or_else(|e| panic!("{e}"));
    out.lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect()
}

fn guest_inspect(vm: &Vm, container: &str, format: &str) -> String {
    vm.sh(&format!("podman inspect --format '{format}' {container}"))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A service that runs until SIGTERM, which ends it within half a second
/// (a bare `sleep` as PID 1 would ignore it, and every stop would wait out
/// the grace period).
fn sleeper(name: &str) -> Value {
    json!({
        "name": name,
        "image": TEST_IMAGE,
        "args": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.5; done"],
    })
}

/// A service that appends `TERM <hostname>` (podman's short id) to the
/// guest's signal log when SIGTERM stops it.
fn trapping(name: &str, env: &Value) -> Value {
    json!({
        "name": name,
        "image": TEST_IMAGE,
        "args": ["sh", "-c", "trap 'echo TERM $(hostname) >> /signals/log; exit 0' TERM; echo ready; while true; do sleep 0.2; done"],
        "env": env,
        "volumes": [{"source": format!("{GUEST_DIR}/signals"), "target": "/signals"}],
    })
}

fn init(name: &str, script: &str) -> Value {
    json!({
        "name": name,
        "image": TEST_IMAGE,
        "args": ["sh", "-c", script],
        "volumes": [{"source": format!("{GUEST_DIR}/work"), "target": "/work"}],
        "timeout": 120,
    })
}

fn lifecycle_policy() -> Value {
    json!({"stop_signal": "SIGTERM", "grace_period_secs": 20})
}

async fn ping(c: &mut Ctx<'_>) {
    let arch = c.vm.arch().name();
    let podman =
        c.vm.sh("podman version --format '{{.Server.Version}}'")
            .unwrap_or_else(|e| panic!("{e}"));
    let heartbeat = eventually!("a heartbeat with the guest's facts", SETTLE, {
        c.admin
            .heartbeat(DEVICE)
            .await
            .filter(|h| h.runtime_version.is_some())
    });
    assert_eq!(heartbeat.arch, arch, "{heartbeat:?}");
    assert!(
        heartbeat.os.starts_with("Debian GNU/Linux"),
        "{heartbeat:?}"
    );
    assert_eq!(
        heartbeat.runtime_version.as_deref(),
        Some(podman.as_str()),
        "{heartbeat:?}"
    );
    let kernel = c.vm.sh("uname -r").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(heartbeat.kernel, kernel, "{heartbeat:?}");
    let reply = c.admin.command(DEVICE, "ping", "").await;
    assert_eq!(reply["ok"]["device_id"], json!(DEVICE), "{reply}");
    assert_eq!(
        reply["ok"]["agent_version"],
        json!(env!("CARGO_PKG_VERSION")),
        "{reply}"
    );
    assert!(reply["ok"]["uptime_s"].is_u64(), "{reply}");
    println!(
        "  ping: {}; heartbeat: {} on {}, kernel {}, podman {}",
        reply["ok"], heartbeat.arch, heartbeat.os, heartbeat.kernel, podman
    );
}

async fn isolation(c: &mut Ctx<'_>) {
    let score = json!({"services": [sleeper("main")]}).to_string();
    c.admin.put(OTHER, "iso-theirs", score.clone()).await;
    let rev = c.admin.put(DEVICE, "iso-mine", score).await;
    let state = c
        .admin
        .wait_state(DEVICE, "iso-mine", SETTLE, |s| {
            s.phase == Phase::Running && s.revision == rev
        })
        .await;
    assert_eq!(running(&guest_ps(c.vm, "iso-mine")), reported(&state));
    // The guest's agent has acted on its own key since the other was put:
    // it never acts on the other's.
    assert_eq!(
        guest_deployments(c.vm),
        BTreeSet::from(["iso-mine".to_owned()]),
        "the guest runs only its own deployment"
    );
    assert!(c.admin.state(OTHER, "iso-theirs").await.is_none());

    // The guest's credentials, from here: every reach for the other
    // device's keys and subjects is refused by the server.
    let refusals = Arc::new(Mutex::new(BTreeSet::<String>::new()));
    let seen = refusals.clone();
    let client =
        ConnectOptions::with_user_and_password(DEVICE.into(), format!("change-me-{DEVICE}"))
            .custom_inbox_prefix(format!("_INBOX.{DEVICE}"))
            .event_callback(move |event| {
                let seen = seen.clone();
                async move {
                    if let Event::ServerError(error) = event {
                        let text = error.to_string();
                        if let Some((_, what)) = text.split_once("Permissions Violation for ") {
                            seen.lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .insert(what.to_owned());
                        }
                    }
                }
            })
            .connect(c.nats.url())
            .await
            .unwrap_or_else(|e| panic!("{DEVICE}'s credentials are refused at connect: {e}"));
    let theirs_state = format!("$KV.podfleet-state.{OTHER}.iso-theirs");
    let theirs_desired = format!("$KV.podfleet-desired.{OTHER}.iso-theirs");
    let theirs_commands = format!("device-commands.{OTHER}.ping");
    for subject in [&theirs_state, &theirs_desired] {
        client
            .publish(subject.clone(), "{}".into())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let _subscription = client
        .subscribe(theirs_commands.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    client.flush().await.unwrap_or_else(|e| panic!("{e}"));
    let expected = BTreeSet::from([
        format!("Publish to \"{theirs_state}\""),
        format!("Publish to \"{theirs_desired}\""),
        format!("Subscription to \"{theirs_commands}\""),
    ]);
    let refused = || {
        refusals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    };
    eventually!(
        "the server to refuse rpi-01 on rpi-02's subjects",
        Duration::from_secs(10),
        { expected.is_subset(&refused()).then_some(()) }
    );
    assert_eq!(refused(), expected);
    assert!(
        c.admin.state(OTHER, "iso-theirs").await.is_none(),
        "nothing was written"
    );

    c.admin.delete(OTHER, "iso-theirs").await;
    c.admin.delete(DEVICE, "iso-mine").await;
    eventually!("iso-mine's teardown", SETTLE, {
        c.admin
            .state(DEVICE, "iso-mine")
            .await
            .is_none()
            .then_some(())
    });
    assert_eq!(guest_ps(c.vm, "iso-mine"), Vec::new());
}

async fn lifecycle(c: &mut Ctx<'_>) {
    let t0 = Instant::now();
    let dep = "shop";
    let env1 = json!({"MODE": "one"});
    // v1: an init container prepares, then web (env) and worker run.
    let v1 = json!({
        "init_containers": [init("prepare", "echo prepared > /work/ready")],
        "services": [trapping("web", &env1), sleeper("worker")],
        "lifecycle": lifecycle_policy(),
    });
    let rev1 = c.admin.put(DEVICE, dep, v1.to_string()).await;
    let state = c
        .admin
        .wait_state(DEVICE, dep, SETTLE, |s| {
            s.phase == Phase::Running && s.revision == rev1
        })
        .await;
    let ps = guest_ps(c.vm, dep);
    assert_eq!(
        running(&ps),
        reported(&state),
        "podman runs what is reported: {ps:#?}"
    );
    assert!(
        ps.iter().all(|p| !p.is_init()),
        "init containers removed: {ps:#?}"
    );
    assert_eq!(
        c.vm.sh(&format!("cat {GUEST_DIR}/work/ready"))
            .unwrap_or_else(|e| panic!("{e}")),
        "prepared"
    );
    let web1 = state.container_ids["web"].clone();
    let worker1 = state.container_ids["worker"].clone();
    let env = guest_inspect(c.vm, &web1, "{{range .Config.Env}}{{.}} {{end}}");
    assert!(env.contains("MODE=one"), "{env}");

    lap(t0, "v1 running");
    // v2: web's env changes; the old web is stopped by id with SIGTERM.
    let v2 = json!({
        "init_containers": [init("prepare", "echo prepared > /work/ready")],
        "services": [trapping("web", &json!({"MODE": "two"})), sleeper("worker")],
        "lifecycle": lifecycle_policy(),
    });
    let rev2 = c.admin.put(DEVICE, dep, v2.to_string()).await;
    let state = c
        .admin
        .wait_state(DEVICE, dep, SETTLE, |s| {
            s.phase == Phase::Running && s.revision == rev2
        })
        .await;
    let web2 = state.container_ids["web"].clone();
    assert_ne!(web2, web1, "web was replaced");
    assert_eq!(
        state.container_ids["worker"], worker1,
        "worker did not change"
    );
    let signals =
        c.vm.sh(&format!("cat {GUEST_DIR}/signals/log"))
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        signals,
        format!("TERM {}", &web1[..12]),
        "the old web got SIGTERM"
    );
    let ps = guest_ps(c.vm, dep);
    assert_eq!(running(&ps), reported(&state));
    assert_eq!(ps.len(), 2, "the old web is gone: {ps:#?}");
    let env = guest_inspect(c.vm, &web2, "{{range .Config.Env}}{{.}} {{end}}");
    assert!(env.contains("MODE=two"), "{env}");
    let started = guest_inspect(c.vm, &web2, "{{.State.StartedAt}}");

    lap(t0, "v2 running, the old web stopped");
    // v3: a failing init container fails the revision; v2 keeps running
    // (roll forward only).
    let v3 = json!({
        "init_containers": [init("migrate", "echo cannot migrate; exit 3")],
        "services": [trapping("web", &json!({"MODE": "three"})), sleeper("worker")],
        "lifecycle": lifecycle_policy(),
    });
    let rev3 = c.admin.put(DEVICE, dep, v3.to_string()).await;
    let state = c
        .admin
        .wait_state(DEVICE, dep, SETTLE, |s| {
            s.phase == Phase::Failed && s.revision == rev3
        })
        .await;
    assert!(
        matches!(&state.cause, Some(FailureCause::InitContainerExited { name, exit_code: 3 }) if name == "migrate"),
        "{state:#?}"
    );
    let services: BTreeSet<(String, String)> = guest_ps(c.vm, dep)
        .iter()
        .filter(|p| !p.is_init() && p.state == "running")
        .map(|p| (p.service().to_owned(), p.id.clone()))
        .collect();
    assert_eq!(
        services,
        BTreeSet::from([
            ("web".to_owned(), web2.clone()),
            ("worker".to_owned(), worker1.clone())
        ]),
        "v2's containers run on"
    );
    assert_eq!(
        guest_inspect(c.vm, &web2, "{{.State.StartedAt}}"),
        started,
        "web2 untouched"
    );

    lap(t0, "v3 failed, v2 running on");
    // Delete: nothing is left.
    c.admin.delete(DEVICE, dep).await;
    eventually!("the state to be cleared", SETTLE, {
        c.admin.state(DEVICE, dep).await.is_none().then_some(())
    });
    assert_eq!(guest_ps(c.vm, dep), Vec::new());
    let signals =
        c.vm.sh(&format!("cat {GUEST_DIR}/signals/log"))
            .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        signals.contains(&format!("TERM {}", &web2[..12])),
        "{signals}"
    );
}

/// The runtime conformance suite, run here against the guest's own podman
/// through its API socket forwarded over ssh: the adapter the agent uses,
/// held to the same behaviour on the guest's podman as on the host's.
async fn conformance(c: &mut Ctx<'_>) {
    // The agent would see the suite's containers come and go; it rests
    // meanwhile (its containers run on: KillMode=process).
    c.vm.sh("systemctl stop podfleet-agent")
        .unwrap_or_else(|e| panic!("{e}"));
    let socket =
        std::env::temp_dir().join(format!("podfleet-vm-podman-{}.sock", std::process::id()));
    let mut forward =
        c.vm.forward_socket(&socket, "/run/podman/podman.sock")
            .unwrap_or_else(|e| panic!("{e}"));
    let fixture = Fixture {
        image: TEST_IMAGE.to_owned(),
        missing_image: "localhost/podfleet-test:does-not-exist".to_owned(),
        prefix: "pfconf".to_owned(),
        pause: |d| Box::pin(tokio::time::sleep(d)),
    };
    let runtime = PodmanRuntime::connect(&socket)
        .await
        .unwrap_or_else(|e| panic!("cannot reach the guest's podman: {e}"));
    println!("  the guest's podman API version {}", runtime.api_version());
    let mut failed = Vec::new();
    for &check in CHECKS {
        let started = Instant::now();
        let result = tokio::time::timeout(
            Duration::from_secs(120),
            run_check(&runtime, &fixture, check),
        )
        .await
        .unwrap_or_else(|_| Some(Err("no answer within 120 s".to_owned())));
        let took = started.elapsed();
        match result {
            Some(Ok(())) => println!("  ok    {check} ({took:.1?})"),
            Some(Err(why)) => {
                println!("  FAIL  {check} ({took:.1?}): {why}");
                failed.push((check, why));
            }
            None => panic!("the suite does not know its own check {check}"),
        }
    }
    let _ = forward.kill();
    let _ = forward.wait();
    let _ = std::fs::remove_file(&socket);
    c.vm.sh("systemctl start podfleet-agent")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        failed.is_empty(),
        "the guest's podman disagrees with the suite: {failed:#?}"
    );
}

/// Puts a two-service deployment and waits for it to run; returns its
/// revision and reported container ids.
async fn steady(c: &mut Ctx<'_>, dep: &str, mode: &str) -> (u64, BTreeSet<(String, String)>) {
    let score = json!({
        "services": [trapping("web", &json!({"MODE": mode})), sleeper("worker")],
        "lifecycle": lifecycle_policy(),
    });
    let rev = c.admin.put(DEVICE, dep, score.to_string()).await;
    let state = c
        .admin
        .wait_state(DEVICE, dep, SETTLE, |s| {
            s.phase == Phase::Running && s.revision == rev
        })
        .await;
    let ids = reported(&state);
    assert_eq!(running(&guest_ps(c.vm, dep)), ids);
    (rev, ids)
}

async fn reboot(c: &mut Ctx<'_>) {
    let dep = "steady";
    let (rev, ids) = steady(c, dep, "one").await;
    let before = Instant::now();
    c.vm.reboot().unwrap_or_else(|e| panic!("{e}"));
    println!("  rebooted in {:.1} s", before.elapsed().as_secs_f64());
    // A heartbeat put after the guest came back is from the agent this
    // boot started.
    let back = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let heartbeats = async_nats::jetstream::new(c.admin.client.clone())
        .get_key_value(HEARTBEAT_BUCKET)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eventually!("a heartbeat from the rebooted guest's agent", SETTLE, {
        heartbeats
            .entry(DEVICE)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .filter(|e| u64::try_from(e.created.unix_timestamp()).is_ok_and(|t| t > back))
    });
    // The agent adopts what it finds: the same containers, running again.
    eventually!("the deployment's containers running again", SETTLE, {
        (running(&guest_ps(c.vm, dep)) == ids).then_some(())
    });
    let state = c
        .admin
        .wait_state(DEVICE, dep, SETTLE, |s| s.phase == Phase::Running)
        .await;
    assert_eq!(state.revision, rev, "the same revision");
    assert_eq!(reported(&state), ids, "nothing was recreated");
    assert_eq!(
        c.vm.sh("systemctl is-enabled podfleet-agent")
            .unwrap_or_else(|e| panic!("{e}")),
        "enabled"
    );
}

async fn offline(c: &mut Ctx<'_>) {
    let dep = "steady";
    let state = c
        .admin
        .wait_state(DEVICE, dep, SETTLE, |s| s.phase == Phase::Running)
        .await;
    let ids = reported(&state);
    c.nats.stop();
    println!("  nats-server stopped");
    // Offline, the agent still runs its workload: a worker killed behind
    // its back is restarted, with no broker to tell it.
    let worker = state.container_ids["worker"].clone();
    c.vm.sh(&format!("podman kill {worker} >/dev/null"))
        .unwrap_or_else(|e| panic!("{e}"));
    eventually!("the killed worker running again while offline", SETTLE, {
        guest_ps(c.vm, dep)
            .iter()
            .any(|p| p.service() == "worker" && p.state == "running")
            .then_some(())
    });
    tokio::time::sleep(Duration::from_secs(10)).await;
    let ps = guest_ps(c.vm, dep);
    let web = ps
        .iter()
        .find(|p| p.service() == "web")
        .map(|p| (p.id.clone(), p.state.clone()));
    assert!(
        ids.iter()
            .any(|(s, id)| s == "web" && web == Some((id.clone(), "running".to_owned()))),
        "web ran on untouched: {ps:#?}"
    );
    assert_eq!(
        c.vm.sh("systemctl is-active podfleet-agent")
            .unwrap_or_else(|e| panic!("{e}")),
        "active"
    );
    c.nats.resume();
    c.admin.wait_connected().await;
    println!("  nats-server back");
    // A change made now is applied.
    let (_, after) = steady(c, dep, "two").await;
    assert_ne!(after, ids, "web was replaced by the new revision");
    c.admin.delete(DEVICE, dep).await;
    eventually!("steady's teardown", SETTLE, {
        c.admin.state(DEVICE, dep).await.is_none().then_some(())
    });
    assert_eq!(guest_ps(c.vm, dep), Vec::new());
}
