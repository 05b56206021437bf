//! What a [`RuntimeOp::Exec`](podfleet_core::runtime::RuntimeOp::Exec)
//! does in the [`FakeRuntime`](crate::FakeRuntime): a tiny model of busybox
//! `sh` and `cat`, enough to provision a container with a setup script and
//! to read its marker back. It runs nothing and reads no clock: [`run`]
//! says at once how the exec ends, after how long, and what it wrote.
//!
//! # The model
//!
//! - `sh` or `/bin/sh` with a script file, `/bin/sh [FLAGS] PATH` (flags
//!   such as `-e`, `-x`, `-o pipefail` are skipped; `-c TEXT` takes the
//!   script from `TEXT` instead): the script runs line by line, always as
//!   under `-e`. A missing script ends with 2 and busybox's words (`can't
//!   open 'PATH': No such file or directory`); with neither a path nor
//!   `-c`, sh reads its commands from stdin, which is empty: 0.
//! - A line is trimmed, then
//!   - blank, or a `#` comment: skipped;
//!   - `exit N`: ends with code `N` (mod 256; a bare `exit` with 0, a word
//!     that is no number with 2);
//!   - `sleep S`: S whole seconds more before the exec ends (a word that
//!     is no whole number ends it with 1);
//!   - `echo TEXT`: writes `TEXT` and a newline, verbatim (no quoting, no
//!     expansion);
//!   - `false`: ends with 1;
//!   - `hang`: never ends by itself (no such command in busybox: the
//!     model's word for a script that blocks); it ends with 137 when the
//!     container stops;
//!   - `cat` alone: reads stdin, which is empty (`/dev/null`), and goes on;
//!   - `read ...`: reads stdin, meets its end and fails, so the script ends
//!     with 1 (as busybox's `sh -e` does);
//!   - `cat PATH...`: writes each file; a missing one writes `cat: can't
//!     open 'PATH': No such file or directory` and the script ends with 1
//!     once `cat` is done;
//!   - anything else succeeds and writes nothing.
//!
//!   The end of the script ends the exec with 0.
//! - `cat PATH...` or `/bin/cat PATH...`: as the line above, ending with 0
//!   or 1.
//! - Anything else: 127, with runc's words for a program not on the PATH.
//!
//! stdout and stderr are one output, in order. Only the files copied into
//! the container ([`FakeFile`]) exist; the image's own files do not.

use std::collections::BTreeMap;
use std::time::Duration;

/// A file in a fake container, as a `copy_file` wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeFile {
    /// Its bytes, as text.
    pub content: String,
    /// Its permission bits.
    pub mode: u32,
}

/// How a modelled exec ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecEnd {
    /// It exits with `code` once it has run for `after`.
    Exits {
        /// Its exit code.
        code: i64,
        /// How long it runs.
        after: Duration,
    },
    /// It never ends by itself: stopping the container kills it (137).
    Hangs,
}

/// What a modelled exec does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRun {
    /// How it ends.
    pub end: ExecEnd,
    /// Everything it writes, stdout and stderr together, unbounded.
    pub output: String,
}

/// The exit code of a process killed by SIGKILL, as a stopped container's
/// execs end.
pub const KILLED: i64 = 137;

/// How `argv` runs in a container holding `files`. See the [module
/// docs](self).
pub fn run(argv: &[String], files: &BTreeMap<String, FakeFile>) -> ExecRun {
    let mut shell = Shell {
        files,
        output: String::new(),
        took: Duration::ZERO,
    };
    let end = match argv.split_first() {
        Some((program, args)) if matches!(program.as_str(), "sh" | "/bin/sh") => {
            shell.sh(program, args)
        }
        Some((program, args)) if matches!(program.as_str(), "cat" | "/bin/cat") => {
            let code = shell_cat(&mut shell.output, files, args);
            shell.exit(code)
        }
        Some((program, _)) => {
            shell.output.push_str(&format!(
                "Error: runc: exec failed: unable to start container process: exec: \"{program}\": \
                 executable file not found in $PATH: OCI runtime attempted to invoke a command that was not found\n"
            ));
            shell.exit(127)
        }
        None => {
            shell.output.push_str("Error: no command given to exec\n");
            shell.exit(127)
        }
    };
    ExecRun {
        end,
        output: shell.output,
    }
}

