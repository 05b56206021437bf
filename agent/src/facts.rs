//! The device's facts for the heartbeat, read once when the agent starts:
//! its CPU architecture, operating system and kernel release.
//!
//! The reconciler reports them but never reads the host itself; the agent
//! hands them in through [`Config::device_facts`](podfleet_core::Config::device_facts).
//! Nothing here fails: a fact that cannot be read falls back as each
//! function says, and the agent starts all the same.

use std::path::Path;

use podfleet_core::reconciler::DeviceFacts;

/// Where os-release lives: `/etc/os-release`, else `/usr/lib/os-release`
/// (os-release(5)).
pub const OS_RELEASE: [&str; 2] = ["/etc/os-release", "/usr/lib/os-release"];

/// The kernel release, as `uname -r` prints it.
pub const KERNEL_RELEASE: &str = "/proc/sys/kernel/osrelease";

/// This device's facts: [`std::env::consts::ARCH`], the OS as
/// [`os_name`] reads it from [`OS_RELEASE`], and the kernel release from
/// [`KERNEL_RELEASE`].
pub fn gather() -> DeviceFacts {
    DeviceFacts {
        arch: std::env::consts::ARCH.to_owned(),
        os: os_name(OS_RELEASE.iter().map(Path::new)),
        kernel: kernel_release(Path::new(KERNEL_RELEASE)),
    }
}

/// The `PRETTY_NAME` of the first of `os_release` files that has one, else
/// the bare OS name Rust was built for ([`std::env::consts::OS`], `"linux"`).
pub fn os_name<'a>(os_release: impl IntoIterator<Item = &'a Path>) -> String {
    os_release
        .into_iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .find_map(|text| pretty_name(&text))
        .unwrap_or_else(|| std::env::consts::OS.to_owned())
}

/// The kernel release in the file at `path` (`/proc/sys/kernel/osrelease`),
/// or an empty text when it cannot be read.
pub fn kernel_release(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_owned())
        .unwrap_or_default()
}

/// The value of `PRETTY_NAME` in an os-release text, unquoted; `None` when
/// it is absent or empty.
///
/// os-release is a list of shell-style assignments: a value may be in
/// double quotes (where a backslash escapes the next character) or single
/// quotes (taken as written), and a later assignment wins.
pub fn pretty_name(os_release: &str) -> Option<String> {
    os_release
        .lines()
        .rev()
        .find_map(|line| {
            let (key, value) = line.trim().split_once('=')?;
            (key.trim() == "PRETTY_NAME").then(|| unquote(value.trim()))
        })
        .filter(|name| !name.trim().is_empty())
}

fn unquote(value: &str) -> String {
    if let Some(inner) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
        return inner.to_owned();
    }
    let inner = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_name_is_unquoted() {
        let debian = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nID=debian\n";
        assert_eq!(
            pretty_name(debian).as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
        assert_eq!(
            pretty_name("PRETTY_NAME='Alpine Linux v3.20'").as_deref(),
            Some("Alpine Linux v3.20")
        );
        assert_eq!(pretty_name("PRETTY_NAME=Fedora").as_deref(), Some("Fedora"));
        assert_eq!(
            pretty_name(r#"PRETTY_NAME="say \"hi\" \\ \$HOME""#).as_deref(),
            Some(r#"say "hi" \ $HOME"#)
        );
    }

    #[test]
    fn pretty_name_skips_comments_and_other_keys_and_takes_the_last() {
        let text =
            "# PRETTY_NAME=\"comment\"\nNAME=x\n\nPRETTY_NAME=\"old\"\n  PRETTY_NAME=\"new\"  \n";
        assert_eq!(pretty_name(text).as_deref(), Some("new"));
        assert_eq!(pretty_name("NAME=\"Debian\"\nID=debian"), None);
        assert_eq!(pretty_name("PRETTY_NAME=\"\""), None);
        assert_eq!(pretty_name(""), None);
    }

    #[test]
    fn os_name_falls_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc-os-release");
        let lib = dir.path().join("lib-os-release");
        let missing = dir.path().join("missing");
        std::fs::write(&lib, "PRETTY_NAME=\"From usr/lib\"\n").unwrap();
        assert_eq!(os_name([etc.as_path(), lib.as_path()]), "From usr/lib");
        std::fs::write(&etc, "PRETTY_NAME=\"From etc\"\n").unwrap();
        assert_eq!(os_name([etc.as_path(), lib.as_path()]), "From etc");
        std::fs::write(&etc, "NAME=nameless\n").unwrap();
        assert_eq!(os_name([etc.as_path(), lib.as_path()]), "From usr/lib");
        assert_eq!(os_name([missing.as_path()]), std::env::consts::OS);
    }

    #[test]
    fn kernel_release_is_trimmed_or_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("osrelease");
        std::fs::write(&path, "6.1.0-rpi7-rpi-v8\n").unwrap();
        assert_eq!(kernel_release(&path), "6.1.0-rpi7-rpi-v8");
        assert_eq!(kernel_release(&dir.path().join("missing")), "");
    }

    #[test]
    fn this_device_has_its_architecture_and_an_os() {
        let facts = gather();
        assert_eq!(facts.arch, std::env::consts::ARCH);
        assert!(!facts.os.is_empty());
    }
}
