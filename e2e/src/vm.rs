//! Debian guests under QEMU, reached over ssh: the VM tier's machinery.
//!
//! `cargo xtask e2e` builds a guest image (a kernel, its initrd and an ext4
//! root file system made by mmdebstrap, with an ssh key in root's
//! `authorized_keys`); [`Vm::boot`] boots it with its writes going to a
//! temporary overlay, so the cached image stays as it was, on QEMU's
//! user-mode network: the guest reaches the host's loopback services at
//! [`HOST_FROM_GUEST`] and the host reaches the guest's ssh on a forwarded
//! loopback port. Every command shares one ssh connection.
//!
//! Acceleration is KVM when the host can give it for the guest's
//! architecture, TCG otherwise ([`Accel::detect`]).

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::str::FromStr;
use std::thread;
use std::time::{Duration, Instant};

use crate::{free_port, log_file};

/// The address at which a guest on QEMU's user-mode network reaches the
/// host's loopback.
pub const HOST_FROM_GUEST: &str = "10.0.2.2";

/// How long a boot may take until ssh answers (under TCG on a 2-core host,
/// 40 to 80 s have been measured, more when the host is busy).
pub const BOOT_DEADLINE: Duration = Duration::from_secs(240);

/// A guest architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// amd64.
    X86_64,
    /// arm64, the Raspberry Pi's.
    Aarch64,
}

impl Arch {
    /// The name Rust and the kernel give it (`x86_64`, `aarch64`), which is
    /// also what the agent's heartbeat reports.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64",
            Self::Aarch64 => "aarch64",
        }
    }

    /// The QEMU system emulator for it.
    #[must_use]
    pub fn qemu(self) -> &'static str {
        match self {
            Self::X86_64 => "qemu-system-x86_64",
            Self::Aarch64 => "qemu-system-aarch64",
        }
    }

    /// The kernel's serial console device.
    #[must_use]
    pub fn console(self) -> &'static str {
        match self {
            Self::X86_64 => "ttyS0",
            Self::Aarch64 => "ttyAMA0",
        }
    }

    /// The host's own architecture.
    #[must_use]
    pub fn host() -> Option<Self> {
        std::env::consts::ARCH.parse().ok()
    }
}

impl FromStr for Arch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "x86_64" | "amd64" => Ok(Self::X86_64),
            "aarch64" | "arm64" => Ok(Self::Aarch64),
            other => Err(format!(
                "unknown architecture {other:?}: expected x86_64 (amd64) or aarch64 (arm64)"
            )),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How QEMU runs the guest's instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation, `-cpu host`.
    Kvm,
    /// QEMU's own translator, one host thread per guest CPU.
    Tcg,
}

impl Accel {
    /// KVM when `/dev/kvm` can be opened, the guest's architecture is the
    /// host's and the module behind it is not `kvm_pvm` (a nested,
    /// paravirtualised KVM that stock kernels do not boot under); TCG
    /// otherwise. `PODFLEET_E2E_ACCEL=kvm|tcg` decides instead.
    ///
    /// # Errors
    ///
    /// If `PODFLEET_E2E_ACCEL` is neither `kvm` nor `tcg`.
    pub fn detect(arch: Arch) -> Result<Self, String> {
        match std::env::var("PODFLEET_E2E_ACCEL").as_deref() {
            Ok("kvm") => return Ok(Self::Kvm),
            Ok("tcg") => return Ok(Self::Tcg),
            Ok(other) => {
                return Err(format!(
                    "PODFLEET_E2E_ACCEL={other:?}: expected kvm or tcg (or unset: detect)"
                ))
            }
            Err(_) => {}
        }
        let usable = Arch::host() == Some(arch)
            && fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok()
            && !Path::new("/sys/module/kvm_pvm").exists();
        Ok(if usable { Self::Kvm } else { Self::Tcg })
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        })
    }
}

/// What `cargo xtask e2e` built: a guest's kernel, initrd, root disk and
/// the ssh key its root accepts.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The guest's architecture.
    pub arch: Arch,
    /// The kernel (`/boot/vmlinuz-*` of the root file system).
    pub kernel: PathBuf,
    /// Its initrd.
    pub initrd: PathBuf,
    /// The root file system, a raw ext4 image; never written (each boot
    /// has its own overlay).
    pub disk: PathBuf,
    /// The private ssh key whose public half is root's `authorized_keys`.
    pub ssh_key: PathBuf,
}

/// A booted guest. Dropping it powers it off, unless it is [kept](Vm::keep).
#[derive(Debug)]
pub struct Vm {
    image: GuestImage,
    qemu: Option<Child>,
    dir: PathBuf,
    ssh_port: u16,
    accel: Accel,
    keep: bool,
}

