//! Cross-building the production `podfleet-agent` for aarch64 on an amd64
//! Debian machine, without rustup targets.
//!
//! A Debian trixie chroot (amd64, with arm64 as a foreign architecture) is
//! made with mmdebstrap and cached in a directory named after a hash of its
//! recipe. It holds Debian's rustc and cargo from trixie-backports, the arm64
//! standard library (`libstd-rust-dev:arm64`) and the aarch64 cross gcc as
//! the linker. cargo runs in it in a private mount namespace, so the mounts
//! it needs (/proc, /dev, the workspace read-only, the cargo home and target
//! directory from the cache) disappear with it.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Bumped whenever the chroot's recipe changes in a way the arguments below
/// do not show (it is part of the hash that names the chroot).
const RECIPE_VERSION: u32 = 1;
/// The Debian release of the chroot.
const SUITE: &str = "trixie";
/// The mirror the host uses.
const MIRROR: &str = "http://deb.debian.org/debian";
/// What the chroot has besides apt and the essential packages.
const PACKAGES: [&str; 6] = [
    "rustc",
    "cargo",
    "libstd-rust-dev:arm64",
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "ca-certificates",
];
/// Backports are "NotAutomatic" (priority 100), so without this apt would
/// take trixie's rustc 1.85. Foreign-architecture packages need their own
/// `:arm64` pattern, or `libstd-rust-dev:arm64` stays at trixie's version
/// and conflicts with the amd64 one.
const RUST_PIN: &str = "Package: rustc cargo libstd-rust-* libstd-rust-*:arm64
Pin: release n=trixie-backports
Pin-Priority: 500
";
/// The Rust target triple.
const TARGET: &str = "aarch64-unknown-linux-gnu";
/// The ELF `e_machine` of AArch64.
const EM_AARCH64: u16 = 183;
/// Where the workspace, the cargo home and the target directory are mounted
/// inside the chroot.
const IN_CHROOT: &str = "/podfleet";

/// Builds podfleet-agent (release) for aarch64-unknown-linux-gnu in a cached Debian trixie chroot; returns the binary's path.
///
/// The binary is the one `cargo build --release -p podfleet-agent` makes
/// (the package's default features), built `--locked`. `cache` holds the
/// chroot (`chroot-trixie-arm64-<hash>`), the cargo home (`cargo-home`) and
/// the target directory (`target-aarch64`), so later runs are incremental;
/// the workspace is only read. Needs root, mmdebstrap, unshare, mount and
/// chroot. The result is checked to be an AArch64 ELF, and run with
/// `--version` under qemu-user when that is installed.
pub fn aarch64_agent(workspace: &Path, cache: &Path) -> Result<PathBuf, String> {
    preflight()?;
    fs::create_dir_all(cache).map_err(|e| {
        format!(
            "could not create the cache directory {}: {e}",
            cache.display()
        )
    })?;
    let cache = absolute(cache)?;
    let workspace = absolute(workspace)?;
    if !workspace.join("Cargo.lock").is_file() {
        return Err(format!(
            "{} has no Cargo.lock: pass the podfleet workspace's root",
            workspace.display()
        ));
    }
    let root = aarch64_chroot(&cache)?;
    let binary = build_agent(&workspace, &cache, &root)?;
    check_binary(&binary, &root)?;
    let size = fs::metadata(&binary)
        .map_err(|e| format!("could not stat {}: {e}", binary.display()))?
        .len();
    eprintln!(
        "xtask: aarch64 podfleet-agent: {} ({})",
        binary.display(),
        megabytes(size)
    );
    Ok(binary)
}

/// The cache directory `cargo xtask` uses when nobody passes one:
/// `$XDG_CACHE_HOME/podfleet-e2e`, else `~/.cache/podfleet-e2e`.
pub fn default_cache() -> PathBuf {
    env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"))
        .join("podfleet-e2e")
}

