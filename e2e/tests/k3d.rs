#![allow(clippy::unwrap_used, missing_docs)]
//! The operator on a current Kubernetes cluster: k3d, the operator deployed
//! from `deploy/operator/` as a user would.
//!
//! Gated: it needs `k3d` (and the container engine k3d drives) and k3d's
//! node images from a registry, which the machines podfleet is developed
//! and tested on cannot reach. It runs only when asked:
//!
//! ```sh
//! cargo xtask operator-image
//! PODFLEET_K3D=1 cargo test -p e2e --test k3d -- --ignored
//! ```
//!
//! Nothing else depends on it. What it checks: the Deployment becomes
//! available from the kustomization (image, RBAC, probes, Secret), and a
//! FleetDeployment applied with kubectl gets its finalizer, writes its
//! device's desired key into a nats-server on the host, and is torn down.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CLUSTER: &str = "podfleet-e2e";
const IMAGE: &str = "localhost/podfleet-operator:latest";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .current_dir(workspace())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {}: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn wait_for(what: &str, timeout: Duration, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !probe() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Deletes the cluster and stops nats-server, whatever happened.
struct Teardown(Child);

impl Drop for Teardown {
    fn drop(&mut self) {
        let _ = Command::new("k3d")
            .args(["cluster", "delete", CLUSTER])
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "needs k3d and a registry for its node images (not reachable here): cargo xtask operator-image && PODFLEET_K3D=1 cargo test -p e2e --test k3d -- --ignored"]
fn the_operator_runs_from_the_kustomization_on_k3d() {
    assert_eq!(
        std::env::var("PODFLEET_K3D").as_deref(),
        Ok("1"),
        "this tier runs only with PODFLEET_K3D=1"
    );
    for program in ["k3d", "kubectl", "podman", "nats-server"] {
        assert!(
            Command::new(program).arg("--version").output().is_ok(),
            "{program} is not on PATH: this tier needs it"
        );
    }
    // nats-server on every address of the host, so the cluster's pods
    // reach it as host.k3d.internal.
    let port = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = tempfile::tempdir().unwrap();
    let nats = Command::new("nats-server")
        .args(["-js", "-a", "0.0.0.0", "-p", &port.to_string(), "-sd"])
        .arg(store.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _teardown = Teardown(nats);
    wait_for("nats-server", Duration::from_secs(15), || {
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok()
    });

    run("k3d", &["cluster", "create", CLUSTER, "--wait"]);
    let archive = store.path().join("operator.tar");
    run("podman", &["save", "-o", archive.to_str().unwrap(), IMAGE]);
    run(
        "k3d",
        &["image", "import", "-c", CLUSTER, archive.to_str().unwrap()],
    );

    // The kustomization as shipped, then the Secret pointing at the host.
    let overlay = tempfile::tempdir().unwrap();
    run("kubectl", &["apply", "-k", "deploy/operator"]);
    let config = overlay.path().join("config.toml");
    std::fs::write(
        &config,
        format!("current-context = \"fleet\"\n\n[contexts.fleet]\nserver = \"nats://host.k3d.internal:{port}\"\n"),
    )
    .unwrap();
    let secret = run(
        "kubectl",
        &[
            "-n",
            "podfleet",
            "create",
            "secret",
            "generic",
            "podfleet-operator-nats",
            &format!("--from-file=config.toml={}", config.display()),
            "--dry-run=client",
            "-o",
            "yaml",
        ],
    );
    let secret_file = overlay.path().join("secret.yaml");
    std::fs::write(&secret_file, secret).unwrap();
    run("kubectl", &["apply", "-f", secret_file.to_str().unwrap()]);
    run(
        "kubectl",
        &[
            "-n",
            "podfleet",
            "rollout",
            "restart",
            "deployment/podfleet-operator",
        ],
    );
    run(
        "kubectl",
        &[
            "-n",
            "podfleet",
            "rollout",
            "status",
            "deployment/podfleet-operator",
            "--timeout=300s",
        ],
    );

    let manifest = overlay.path().join("web.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: podfleet.io/v1alpha1\nkind: FleetDeployment\nmetadata:\n  name: web\n  namespace: podfleet\nspec:\n  target:\n    devices: [rpi-01]\n  score:\n    services:\n      - name: web\n        image: localhost/web:1\n",
    )
    .unwrap();
    run("kubectl", &["apply", "-f", manifest.to_str().unwrap()]);
    let key_written = || {
        let runtime = e2e::agent::tokio_runtime();
        runtime.block_on(async {
            let client = async_nats::connect(format!("nats://127.0.0.1:{port}"))
                .await
                .ok()?;
            let store = async_nats::jetstream::new(client)
                .get_key_value(podfleet_core::wire::names::DESIRED_BUCKET)
                .await
                .ok()?;
            store.get("rpi-01.web").await.ok().flatten()
        })
    };
    wait_for(
        "the desired key rpi-01.web",
        Duration::from_secs(120),
        || key_written().is_some(),
    );
    let finalizers = run(
        "kubectl",
        &[
            "-n",
            "podfleet",
            "get",
            "fleetdeployment",
            "web",
            "-o",
            "jsonpath={.metadata.finalizers}",
        ],
    );
    assert!(
        finalizers.contains("podfleet.io/desired-keys"),
        "{finalizers}"
    );
    run(
        "kubectl",
        &[
            "-n",
            "podfleet",
            "delete",
            "fleetdeployment",
            "web",
            "--timeout=120s",
        ],
    );
    assert!(
        key_written().is_none(),
        "the key outlived its FleetDeployment"
    );
}
