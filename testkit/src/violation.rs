//! [`Violation`]: a broken invariant, as a value a check returns and a
//! driver matches on; its text is for people.

use std::fmt;

use podfleet_core::time::Timestamp;

/// The invariants the oracle and the simulator hold the agent to. Each
/// displays as the words that start its violations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Invariant {
    /// What is created is exactly what the newest valid score asks for, and
    /// what is started runs it.
    NoRevert,
    /// A running container whose spec did not change is never stopped,
    /// removed or recreated.
    HealthyContainerRecreated,
    /// A service starts only once its revision's init containers exited 0,
    /// in order.
    InitContainersFirst,
    /// A container is stopped by its recorded id, with the signal it was
    /// created with and the grace of the score that created it, before it
    /// is removed.
    GracefulReplace,
    /// No container of an older revision is stopped or removed before every
    /// image the newest revision creates containers from is in the store
    /// ("download, then kill"): a pull that fails stops nothing.
    DownloadBeforeKill,
    /// Image garbage collection never asks to remove an image a container
    /// uses, or one the newest valid revision of a deployment names.
    ImageGcKeepsNeeded,
    /// A runtime mutation (create, start, stop, remove, copy, exec) only
    /// ever touches a container with podfleet's labels, and a `no_launch`
    /// deployment never creates, starts or provisions one: it only retires
    /// its own from an earlier lifetime.
    OnlyOwnContainers,
    /// A service never has two containers at once (a replace that is not
    /// graceful leaves two, so it is reported under that name).
    OneContainerPerService,
    /// A report says what the agent saw: its ids exist, were started and are
    /// the containers of their revision, and every field is borne out.
    TruthfulReports,
    /// A device reads and writes only its own keys.
    Isolation,
    /// Once faults heal, every deployment converges and then stays still.
    Liveness,
    /// Once faults heal, every fleet deployment's per-device keys are
    /// exactly its resolved target holding its score, and its status counts
    /// what the devices report.
    FleetConvergence,
    /// A simulated host (an agent, the broker) failed outright.
    HostFailed,
    /// Anything a check found that no invariant above names.
    Other,
}

impl Invariant {
    /// The words a violation of it starts with.
    pub fn name(self) -> &'static str {
        match self {
            Invariant::NoRevert => "no revert",
            Invariant::HealthyContainerRecreated => "healthy container recreated",
            Invariant::InitContainersFirst => "init containers first",
            Invariant::GracefulReplace | Invariant::OneContainerPerService => "graceful replace",
            Invariant::DownloadBeforeKill => "download before kill",
            Invariant::ImageGcKeepsNeeded => "image gc keeps what is needed",
            Invariant::OnlyOwnContainers => "only own containers",
            Invariant::TruthfulReports => "truthful reports",
            Invariant::Isolation => "isolation",
            Invariant::Liveness => "liveness",
            Invariant::FleetConvergence => "fleet convergence",
            Invariant::HostFailed => "a host failed",
            Invariant::Other => "other",
        }
    }
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One broken invariant: which, what exactly, and where and when it was
/// seen. Displays as `[device: ][time: ]invariant: detail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The invariant broken.
    pub invariant: Invariant,
    /// What broke it, in words.
    pub detail: String,
    /// When, in virtual time, if the check knows.
    pub at: Option<Timestamp>,
    /// The device it happened on, if the check runs on more than one.
    pub device: Option<String>,
}

impl Violation {
    /// A violation of `invariant`, with no time or device.
    pub fn new(invariant: Invariant, detail: impl Into<String>) -> Self {
        Self {
            invariant,
            detail: detail.into(),
            at: None,
            device: None,
        }
    }

    /// A violation of `invariant` seen at `at`.
    pub fn at(at: Timestamp, invariant: Invariant, detail: impl Into<String>) -> Self {
        Self {
            at: Some(at),
            ..Self::new(invariant, detail)
        }
    }

    /// The same violation, seen on `device`.
    #[must_use]
    pub fn on(mut self, device: impl fmt::Display) -> Self {
        self.device = Some(device.to_string());
        self
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(device) = &self.device {
            write!(f, "{device}: ")?;
        }
        if let Some(at) = self.at {
            write!(f, "{at}: ")?;
        }
        write!(f, "{}: {}", self.invariant, self.detail)
    }
}

impl std::error::Error for Violation {}
