//! The device's base system: containers someone other than podfleet runs
//! (systemd units, quadlets, a vendor's stack), created without podfleet's
//! labels. `no_launch` deployments verify them; the oracle holds podfleet
//! to never touching them (invariant "only own containers").
//!
//! [`install`] creates them in a [`FakeRuntime`] whose store already has
//! the catalogue ([`crate::images`]). Together they show a verification
//! every verdict it can reach from the container itself: one runs the
//! image a score names, one exited on it, one runs another image, and one
//! name has no container at all (a missing tag is the store's business:
//! the fuzzer takes images away).

use std::collections::BTreeMap;

use podfleet_core::runtime::{ContainerSpec, RuntimeOp};
use podfleet_core::time::Timestamp;
use podfleet_core::wire::Signal;

use crate::images::{A_1, IGNORE_STOP};
use crate::runtime::FakeRuntime;

/// Runs [`A_1`]: verified running by a score naming that image.
pub const PROXY: &str = "base_proxy";
/// Exited with code 0 on [`A_1`] (stopped by a reboot, say): verified
/// stopped by a score naming that image, and never started by podfleet.
pub const BACKUP: &str = "base_backup";
/// Runs [`IGNORE_STOP`]: drifted for a score naming [`A_1`].
pub const VPN: &str = "base_vpn";
/// No container has this name: missing.
pub const GONE: &str = "base_gone";

/// The names a `no_launch` service can verify, in the order above.
pub const NAMES: [&str; 4] = [PROXY, BACKUP, VPN, GONE];

/// The label the base system puts on its containers (podfleet's own are
/// `io.podfleet.*`).
const OWNER_LABEL: (&str, &str) = ("com.example.owner", "base-system");

fn spec(name: &str, image: &str) -> ContainerSpec {
    ContainerSpec {
        name: name.to_owned(),
        image: image.to_owned(),
        args: Vec::new(),
        env: BTreeMap::new(),
        volumes: Vec::new(),
        ports: Vec::new(),
        labels: BTreeMap::from([(OWNER_LABEL.0.to_owned(), OWNER_LABEL.1.to_owned())]),
        stop_signal: Signal::Term,
    }
}

/// Creates the base system's containers in `runtime`, as they are when the
/// agent first looks: [`PROXY`] and [`VPN`] running, [`BACKUP`] exited.
pub fn install(runtime: &mut FakeRuntime) {
    for (name, image, runs) in [
        (PROXY, A_1, true),
        (BACKUP, A_1, false),
        (VPN, IGNORE_STOP, true),
    ] {
        let id = runtime.create_quietly(spec(name, image));
        let _ = runtime.execute(&RuntimeOp::Start {
            container: id.clone(),
        });
        if !runs {
            runtime.crash(Timestamp::ZERO, &id, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podfleet_core::runtime::ContainerState;

    #[test]
    fn every_verdict_has_its_container() {
        let mut runtime = crate::images::runtime();
        install(&mut runtime);
        let state = |name| {
            runtime
                .by_name(name)
                .map(|c| (c.state, c.spec.image.clone()))
        };
        assert_eq!(
            state(PROXY),
            Some((ContainerState::Running, A_1.to_owned()))
        );
        assert_eq!(
            state(BACKUP),
            Some((ContainerState::Exited, A_1.to_owned()))
        );
        assert_eq!(
            state(VPN),
            Some((ContainerState::Running, IGNORE_STOP.to_owned()))
        );
        assert_eq!(state(GONE), None);
        // None of them is podfleet's: a list does not show them.
        let listed = runtime.execute(&RuntimeOp::List);
        assert!(
            matches!(&listed, crate::Completion::Ready(Ok(podfleet_core::runtime::RuntimeReply::Listed { containers })) if containers.is_empty()),
            "{listed:?}"
        );
    }
}
