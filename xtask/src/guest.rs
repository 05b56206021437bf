//! The VM tier's guest images: Debian from its packages only, made with
//! mmdebstrap and cached in a directory named after a hash of the recipe.
//!
//! An image is a kernel and its initrd (taken out of the root file system's
//! `/boot`, for QEMU's direct kernel boot) and a raw ext4 file system made
//! from the mmdebstrap tree with `mkfs.ext4 -d` (no loop mounts). It has
//! systemd, openssh-server with a key made for the image in root's
//! `authorized_keys`, podman with its network stack (netavark,
//! aardvark-dns), crun and runc, busybox-static and nothing of podfleet's:
//! the scenarios install the agent the way a user does. A foreign
//! architecture's packages are configured through binfmt_misc and
//! qemu-user.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::cross::{fnv1a64, put_in_place, remove_stale_partials, took};

/// Bumped whenever the recipe changes in a way the arguments below do not
/// show (it is part of the hash that names the image).
const RECIPE_VERSION: u32 = 1;
/// The mirror the host uses.
const MIRROR: &str = "http://deb.debian.org/debian";
/// The Debian releases an image can be of.
pub const SUITES: [&str; 2] = ["trixie", "bookworm"];
/// The root file system's size (sparse: only what is written takes room).
const DISK_SIZE: &str = "4G";

/// A guest image in the cache.
#[derive(Debug, Clone)]
pub struct Image {
    /// The kernel.
    pub kernel: PathBuf,
    /// Its initrd.
    pub initrd: PathBuf,
    /// The raw ext4 root file system.
    pub disk: PathBuf,
    /// The private key root's `authorized_keys` accepts.
    pub ssh_key: PathBuf,
}

/// What an image has besides the essential packages, for Debian
/// architecture `arch` (`amd64`, `arm64`).
fn packages(arch: &str) -> Vec<String> {
    let mut packages: Vec<String> = [
        "systemd",
        "systemd-sysv",
        "udev",
        "dbus",
        "kmod",
        "initramfs-tools",
        "zstd",
        "openssh-server",
        "podman",
        "conmon",
        "crun",
        "runc",
        "netavark",
        "aardvark-dns",
        "nftables",
        "iptables",
        "catatonit",
        "busybox-static",
        "iproute2",
    ]
    .map(str::to_owned)
    .to_vec();
    packages.insert(0, format!("linux-image-cloud-{arch}"));
    packages
}

/// The mmdebstrap options (before the suite): all of the recipe but the
/// suite and the architecture's name. `$1` in a hook is the tree; hooks run
/// in the image directory, where `key.pub` is.
fn mmdebstrap_options(arch: &str) -> Vec<String> {
    vec![
        "--variant=minbase".to_owned(),
        format!("--architectures={arch}"),
        format!("--include={}", packages(arch).join(",")),
        // Documentation nobody reads in a test guest is not unpacked, which
        // also spares a foreign architecture's emulated dpkg the work.
        "--dpkgopt=path-exclude=/usr/share/man/*".to_owned(),
        "--dpkgopt=path-exclude=/usr/share/doc/*".to_owned(),
        "--dpkgopt=path-include=/usr/share/doc/*/copyright".to_owned(),
        "--dpkgopt=path-exclude=/usr/share/locale/*".to_owned(),
        // The initrd needs only what mounts the root: virtio's block device
        // and ext4. Fewer modules make it quicker to build, above all under
        // emulation.
        "--setup-hook=mkdir -p \"$1/etc/initramfs-tools/conf.d\" && printf 'MODULES=list\\n' > \"$1/etc/initramfs-tools/conf.d/podfleet\" && printf 'virtio_pci\\nvirtio_blk\\next4\\n' > \"$1/etc/initramfs-tools/modules\"".to_owned(),
        "--customize-hook=mkdir -p -m 0700 \"$1/root/.ssh\" && cp key.pub \"$1/root/.ssh/authorized_keys\"".to_owned(),
        "--customize-hook=echo podfleet-vm > \"$1/etc/hostname\" && printf '127.0.1.1 podfleet-vm\\n' >> \"$1/etc/hosts\"".to_owned(),
        "--customize-hook=printf '/dev/vda / ext4 defaults 0 1\\n' > \"$1/etc/fstab\"".to_owned(),
        "--customize-hook=printf '[Match]\\nName=en*\\n\\n[Network]\\nDHCP=yes\\n' > \"$1/etc/systemd/network/20-wired.network\" && chroot \"$1\" systemctl enable systemd-networkd".to_owned(),
    ]
}

