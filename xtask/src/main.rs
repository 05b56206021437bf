//! `cargo xtask`: podfleet's developer tasks.
//!
//! - `cargo xtask test`: provisions what the test suite needs (podman,
//!   runc, nats-server and busybox-static from Debian's packages, installed when
//!   missing and running as root), then runs `cargo test --workspace`.
//!   Extra arguments are passed to `cargo test`.
//! - `cargo xtask provision`: only the provisioning step.
//! - `cargo xtask fuzz --smoke`, `cargo xtask fuzz <target> [--time SECS]`,
//!   `cargo xtask fuzz seeds`: the cargo-fuzz targets in fuzz/ (installing
//!   cargo-fuzz when missing); see docs/fuzzing.md.
//! - `cargo xtask bench-agent`: provisions, then runs the agent benchmark
//!   (`cargo bench -p e2e --bench agent`, figures for docs/performance.md).
//! - `cargo xtask demo [--exit-after-upgrade]`: provisions, builds the e2e
//!   crate's binaries and runs `podfleet-demo`, a narrated fleet of three
//!   devices on this machine (docs/first-fleet.md).
//!
//! - `cargo xtask build-agent --arch aarch64|x86_64`: the production agent
//!   for that architecture (aarch64 cross-built in a cached Debian chroot).
//! - `cargo xtask e2e --arch aarch64|x86_64 [--suite trixie|bookworm]
//!   [--keep]`: builds the production agent for the architecture and a
//!   Debian guest image, boots it under QEMU and runs the VM scenarios
//!   (docs/e2e.md).
//! - `cargo xtask k8s-apiserver`: a kube-apiserver 1.20.2 built from
//!   Debian's source package and cached (15 to 20 min the first time), with
//!   etcd-server installed beside it; prints its path, for
//!   `PODFLEET_KUBE_APISERVER` (the cluster tests in e2e/).
//! - `cargo xtask e2e --k8s`: the cluster tier: that apiserver with
//!   deploy/operator applied, the operator as a process against real
//!   agents (docs/e2e.md).
//! - `cargo xtask operator-image`: the operator's image, FROM scratch,
//!   built and tried with podman as `localhost/podfleet-operator:latest`.
//!
//! It fails loudly, naming the package, when something cannot be provided.

mod cross;
mod guest;
mod k8s;
mod vm;

use std::env;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

/// A program the tests need, and the Debian package that provides it.
const NEEDS: [(&str, &str); 7] = [
    ("podman", "podman"),
    // crun cannot run containers on this kind of machine (hybrid cgroups);
    // the project's containers.conf selects runc.
    ("runc", "runc"),
    ("nats-server", "nats-server"),
    ("busybox", "busybox-static"),
    // `kubectl kustomize deploy/operator` in the operator's manifest test;
    // any kubectl will do there (the cluster tier checks its version).
    ("kubectl", "kubernetes-client"),
    // The registry tier (e2e/tests/registry.rs): distribution 2.8 on
    // loopback, with a bcrypt htpasswd file made by apache2-utils' htpasswd.
    ("docker-registry", "docker-registry"),
    ("htpasswd", "apache2-utils"),
];

