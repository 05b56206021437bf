//! The `podfleet` binary's exit codes on the paths decided before it
//! connects (no NATS needed): help, usage errors, invalid files.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn podfleet(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_podfleet"))
        .args(args)
        // Nothing from the caller's environment may pick a server.
        .env_remove("PODFLEET_SERVER")
        .env_remove("PODFLEET_CONTEXT")
        .env("PODFLEET_CONFIG", "/nonexistent/podfleet.toml")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command that refuses before reading its stdin closes it first: the
    // write then breaks its pipe, which is no failure of the test.
    let written = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    if let Err(e) = written {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    child.wait_with_output().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn help_succeeds_and_lists_the_exit_codes() {
    let output = podfleet(&["--help"], "");
    assert_eq!(output.status.code(), Some(0));
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("Exit codes:"), "{help}");
    assert!(help.contains("64  usage"), "{help}");
}

#[test]
fn usage_errors_exit_64() {
    for args in [
        &["frobnicate"][..],
        &["get", "pods"],
        &["ping", "Not_A_Device"],
        &["get", "deployments", "-l", "site=lyon"],
        &["get", "devices", "-l", "site in ("],
        &["label", "device", "rpi-01", "site=ly on"],
        &["get", "devices", "-w", "-o", "json"],
    ] {
        let output = podfleet(args, "");
        assert_eq!(
            output.status.code(),
            Some(64),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn an_invalid_manifest_exits_1_before_connecting() {
    let manifest = "\
apiVersion: podfleet.io/v1alpha1
kind: FleetDeployment
metadata: {name: web}
spec:
  target: {devices: []}
  score: {services: [{name: app, image: x}]}
";
    let output = podfleet(&["apply", "-f", "-"], manifest);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr(&output),
        "error: <stdin>: spec.target.devices: the list is empty: \
         name at least one device, or use a selector\n"
    );
    let output = podfleet(&["apply", "-f", "/nonexistent/web.yaml"], "");
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).starts_with("error: /nonexistent/web.yaml: "));
}

#[test]
fn the_controller_refuses_knobs_that_cannot_work() {
    let output = podfleet(&["controller", "--replicas", "9"], "");
    assert_eq!(output.status.code(), Some(64), "{}", stderr(&output));
    let output = podfleet(&["controller", "--offline-after", "soon"], "");
    assert_eq!(output.status.code(), Some(64), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("is not a duration"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn an_unusable_registry_auth_file_exits_1_before_connecting() {
    let manifest = "\
apiVersion: podfleet.io/v1alpha1
kind: FleetDeployment
metadata: {name: web}
spec:
  target: {devices: [rpi-01]}
  score: {services: [{name: app, image: registry.example/web:1}]}
";
    let args = [
        "apply",
        "-f",
        "-",
        "--registry-auth-file",
        "/nonexistent/auth.json",
    ];
    let output = podfleet(&args, manifest);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output)
            .starts_with("error: the registry auth file /nonexistent/auth.json is unusable: "),
        "{}",
        stderr(&output)
    );
    // Nothing to resolve, nothing read: the failure is the connection's.
    let local = manifest.replace("registry.example/web:1", "localhost/web:1");
    let output = podfleet(&args, &local);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    let output = podfleet(
        &[
            "apply",
            "-f",
            "-",
            "--insecure-registry",
            "http://127.0.0.1:5000",
        ],
        manifest,
    );
    assert_eq!(output.status.code(), Some(64), "{}", stderr(&output));
}
