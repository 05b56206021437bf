#![allow(clippy::unwrap_used, missing_docs)]
//! The smoke test of `cargo xtask demo`: the demo binary runs its whole
//! walkthrough (three devices, deploy, upgrade) and tears down.

use std::process::Command;

#[test]
fn the_demo_runs_to_the_upgrade_and_tears_down() {
    let output = Command::new(env!("CARGO_BIN_EXE_podfleet-demo"))
        .arg("--exit-after-upgrade")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the demo exited with {}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}",
        output.status
    );
    for expected in [
        "fleetdeployment/web created",
        "podfleet demo v1",
        "fleetdeployment/web configured",
        "rollout of web complete: 2/2 device(s) run generation 2",
        "podfleet demo v2",
        "export PODFLEET_SERVER=nats://127.0.0.1:",
        "removed the containers",
    ] {
        assert!(stdout.contains(expected), "{expected:?} missing:\n{stdout}");
    }
}