struct Shell<'f> {
    files: &'f BTreeMap<String, FakeFile>,
    output: String,
    took: Duration,
}

impl Shell<'_> {
    fn exit(&self, code: i64) -> ExecEnd {
        ExecEnd::Exits {
            code,
            after: self.took,
        }
    }

    /// `sh` with `args`: find the script, then run it.
    fn sh(&mut self, program: &str, args: &[String]) -> ExecEnd {
        let mut args = args.iter();
        let script = loop {
            match args.next().map(String::as_str) {
                None => return self.exit(0),
                Some("-c") => match args.next() {
                    Some(text) => break text.clone(),
                    None => {
                        self.output
                            .push_str(&format!("{program}: -c requires an argument\n"));
                        return self.exit(2);
                    }
                },
                // The one option that takes an argument: `-o pipefail`.
                Some("-o" | "+o") => {
                    args.next();
                }
                Some(flag) if flag.len() > 1 && flag.starts_with(['-', '+']) => {}
                Some(path) => match self.files.get(path) {
                    Some(file) => break file.content.clone(),
                    None => {
                        self.output.push_str(&format!(
                            "{program}: can't open '{path}': No such file or directory\n"
                        ));
                        return self.exit(2);
                    }
                },
            }
        };
        for line in script.lines() {
            if let Some(end) = self.line(line.trim()) {
                return end;
            }
        }
        self.exit(0)
    }

    /// Runs one line of a script: `Some` when it ends the script.
    fn line(&mut self, line: &str) -> Option<ExecEnd> {
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let (command, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim_start();
        match command {
            "exit" if rest.is_empty() => Some(self.exit(0)),
            "exit" => match rest.parse::<i64>() {
                Ok(code) => Some(self.exit(code.rem_euclid(256))),
                Err(_) => {
                    self.output
                        .push_str(&format!("sh: exit: Illegal number: {rest}\n"));
                    Some(self.exit(2))
                }
            },
            "sleep" => match rest.parse::<u64>() {
                Ok(seconds) => {
                    self.took += Duration::from_secs(seconds);
                    None
                }
                Err(_) => {
                    self.output
                        .push_str(&format!("sleep: invalid number '{rest}'\n"));
                    Some(self.exit(1))
                }
            },
            "echo" => {
                self.output.push_str(rest);
                self.output.push('\n');
                None
            }
            "false" | "read" => Some(self.exit(1)),
            "hang" => Some(ExecEnd::Hangs),
            "cat" => {
                let args: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
                match shell_cat(&mut self.output, self.files, &args) {
                    0 => None,
                    code => Some(self.exit(code)),
                }
            }
            _ => None,
        }
    }
}

