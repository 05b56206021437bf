//! The setup-script catalogue: every `setup_script` the simulator and the
//! fuzzer put in a score, in the words of the fake's shell model
//! ([`crate::shell`]), which decides how each one ends.
//!
//! One text, one ending, defined here only; [`provisions`] reads the
//! ending from the shell model itself, so a generator that needs to know
//! whether a score can ever run asks it rather than keeping a list.

use std::collections::BTreeMap;
use std::time::Duration;

use podfleet_core::reconciler::SETUP_SCRIPT_PATH;

use crate::shell::{self, ExecEnd, FakeFile};

/// Prints a line and exits 0 at once.
pub const PROVISIONS: &str = "echo provisioning\napk add curl\n";
/// Exits 0 after 20 s: an agent that dies meanwhile leaves a container
/// without its marker.
pub const PROVISIONS_SLOWLY: &str = "echo installing\nsleep 20\necho installed\n";
/// Reads stdin, which is `/dev/null`, and goes on: exits 0.
pub const READS_STDIN: &str = "echo copying\ncat\necho copied\n";
/// A command fails after some output: exits 1, under `-e`.
pub const FAILS: &str = "echo fetching the key\nfalse\necho never reached\n";
/// Exits 3 after some output.
pub const EXITS_3: &str = "echo checking the disk\nexit 3\n";
/// Asks a question on stdin, meets its end and fails: exits 1.
pub const ASKS: &str = "echo continue?\nread answer\necho never reached\n";
/// Never exits: the agent's setup timeout walks away from it.
pub const HANGS: &str = "echo waiting for the network\nhang\n";

/// Every script, those that provision first.
pub const ALL: [&str; 7] = [
    PROVISIONS,
    PROVISIONS_SLOWLY,
    READS_STDIN,
    FAILS,
    EXITS_3,
    ASKS,
    HANGS,
];

/// How `script` ends when the agent runs it as a setup script in the fake
/// (from its file, as the reconciler runs it).
pub fn ending(script: &str) -> ExecEnd {
    let files = BTreeMap::from([(
        SETUP_SCRIPT_PATH.to_owned(),
        FakeFile {
            content: script.to_owned(),
            mode: 0o700,
        },
    )]);
    let argv = ["/bin/sh".to_owned(), SETUP_SCRIPT_PATH.to_owned()];
    shell::run(&argv, &files).end
}

/// Whether `script` provisions a container for an agent whose setup
/// timeout is `timeout`
/// ([`DEFAULT_SETUP_TIMEOUT`](podfleet_core::reconciler::DEFAULT_SETUP_TIMEOUT)
/// unless configured): it
/// exits 0 before then.
pub fn provisions(script: &str, timeout: Duration) -> bool {
    matches!(ending(script), ExecEnd::Exits { code: 0, after } if after < timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use podfleet_core::reconciler::DEFAULT_SETUP_TIMEOUT;

    #[test]
    fn the_first_three_provision_and_the_rest_never_do() {
        let provisioning: Vec<bool> = ALL
            .iter()
            .map(|s| provisions(s, DEFAULT_SETUP_TIMEOUT))
            .collect();
        assert_eq!(provisioning, [true, true, true, false, false, false, false]);
        assert_eq!(ending(HANGS), ExecEnd::Hangs);
        assert_eq!(
            ending(PROVISIONS_SLOWLY),
            ExecEnd::Exits {
                code: 0,
                after: Duration::from_secs(20)
            }
        );
        assert!(!provisions(PROVISIONS_SLOWLY, Duration::from_secs(10)));
        assert!(matches!(ending(EXITS_3), ExecEnd::Exits { code: 3, .. }));
    }
}
