#![allow(clippy::unwrap_used, missing_docs)]
//! The whole fleet for real: nats-server, `podfleet controller` as a
//! process, and real agents on isolated podman stores, driven only through
//! the `podfleet` CLI binary, with podman's own `ps` as ground truth. The
//! controller against fake devices is control/tests/nats.rs.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use e2e::agent::{tokio_runtime, Device, PsEntry};
use e2e::fleet::{Binaries, Fleet, Podfleet};
use e2e::{demo_image, eventually, TEST_IMAGE};
use podfleet_core::wire::names::DESIRED_BUCKET;
use serde_json::Value;

/// Generous: two cores shared with compilers.
const SETTLE: Duration = Duration::from_secs(60);
const ROLLOUT_TIMEOUT: &str = "120s";

fn binaries() -> Binaries {
    Binaries {
        podfleet: PathBuf::from(env!("CARGO_BIN_EXE_podfleet-e2e")),
        agent: PathBuf::from(env!("CARGO_BIN_EXE_podfleet-agent-e2e")),
    }
}

/// The `web` fleet deployment: the demo web server on the devices labelled
/// `site=lyon`, after an init container that only runs `true`.
fn manifest(image: &str) -> String {
    format!(
        r#"apiVersion: podfleet.io/v1alpha1
kind: FleetDeployment
metadata:
  name: web
spec:
  target:
    selector: "site=lyon"
  score:
    init_containers:
      - name: prepare
        image: {TEST_IMAGE}
        args: ["true"]
    services:
      - name: web
        image: {image}
    lifecycle:
      grace_period_secs: 2
"#
    )
}

fn apply(cli: &Podfleet, file: &Path, image: &str) -> String {
    fs::write(file, manifest(image)).unwrap();
    cli.ok(&["apply", "-f", &file.display().to_string()])
}

fn rollout(cli: &Podfleet) {
    let run = cli.run(&["rollout", "status", "web", "--timeout", ROLLOUT_TIMEOUT]);
    assert_eq!(run.code(), Some(0), "{run}");
    assert!(run.stdout.contains("rollout of web complete"), "{run}");
}

/// The one running `web` container of `device`, with its image.
fn web_container(device: &Device) -> (String, String) {
    let ps = device.containers("web");
    let services: Vec<&PsEntry> = ps.iter().filter(|c| !c.is_init()).collect();
    assert_eq!(services.len(), 1, "{}: {ps:#?}", device.id);
    let web = services[0];
    assert_eq!(web.state, "running", "{}: {ps:#?}", device.id);
    assert_eq!(web.service(), "web");
    let image = device.inspect(&web.id, "{{.ImageName}}");
    (web.id.clone(), image)
}

