//! `cargo xtask e2e --arch aarch64|x86_64`: the production agent on a
//! Debian guest under QEMU (docs/e2e.md).
//!
//! 1. Provisions the host: QEMU for the guest's architecture, mmdebstrap,
//!    and for a foreign architecture qemu-user with its binfmt_misc entry;
//!    nats-server, which the guest reaches through QEMU's user-mode network.
//! 2. Builds `podfleet-agent` for the guest: cargo on the host for the
//!    host's architecture, the cached Debian chroot of [`crate::cross`] for
//!    aarch64 on an amd64 host.
//! 3. Makes (or reuses) the guest image ([`crate::guest`]).
//! 4. Runs `podfleet-vm-e2e` (e2e/src/bin), which boots the guest, installs
//!    the agent as a user would and runs the scenarios, and prints the
//!    timing table.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::{cross, guest};

pub const USAGE: &str = "  build-agent --arch ARCH
                the production podfleet-agent for x86_64 or aarch64 (cross-built in a cached
                Debian chroot on an amd64 host, no rustup target needed); prints its path
  e2e --arch ARCH [--suite SUITE] [--keep] [--prepare]
                the agent on a Debian VM under QEMU: ARCH is x86_64 (amd64) or aarch64 (arm64),
                SUITE trixie (default) or bookworm; --keep (or PODFLEET_E2E_KEEP=1) leaves the
                guest running; --prepare only builds the agent and the image into the cache,
                PODFLEET_E2E_CACHE (default ~/.cache/podfleet-e2e); PODFLEET_E2E_ACCEL=kvm|tcg
                overrides the detection of KVM";

/// A guest architecture as the task knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    fn parse(name: &str) -> Result<Self, String> {
        match name {
            "x86_64" | "amd64" => Ok(Self::X86_64),
            "aarch64" | "arm64" => Ok(Self::Aarch64),
            other => Err(format!(
                "unknown architecture {other:?}: expected x86_64 (amd64) or aarch64 (arm64)"
            )),
        }
    }

    fn rust(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64",
            Self::Aarch64 => "aarch64",
        }
    }

    fn debian(self) -> &'static str {
        match self {
            Self::X86_64 => "amd64",
            Self::Aarch64 => "arm64",
        }
    }

    fn is_host(self) -> bool {
        env::consts::ARCH == self.rust()
    }

    /// The QEMU system emulator and its Debian package.
    fn qemu(self) -> (&'static str, &'static str) {
        match self {
            Self::X86_64 => ("qemu-system-x86_64", "qemu-system-x86"),
            Self::Aarch64 => ("qemu-system-aarch64", "qemu-system-arm"),
        }
    }
}

#[derive(Debug)]
struct Options {
    arch: Arch,
    suite: String,
    keep: bool,
    /// Only provision, build the agent and make the image (to fill the
    /// cache ahead of a run, e.g. while other tests run).
    prepare: bool,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut arch = None;
    let mut suite = guest::SUITES[0].to_owned();
    let mut keep = env::var("PODFLEET_E2E_KEEP").is_ok_and(|v| v == "1");
    let mut prepare = false;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--arch" => {
                let name = args.next().ok_or("--arch needs x86_64 or aarch64")?;
                arch = Some(Arch::parse(name)?);
            }
            "--suite" => suite.clone_from(args.next().ok_or("--suite needs trixie or bookworm")?),
            "--keep" => keep = true,
            "--prepare" => prepare = true,
            other => {
                return Err(format!(
                    "unexpected argument {other:?}\nusage: cargo xtask\n{USAGE}"
                ))
            }
        }
    }
    Ok(Options {
        arch: arch.ok_or_else(|| format!("--arch is required\nusage: cargo xtask\n{USAGE}"))?,
        suite,
        keep,
        prepare,
    })
}

/// `cargo xtask e2e ...`.
pub fn e2e(args: &[String], workspace: &Path) -> Result<(), String> {
    let options = parse(args)?;
    let arch = options.arch;
    let cache = cross::cache();
    let mut timings: Vec<(String, f64)> = Vec::new();

    let start = Instant::now();
    provision(arch)?;
    timings.push(("provision host".into(), start.elapsed().as_secs_f64()));

    let start = Instant::now();
    let agent = agent_for(arch, workspace, &cache)?;
    timings.push((
        format!("agent build ({})", arch.rust()),
        start.elapsed().as_secs_f64(),
    ));

    let start = Instant::now();
    let image = guest::image(&cache, arch.debian(), &options.suite)?;
    timings.push((
        format!("guest image ({})", options.suite),
        start.elapsed().as_secs_f64(),
    ));

    if options.prepare {
        eprintln!(
            "xtask: prepared: agent {}, image {}",
            agent.display(),
            image.disk.display()
        );
        return Ok(());
    }

    let start = Instant::now();
    eprintln!("xtask: building the scenarios (cargo build -p e2e --bin podfleet-vm-e2e)");
    crate::cargo(
        &["build", "--quiet", "-p", "e2e", "--bin", "podfleet-vm-e2e"],
        &[],
    )?;
    timings.push(("scenarios build".into(), start.elapsed().as_secs_f64()));

    let work = target_dir(workspace).join("vm-e2e").join(arch.rust());
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(|e| format!("could not create {}: {e}", work.display()))?;
    let mut scenarios = Command::new(target_dir(workspace).join("debug").join("podfleet-vm-e2e"));
    scenarios
        .args(["--arch", arch.rust()])
        .arg("--kernel")
        .arg(&image.kernel)
        .arg("--initrd")
        .arg(&image.initrd)
        .arg("--disk")
        .arg(&image.disk)
        .arg("--ssh-key")
        .arg(&image.ssh_key)
        .arg("--agent")
        .arg(&agent)
        .arg("--work")
        .arg(&work);
    for (name, secs) in &timings {
        scenarios.arg("--timing").arg(format!("{name}={secs:.1}"));
    }
    if options.keep {
        scenarios.arg("--keep");
    }
    crate::run(&mut scenarios).map_err(|e| {
        format!(
            "{e}\nthe guest's console and QEMU's log are in {}; PODFLEET_E2E_KEEP=1 keeps the guest for a look",
            work.display()
        )
    })
}