/// busybox `cat` of `paths` (stdin, which is empty, when there are none):
/// its exit code.
fn shell_cat(output: &mut String, files: &BTreeMap<String, FakeFile>, paths: &[String]) -> i64 {
    let mut code = 0;
    for path in paths {
        match files.get(path) {
            Some(file) => output.push_str(&file.content),
            None => {
                output.push_str(&format!(
                    "cat: can't open '{path}': No such file or directory\n"
                ));
                code = 1;
            }
        }
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(entries: &[(&str, &str)]) -> BTreeMap<String, FakeFile> {
        entries
            .iter()
            .map(|&(path, content)| {
                let file = FakeFile {
                    content: content.to_owned(),
                    mode: 0o700,
                };
                (path.to_owned(), file)
            })
            .collect()
    }

    fn argv(args: &[&str]) -> Vec<String> {
        args.iter().map(|&a| a.to_owned()).collect()
    }

    const SETUP: &[&str] = &["/bin/sh", "-e", "-o", "pipefail", "/.podfleet/setup.sh"];

    fn script(text: &str) -> ExecRun {
        run(&argv(SETUP), &files(&[("/.podfleet/setup.sh", text)]))
    }

    fn exits(code: i64, seconds: u64) -> ExecEnd {
        ExecEnd::Exits {
            code,
            after: Duration::from_secs(seconds),
        }
    }

    #[test]
    fn a_script_runs_to_its_end_or_its_exit() {
        let done = script("# set up\n\necho one\n  echo two words  \napk add curl\n");
        assert_eq!(done.end, exits(0, 0));
        assert_eq!(done.output, "one\ntwo words\n");
        let exited = script("echo before\nexit 4\necho never\n");
        assert_eq!(exited.end, exits(4, 0));
        assert_eq!(exited.output, "before\n");
        assert_eq!(script("exit").end, exits(0, 0));
        assert_eq!(script("exit 300").end, exits(44, 0));
        assert_eq!(script("exit soon").end, exits(2, 0));
    }

    #[test]
    fn a_failing_command_stops_the_script_as_under_dash_e() {
        let failed = script("echo start\nfalse\necho never\n");
        assert_eq!(failed.end, exits(1, 0));
        assert!(!failed.output.contains("never"));
        let missing = script("cat /etc/nothing\necho never\n");
        assert_eq!(missing.end, exits(1, 0));
        assert_eq!(
            missing.output,
            "cat: can't open '/etc/nothing': No such file or directory\n"
        );
    }

    #[test]
    fn stdin_is_empty_so_cat_goes_on_and_read_fails() {
        let cat = script("cat\necho after\nexit 4\n");
        assert_eq!((cat.end, cat.output.as_str()), (exits(4, 0), "after\n"));
        let read = script("read answer\necho never\n");
        assert_eq!((read.end, read.output.as_str()), (exits(1, 0), ""));
    }

    #[test]
    fn sleeps_add_up_and_hang_never_ends() {
        assert_eq!(script("sleep 2\necho x\nsleep 3\n").end, exits(0, 5));
        assert_eq!(script("sleep 2\nfalse\nsleep 3\n").end, exits(1, 2));
        assert_eq!(script("sleep 0.5\n").end, exits(1, 0));
        let hangs = script("echo waiting\nhang\necho never\n");
        assert_eq!(
            (hangs.end, hangs.output.as_str()),
            (ExecEnd::Hangs, "waiting\n")
        );
    }

    #[test]
    fn cat_prints_a_copied_file_and_the_shell_finds_its_script() {
        let held = files(&[("/.podfleet/provisioned", "sha256:abc\n")]);
        let marker = run(&argv(&["cat", "/.podfleet/provisioned"]), &held);
        assert_eq!(marker.end, exits(0, 0));
        assert_eq!(marker.output, "sha256:abc\n");
        let absent = run(&argv(&["cat", "/.podfleet/other"]), &held);
        assert_eq!(absent.end, exits(1, 0));
        let no_script = run(&argv(SETUP), &held);
        assert_eq!(no_script.end, exits(2, 0));
        assert_eq!(
            no_script.output,
            "/bin/sh: can't open '/.podfleet/setup.sh': No such file or directory\n"
        );
        let inline = run(&argv(&["sh", "-c", "echo hi\nexit 3"]), &held);
        assert_eq!((inline.end, inline.output.as_str()), (exits(3, 0), "hi\n"));
        assert_eq!(run(&argv(&["sh", "-e"]), &held).end, exits(0, 0));
    }

    #[test]
    fn other_programs_are_not_found() {
        let other = run(&argv(&["apk", "add", "curl"]), &BTreeMap::new());
        assert_eq!(other.end, exits(127, 0));
        assert!(other.output.contains("\"apk\": executable file not found"));
        assert_eq!(run(&[], &BTreeMap::new()).end, exits(127, 0));
    }
}