impl Vm {
    /// Boots `image` with `memory_mib` of memory and two CPUs, its disk
    /// writes going to a temporary overlay, with QEMU's and the serial
    /// console's logs in `dir`, and returns once ssh answers.
    ///
    /// # Errors
    ///
    /// If QEMU cannot start, exits, or ssh does not answer within
    /// [`BOOT_DEADLINE`]; the error carries the console's last lines.
    pub fn boot(
        image: &GuestImage,
        dir: &Path,
        accel: Accel,
        memory_mib: u32,
    ) -> Result<Self, String> {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let ssh_port = free_port();
        let mut qemu = Command::new(image.arch.qemu());
        match image.arch {
            Arch::X86_64 => qemu.args(["-machine", "q35"]),
            Arch::Aarch64 => qemu.args(["-machine", "virt"]),
        };
        match (accel, image.arch) {
            (Accel::Kvm, _) => qemu.args(["-accel", "kvm", "-cpu", "host"]),
            (Accel::Tcg, Arch::X86_64) => qemu.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
            // `max` emulates pointer authentication, which costs TCG dearly.
            (Accel::Tcg, Arch::Aarch64) => {
                qemu.args(["-accel", "tcg,thread=multi", "-cpu", "cortex-a72"])
            }
        };
        qemu.args(["-m", &memory_mib.to_string(), "-smp", "2"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-serial")
            .arg(format!("file:{}", dir.join("console.log").display()))
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .arg("-append")
            .arg(format!(
                "root=/dev/vda rw console={} panic=-1 quiet",
                image.arch.console()
            ))
            .arg("-drive")
            // snapshot=on: the guest's writes go to a temporary overlay that
            // lives as long as QEMU (reboots included); the image is never
            // written.
            .arg(format!(
                "if=none,id=root,format=raw,snapshot=on,file={}",
                image.disk.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=root"])
            .arg("-netdev")
            .arg(format!("user,id=net,hostfwd=tcp:127.0.0.1:{ssh_port}-:22"))
            // No option ROM: it is only for booting from the network, and
            // the ROM files (ipxe-qemu) are only a Recommends of QEMU.
            .args(["-device", "virtio-net-pci,netdev=net,romfile="])
            .args(["-device", "virtio-rng-pci"])
            .stdin(Stdio::null())
            .stdout(log_file(&dir.join("qemu.log")))
            .stderr(log_file(&dir.join("qemu.log")));
        let child = qemu.spawn().map_err(|e| {
            format!(
                "cannot start {} (Debian package qemu-system-{}): {e}",
                image.arch.qemu(),
                match image.arch {
                    Arch::X86_64 => "x86",
                    Arch::Aarch64 => "arm",
                }
            )
        })?;
        let mut vm = Self {
            image: image.clone(),
            qemu: Some(child),
            dir: dir.to_owned(),
            ssh_port,
            accel,
            keep: false,
        };
        vm.wait_for_ssh(BOOT_DEADLINE)?;
        Ok(vm)
    }

    /// The acceleration it runs with.
    #[must_use]
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The guest's architecture.
    #[must_use]
    pub fn arch(&self) -> Arch {
        self.image.arch
    }

    /// Keeps the guest running after this is dropped (for debugging), and
    /// returns how to reach it and how to clean up.
    #[must_use]
    pub fn keep(&mut self) -> String {
        self.keep = true;
        let pid = self.qemu.as_ref().map_or(0, Child::id);
        format!(
            "the guest is still running (QEMU pid {pid}):\n  ssh: {}\n  console log: {}\n  clean up: kill {pid}; rm -r {}",
            self.ssh_command_line(),
            self.dir.join("console.log").display(),
            self.dir.display()
        )
    }

    /// The ssh command line that logs into the guest, for people.
    #[must_use]
    pub fn ssh_command_line(&self) -> String {
        format!(
            "ssh -i {} -p {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null root@127.0.0.1",
            self.image.ssh_key.display(),
            self.ssh_port
        )
    }

    /// An `ssh` command to the guest as root, without its remote command,
    /// over the connection all such commands share.
    #[must_use]
    pub fn ssh(&self) -> Command {
        self.ssh_command(true)
    }

    /// An `ssh` command to the guest; `shared`: over the shared connection,
    /// else over one of its own.
    fn ssh_command(&self, shared: bool) -> Command {
        let mut ssh = Command::new("ssh");
        ssh.args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "ServerAliveInterval=5",
            "-o",
            "ServerAliveCountMax=6",
        ]);
        if shared {
            // One connection carries every command: a new one costs the
            // emulated guest a key exchange each time.
            ssh.args(["-o", "ControlMaster=auto", "-o", "ControlPersist=60", "-o"])
                .arg(format!("ControlPath={}", self.control_path().display()));
        } else {
            ssh.args(["-o", "ControlMaster=no", "-o", "ControlPath=none"]);
        }
        ssh.arg("-i").arg(&self.image.ssh_key).args([
            "-p",
            &self.ssh_port.to_string(),
            "root@127.0.0.1",
        ]);
        ssh
    }

    /// Ends the shared ssh connection; the next command opens another.
    fn close_shared(&self) {
        let _ = self
            .ssh()
            .args(["-O", "exit"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// The socket of the shared ssh connection (short: a unix socket's
    /// path has at most 107 bytes).
    fn control_path(&self) -> PathBuf {
        std::env::temp_dir().join(format!("podfleet-vm-ssh-{}", self.ssh_port))
    }

    /// Runs `script` with the guest's `sh` and returns its output, whatever
    /// its exit status.
    ///
    /// # Errors
    ///
    /// If ssh cannot be run at all.
    pub fn run(&self, script: &str) -> Result<Output, String> {
        self.ssh()
            .arg(script)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run ssh (Debian package openssh-client): {e}"))
    }

    /// Runs `script` in the guest and returns its standard output, trimmed.
    ///
    /// # Errors
    ///
    /// If it exits with another status than 0, with its output.
    pub fn sh(&self, script: &str) -> Result<String, String> {
        let output = self.run(script)?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        } else {
            Err(format!(
                "in the guest, `{script}` failed with {}:\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// Copies the local file `from` to `to` in the guest, with mode `mode`.
    ///
    /// # Errors
    ///
    /// If it cannot be read or written.
    pub fn copy_in(&self, from: &Path, to: &str, mode: &str) -> Result<(), String> {
        let bytes = fs::read(from).map_err(|e| format!("cannot read {}: {e}", from.display()))?;
        self.write(to, mode, &bytes)
    }

    /// Writes `bytes` to `path` in the guest, with mode `mode`, making its
    /// directory.
    ///
    /// # Errors
    ///
    /// If ssh fails.
    pub fn write(&self, path: &str, mode: &str, bytes: &[u8]) -> Result<(), String> {
        let mut child = self
            .ssh()
            .arg(format!(
                "mkdir -p \"$(dirname '{path}')\" && cat > '{path}.part' && chmod {mode} '{path}.part' && mv '{path}.part' '{path}'"
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run ssh: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(bytes)
                .map_err(|e| format!("cannot send {path} to the guest: {e}"))?;
        }
        let output = child
            .wait_with_output()
            .map_err(|e| format!("ssh failed: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "cannot write {path} in the guest ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// The guest's boot id (`/proc/sys/kernel/random/boot_id`), new at
    /// every boot.
    ///
    /// # Errors
    ///
    /// If ssh fails.
    pub fn boot_id(&self) -> Result<String, String> {
        self.sh("cat /proc/sys/kernel/random/boot_id")
    }

    /// Reboots the guest with `systemctl reboot` and returns once ssh
    /// answers from the new boot.
    ///
    /// # Errors
    ///
    /// If the guest does not come back within [`BOOT_DEADLINE`].
    pub fn reboot(&mut self) -> Result<(), String> {
        let before = self.boot_id()?;
        // The connection may be cut by the reboot itself: its status says
        // nothing.
        let _ = self.run("systemctl reboot");
        // The shared connection dies with this boot, but its client would
        // only notice after its keep-alives went unanswered (half a
        // minute), holding every command meanwhile: close it now and ask
        // over connections of their own until the new boot answers.
        self.close_shared();
        let deadline = Instant::now() + BOOT_DEADLINE;
        loop {
            let answer = self
                .ssh_command(false)
                .arg("cat /proc/sys/kernel/random/boot_id")
                .stdin(Stdio::null())
                .output();
            if let Ok(output) = answer {
                let after = String::from_utf8_lossy(&output.stdout).trim().to_owned();
                if output.status.success() && after != before {
                    return Ok(());
                }
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                return Err(format!(
                    "the guest did not come back from its reboot within {BOOT_DEADLINE:?}; console:\n{}",
                    self.console_tail(40)
                ));
            }
            thread::sleep(Duration::from_secs(1));
        }
    }

    /// Forwards the guest's unix socket `remote` to the local path `local`
    /// over ssh, until the returned child is killed.
    ///
    /// # Errors
    ///
    /// If ssh cannot start or the socket does not appear within 30 s.
    pub fn forward_socket(&self, local: &Path, remote: &str) -> Result<Child, String> {
        let _ = fs::remove_file(local);
        // A connection of its own, whose end ends the forwarding.
        let mut child = self
            .ssh_command(false)
            .args([
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-o",
                "StreamLocalBindUnlink=yes",
                "-L",
            ])
            .arg(format!("{}:{remote}", local.display()))
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run ssh: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !local.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("ssh forwarding {remote} exited with {status}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!(
                    "ssh did not forward {remote} to {} within 30 s",
                    local.display()
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
        Ok(child)
    }

    /// The last `lines` lines of the guest's serial console.
    #[must_use]
    pub fn console_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn check_alive(&mut self) -> Result<(), String> {
        if let Some(child) = self.qemu.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                let log = fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default();
                return Err(format!(
                    "QEMU exited with {status}:\n{log}\nconsole:\n{}",
                    self.console_tail(40)
                ));
            }
        }
        Ok(())
    }

    fn wait_for_ssh(&mut self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            self.check_alive()?;
            if self.run("true").is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "ssh on port {} did not answer within {within:?}; console:\n{}",
                    self.ssh_port,
                    self.console_tail(40)
                ));
            }
            thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        self.close_shared();
        if let Some(mut child) = self.qemu.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