/// `cargo xtask build-agent --arch ARCH`: the production agent for `ARCH`,
/// built as the VM tier builds it; prints its path.
pub fn build_agent(args: &[String], workspace: &Path) -> Result<(), String> {
    let arch = match args {
        [flag, name] if flag == "--arch" => Arch::parse(name)?,
        _ => return Err("usage: cargo xtask build-agent --arch x86_64|aarch64".into()),
    };
    let binary = agent_for(arch, workspace, &cross::cache())?;
    println!("{}", binary.display());
    Ok(())
}

/// `podfleet-agent` built with `--release --locked` for `arch`: by the
/// host's cargo for the host's architecture, in the cached chroot for
/// aarch64 on an amd64 host.
fn agent_for(arch: Arch, workspace: &Path, cache: &Path) -> Result<PathBuf, String> {
    if arch.is_host() {
        eprintln!(
            "xtask: building podfleet-agent (cargo build --release --locked -p podfleet-agent)"
        );
        crate::cargo(
            &["build", "--release", "--locked", "-p", "podfleet-agent"],
            &[],
        )?;
        Ok(target_dir(workspace).join("release").join("podfleet-agent"))
    } else if arch == Arch::Aarch64 && Arch::X86_64.is_host() {
        cross::aarch64_agent(workspace, cache)
    } else {
        Err(format!(
            "a {} agent is built on a {} host or, for aarch64, on an x86_64 one; this host is {}",
            arch.rust(),
            arch.rust(),
            env::consts::ARCH
        ))
    }
}

fn target_dir(workspace: &Path) -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from)
}

/// What the VM tier needs on the host, by program and Debian package.
fn provision(arch: Arch) -> Result<(), String> {
    let (qemu, qemu_package) = arch.qemu();
    let mut needs = vec![
        ("nats-server", "nats-server"),
        (qemu, qemu_package),
        ("mmdebstrap", "mmdebstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("ssh", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
        ("unshare", "util-linux"),
    ];
    if !arch.is_host() {
        // mmdebstrap checks a foreign architecture runs with arch-test, and
        // runs its maintainer scripts through qemu-user.
        needs.push(("arch-test", "arch-test"));
        needs.push(("qemu-aarch64-static", "qemu-user-static"));
    }
    crate::install_missing(&needs, "the VM tier", false)?;
    if !arch.is_host() {
        binfmt(arch)?;
    }
    Ok(())
}

/// Makes sure the kernel runs `arch`'s binaries through qemu-user: mounts
/// binfmt_misc when it is not, and registers qemu-user-static's entry (with
/// its `F` flag, so that it works inside chroots) when it is missing.
fn binfmt(arch: Arch) -> Result<(), String> {
    let dir = Path::new("/proc/sys/fs/binfmt_misc");
    if !dir.join("register").exists() {
        crate::run(
            Command::new("mount")
                .args(["-t", "binfmt_misc", "binfmt_misc"])
                .arg(dir),
        )
        .map_err(|e| {
            format!(
                "{e}: binfmt_misc is needed to make an {} image",
                arch.debian()
            )
        })?;
    }
    let name = format!("qemu-{}", arch.rust());
    if dir.join(&name).exists() {
        return Ok(());
    }
    let conf = Path::new("/usr/lib/binfmt.d").join(format!("{name}.conf"));
    let entry = fs::read_to_string(&conf).map_err(|e| {
        format!(
            "could not read {} ({e}): it comes with Debian's qemu-user-static",
            conf.display()
        )
    })?;
    eprintln!(
        "xtask: registering {name} with binfmt_misc ({})",
        conf.display()
    );
    fs::write(dir.join("register"), entry.trim())
        .map_err(|e| format!("could not register {name} with binfmt_misc: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arguments_are_read_and_bad_ones_named() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let options = parse(&args(&["--arch", "arm64", "--suite", "bookworm"])).unwrap();
        assert_eq!(options.arch, Arch::Aarch64);
        assert_eq!(options.suite, "bookworm");
        assert!(parse(&args(&["--arch", "riscv64"]))
            .unwrap_err()
            .contains("\"riscv64\""));
        assert!(parse(&args(&[]))
            .unwrap_err()
            .contains("--arch is required"));
        assert!(parse(&args(&["--arch", "x86_64", "--fast"]))
            .unwrap_err()
            .contains("\"--fast\""));
    }
}
