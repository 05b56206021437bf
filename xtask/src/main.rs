//! `cargo xtask`: podfleet's developer tasks.
//!
//! - `cargo xtask test`: provisions what the test suite needs (podman,
//!   runc, nats-server and busybox-static from Debian's packages, installed when
//!   missing and running as root), then runs `cargo test --workspace`.
//!   Extra arguments are passed to `cargo test`.
//! - `cargo xtask provision`: only the provisioning step.
//! - `cargo xtask bench-agent`: provisions, then runs the agent benchmark
//!   (`cargo bench -p e2e --bench agent`, figures for docs/performance.md).
//!
//! It fails loudly, naming the package, when something cannot be provided.

use std::env;
use std::process::{Command, ExitCode};

/// A program the tests need, and the Debian package that provides it.
const NEEDS: [(&str, &str); 4] = [
    ("podman", "podman"),
    // crun cannot run containers on this kind of machine (hybrid cgroups);
    // the project's containers.conf selects runc.
    ("runc", "runc"),
    ("nats-server", "nats-server"),
    ("busybox", "busybox-static"),
];

fn main() -> ExitCode {
    let mut args = env::args().skip(1);
    let task = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    let result = match task.as_str() {
        "test" => provision().and_then(|()| cargo_test(&rest)),
        "provision" => provision(),
        "bench-agent" => provision().and_then(|()| cargo(&["bench", "-p", "e2e", "--bench", "agent"], &rest)),
        _ => Err(format!(
            "unknown task {task:?}\nusage: cargo xtask <task>\n  test [ARGS]   provision, then cargo test --workspace [ARGS]\n  provision     install podman, nats-server, busybox-static when missing\n  bench-agent   provision, then the agent benchmark (cargo bench -p e2e --bench agent)"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

fn on_path(program: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|path| env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn provision() -> Result<(), String> {
    let missing: Vec<&str> = NEEDS
        .iter()
        .filter(|(program, _)| !on_path(program))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        eprintln!("xtask: podman, nats-server and busybox-static are present");
        return Ok(());
    }
    if !is_root() {
        return Err(format!(
            "the tests need {} and this is not root: run `sudo apt-get install -y {}` and try again",
            missing.join(", "),
            missing.join(" ")
        ));
    }
    eprintln!(
        "xtask: installing {} from Debian's packages",
        missing.join(", ")
    );
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

fn cargo_test(extra: &[String]) -> Result<(), String> {
    cargo(&["test", "--workspace"], extra)
}

fn cargo(args: &[&str], extra: &[String]) -> Result<(), String> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).args(args).args(extra))
}

fn run(command: &mut Command) -> Result<(), String> {
    let shown = format!("{command:?}");
    let status = command
        .status()
        .map_err(|e| format!("could not run {shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed with {status}"))
    }
}
