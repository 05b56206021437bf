//! Deliberate bugs, for the tests that prove each invariant check catches
//! the bug it is there for.
//!
//! They exist only with the `bugs` cargo feature, which the test kit turns
//! on and no release build does. Without it [`bug!`] is a constant `false`
//! and the switches leave no trace in the binary.

/// Whether the deliberate bug `$name` is switched on in `$config`; a
/// constant `false` without the `bugs` feature.
macro_rules! bug {
    ($config:expr, $name:ident) => {{
        #[cfg(feature = "bugs")]
        let on = $config.bugs.$name;
        #[cfg(not(feature = "bugs"))]
        let on = {
            let _ = &$config;
            false
        };
        on
    }};
}

/// Deliberate bugs, each breaking one invariant. All off by default.
#[cfg(feature = "bugs")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bugs {
    /// The tick recreates running containers (the 30 s redeploy loop).
    pub recreate_on_tick: bool,
    /// A failed rollout restarts the previous revision's containers.
    pub revert_on_failure: bool,
    /// Init containers are skipped.
    pub skip_init_containers: bool,
    /// Replaced containers are removed without a graceful stop.
    pub skip_graceful_stop: bool,
    /// A new container is created before the old one is removed.
    pub create_before_remove: bool,
    /// Each image is made present just before its own container is
    /// created, after the old containers were stopped ("kill, then
    /// download").
    pub pull_after_stop: bool,
    /// Image garbage collection ignores what the deployments keep: an
    /// unused image of the current revision (an init container's) goes.
    pub gc_ignores_keep: bool,
    /// A `no_launch` deployment starts the stopped container it verifies,
    /// as the seed's attach path would.
    pub start_unverified: bool,
    /// A container the agent finds after a restart counts as provisioned
    /// without showing its setup script's marker.
    pub trust_unprovisioned: bool,
    /// Reports say Running as soon as a rollout starts.
    pub report_running_early: bool,
    /// A restarted agent reports its cached deployments before it has
    /// listed the runtime (they read as crash-looping).
    pub report_before_observing: bool,
    /// The agent's outbox publishes strictly in key order and treats a
    /// report the broker refuses as too large like any other failure: one
    /// report that cannot be published holds up every report behind it.
    pub head_of_line_reports: bool,
}