fn main() -> ExitCode {
    let mut args = env::args().skip(1);
    let task = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    let result = match task.as_str() {
        "test" => provision().and_then(|()| cargo_test(&rest)),
        "provision" => provision(),
        "fuzz" => fuzz(&rest),
        "bench-agent" => provision().and_then(|()| cargo(&["bench", "-p", "e2e", "--bench", "agent"], &rest)),
        "demo" => provision().and_then(|()| demo(&rest)),
        "e2e" if rest.iter().any(|a| a == "--k8s") => {
            if rest.iter().any(|a| a == "--arch") {
                Err("--k8s and --arch are two tiers: run them one at a time".into())
            } else {
                k8s::e2e(&rest, &workspace_root())
            }
        }
        "e2e" => vm::e2e(&rest, &workspace_root()),
        "build-agent" => vm::build_agent(&rest, &workspace_root()),
        "k8s-apiserver" => k8s::task(&rest),
        "operator-image" => k8s::operator_image(&rest, &workspace_root()),
        _ => Err(format!(
            "unknown task {task:?}\nusage: cargo xtask <task>\n  test [ARGS]   provision, then cargo test --workspace [ARGS]\n  provision     install podman, runc, nats-server, busybox-static, kubectl,\n                docker-registry, apache2-utils when missing\n  demo [--exit-after-upgrade]\n                provision, then a narrated fleet of three devices on this machine\n                (nats-server, podfleet controller, three agents); Ctrl-C ends it\n  bench-agent   provision, then the agent benchmark (cargo bench -p e2e --bench agent)\n{}\n{}\n{FUZZ_USAGE}", vm::USAGE, k8s::USAGE
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
    install_missing(&NEEDS, "the tests", true)
}

/// Installs the Debian package of each program of `needs` that is not on
/// PATH (nor in /usr/sbin, /sbin), as root; `who` is what needs them.
/// `recommends`: with the packages' recommended ones too.
fn install_missing(needs: &[(&str, &str)], who: &str, recommends: bool) -> Result<(), String> {
    let mut missing: Vec<&str> = needs
        .iter()
        .filter(|(program, _)| cross::find_program(program).is_none())
        .map(|(_, package)| *package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        let programs: Vec<&str> = needs.iter().map(|(program, _)| *program).collect();
        eprintln!("xtask: {} present", programs.join(", "));
        return Ok(());
    }
    apt_install(&missing, who, recommends)
}

/// Installs Debian `packages` (for `who`) with apt-get, as root.
/// `recommends`: with the packages' recommended ones too.
fn apt_install(packages: &[&str], who: &str, recommends: bool) -> Result<(), String> {
    if !is_root() {
        return Err(format!(
            "{who} need {} and this is not root: run `sudo apt-get install -y {}` and try again",
            packages.join(", "),
            packages.join(" ")
        ));
    }
    eprintln!(
        "xtask: installing {} from Debian's packages",
        packages.join(", ")
    );
    // apt's chatter goes to stderr: some tasks print a path on stdout.
    run(Command::new("apt-get")
        .arg("update")
        .arg("-qq")
        .stdout(std::io::stderr()))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args((!recommends).then_some("--no-install-recommends"))
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(std::io::stderr()))?;
    Ok(())
}

/// The binaries `podfleet-demo` runs, all built inside the e2e crate.
const DEMO_BINARIES: [&str; 3] = ["podfleet-demo", "podfleet-e2e", "podfleet-agent-e2e"];

/// Builds the demo's binaries, then becomes `podfleet-demo` (exec), so
/// that Ctrl-C reaches the demo alone and it can tear its fleet down.
fn demo(extra: &[String]) -> Result<(), String> {
    let mut build = vec!["build", "--quiet", "-p", "e2e"];
    for binary in DEMO_BINARIES {
        build.extend(["--bin", binary]);
    }
    eprintln!("xtask: building the demo (cargo build -p e2e: podfleet-demo, podfleet-e2e, podfleet-agent-e2e)");
    cargo(&build, &[])?;
    let target = env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from);
    let demo = target.join("debug").join(DEMO_BINARIES[0]);
    let error = Command::new(&demo).args(extra).exec();
    Err(format!("could not run {}: {error}", demo.display()))
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

/// The fuzz targets, each with the dictionary its mutator gets.
const FUZZ_TARGETS: [(&str, Option<&str>); 5] = [
    ("score", Some("dict/json.dict")),
    ("report", Some("dict/json.dict")),
    ("command", Some("dict/json.dict")),
    ("names", Some("dict/names.dict")),
    ("reconciler", Some("dict/json.dict")),
];

/// Seconds each target runs in the smoke test.
const SMOKE_SECS: u64 = 20;
/// Seconds one input may take before libFuzzer calls it a hang.
const INPUT_TIMEOUT_SECS: u64 = 25;
/// The cargo-fuzz release line the tasks are written against.
const CARGO_FUZZ_VERSION: &str = "^0.13";

const FUZZ_USAGE: &str = "  fuzz --smoke [--time SECS]   build every fuzz target, run each for SECS (default 20) from its seeds, fail on any crash
  fuzz <target> [--time SECS]  one long run of score, report, command, names or reconciler, one job (default 600 s; 0: until stopped)
  fuzz seeds                   regenerate fuzz/corpus/*/seed-* and fuzz/dict/ from core/tests' wire fixtures";

/// `cargo xtask fuzz ...`.
fn fuzz(args: &[String]) -> Result<(), String> {
    let usage = || format!("usage: cargo xtask <task>\n{FUZZ_USAGE}");
    let mut what = None;
    let mut time = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--time" => {
                let secs = args
                    .next()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| format!("--time needs a number of seconds\n{}", usage()))?;
                time = Some(secs);
            }
            "--smoke" if what.is_none() => what = Some(arg.clone()),
            other if what.is_none() && !other.starts_with('-') => what = Some(arg.clone()),
            other => return Err(format!("unexpected argument {other:?}\n{}", usage())),
        }
    }
    let fuzz_dir = workspace_root().join("fuzz");
    match what.as_deref() {
        Some("--smoke") => {
            fuzz_tools()?;
            fuzz_smoke(&fuzz_dir, time.unwrap_or(SMOKE_SECS))
        }
        Some("seeds") => fuzz_seeds(&fuzz_dir),
        Some(target) if FUZZ_TARGETS.iter().any(|(t, _)| *t == target) => {
            fuzz_tools()?;
            fuzz_long(&fuzz_dir, target, time.unwrap_or(600))
        }
        Some(other) => Err(format!(
            "unknown fuzz target {other:?}: the targets are {}\n{}",
            FUZZ_TARGETS.map(|(t, _)| t).join(", "),
            usage()
        )),
        None => Err(usage()),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// `cargo` as the rustup proxy, which understands `+nightly`.
fn cargo_nightly() -> Command {
    let mut cargo = Command::new("cargo");
    cargo.arg("+nightly");
    cargo
}

/// Makes sure the nightly toolchain, a C++ compiler (libFuzzer is C++) and
/// cargo-fuzz are there, installing cargo-fuzz when it is missing.
fn fuzz_tools() -> Result<(), String> {
    let nightly = cargo_nightly()
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !nightly {
        return Err(
            "fuzzing needs the nightly toolchain and `cargo +nightly` does not run: install it with `rustup toolchain install nightly --profile minimal`".into(),
        );
    }
    if !["c++", "g++", "clang++"].iter().any(|cxx| on_path(cxx)) {
        return Err(
            "libfuzzer-sys compiles libFuzzer with a C++ compiler and none is on PATH: install one (Debian package g++)".into(),
        );
    }
    let has_cargo_fuzz = || {
        cargo_nightly()
            .args(["fuzz", "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has_cargo_fuzz() {
        return Ok(());
    }
    eprintln!("xtask: cargo-fuzz is missing; installing it from crates.io (cargo install cargo-fuzz --version {CARGO_FUZZ_VERSION} --locked)");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ]))
    .map_err(|e| {
        format!("could not install cargo-fuzz ({e}): install it with `cargo install cargo-fuzz --locked` and try again")
    })?;
    if has_cargo_fuzz() {
        Ok(())
    } else {
        Err("cargo-fuzz was installed but `cargo +nightly fuzz` still does not run: is ~/.cargo/bin on PATH?".into())
    }
}

/// The libFuzzer options every run gets: its dictionary, the per-input
/// time limit and the final statistics.
fn libfuzzer_options(fuzz_dir: &Path, target: &str, secs: u64) -> Vec<String> {
    let mut options = vec![
        format!("-max_total_time={secs}"),
        format!("-timeout={INPUT_TIMEOUT_SECS}"),
        "-print_final_stats=1".to_owned(),
    ];
    if let Some((_, Some(dict))) = FUZZ_TARGETS.iter().find(|(t, _)| *t == target) {
        options.push(format!("-dict={}", fuzz_dir.join(dict).display()));
    }
    options
}

/// `cargo +nightly fuzz run` for one target: new inputs go to a working
/// corpus under fuzz/target/ (not committed), the committed seeds are read.
fn fuzz_run_command(fuzz_dir: &Path, target: &str, secs: u64) -> Result<Command, String> {
    let work = fuzz_dir.join("target/corpus").join(target);
    fs::create_dir_all(&work).map_err(|e| format!("could not create {}: {e}", work.display()))?;
    let mut command = cargo_nightly();
    command
        .current_dir(fuzz_dir)
        .args(["fuzz", "run", "--sanitizer", "none", target])
        .arg(&work)
        .arg(fuzz_dir.join("corpus").join(target))
        .arg("--")
        .args(libfuzzer_options(fuzz_dir, target, secs));
    Ok(command)
}

/// What libFuzzer's final statistics say about a run.
#[derive(Debug, Default)]
struct RunStats {
    execs: Option<u64>,
    execs_per_sec: Option<u64>,
    corpus: Option<String>,
}

fn run_stats(log: &str) -> RunStats {
    let stat = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim_start_matches(':').trim().parse().ok())
    };
    let corpus = log
        .lines()
        .rev()
        .find_map(|l| l.split_once(" corp: "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .map(str::to_owned);
    RunStats {
        execs: stat("stat::number_of_executed_units"),
        execs_per_sec: stat("stat::average_exec_per_sec"),
        corpus,
    }
}

fn fuzz_smoke(fuzz_dir: &Path, secs: u64) -> Result<(), String> {
    eprintln!("xtask: checking the seed corpus and replaying it on stable (cargo test in fuzz/)");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .current_dir(fuzz_dir)
        .args(["test", "--quiet", "--lib"]))?;
    eprintln!("xtask: building every fuzz target (release, debug assertions, no sanitizer)");
    run(cargo_nightly()
        .current_dir(fuzz_dir)
        .args(["fuzz", "build", "--sanitizer", "none"]))?;
    let mut summary = Vec::new();
    for (target, _) in FUZZ_TARGETS {
        let log_path = fuzz_dir.join(format!("target/smoke-{target}.log"));
        let log_file = fs::File::create(&log_path)
            .map_err(|e| format!("could not create {}: {e}", log_path.display()))?;
        let mut command = fuzz_run_command(fuzz_dir, target, secs)?;
        eprintln!(
            "xtask: fuzzing {target} for {secs} s (log: {})",
            log_path.display()
        );
        let status = command
            .stdout(Stdio::null())
            .stderr(log_file)
            .status()
            .map_err(|e| format!("could not run cargo +nightly fuzz: {e}"))?;
        let log = fs::read_to_string(&log_path).unwrap_or_default();
        if !status.success() {
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            let artifact = log
                .lines()
                .find_map(|l| l.split_once("Test unit written to "))
                .map(|(_, path)| path.trim().to_owned());
            let replay = artifact.as_deref().map_or_else(String::new, |a| {
                format!(
                    "\nreplay it:   cd fuzz && cargo +nightly fuzz run --sanitizer none {target} {a}\nminimise it: cd fuzz && cargo +nightly fuzz tmin --sanitizer none {target} {a}"
                )
            });
            return Err(format!(
                "fuzz target {target} failed ({status}):\n{tail}{replay}\nthen turn it into a unit test in the crate it concerns (docs/fuzzing.md)"
            ));
        }
        let stats = run_stats(&log);
        summary.push(format!(
            "  {target:<11} {:>10} execs {:>7} execs/s  corpus {}",
            stats.execs.map_or("?".into(), |n| n.to_string()),
            stats.execs_per_sec.map_or("?".into(), |n| n.to_string()),
            stats.corpus.as_deref().unwrap_or("?")
        ));
    }
    eprintln!(
        "xtask: fuzz smoke passed, no crash in {} targets x {secs} s:\n{}",
        FUZZ_TARGETS.len(),
        summary.join("\n")
    );
    Ok(())
}

fn fuzz_long(fuzz_dir: &Path, target: &str, secs: u64) -> Result<(), String> {
    let mut command = fuzz_run_command(fuzz_dir, target, secs)?;
    eprintln!("xtask: fuzzing {target} for {secs} s, one job: {command:?}");
    run(&mut command)
}

fn fuzz_seeds(fuzz_dir: &Path) -> Result<(), String> {
    eprintln!(
        "xtask: regenerating fuzz/corpus/*/seed-* from core/tests/snapshots and core/tests/wire.rs"
    );
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .current_dir(fuzz_dir)
        .env("PODFLEET_BLESS", "1")
        .args(["test", "--quiet", "--lib", "seeds::seed_corpus_is_current"]))
}
