//! `cargo xtask demo`: a fleet of three simulated devices on this machine,
//! narrated step by step for a newcomer.
//!
//! Real processes, nothing faked: one nats-server with JetStream, `podfleet
//! controller`, and one `podfleet-agent` per device, each device a podman
//! store of its own (its own `--root`, so the devices' containers never
//! mix). Everything is done through the `podfleet` CLI, printed before it
//! runs, so the output is also a script to copy.
//!
//! It runs until Ctrl-C (or `--exit-after-upgrade`, for the smoke test),
//! then removes the containers, the stores and the servers.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use e2e::agent::tokio_runtime;
use e2e::fleet::{Binaries, Fleet, Podfleet};
use e2e::{demo_image, TEST_IMAGE};

const USAGE: &str = "usage: podfleet-demo [--exit-after-upgrade] [--podfleet PATH] [--agent PATH]

  --exit-after-upgrade  stop and tear down after the upgrade instead of waiting for Ctrl-C
  --podfleet PATH       the podfleet binary (default: podfleet-e2e beside this program)
  --agent PATH          the podfleet-agent binary (default: podfleet-agent-e2e beside this program)";

/// The devices: id and site.
const DEVICES: [(&str, &str); 3] = [("rpi-01", "lyon"), ("rpi-02", "lyon"), ("rpi-03", "paris")];

/// How long the devices may take to say hello, and a rollout to finish.
const WAIT: Duration = Duration::from_secs(120);

#[derive(Debug, Default)]
struct Options {
    exit_after_upgrade: bool,
    podfleet: Option<PathBuf>,
    agent: Option<PathBuf>,
}

fn parse(args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut options = Options::default();
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--exit-after-upgrade" => options.exit_after_upgrade = true,
            "--podfleet" | "--agent" => {
                let path = args
                    .next()
                    .map(PathBuf::from)
                    .ok_or_else(|| format!("{arg} needs a path"))?;
                if arg == "--podfleet" {
                    options.podfleet = Some(path);
                } else {
                    options.agent = Some(path);
                }
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    Ok(options)
}

fn main() -> ExitCode {
    let options = match parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) if message.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("podfleet-demo: {message}\n{USAGE}");
            return ExitCode::from(64);
        }
    };
    catch_signals();
    match demo(&options) {
        Ok(()) => ExitCode::SUCCESS,
        // Interrupted before the end: the shell's convention for SIGINT.
        Err(_) if STOP.load(Ordering::SeqCst) => ExitCode::from(130),
        Err(message) => {
            eprintln!("\npodfleet-demo: {message}");
            ExitCode::FAILURE
        }
    }
}

/// A numbered section title.
fn step(number: u32, title: &str) {
    println!("\n\x20== {number}. {title} ==\n");
}

/// Narration, indented.
fn say(text: &str) {
    for line in text.lines() {
        if line.is_empty() {
            println!();
        } else {
            println!("   {line}");
        }
    }
}

/// Prints `$ podfleet args...` and runs it with its output on ours;
/// fails unless it exits 0.
fn run(cli: &Podfleet, args: &[&str]) -> Result<(), String> {
    interrupted()?;
    show(args);
    let status = cli
        .command(args)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", cli.binary().display()))?;
    interrupted()?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "`podfleet {}` exited with {status}",
            args.join(" ")
        ))
    }
}

fn show(args: &[&str]) {
    println!("\n$ podfleet {}", args.join(" "));
}

/// The demo's manifest: the web server on the devices of the lyon site,
/// after an init container.
fn manifest(image: &str) -> String {
    format!(
        r#"# A fleet deployment: what runs (the score) and where (the target).
apiVersion: podfleet.io/v1alpha1
kind: FleetDeployment
metadata:
  name: web
spec:
  target:
    selector: "site=lyon"          # every device labelled site=lyon
  score:
    init_containers:               # run to completion before the services start
      - name: prepare
        image: {TEST_IMAGE}
        args: ["true"]
    services:
      - name: web                  # busybox httpd serving /www on port 8080
        image: {image}
    lifecycle:
      grace_period_secs: 2         # httpd runs as PID 1 and ignores SIGTERM
"#
    )
}