/// Every container on `device`, whatever its deployment.
fn all_containers(device: &Device) -> String {
    let output = device
        .podman()
        .podman()
        .args(["ps", "--all", "--format", "{{.Names}}"])
        .output()
        .unwrap();
    assert!(output.status.success());
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Every live key of the desired bucket with its revision.
async fn desired_revisions(url: &str) -> BTreeMap<String, u64> {
    let client = async_nats::connect(url).await.unwrap();
    let store = async_nats::jetstream::new(client)
        .get_key_value(DESIRED_BUCKET)
        .await
        .unwrap();
    e2e::fleet::desired_revisions(&store).await
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

/// The item named `name` of a `List`.
fn item<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items: {list:#}"))
        .iter()
        .find(|i| i["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no item {name}: {list:#}"))
}

#[test]
fn a_fleet_deployment_follows_labels_survives_the_controller_and_upgrades() {
    let started = Instant::now();
    let images = [demo_image(1), demo_image(2)];
    let mut fleet = Fleet::start(&binaries(), &images, &["--allow-exec"]);
    let cli = fleet.cli().clone();
    let file = fleet.dir().join("web.yaml");
    for (id, site) in [
        ("rpi-01", "site=lyon"),
        ("rpi-02", "site=lyon"),
        ("rpi-03", "site=paris"),
    ] {
        fleet.add_device(id, &[site]).start_agent();
    }
    eprintln!("fleet up after {:?}", started.elapsed());

    // Apply to site=lyon: rpi-01 and rpi-02 run it, rpi-03 nothing.
    let applied = apply(&cli, &file, &images[0]);
    assert_eq!(applied.trim(), "fleetdeployment/web created");
    rollout(&cli);
    let (web01, image01) = web_container(fleet.device("rpi-01"));
    assert_eq!(image01, images[0]);
    let _ = web_container(fleet.device("rpi-02"));
    assert_eq!(all_containers(fleet.device("rpi-03")), "");
    eprintln!("rolled out after {:?}", started.elapsed());

    // rpi-02 moves to paris: the deployment leaves it, rpi-01 is untouched.
    let relabelled = cli.ok(&["label", "device", "rpi-02", "site=paris", "--overwrite"]);
    assert_eq!(relabelled.trim(), "device/rpi-02 labeled");
    let rpi02 = fleet.device("rpi-02");
    tokio_runtime().block_on(async {
        eventually!("rpi-02 to remove web", SETTLE, {
            rpi02.containers("web").is_empty().then_some(())
        });
    });
    let devices = json(&cli.ok(&["get", "devices", "-o", "json"]));
    assert_eq!(
        item(&devices, "rpi-02")["status"]["deployments"],
        json("[]")
    );
    assert_eq!(web_container(fleet.device("rpi-01")).0, web01);
    rollout(&cli);

    // rpi-04 is labelled before its agent first connects, and gets it then.
    fleet.add_device("rpi-04", &["site=lyon"]);
    tokio_runtime().block_on(async {
        eventually!("the controller to target rpi-04", SETTLE, {
            let list = json(&cli.ok(&["get", "deployments", "-o", "json"]));
            (item(&list, "web")["status"]["targeted"] == 2).then_some(())
        });
    });
    let pending = cli.run(&["rollout", "status", "web", "--timeout", "2s"]);
    assert_eq!(
        pending.code(),
        Some(2),
        "an agent that never ran: {pending}"
    );
    fleet.device_mut("rpi-04").start_agent();
    rollout(&cli);
    let _ = web_container(fleet.device("rpi-04"));
    assert_eq!(web_container(fleet.device("rpi-01")).0, web01);
    eprintln!("relabelled and grown after {:?}", started.elapsed());

    // The controller crashes and comes back: it rewrites no desired key.
    let url = fleet.nats().url();
    let runtime = tokio_runtime();
    let before = runtime.block_on(desired_revisions(&url));
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        ["rpi-01.web", "rpi-04.web"]
    );
    fleet.kill_controller();
    let log_before = fleet.controller_output().len();
    fleet.start_controller();
    rollout(&cli);
    // Long enough for a resync and a few status intervals.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        fleet.controller().is_running(),
        "{}",
        fleet.controller_output()
    );
    assert_eq!(
        runtime.block_on(desired_revisions(&url)),
        before,
        "controller log after the restart:\n{}",
        &fleet.controller_output()[log_before..]
    );
    assert_eq!(web_container(fleet.device("rpi-01")).0, web01);
    eprintln!("controller restarted after {:?}", started.elapsed());

    // Upgrade to v2: new containers on every targeted device.
    let configured = apply(&cli, &file, &images[1]);
    assert_eq!(configured.trim(), "fleetdeployment/web configured");
    rollout(&cli);
    for id in ["rpi-01", "rpi-04"] {
        let (container, image) = web_container(fleet.device(id));
        assert_eq!(image, images[1], "{id}");
        assert_ne!(container, web01, "{id}");
    }
    assert_eq!(all_containers(fleet.device("rpi-02")), "");
    assert_eq!(all_containers(fleet.device("rpi-03")), "");
    eprintln!("upgraded after {:?}", started.elapsed());

    // A restart: new containers of the same image on every targeted device.
    let upgraded: Vec<String> = ["rpi-01", "rpi-04"]
        .iter()
        .map(|id| web_container(fleet.device(id)).0)
        .collect();
    let restarted = cli.ok(&["rollout", "restart", "web"]);
    assert!(
        restarted.starts_with("fleetdeployment/web restarted: generation "),
        "{restarted}"
    );
    rollout(&cli);
    for (id, before) in ["rpi-01", "rpi-04"].iter().zip(&upgraded) {
        let (container, image) = web_container(fleet.device(id));
        assert_eq!(image, images[1], "{id}");
        assert_ne!(&container, before, "{id} was not restarted");
    }
    // Applying the same file again keeps the restart: nothing moves.
    let restarted_ids: Vec<String> = ["rpi-01", "rpi-04"]
        .iter()
        .map(|id| web_container(fleet.device(id)).0)
        .collect();
    let unchanged = apply(&cli, &file, &images[1]);
    assert_eq!(unchanged.trim(), "fleetdeployment/web unchanged");
    std::thread::sleep(Duration::from_secs(2));
    for (id, before) in ["rpi-01", "rpi-04"].iter().zip(&restarted_ids) {
        assert_eq!(&web_container(fleet.device(id)).0, before, "{id}");
    }
    eprintln!("restarted after {:?}", started.elapsed());

    // Every read verb.
    let table = cli.ok(&["get", "devices"]);
    let header = table.lines().next().unwrap();
    for column in ["NAME", "STATUS", "HEARTBEAT", "AGENT", "DEPLOYMENTS"] {
        assert!(header.contains(column), "{table}");
    }
    for id in ["rpi-01", "rpi-02", "rpi-03", "rpi-04"] {
        let row = table
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("no row {id}:\n{table}"));
        assert!(row.contains("Online"), "{table}");
    }
    let wide = cli.ok(&["get", "devices", "-o", "wide"]);
    assert!(wide.lines().next().unwrap().contains("LABELS"), "{wide}");
    assert!(
        wide.lines()
            .any(|l| l.starts_with("rpi-03") && l.contains("site=paris")),
        "{wide}"
    );
    let lyon = cli.ok(&["get", "devices", "-l", "site=lyon", "-o", "name"]);
    assert_eq!(lyon, "device/rpi-01\ndevice/rpi-04\n");
    let devices = json(&cli.ok(&["get", "devices", "-o", "json"]));
    assert_eq!(devices["kind"], "List");
    assert_eq!(devices["items"].as_array().unwrap().len(), 4, "{devices:#}");
    let rpi01 = item(&devices, "rpi-01");
    assert_eq!(rpi01["metadata"]["labels"]["site"], "lyon", "{rpi01:#}");
    assert_eq!(rpi01["status"]["phase"], "Online", "{rpi01:#}");
    assert_eq!(
        rpi01["status"]["deployments"],
        json(r#"["web"]"#),
        "{rpi01:#}"
    );
    assert_eq!(
        item(&devices, "rpi-03")["status"]["deployments"],
        json("[]")
    );

    let table = cli.ok(&["get", "deployments"]);
    let row = table.lines().find(|l| l.starts_with("web")).unwrap();
    assert!(row.contains("site=lyon") && row.contains("2/2"), "{table}");
    let wide = cli.ok(&["get", "deployments", "-o", "wide"]);
    assert!(wide.lines().next().unwrap().contains("STRATEGY"), "{wide}");
    assert!(wide.contains("AllAtOnce"), "{wide}");
    let deployments = json(&cli.ok(&["get", "deployments", "-o", "json"]));
    let web = item(&deployments, "web");
    assert_eq!(web["kind"], "FleetDeployment");
    assert_eq!(web["spec"]["score"]["services"][0]["image"], images[1]);
    assert_eq!(web["status"]["targeted"], 2, "{web:#}");
    assert_eq!(web["status"]["phases"]["running"], 2, "{web:#}");
    assert_eq!(
        web["status"]["observedGeneration"], web["metadata"]["generation"],
        "{web:#}"
    );

    let described = cli.ok(&["describe", "device", "rpi-01"]);
    assert!(described.contains("site=lyon"), "{described}");
    assert!(described.contains("Running"), "{described}");
    let revision = runtime.block_on(desired_revisions(&url))["rpi-01.web"];
    assert!(
        described.contains(&format!("Revision:      {revision} (up to date)")),
        "revision {revision}:\n{described}"
    );
    let described = cli.ok(&["describe", "deployment", "web"]);
    for expected in [
        "site=lyon",
        "prepare",
        &images[1],
        "Running",
        "rpi-01",
        "rpi-04",
    ] {
        assert!(described.contains(expected), "{expected}:\n{described}");
    }
    let devices_part = described.split("Devices:").nth(1).unwrap_or_default();
    assert!(!devices_part.contains("rpi-02"), "{described}");
    let row = devices_part
        .lines()
        .map(str::split_whitespace)
        .map(Iterator::collect::<Vec<_>>)
        .find(|cells| cells.first() == Some(&"rpi-01"))
        .unwrap_or_else(|| panic!("no row rpi-01:\n{described}"));
    let revision = revision.to_string();
    assert_eq!(
        row[..4],
        [
            "rpi-01",
            "Running",
            &format!("{revision}/{revision}"),
            "yes"
        ],
        "{described}"
    );

    // The device commands.
    let pong = cli.ok(&["ping", "rpi-03"]);
    assert!(pong.starts_with("rpi-03 answered in "), "{pong}");
    let page = cli.ok(&[
        "exec",
        "rpi-04",
        "web",
        "web",
        "--",
        "wget",
        "-qO-",
        "http://127.0.0.1:8080/",
    ]);
    assert_eq!(page, "podfleet demo v2\n");
    let failing = cli.run(&["exec", "rpi-04", "web", "web", "--", "sh", "-c", "exit 7"]);
    assert_eq!(failing.code(), Some(7), "{failing}");
    let logs = cli.ok(&["logs", "rpi-04", "web", "web", "--tail", "20"]);
    assert!(
        logs.contains("response:200"),
        "httpd logs the request:\n{logs}"
    );
    let unknown = cli.run(&["logs", "rpi-03", "web", "web"]);
    assert_eq!(unknown.code(), Some(1), "{unknown}");

    // Delete: gone from every device and from the listing.
    let deleted = cli.ok(&["delete", "deployment", "web"]);
    assert_eq!(deleted.trim(), "fleetdeployment/web deleted");
    tokio_runtime().block_on(async {
        for device in fleet.devices() {
            eventually!(format!("{} to remove web", device.id), SETTLE, {
                all_containers(device).is_empty().then_some(())
            });
        }
    });
    let listed = cli.run(&["get", "deployments"]);
    assert_eq!(listed.code(), Some(0), "{listed}");
    assert_eq!(listed.stdout, "", "{listed}");
    assert!(listed.stderr.contains("No resources found."), "{listed}");
    assert!(runtime.block_on(desired_revisions(&url)).is_empty());
    let again = cli.run(&["delete", "deployment", "web"]);
    assert_eq!(again.code(), Some(1), "{again}");
    assert!(
        fleet.controller().is_running(),
        "{}",
        fleet.controller_output()
    );
    eprintln!("done after {:?}", started.elapsed());
}