/// Makes sure the cached chroot exists, creating it when it does not, and
/// returns its root. It also serves as the arm64 sysroot for qemu-user
/// (`qemu-aarch64-static -L <root>`), since it has `libc6:arm64`.
pub fn aarch64_chroot(cache: &Path) -> Result<PathBuf, String> {
    let (options, mirrors) = mmdebstrap_recipe();
    let mut recipe = format!("{RECIPE_VERSION}");
    for arg in options.iter().chain([&SUITE.to_owned()]).chain(&mirrors) {
        recipe.push('\0');
        recipe.push_str(arg);
    }
    let name = format!("chroot-{SUITE}-arm64-{:016x}", fnv1a64(recipe.as_bytes()));
    let root = cache.join(&name);
    if root.is_dir() {
        eprintln!("xtask: reusing the aarch64 build chroot {}", root.display());
        return Ok(root);
    }
    remove_stale_partials(cache, &name)?;
    let partial = cache.join(format!("{name}.partial-{}", std::process::id()));
    let log_path = cache.join(format!("{name}.log"));
    let log = fs::File::create(&log_path)
        .map_err(|e| format!("could not create {}: {e}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("could not reopen {}: {e}", log_path.display()))?;
    eprintln!(
        "xtask: creating the aarch64 build chroot {} (mmdebstrap: Debian {SUITE} + {SUITE}-backports, {}; one or two minutes; log: {})",
        root.display(),
        PACKAGES.join(", "),
        log_path.display()
    );
    let start = Instant::now();
    // mmdebstrap mounts /proc, /sys and /dev in the chroot while it
    // installs; its own mount namespace keeps them from outliving it.
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "--", "mmdebstrap"])
        .args(&options)
        .arg(SUITE)
        .arg(&partial)
        .args(&mirrors)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    let shown = format!("{command:?}");
    let status = command
        .status()
        .map_err(|e| format!("could not run {shown}: {e}"))?;
    if !status.success() {
        let log = fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        return Err(format!(
            "creating the chroot failed ({status}): {shown}\n{tail}\n(full log: {}; the partial chroot {} is removed on the next run). Is {MIRROR} reachable?",
            log_path.display(),
            partial.display()
        ));
    }
    put_in_place(&partial, &root)?;
    eprintln!("xtask: chroot created in {}", took(start));
    Ok(root)
}

/// Renames the finished `partial` build to `dir`, its name in the cache;
/// when another run finished the same recipe first, keeps theirs.
/// The cache directory: `PODFLEET_E2E_CACHE`, else [`default_cache`].
pub(crate) fn cache() -> PathBuf {
    std::env::var_os("PODFLEET_E2E_CACHE")
        .filter(|dir| !dir.is_empty())
        .map_or_else(default_cache, PathBuf::from)
}

pub(crate) fn put_in_place(partial: &Path, dir: &Path) -> Result<(), String> {
    match fs::rename(partial, dir) {
        Ok(()) => Ok(()),
        Err(_) if dir.is_dir() => fs::remove_dir_all(partial)
            .map_err(|e| format!("could not remove {}: {e}", partial.display())),
        Err(e) => Err(format!(
            "could not rename {} to {}: {e}",
            partial.display(),
            dir.display()
        )),
    }
}

/// The mmdebstrap options (before the suite) and mirror lines (after the
/// target directory): all of the chroot's recipe.
fn mmdebstrap_recipe() -> (Vec<String>, Vec<String>) {
    let pin = RUST_PIN.trim_end().replace('\n', "\\n");
    let options = vec![
        "--variant=apt".to_owned(),
        "--architectures=amd64,arm64".to_owned(),
        format!("--include={}", PACKAGES.join(",")),
        format!(
            "--setup-hook=mkdir -p \"$1/etc/apt/preferences.d\" && printf '{pin}\\n' > \"$1/etc/apt/preferences.d/podfleet-rust\""
        ),
    ];
    let mirrors = vec![
        format!("deb {MIRROR} {SUITE} main"),
        format!("deb {MIRROR} {SUITE}-backports main"),
    ];
    (options, mirrors)
}