/// Waits until every demo device has sent a heartbeat, reading
/// `podfleet get devices -o json` quietly.
fn wait_for_devices(cli: &Podfleet) -> Result<(), String> {
    let deadline = Instant::now() + WAIT;
    loop {
        interrupted()?;
        let run = cli.run(&["get", "devices", "-o", "json"]);
        let online = serde_json::from_str::<serde_json::Value>(&run.stdout)
            .ok()
            .and_then(|list| {
                list["items"].as_array().map(|items| {
                    items
                        .iter()
                        .filter(|i| i["status"]["phase"] == "Online")
                        .count()
                })
            })
            .unwrap_or(0);
        if online == DEVICES.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the devices did not all send a heartbeat within {WAIT:?}:\n{run}"
            ));
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// `podfleet get deployments -w` on our output while `rollout status`
/// waits quietly; the watch is stopped a moment after the rollout ends.
fn watch_rollout(cli: &Podfleet) -> Result<(), String> {
    show(&["get", "deployments", "-w"]);
    let mut watch = cli
        .command(&["get", "deployments", "-w"])
        .stdout(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", cli.binary().display()))?;
    let rollout = cli.run(&["rollout", "status", "web", "--timeout", "120s"]);
    // One more round of the watch, so it prints the final row.
    thread::sleep(Duration::from_millis(1500));
    let _ = watch.kill();
    let _ = watch.wait();
    interrupted()?;
    if rollout.code() == Some(0) {
        say("\n(the demo stopped the watch; by hand, Ctrl-C stops it)");
        Ok(())
    } else {
        Err(format!("the rollout did not complete:\n{rollout}"))
    }
}

fn demo(options: &Options) -> Result<(), String> {
    let binaries = match (&options.podfleet, &options.agent) {
        (Some(podfleet), Some(agent)) => Binaries {
            podfleet: podfleet.clone(),
            agent: agent.clone(),
        },
        (podfleet, agent) => {
            let mut binaries = Binaries::beside_current_exe()?;
            if let Some(podfleet) = podfleet {
                binaries.podfleet.clone_from(podfleet);
            }
            if let Some(agent) = agent {
                binaries.agent.clone_from(agent);
            }
            binaries
        }
    };
    let started = Instant::now();
    println!(
        "podfleet demo: a fleet of three devices on this machine\n\
         ========================================================\n"
    );
    say(
        "podfleet runs containers on fleets of edge devices. You describe a workload once\n\
         (a FleetDeployment) and pick devices by their labels; a controller works out what\n\
         every device should run and writes it to NATS JetStream; an agent on each device\n\
         makes podman run exactly that and reports back.\n\
         \n\
         Here every part runs for real on this machine: one nats-server, the controller,\n\
         and three agents, each with a podman store of its own standing in for a device.",
    );

    step(1, "Container images");
    say(&format!(
        "Nothing is pulled from a registry: the images are built locally, FROM the\n\
         busybox test image ({TEST_IMAGE}), once."
    ));
    let images = [demo_image(1), demo_image(2)];
    interrupted()?;
    say(&format!(
        "\n{}  busybox httpd serving \"podfleet demo v1\" on port 8080\n\
         {}  the same, saying \"podfleet demo v2\"",
        images[0], images[1]
    ));

    step(2, "The broker and the controller");
    let dir = tempfile::Builder::new()
        .prefix("podfleet-demo-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let mut fleet = Fleet::start_in(dir, &binaries, &images, &["--allow-exec"]);
    let result = walkthrough(&mut fleet, &binaries, &images, started, options);
    match &result {
        Ok(()) if options.exit_after_upgrade => say("--exit-after-upgrade: tearing down."),
        Ok(()) => say("Ctrl-C: tearing down."),
        Err(_) if STOP.load(Ordering::SeqCst) => say("\n\nCtrl-C: tearing down."),
        Err(_) => say("\nSomething went wrong (the reason follows): tearing down."),
    }
    fleet.kill_controller();
    drop(fleet);
    say("removed the containers, the device stores, the controller and nats-server.");
    result
}

/// Steps 2 to 6, on a fleet whose nats-server and controller run.
fn walkthrough(
    fleet: &mut Fleet,
    binaries: &Binaries,
    images: &[String; 2],
    started: Instant,
    options: &Options,
) -> Result<(), String> {
    let bin = fleet.dir().join("bin");
    fs::create_dir_all(&bin).map_err(|e| format!("cannot create {}: {e}", bin.display()))?;
    symlink(&binaries.podfleet, bin.join("podfleet"))
        .map_err(|e| format!("cannot link {}: {e}", bin.display()))?;
    let cli = fleet.cli().clone();
    let url = cli.server().to_owned();
    say(&format!(
        "nats-server -js -p {port}           the broker: JetStream KV buckets hold the\n\
         \x20                                         desired state, reports and heartbeats\n\
         podfleet controller --server {url}\n\
         \x20                                         the fleet controller; log: {log}\n\
         \n\
         In the commands below, `podfleet` is {podfleet}\n\
         (linked as {bin}/podfleet), with PODFLEET_SERVER={url}.",
        port = fleet.nats().port(),
        log = fleet.controller_log().display(),
        podfleet = binaries.podfleet.display(),
        bin = bin.display(),
    ));

    step(3, "Three devices");
    for (id, _) in DEVICES {
        let device = fleet.add_device(id, &[]);
        device.start_agent();
        let store = device
            .podman()
            .socket()
            .parent()
            .map_or_else(String::new, |p| p.display().to_string());
        say(&format!(
            "{id}: podfleet-agent --device-id {id} --nats-urls {url} --allow-exec ...\n\
             \x20       its podman store: {store}\n\
             \x20       its log: {}",
            device.agent_log().display()
        ));
    }
    wait_for_devices(&cli)?;
    say(
        "\nEach agent announces itself with a heartbeat every second. The controller now\n\
         knows three devices, without labels:",
    );
    run(&cli, &["get", "devices"])?;
    say("\nLabels say what a device is; deployments pick devices by label:");
    for (id, site) in DEVICES {
        run(&cli, &["label", "device", id, &format!("site={site}")])?;
    }
    run(&cli, &["get", "devices", "-o", "wide"])?;

    step(4, "Deploy");
    let file = fleet.dir().join("web.yaml");
    fs::write(&file, manifest(&images[0]))
        .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    let file_arg = file.display().to_string();
    say(&format!("The manifest, {}:\n", file.display()));
    say(&manifest(&images[0]));
    println!();
    say("A dry run shows which devices it would go to, without writing anything:");
    run(&cli, &["apply", "-f", &file_arg, "--dry-run"])?;
    run(&cli, &["apply", "-f", &file_arg])?;
    say(
        "\nThe controller writes the score to rpi-01's and rpi-02's desired state; their\n\
         agents run the init container, then start the service, and report back:",
    );
    watch_rollout(&cli)?;
    run(&cli, &["get", "devices"])?;
    say("\nrpi-03 (site=paris) runs nothing. Ask rpi-01's web server for its page, inside its container:");
    run(
        &cli,
        &[
            "exec",
            "rpi-01",
            "web",
            "web",
            "--",
            "wget",
            "-qO-",
            "http://127.0.0.1:8080/",
        ],
    )?;

    step(5, "Upgrade");
    fs::write(&file, manifest(&images[1]))
        .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    say(&format!(
        "web.yaml now says `image: {}` (was {}). Apply it again and follow the rollout:",
        images[1], images[0]
    ));
    run(&cli, &["apply", "-f", &file_arg])?;
    run(&cli, &["rollout", "status", "web", "--timeout", "120s"])?;
    run(&cli, &["get", "deployments"])?;
    run(
        &cli,
        &[
            "exec",
            "rpi-02",
            "web",
            "web",
            "--",
            "wget",
            "-qO-",
            "http://127.0.0.1:8080/",
        ],
    )?;
    say("\nhttpd logged that request; the agent fetches the service's logs:");
    run(&cli, &["logs", "rpi-02", "web", "web", "--tail", "3"])?;
    println!(
        "\n   The fleet was up, deployed and upgraded in {:.0?}.",
        started.elapsed()
    );

    step(6, "Your turn");
    try_next(fleet, &cli, &bin, &file);
    if options.exit_after_upgrade {
        return Ok(());
    }
    say("The fleet runs until you press Ctrl-C here; then everything is removed.");
    while !STOP.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(200));
    }
    println!();
    Ok(())
}