/// Makes sure the image of Debian `suite` for Debian architecture `arch`
/// is in `cache`, building it when it is not, and returns it.
///
/// # Errors
///
/// If mmdebstrap, ssh-keygen or mkfs.ext4 fails (with the end of the log).
pub fn image(cache: &Path, arch: &str, suite: &str) -> Result<Image, String> {
    if !SUITES.contains(&suite) {
        return Err(format!(
            "unknown suite {suite:?}: the guest images are of {}",
            SUITES.join(" or ")
        ));
    }
    let options = mmdebstrap_options(arch);
    let mut recipe = format!("{RECIPE_VERSION}\0{suite}\0{MIRROR}\0{DISK_SIZE}");
    for option in &options {
        recipe.push('\0');
        recipe.push_str(option);
    }
    let name = format!("guest-{suite}-{arch}-{:016x}", fnv1a64(recipe.as_bytes()));
    let dir = cache.join(&name);
    let image = Image {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        disk: dir.join("root.raw"),
        ssh_key: dir.join("key"),
    };
    if dir.is_dir() {
        eprintln!("xtask: reusing the guest image {}", dir.display());
        return Ok(image);
    }
    fs::create_dir_all(cache).map_err(|e| format!("could not create {}: {e}", cache.display()))?;
    remove_stale_partials(cache, &name)?;
    let partial = cache.join(format!("{name}.partial-{}", std::process::id()));
    fs::create_dir_all(&partial)
        .map_err(|e| format!("could not create {}: {e}", partial.display()))?;
    let log_path = cache.join(format!("{name}.log"));
    eprintln!(
        "xtask: making the {suite} {arch} guest image {} (mmdebstrap; about 1 min for the host's architecture, several under emulation; log: {})",
        dir.display(),
        log_path.display()
    );
    let start = Instant::now();
    logged(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "podfleet-e2e", "-f"])
            .arg(partial.join("key")),
        &log_path,
        "ssh-keygen (Debian package openssh-client)",
    )?;
    let tree = partial.join("tree");
    // mmdebstrap mounts /proc, /sys and /dev in the tree while it installs;
    // its own mount namespace keeps them from outliving it.
    logged(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "mmdebstrap"])
            .args(&options)
            .arg(suite)
            .arg(&tree)
            .arg(MIRROR)
            .current_dir(&partial),
        &log_path,
        "mmdebstrap",
    )?;
    let boot = tree.join("boot");
    for (prefix, to) in [("vmlinuz-", "vmlinuz"), ("initrd.img-", "initrd.img")] {
        let found = fs::read_dir(&boot)
            .map_err(|e| format!("could not read {}: {e}", boot.display()))?
            .flatten()
            .map(|entry| entry.path())
            .find(|path| {
                path.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix))
            })
            .ok_or_else(|| format!("the image has no {}{prefix}*", boot.display()))?;
        fs::copy(&found, partial.join(to))
            .map_err(|e| format!("could not copy {}: {e}", found.display()))?;
    }
    logged(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "root", "-d"])
            .arg(&tree)
            .arg(partial.join("root.raw"))
            .arg(DISK_SIZE),
        &log_path,
        "mkfs.ext4 (Debian package e2fsprogs)",
    )?;
    fs::remove_dir_all(&tree).map_err(|e| format!("could not remove {}: {e}", tree.display()))?;
    put_in_place(&partial, &dir)?;
    eprintln!("xtask: guest image made in {}", took(start));
    Ok(image)
}

/// Runs `command` with its output appended to `log`; on failure, the
/// error names `what` and carries the log's end.
pub(crate) fn logged(command: &mut Command, log: &Path, what: &str) -> Result<(), String> {
    let open = || {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("could not open {}: {e}", log.display()))
    };
    let shown = format!("{command:?}");
    let status = command
        .stdin(Stdio::null())
        .stdout(open()?)
        .stderr(open()?)
        .status()
        .map_err(|e| format!("could not run {what}: {e}"))?;
    if status.success() {
        return Ok(());
    }
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    Err(format!(
        "{what} failed ({status}): {shown}\n{}\n(full log: {})",
        lines[lines.len().saturating_sub(30)..].join("\n"),
        log.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recipe_has_the_kernel_of_its_architecture_and_the_runtime() {
        let options = mmdebstrap_options("arm64");
        let include = options
            .iter()
            .find(|o| o.starts_with("--include="))
            .unwrap();
        for package in [
            "linux-image-cloud-arm64",
            "podman",
            "openssh-server",
            "busybox-static",
        ] {
            assert!(include.contains(package), "{include}");
        }
        assert!(options.contains(&"--architectures=arm64".to_owned()));
    }

    #[test]
    fn an_unknown_suite_is_refused_by_name() {
        let error = image(Path::new("/nonexistent"), "amd64", "sid").unwrap_err();
        assert!(error.contains("\"sid\""), "{error}");
        assert!(error.contains("trixie or bookworm"), "{error}");
    }
}