/// Removes chroots of this recipe left half-made by a run that died (its
/// process is gone), after making sure nothing is mounted inside them.
pub(crate) fn remove_stale_partials(cache: &Path, name: &str) -> Result<(), String> {
    let prefix = format!("{name}.partial-");
    let entries =
        fs::read_dir(cache).map_err(|e| format!("could not read {}: {e}", cache.display()))?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        if Path::new("/proc").join(pid).exists() && pid != std::process::id().to_string() {
            continue; // still being made by another run
        }
        let path = entry.path();
        let path_text = path.to_string_lossy();
        let mounted = mountinfo
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .any(|point| point == path_text || point.starts_with(&format!("{path_text}/")));
        if mounted {
            return Err(format!(
                "{} is an interrupted chroot build with something still mounted inside: unmount it (grep {} /proc/self/mountinfo), remove it and try again",
                path.display(),
                path.display()
            ));
        }
        eprintln!(
            "xtask: removing the interrupted chroot build {}",
            path.display()
        );
        fs::remove_dir_all(&path)
            .map_err(|e| format!("could not remove {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Runs `cargo build --release --locked -p podfleet-agent --target
/// aarch64-unknown-linux-gnu` in the chroot; returns the binary's path on
/// the host.
fn build_agent(workspace: &Path, cache: &Path, root: &Path) -> Result<PathBuf, String> {
    let cargo_home = cache.join("cargo-home");
    let target_dir = cache.join("target-aarch64");
    for dir in [&cargo_home, &target_dir] {
        fs::create_dir_all(dir).map_err(|e| format!("could not create {}: {e}", dir.display()))?;
    }
    for point in ["src", "cargo-home", "target"] {
        let dir = root.join(IN_CHROOT.trim_start_matches('/')).join(point);
        fs::create_dir_all(&dir).map_err(|e| format!("could not create {}: {e}", dir.display()))?;
    }
    // Name resolution for crates.io: the host's, copied afresh each time.
    for file in ["resolv.conf", "hosts"] {
        let from = Path::new("/etc").join(file);
        let to = root.join("etc").join(file);
        // Never write through a symbolic link in the chroot (it would point
        // at the host's own files).
        if fs::symlink_metadata(&to).is_ok() {
            fs::remove_file(&to).map_err(|e| format!("could not remove {}: {e}", to.display()))?;
        }
        fs::copy(&from, &to)
            .map_err(|e| format!("could not copy {} to {}: {e}", from.display(), to.display()))?;
    }
    // The host's CA bundle, which may trust more than Debian's (a TLS-
    // inspecting proxy's CA, say); the chroot's own when the host has none.
    let cainfo = match host_ca_bundle() {
        Some(bundle) => {
            let to = root
                .join(IN_CHROOT.trim_start_matches('/'))
                .join("host-ca-certificates.crt");
            fs::copy(&bundle, &to).map_err(|e| {
                format!(
                    "could not copy {} to {}: {e}",
                    bundle.display(),
                    to.display()
                )
            })?;
            format!("{IN_CHROOT}/host-ca-certificates.crt")
        }
        None => "/etc/ssl/certs/ca-certificates.crt".to_owned(),
    };
    let rustc = Command::new("chroot")
        .arg(root)
        .args(["rustc", "--version"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "rustc".to_owned(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        );
    let cargo_args = [
        "cargo",
        "build",
        "--release",
        "--locked",
        "-p",
        "podfleet-agent",
        "--target",
        TARGET,
    ];
    eprintln!(
        "xtask: building podfleet-agent for {TARGET} in the chroot with {rustc} ({}; a clean build takes 6 to 15 min)",
        cargo_args.join(" ")
    );
    let start = Instant::now();
    let script = r#"set -eu
root=$1 src=$2 home=$3 target=$4 in=$5
shift 5
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
mount --bind "$src" "$root$in/src"
mount -o remount,bind,ro "$root$in/src"
mount --bind "$home" "$root$in/cargo-home"
mount --bind "$target" "$root$in/target"
exec chroot "$root" sh -c 'cd "$0" && exec "$@"' "$in/src" "$@"
"#;
    let mut command = Command::new("unshare");
    command
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(root)
        .arg(workspace)
        .arg(&cargo_home)
        .arg(&target_dir)
        .arg(IN_CHROOT)
        .args([
            "env",
            "-i",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/root",
            "LANG=C.UTF-8",
        ])
        .arg(format!("CARGO_HOME={IN_CHROOT}/cargo-home"))
        .arg(format!("CARGO_TARGET_DIR={IN_CHROOT}/target"))
        .arg(format!("CARGO_HTTP_CAINFO={cainfo}"))
        .arg("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc");
    if let Some(term) = env::var_os("TERM") {
        let mut pair = std::ffi::OsString::from("TERM=");
        pair.push(term);
        command.arg(pair);
    }
    command.args(cargo_args).stdin(Stdio::null());
    let status = command
        .status()
        .map_err(|e| format!("could not run unshare (cargo build in the chroot): {e}"))?;
    if !status.success() {
        return Err(format!(
            "`{}` in the chroot {} failed ({status}): see cargo's output above. The chroot can be entered with `chroot {}`; removing it makes the next run create it afresh",
            cargo_args.join(" "),
            root.display(),
            root.display()
        ));
    }
    eprintln!("xtask: cargo build finished in {}", took(start));
    Ok(target_dir
        .join(TARGET)
        .join("release")
        .join("podfleet-agent"))
}

/// The CA bundle the host's cargo would use: `CARGO_HTTP_CAINFO`,
/// `SSL_CERT_FILE`, else Debian's.
fn host_ca_bundle() -> Option<PathBuf> {
    ["CARGO_HTTP_CAINFO", "SSL_CERT_FILE"]
        .into_iter()
        .filter_map(env::var_os)
        .map(PathBuf::from)
        .chain([PathBuf::from("/etc/ssl/certs/ca-certificates.crt")])
        .find(|path| path.is_file())
}

/// Checks that `binary` is a 64-bit little-endian AArch64 ELF, and runs it
/// with `--version` under qemu-user when that is available.
fn check_binary(binary: &Path, root: &Path) -> Result<(), String> {
    let bytes = fs::read(binary).map_err(|e| {
        format!(
            "cargo build succeeded but {} cannot be read ({e})",
            binary.display()
        )
    })?;
    aarch64_elf(&bytes).map_err(|e| {
        format!(
            "{} is not an aarch64 binary: {e}; remove {} and try again",
            binary.display(),
            binary
                .parent()
                .map_or_else(String::new, |p| p.display().to_string())
        )
    })?;
    let glibc = newest_glibc(&bytes).unwrap_or_else(|| "none".to_owned());
    eprintln!(
        "xtask: {} is an ELF 64-bit LSB aarch64 executable; newest glibc symbol version: {glibc}",
        binary.display()
    );
    let binfmt = Path::new("/proc/sys/fs/binfmt_misc/qemu-aarch64");
    let mut run = if let Some(qemu) = ["qemu-aarch64-static", "qemu-aarch64"]
        .into_iter()
        .find(|q| find_program(q).is_some())
    {
        let mut command = Command::new(qemu);
        command.arg("-L").arg(root).arg(binary);
        command
    } else if binfmt.exists() {
        let mut command = Command::new(binary);
        command.env("QEMU_LD_PREFIX", root);
        command
    } else {
        eprintln!("xtask: qemu-user is not installed (Debian package qemu-user-static), so the binary was not run");
        return Ok(());
    };
    run.arg("--version").stdin(Stdio::null());
    let shown = format!("{run:?}");
    let output = run
        .output()
        .map_err(|e| format!("could not run {shown}: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || !stdout.contains("podfleet-agent") {
        return Err(format!(
            "{shown} failed ({}): {}{}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    eprintln!("xtask: under qemu-user it says: {}", stdout.trim());
    Ok(())
}

/// Checks an ELF header: 64-bit, little-endian, `e_machine` AArch64.
fn aarch64_elf(bytes: &[u8]) -> Result<(), String> {
    if bytes.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err("no ELF magic".into());
    }
    if bytes.get(4) != Some(&2) {
        return Err("not a 64-bit ELF".into());
    }
    if bytes.get(5) != Some(&1) {
        return Err("not little-endian".into());
    }
    let machine = bytes
        .get(18..20)
        .map(|m| u16::from_le_bytes([m[0], m[1]]))
        .ok_or("truncated ELF header")?;
    if machine == EM_AARCH64 {
        Ok(())
    } else {
        Err(format!(
            "e_machine is {machine}, not {EM_AARCH64} (AArch64)"
        ))
    }
}

/// The newest `GLIBC_x.y[.z]` symbol version named in a binary, which is
/// the oldest glibc it runs on.
fn newest_glibc(bytes: &[u8]) -> Option<String> {
    let needle = b"GLIBC_";
    let mut newest: Option<(Vec<u32>, String)> = None;
    let mut at = 0;
    while let Some(offset) = bytes
        .get(at..)
        .and_then(|rest| rest.windows(needle.len()).position(|w| w == needle))
    {
        let start = at + offset + needle.len();
        let end = bytes
            .get(start..)
            .and_then(|rest| {
                rest.iter()
                    .position(|b| !(b.is_ascii_digit() || *b == b'.'))
            })
            .map_or(bytes.len(), |n| start + n);
        at = start;
        let text = String::from_utf8_lossy(bytes.get(start..end).unwrap_or_default());
        let version: Option<Vec<u32>> = text.split('.').map(|p| p.parse().ok()).collect();
        if let Some(version) = version.filter(|v| v.len() >= 2) {
            if newest.as_ref().is_none_or(|(n, _)| version > *n) {
                newest = Some((version, format!("GLIBC_{text}")));
            }
        }
    }
    newest.map(|(_, name)| name)
}

/// FNV-1a, 64 bits: names the chroot after its recipe.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Root, and the programs this needs, with the Debian package of each.
fn preflight() -> Result<(), String> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0");
    if !root {
        return Err(
            "building the aarch64 agent needs root (mmdebstrap, mount and chroot): run it as root"
                .into(),
        );
    }
    let missing: Vec<(&str, &str)> = [
        ("mmdebstrap", "mmdebstrap"),
        ("unshare", "util-linux"),
        ("mount", "mount"),
        ("chroot", "coreutils"),
    ]
    .into_iter()
    .filter(|(program, _)| find_program(program).is_none())
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let named: Vec<String> = missing
        .iter()
        .map(|(program, package)| format!("{program} (Debian package {package})"))
        .collect();
    let packages: Vec<&str> = missing.iter().map(|(_, package)| *package).collect();
    Err(format!(
        "building the aarch64 agent needs {}: install it with `apt-get install -y {}` and try again",
        named.join(", "),
        packages.join(" ")
    ))
}

pub(crate) fn find_program(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

pub(crate) fn absolute(path: &Path) -> Result<PathBuf, String> {
    fs::canonicalize(path).map_err(|e| format!("could not resolve {}: {e}", path.display()))
}

pub(crate) fn took(start: Instant) -> String {
    let elapsed = start.elapsed();
    let secs = elapsed.as_secs();
    if secs < 60 {
        format!("{:.1} s", elapsed.as_secs_f64())
    } else {
        format!("{} min {:02} s", secs / 60, secs % 60)
    }
}

pub(crate) fn megabytes(bytes: u64) -> String {
    // Precision is not a concern at these sizes.
    #[allow(clippy::cast_precision_loss)]
    let mb = bytes as f64 / 1_000_000.0;
    format!("{mb:.1} MB, {bytes} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_the_reference_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn the_elf_header_is_checked() {
        let mut header = vec![0u8; 64];
        header[..4].copy_from_slice(b"\x7fELF");
        header[4] = 2;
        header[5] = 1;
        header[18..20].copy_from_slice(&183u16.to_le_bytes());
        assert!(aarch64_elf(&header).is_ok());
        header[18..20].copy_from_slice(&62u16.to_le_bytes());
        assert!(aarch64_elf(&header).is_err());
        assert!(aarch64_elf(b"\x7fELF").is_err());
        assert!(aarch64_elf(b"#!/bin/sh").is_err());
    }

    #[test]
    fn the_newest_glibc_version_is_found() {
        let bytes = b"\0GLIBC_2.17\0GLIBC_2.34\0GLIBC_PRIVATE\0GLIBC_2.28\0GLIBC_2.3.4";
        assert_eq!(newest_glibc(bytes).as_deref(), Some("GLIBC_2.34"));
        assert_eq!(newest_glibc(b"nothing"), None);
    }

    #[test]
    fn only_interrupted_builds_of_the_recipe_are_removed() {
        let cache = env::temp_dir().join(format!("xtask-cross-test-{}", std::process::id()));
        let dead = cache.join("chroot-x.partial-4294967295");
        let alive = cache.join("chroot-x.partial-1");
        let other = cache.join("chroot-y.partial-4294967295");
        for dir in [&dead, &alive, &other] {
            fs::create_dir_all(dir.join("etc")).unwrap();
        }
        remove_stale_partials(&cache, "chroot-x").unwrap();
        assert!(!dead.exists());
        assert!(alive.exists());
        assert!(other.exists());
        fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn the_recipe_names_the_mirror_and_backports() {
        let (options, mirrors) = mmdebstrap_recipe();
        assert!(options.iter().any(|o| o.contains("libstd-rust-dev:arm64")));
        assert!(mirrors.iter().any(|m| m.contains("trixie-backports")));
    }
}