/// Set once SIGINT (Ctrl-C) or SIGTERM arrived: the demo stops at its next
/// step and tears its fleet down.
static STOP: AtomicBool = AtomicBool::new(false);

/// Catches SIGINT and SIGTERM for the rest of the process's life, setting
/// [`STOP`].
fn catch_signals() {
    thread::spawn(|| {
        tokio_runtime().block_on(stopped());
        STOP.store(true, Ordering::SeqCst);
    });
}

/// An error once [`STOP`] is set.
fn interrupted() -> Result<(), String> {
    if STOP.load(Ordering::SeqCst) {
        Err("interrupted".to_owned())
    } else {
        Ok(())
    }
}

/// The commands to try next, ready to paste into another terminal.
fn try_next(fleet: &Fleet, cli: &Podfleet, bin: &Path, file: &Path) {
    let file = file.display();
    say(&format!(
        "In another terminal:\n\
         \n\
         \x20 export PATH={bin}:$PATH\n\
         \x20 export PODFLEET_SERVER={server}\n\
         \n\
         \x20 podfleet get devices -o wide\n\
         \x20 podfleet get deployments -w                  # Ctrl-C to stop watching\n\
         \x20 podfleet describe deployment web\n\
         \x20 podfleet describe device rpi-01\n\
         \x20 podfleet label device rpi-03 site=lyon --overwrite   # rpi-03 joins web\n\
         \x20 podfleet label device rpi-02 site=paris --overwrite  # rpi-02 leaves it\n\
         \x20 podfleet rollout status web\n\
         \x20 podfleet ping rpi-01\n\
         \x20 podfleet logs rpi-01 web web\n\
         \x20 podfleet exec rpi-01 web web -- wget -qO- http://127.0.0.1:8080/\n\
         \x20 $EDITOR {file}   # e.g. add env: or change the image\n\
         \x20 podfleet apply -f {file} --dry-run\n\
         \x20 podfleet apply -f {file}\n\
         \x20 podfleet delete deployment web\n\
         \x20 podfleet get devices -o json\n\
         \n\
         The same connection as a named context: PODFLEET_CONFIG={config}\n\
         Logs: the controller's in {controller}, the agents' as listed in step 3.\n\
         A guided tour of every step by hand: docs/first-fleet.md.\n",
        bin = bin.display(),
        server = cli.server(),
        config = cli.config().display(),
        controller = fleet.controller_log().display(),
    ));
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM: the `podfleet` binary's own.
async fn stopped() {
    podfleet_control::cli::entry::shutdown().await;
}
