//! The runtime conformance suite: podman's behaviour, as far as the
//! reconciler relies on it, written once against [`ContainerRuntime`].
//!
//! It runs against real podman in e2e/ (through the podman adapter) and
//! against the fake runtime in testkit/tests/conformance_fake.rs, so the fake
//! cannot drift from the real thing: every check states what podman 4.3
//! really does, including the surprises. The programs the checks run are
//! public ([`programs`]) so a fake can recognise them by their argv;
//! `programs::fake_behaviours` says how each one behaves.
//!
//! A runtime must pass every check in [`CHECKS`]; only a runtime that runs
//! no programs (the fake) may declare the [`EXEC_CHECKS`] unsupported.
//!
//! The suite owns its containers only: each check names them
//! `<prefix>-<check>-<role>` and force-removes them afterwards, whatever the
//! outcome. It never reads a clock; it waits through [`Fixture::pause`].
//!
//! # Podman 4.3 behaviours stated here
//!
//! - `stop` of a container that is not running (exited, or created and never
//!   started) does nothing: [`StopOutcome::AlreadyStopped`].
//! - A PID 1 without a handler ignores SIGTERM: only a shell `trap` makes a
//!   graceful stop, anything else is killed after the grace period with exit
//!   code 137, and so is a container whose stop signal is SIGKILL.
//! - `wait` on a created, never-started container returns at once; a force
//!   remove ends a pending `wait`, which then answers as if the container had
//!   exited.
//! - `start` of a running container succeeds and does nothing; `start` of an
//!   exited one runs it again under the same id.
//! - Logs keep each stream's order but not the interleaving of stdout and
//!   stderr written close together (conmon drains one pipe, then the other);
//!   `tail` counts lines of both streams together, and a tail of 0 is empty.
//! - `/version` states the version (`Version`, e.g. `4.3.1`), but only after
//!   podman has asked its OCI runtime and conmon for theirs: most of a
//!   second per call.
//! - `inspect image` answers from the local store only; an absent image is
//!   `None`, not an error. A pull from a registry nobody answers at
//!   ([`UNREACHABLE_IMAGE`]) is a `Pull(Network)` failure, and leaves
//!   nothing in the store.
//! - The wait/inspect race (inspect still "running" just after `wait`
//!   returned) was never observed on podman 4.3 in hundreds of tries, but the
//!   reconciler retries it and so does this suite.
//! - `copy_file` writes into a created, running or exited container, and
//!   the file is there when it runs; an `exec` needs a running one
//!   (podman 4.3: 500 "container state improper").
//! - An `exec` reads `/dev/null`: a `cat` in a setup script reads nothing
//!   and the script goes on, but a `read` fails, and under `sh -e` ends
//!   the script with 1. busybox `sh` honours `-o pipefail`. A script that
//!   cannot be opened ends `sh` with 2 (busybox and dash; bash says 127).
//!   Stopping a container ends the execs running in it with 137 (after a
//!   force remove, though, podman has forgotten the exec and its code).

use std::collections::BTreeMap;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::Duration;

use podfleet_core::runtime::{
    ContainerSpec, ContainerState, ContainerStatus, ContainerSummary, ImageInfo, RuntimeErrorKind,
    RuntimeOp, RuntimeReply, RuntimeResult, StopOutcome, LABEL_DEPLOYMENT, LABEL_MANAGED,
    LABEL_SERVICE,
};
use podfleet_core::wire::{PullFailure, Signal};

use podfleet_agent::runtime::{ContainerRuntime, ExecOutput};

/// Waits for a while: the caller's clock (tokio's for real podman, virtual
/// time in the simulator).
pub type Pause = fn(Duration) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a check found: `Err` says what differed from podman's behaviour.
pub type CheckResult = Result<(), String>;

/// What the suite needs from its environment.
#[derive(Debug, Clone)]
pub struct Fixture {
    /// An image that has busybox's `sh`, `sleep` and `echo` on its PATH and
    /// no entrypoint, so that a container's args are its whole command.
    pub image: String,
    /// An image reference that does not exist locally.
    pub missing_image: String,
    /// Starts every container name, so that parallel runs do not collide;
    /// must itself be a valid container name (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`).
    pub prefix: String,
    /// How the suite waits.
    pub pause: Pause,
}

/// The programs the checks run, by argv (the image has no entrypoint).
pub mod programs {
    /// Exits at once with code 3.
    pub const EXIT_3: &[&str] = &["sh", "-c", "exit 3"];
    /// Exits at once with code 0.
    pub const EXIT_0: &[&str] = &["sh", "-c", "exit 0"];
    /// Runs "forever" as PID 1 without a signal handler, so it ignores
    /// SIGTERM: only the kill stops it.
    pub const SLEEP: &[&str] = &["sleep", "1000"];
    /// Prints `ready` once its SIGTERM trap is set, then exits 0 on SIGTERM.
    pub const TRAPS_TERM: &[&str] = &[
        "sh",
        "-c",
        "trap 'exit 0' TERM; echo ready; while true; do sleep 0.1; done",
    ];
    /// Ignores SIGTERM explicitly while it sleeps.
    pub const IGNORES_TERM: &[&str] = &["sh", "-c", "trap '' TERM; sleep 1000"];
    /// Writes `err1` to stderr, then (after a pause, so that the streams
    /// cannot interleave) `line1` to `line5` to stdout, then exits 0.
    pub const SIX_LINES: &[&str] = &[
        "sh",
        "-c",
        "echo err1 >&2; sleep 0.2; echo line1; echo line2; echo line3; echo line4; echo line5",
    ];

    /// How each program above behaves under podman, for a fake runtime to
    /// be configured with (by argv) instead of restating it.
    pub fn fake_behaviours() -> Vec<(&'static [&'static str], crate::runtime::Behaviour)> {
        use crate::runtime::Behaviour;
        use std::time::Duration;

        let lines = |lines: &[&str]| lines.iter().map(|&l| l.to_owned()).collect();
        // A PID 1 without a handler for SIGTERM ignores it.
        let ignores_term = |runs_for: Duration| Behaviour {
            ignores_stop_signal: true,
            ..Behaviour::exits(0, runs_for)
        };
        vec![
            (EXIT_3, Behaviour::exits(3, Duration::ZERO)),
            (EXIT_0, Behaviour::exits(0, Duration::ZERO)),
            (SLEEP, ignores_term(Duration::from_secs(1000))),
            (
                TRAPS_TERM,
                Behaviour {
                    output: lines(&["ready"]),
                    ..Behaviour::default()
                },
            ),
            (IGNORES_TERM, ignores_term(Duration::from_secs(1000))),
            (
                SIX_LINES,
                Behaviour {
                    output: lines(&["err1", "line1", "line2", "line3", "line4", "line5"]),
                    ..Behaviour::exits(0, Duration::from_millis(200))
                },
            ),
        ]
    }
}

macro_rules! checks {
    ($($check:ident),* $(,)?) => {
        /// Every check's name, in the order [`run_all`] runs them.
        pub const CHECKS: &[&str] = &[$(stringify!($check)),*];

        async fn dispatch<R: ContainerRuntime>(
            rt: &R,
            scope: &mut Scope<'_>,
            check: &str,
        ) -> Option<CheckResult> {
            match check {
                $(stringify!($check) => Some($check(rt, scope).await),)*
                _ => None,
            }
        }
    };
}

checks![
    create_then_start_shows_in_list_with_labels,
    create_with_taken_name_is_name_conflict,
    create_with_missing_image_is_image_missing,
    unknown_container_is_not_found,
    wait_then_inspect_gives_the_exit_code,
    wait_on_a_never_started_container_returns,
    stop_of_a_trapping_container_is_graceful,
    stop_of_a_container_ignoring_term_is_killed,
    stop_with_sigkill_is_killed,
    stop_of_a_stopped_container_is_already_stopped,
    remove_of_a_running_container_needs_force,
    force_remove_ends_a_pending_wait,
    start_of_an_exited_container_restarts_it,
    list_ignores_unmanaged_containers,
    logs_keep_the_newest_lines,
    exec_returns_output_and_exit_code,
    exec_timeout_is_reported,
    a_copied_script_runs_under_sh_e_pipefail,
    a_script_reading_stdin_goes_on,
    a_failing_command_stops_the_script,
    a_file_is_copied_in_any_state_but_exec_needs_a_running_container,
    a_stop_kills_a_running_script,
    the_runtime_states_its_version,
    inspect_image_answers_from_the_store,
    pull_from_an_unreachable_registry_is_a_network_failure,
];

/// An image on a registry nobody answers at (port 1 on the loopback): its
/// pull fails at once, without touching the network beyond the device.
pub const UNREACHABLE_IMAGE: &str = "127.0.0.1:1/podfleet-nothing:1";

/// The checks that run a program in a container with `exec`. A runtime that
/// runs no programs cannot pass them honestly, so it may declare these, and
/// only these, unsupported.
pub const EXEC_CHECKS: &[&str] = &[
    "exec_returns_output_and_exit_code",
    "exec_timeout_is_reported",
];

/// Runs every check in [`CHECKS`], one after the other, each cleaning up
/// after itself.
pub async fn run_all<R: ContainerRuntime>(
    rt: &R,
    fixture: &Fixture,
) -> Vec<(&'static str, CheckResult)> {
    let mut results = Vec::with_capacity(CHECKS.len());
    for &check in CHECKS {
        let result = run_check(rt, fixture, check)
            .await
            .unwrap_or_else(|| Err(format!("no check named {check}")));
        results.push((check, result));
    }
    results
}

/// Runs the check named `check`, or returns `None` if there is none.
pub async fn run_check<R: ContainerRuntime>(
    rt: &R,
    fixture: &Fixture,
    check: &str,
) -> Option<CheckResult> {
    let mut scope = Scope {
        fixture,
        check: check.to_owned(),
        names: Vec::new(),
    };
    let result = dispatch(rt, &mut scope, check).await;
    scope.clean_up(rt).await;
    result
}

/// The containers one check made.
struct Scope<'f> {
    fixture: &'f Fixture,
    check: String,
    names: Vec<String>,
}

impl Scope<'_> {
    /// The container name for `role`, remembered for the clean-up.
    fn name(&mut self, role: &str) -> String {
        let name = format!("{}-{}-{role}", self.fixture.prefix, self.check);
        self.names.push(name.clone());
        name
    }

    /// A managed container named for `role` that runs `args`.
    fn spec(&mut self, role: &str, args: &[&str]) -> ContainerSpec {
        let labels = BTreeMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_DEPLOYMENT.to_owned(), self.fixture.prefix.clone()),
            (LABEL_SERVICE.to_owned(), role.to_owned()),
        ]);
        ContainerSpec {
            name: self.name(role),
            image: self.fixture.image.clone(),
            args: args.iter().map(|&a| a.to_owned()).collect(),
            env: BTreeMap::new(),
            volumes: Vec::new(),
            ports: Vec::new(),
            labels,
            stop_signal: Signal::Term,
        }
    }

    async fn pause(&self, duration: Duration) {
        (self.fixture.pause)(duration).await;
    }

    async fn clean_up<R: ContainerRuntime>(&self, rt: &R) {
        for name in &self.names {
            // Most are gone or never existed: NotFound is the expected answer.
            let _ = rt
                .execute(RuntimeOp::Remove {
                    container: name.clone(),
                    force: true,
                })
                .await;
        }
    }
}

async fn create_then_start_shows_in_list_with_labels<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let spec = scope.spec("web", programs::SLEEP);
    let id = create(rt, &spec).await?;
    let row = list_row(rt, &spec.name).await?;
    ensure(
        row.id == id,
        format!("list gives id {}, create gave {id}", row.id),
    )?;
    ensure(
        row.state == ContainerState::Created,
        format!("a created container lists as {}", row.state),
    )?;
    start(rt, &spec.name).await?;
    let row = list_row(rt, &spec.name).await?;
    ensure(
        row.state == ContainerState::Running,
        format!("a started container lists as {}", row.state),
    )?;
    // The image's own labels (podman's io.buildah.version) come along too.
    for (key, value) in &spec.labels {
        ensure(
            row.label(key) == Some(value.as_str()),
            format!(
                "label {key} lists as {}, want \"{value}\"",
                row.label(key)
                    .map_or("absent".to_owned(), |v| format!("\"{v}\""))
            ),
        )?;
    }
    // podman answers 304 to starting a running container: not an error.
    start(rt, &spec.name).await
}

async fn create_with_taken_name_is_name_conflict<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let spec = scope.spec("web", programs::SLEEP);
    create(rt, &spec).await?;
    // podman 4.3 answers 500 "that name is already in use", Docker 409.
    expect_error(
        "create with a taken name",
        rt.execute(RuntimeOp::Create { spec }).await,
        RuntimeErrorKind::NameConflict,
    )
}

async fn create_with_missing_image_is_image_missing<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let mut spec = scope.spec("web", programs::SLEEP);
    spec.image = scope.fixture.missing_image.clone();
    // podman answers 404 "no such image" and does not try to pull.
    expect_error(
        "create from a missing image",
        rt.execute(RuntimeOp::Create { spec: spec.clone() }).await,
        RuntimeErrorKind::ImageMissing,
    )?;
    expect_error(
        "inspect after a failed create",
        rt.execute(RuntimeOp::Inspect {
            container: spec.name,
        })
        .await,
        RuntimeErrorKind::NotFound,
    )
}

async fn unknown_container_is_not_found<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let container = scope.name("ghost");
    let ops = [
        RuntimeOp::Start {
            container: container.clone(),
        },
        RuntimeOp::Wait {
            container: container.clone(),
        },
        RuntimeOp::Inspect {
            container: container.clone(),
        },
        RuntimeOp::Stop {
            container: container.clone(),
            signal: Signal::Term,
            grace: Duration::from_secs(1),
        },
        RuntimeOp::Remove {
            container: container.clone(),
            force: false,
        },
        RuntimeOp::Remove {
            container: container.clone(),
            force: true,
        },
        copy_op(&container, SETUP_SCRIPT, "exit 0\n"),
        RuntimeOp::Exec {
            container: container.clone(),
            argv: argv(&["cat", MARKER]),
        },
    ];
    for op in ops {
        let what = format!("{} of an unknown container", op.name());
        expect_error(&what, rt.execute(op).await, RuntimeErrorKind::NotFound)?;
    }
    match rt.logs(&container, 10, 1000).await {
        Err(e) if e.kind == RuntimeErrorKind::NotFound => {}
        other => return Err(format!("logs of an unknown container: got {other:?}")),
    }
    match rt.exec(&container, &argv(&["true"]), SECOND, 1000).await {
        Err(e) if e.kind == RuntimeErrorKind::NotFound => Ok(()),
        other => Err(format!("exec in an unknown container: got {other:?}")),
    }
}

async fn wait_then_inspect_gives_the_exit_code<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let spec = scope.spec("job", programs::EXIT_3);
    let id = run(rt, &spec).await?;
    wait(rt, &spec.name).await?;
    let status = inspect_after_wait(rt, scope, &spec.name).await?;
    ensure(
        status.id == id,
        format!("inspect gives id {}, create gave {id}", status.id),
    )?;
    ensure(
        status.exit_code == Some(3),
        format!("{}, want exit code 3", shown(&status)),
    )?;
    let row = list_row(rt, &spec.name).await?;
    ensure(
        row.state == ContainerState::Exited,
        format!("an exited container lists as {}", row.state),
    )
}

async fn wait_on_a_never_started_container_returns<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let spec = scope.spec("web", programs::SLEEP);
    create(rt, &spec).await?;
    // podman answers at once, with status -1.
    wait(rt, &spec.name).await?;
    let status = inspect(rt, &spec.name).await?;
    ensure(
        status.state == ContainerState::Created && status.exit_code.is_none(),
        format!("a never-started container inspects as {}", shown(&status)),
    )
}

async fn stop_of_a_trapping_container_is_graceful<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let spec = scope.spec("web", programs::TRAPS_TERM);
    run(rt, &spec).await?;
    // A SIGTERM before the trap is set would be ignored (PID 1).
    until_logged(rt, scope, &spec.name, "ready").await?;
    let outcome = stop(rt, &spec.name, Signal::Term, Duration::from_secs(10)).await?;
    ensure(
        outcome == StopOutcome::Graceful,
        format!("stop of a trapping container: {outcome:?}"),
    )?;
    let status = inspect(rt, &spec.name).await?;
    ensure(
        status.state == ContainerState::Exited && status.exit_code == Some(0),
        format!("after a graceful stop: {}", shown(&status)),
    )
}

async fn stop_of_a_container_ignoring_term_is_killed<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let spec = scope.spec("web", programs::IGNORES_TERM);
    run(rt, &spec).await?;
    let outcome = stop(rt, &spec.name, Signal::Term, SECOND).await?;
    ensure(
        outcome == StopOutcome::Killed,
        format!("stop of a container ignoring SIGTERM: {outcome:?}"),
    )?;
    let status = inspect(rt, &spec.name).await?;
    ensure(
        status.state == ContainerState::Exited && status.exit_code == Some(137),
        format!("after the kill: {}", shown(&status)),
    )
}

async fn stop_with_sigkill_is_killed<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let mut spec = scope.spec("web", programs::SLEEP);
    spec.stop_signal = Signal::Kill;
    run(rt, &spec).await?;
    // The kill comes at once, not after the grace.
    let outcome = stop(rt, &spec.name, Signal::Kill, Duration::from_secs(30)).await?;
    ensure(
        outcome == StopOutcome::Killed,
        format!("stop with SIGKILL: {outcome:?}"),
    )?;
    let status = inspect(rt, &spec.name).await?;
    ensure(
        status.exit_code == Some(137),
        format!("after SIGKILL: {}", shown(&status)),
    )
}

async fn stop_of_a_stopped_container_is_already_stopped<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let exited = scope.spec("job", programs::EXIT_0);
    create(rt, &exited).await?;
    start(rt, &exited.name).await?;
    wait(rt, &exited.name).await?;
    inspect_after_wait(rt, scope, &exited.name).await?;
    // podman answers 304 Not Modified and changes nothing.
    let outcome = stop(rt, &exited.name, Signal::Term, SECOND).await?;
    ensure(
        outcome == StopOutcome::AlreadyStopped,
        format!("stop of an exited container: {outcome:?}"),
    )?;
    let status = inspect(rt, &exited.name).await?;
    ensure(
        status.exit_code == Some(0),
        format!("stop changed an exited container: {}", shown(&status)),
    )?;
    let created = scope.spec("web", programs::SLEEP);
    create(rt, &created).await?;
    let outcome = stop(rt, &created.name, Signal::Term, SECOND).await?;
    ensure(
        outcome == StopOutcome::AlreadyStopped,
        format!("stop of a never-started container: {outcome:?}"),
    )
}

async fn remove_of_a_running_container_needs_force<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let spec = scope.spec("web", programs::SLEEP);
    run(rt, &spec).await?;
    // podman 4.3 answers 500 "container state improper", Docker 409.
    expect_error(
        "remove without force of a running container",
        rt.execute(RuntimeOp::Remove {
            container: spec.name.clone(),
            force: false,
        })
        .await,
        RuntimeErrorKind::Other,
    )?;
    let status = inspect(rt, &spec.name).await?;
    ensure(
        status.state == ContainerState::Running,
        format!("a failed remove left it {}", status.state),
    )?;
    remove(rt, &spec.name, true).await?;
    expect_error(
        "inspect after a force remove",
        rt.execute(RuntimeOp::Inspect {
            container: spec.name,
        })
        .await,
        RuntimeErrorKind::NotFound,
    )
}

async fn force_remove_ends_a_pending_wait<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let spec = scope.spec("job", programs::SLEEP);
    run(rt, &spec).await?;
    let waiting = rt.execute(RuntimeOp::Wait {
        container: spec.name.clone(),
    });
    let removing = async {
        // Let the wait reach the runtime first.
        scope.pause(Duration::from_millis(300)).await;
        remove(rt, &spec.name, true).await
    };
    let (waited, removed) = both(waiting, removing).await;
    removed?;
    // podman answers the wait with status 0 and "container has already been removed".
    match waited {
        Ok(RuntimeReply::Waited) => Ok(()),
        other => Err(format!("wait ended by a force remove: got {other:?}")),
    }
}

async fn start_of_an_exited_container_restarts_it<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let spec = scope.spec("job", programs::EXIT_3);
    let id = create(rt, &spec).await?;
    for run in 1..=2 {
        start(rt, &spec.name).await?;
        wait(rt, &spec.name).await?;
        let status = inspect_after_wait(rt, scope, &spec.name).await?;
        ensure(
            status.id == id && status.exit_code == Some(3),
            format!(
                "run {run}: {}, want id {id} and exit code 3",
                shown(&status)
            ),
        )?;
    }
    Ok(())
}

async fn list_ignores_unmanaged_containers<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let managed = scope.spec("managed", programs::SLEEP);
    let mut unlabelled = scope.spec("unlabelled", programs::SLEEP);
    unlabelled.labels.remove(LABEL_MANAGED);
    let mut disowned = scope.spec("disowned", programs::SLEEP);
    disowned
        .labels
        .insert(LABEL_MANAGED.to_owned(), "false".to_owned());
    for spec in [&managed, &unlabelled, &disowned] {
        create(rt, spec).await?;
    }
    let names: Vec<String> = list(rt).await?.into_iter().map(|c| c.name).collect();
    ensure(
        names.contains(&managed.name),
        format!("list misses {}", managed.name),
    )?;
    for hidden in [&unlabelled.name, &disowned.name] {
        ensure(!names.contains(hidden), format!("list shows {hidden}"))?;
    }
    Ok(())
}

async fn logs_keep_the_newest_lines<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let spec = scope.spec("job", programs::SIX_LINES);
    run(rt, &spec).await?;
    wait(rt, &spec.name).await?;
    let cases: [(u32, usize, &str, bool); 4] = [
        (
            100,
            1000,
            "err1\nline1\nline2\nline3\nline4\nline5\n",
            false,
        ),
        (2, 1000, "line4\nline5\n", false),
        (100, 6, "line5\n", true),
        (0, 1000, "", false),
    ];
    for (tail, max_bytes, text, truncated) in cases {
        let logs = rt
            .logs(&spec.name, tail, max_bytes)
            .await
            .map_err(|e| format!("logs: {e}"))?;
        ensure(
            logs.text == text && logs.truncated == truncated,
            format!(
                "logs(tail {tail}, {max_bytes} bytes) = {logs:?}, want {text:?} truncated {truncated}"
            ),
        )?;
    }
    Ok(())
}

async fn exec_returns_output_and_exit_code<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let spec = scope.spec("web", programs::SLEEP);
    run(rt, &spec).await?;
    let out = exec(
        rt,
        &spec.name,
        &["sh", "-c", "echo out; echo err >&2; exit 7"],
        Duration::from_secs(10),
        1000,
    )
    .await?;
    ensure(
        out.exit_code == Some(7)
            && out.stdout == "out\n"
            && out.stderr == "err\n"
            && !out.truncated
            && !out.timed_out,
        format!("exec gave {out:?}"),
    )?;
    let out = exec(
        rt,
        &spec.name,
        &["echo", "hello"],
        Duration::from_secs(10),
        2,
    )
    .await?;
    ensure(
        out.exit_code == Some(0) && out.stdout == "o\n" && out.truncated,
        format!("exec cut to 2 bytes gave {out:?}"),
    )
}

async fn exec_timeout_is_reported<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let spec = scope.spec("web", programs::SLEEP);
    run(rt, &spec).await?;
    let out = exec(
        rt,
        &spec.name,
        &["sh", "-c", "echo started; sleep 5"],
        Duration::from_millis(500),
        1000,
    )
    .await?;
    ensure(
        out.timed_out && out.exit_code.is_none(),
        format!("exec past its timeout gave {out:?}"),
    )
}

/// Where the core puts a setup script, and how it runs one.
const SETUP_SCRIPT: &str = "/.podfleet/setup.sh";
const SETUP_ARGV: &[&str] = &["/bin/sh", "-e", "-o", "pipefail", SETUP_SCRIPT];
/// Where the core leaves its marker once a container is provisioned.
const MARKER: &str = "/.podfleet/provisioned";

async fn a_copied_script_runs_under_sh_e_pipefail<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let spec = scope.spec("web", programs::SLEEP);
    run(rt, &spec).await?;
    let name = &spec.name;
    let ran = setup(rt, name, "# provision\necho one\n\necho two\nexit 0\n").await?;
    ensure(
        ran == (0, "one\ntwo\n".to_owned()),
        format!("a script echoing two lines gave {ran:?}"),
    )?;
    // Copying again replaces the script; pipefail fails the pipeline.
    let ran = setup(rt, name, "echo start\nfalse | cat\necho never\n").await?;
    ensure(
        ran == (1, "start\n".to_owned()),
        format!("a script whose pipeline fails under pipefail gave {ran:?}"),
    )?;
    let marker = "sha256:5e1f\n";
    copy(rt, name, MARKER, marker, 0o600).await?;
    let read = exec_to_exit(rt, name, &["cat", MARKER]).await?;
    ensure(
        read == (0, marker.to_owned()),
        format!("cat of the marker gave {read:?}"),
    )?;
    let absent = exec_to_exit(rt, name, &["cat", "/.podfleet/absent"]).await?;
    ensure(
        absent.0 == 1 && absent.1.contains("No such file or directory"),
        format!("cat of a missing file gave {absent:?}"),
    )?;
    let no_script = exec_to_exit(rt, name, &["/bin/sh", "-e", "/.podfleet/absent.sh"]).await?;
    ensure(
        no_script.0 == 2 && no_script.1.contains("can't open"),
        format!("sh of a missing script gave {no_script:?}"),
    )?;
    for path in ["setup.sh", "/.podfleet/../etc/passwd", "/.podfleet/"] {
        let what = format!("copy_file to {path:?}");
        expect_error(
            &what,
            rt.execute(copy_op(name, path, "exit 0\n")).await,
            RuntimeErrorKind::Other,
        )?;
    }
    Ok(())
}

async fn a_script_reading_stdin_goes_on<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let spec = scope.spec("web", programs::SLEEP);
    run(rt, &spec).await?;
    // Were the script on stdin, `cat` would swallow the rest of it.
    let ran = setup(rt, &spec.name, "cat\necho after\nexit 4\n").await?;
    ensure(
        ran.0 == 4 && ran.1.ends_with("after\n"),
        format!("a script whose first command is `cat` gave {ran:?}"),
    )?;
    let ran = setup(rt, &spec.name, "read answer\necho never\n").await?;
    ensure(
        ran.0 == 1 && !ran.1.contains("never"),
        format!("a script whose `read` meets the end of stdin gave {ran:?}"),
    )
}

async fn a_failing_command_stops_the_script<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let spec = scope.spec("web", programs::SLEEP);
    run(rt, &spec).await?;
    let ran = setup(rt, &spec.name, "echo start\nfalse\necho never\n").await?;
    ensure(
        ran.0 == 1 && ran.1.contains("start") && !ran.1.contains("never"),
        format!("a script with a failing command gave {ran:?}"),
    )
}

async fn a_file_is_copied_in_any_state_but_exec_needs_a_running_container<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let mut spec = scope.spec("web", programs::SLEEP);
    spec.stop_signal = Signal::Kill;
    let name = &spec.name;
    create(rt, &spec).await?;
    copy(rt, name, MARKER, "created\n", 0o600).await?;
    expect_error(
        "exec in a created container",
        exec_op(rt, name, &["cat", MARKER]).await,
        RuntimeErrorKind::Other,
    )?;
    start(rt, name).await?;
    let read = exec_to_exit(rt, name, &["cat", MARKER]).await?;
    ensure(
        read == (0, "created\n".to_owned()),
        format!("a file copied before the start read {read:?}"),
    )?;
    stop(rt, name, Signal::Kill, SECOND).await?;
    expect_error(
        "exec in a stopped container",
        exec_op(rt, name, &["cat", MARKER]).await,
        RuntimeErrorKind::Other,
    )?;
    copy(rt, name, MARKER, "exited\n", 0o600).await?;
    start(rt, name).await?;
    let read = exec_to_exit(rt, name, &["cat", MARKER]).await?;
    ensure(
        read == (0, "exited\n".to_owned()),
        format!("a file copied into the exited container read {read:?}"),
    )
}

async fn a_stop_kills_a_running_script<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let mut spec = scope.spec("web", programs::SLEEP);
    spec.stop_signal = Signal::Kill;
    run(rt, &spec).await?;
    let name = &spec.name;
    copy(rt, name, SETUP_SCRIPT, "echo waiting\nsleep 1000\n", 0o700).await?;
    let running = exec_to_exit(rt, name, SETUP_ARGV);
    let stopping = async {
        // Let the exec start first.
        scope.pause(Duration::from_millis(500)).await;
        stop(rt, name, Signal::Kill, SECOND).await
    };
    let (ran, stopped) = both(running, stopping).await;
    stopped?;
    let ran = ran?;
    ensure(
        ran == (137, "waiting\n".to_owned()),
        format!("a script running when its container stopped gave {ran:?}"),
    )
}

fn copy_op(container: &str, path: &str, content: &str) -> RuntimeOp {
    RuntimeOp::CopyFile {
        container: container.to_owned(),
        path: path.to_owned(),
        content: content.to_owned(),
        mode: 0o700,
    }
}

async fn copy<R: ContainerRuntime>(
    rt: &R,
    name: &str,
    path: &str,
    content: &str,
    mode: u32,
) -> CheckResult {
    let op = RuntimeOp::CopyFile {
        container: name.to_owned(),
        path: path.to_owned(),
        content: content.to_owned(),
        mode,
    };
    match rt.execute(op).await {
        Ok(RuntimeReply::FileCopied) => Ok(()),
        other => Err(unexpected(&format!("copy_file {path} into {name}"), other)),
    }
}

async fn exec_op<R: ContainerRuntime>(rt: &R, name: &str, args: &[&str]) -> RuntimeResult {
    rt.execute(RuntimeOp::Exec {
        container: name.to_owned(),
        argv: argv(args),
    })
    .await
}

/// Runs `args` in `name` with [`RuntimeOp::Exec`]: its exit code and output.
async fn exec_to_exit<R: ContainerRuntime>(
    rt: &R,
    name: &str,
    args: &[&str],
) -> Result<(i64, String), String> {
    match exec_op(rt, name, args).await {
        Ok(RuntimeReply::Executed { exit_code, output }) => Ok((exit_code, output)),
        other => Err(unexpected(&format!("exec {args:?} in {name}"), other)),
    }
}

/// Copies `script` to [`SETUP_SCRIPT`] and runs it as the core does.
async fn setup<R: ContainerRuntime>(
    rt: &R,
    name: &str,
    script: &str,
) -> Result<(i64, String), String> {
    copy(rt, name, SETUP_SCRIPT, script, 0o700).await?;
    exec_to_exit(rt, name, SETUP_ARGV).await
}

const SECOND: Duration = Duration::from_secs(1);

/// A status as people read it: `exited with exit code 3 (id 1a2b...)`.
fn shown(status: &ContainerStatus) -> String {
    match status.exit_code {
        Some(code) => format!("{} with exit code {code} (id {})", status.state, status.id),
        None => format!("{} without an exit code (id {})", status.state, status.id),
    }
}

fn ensure(condition: bool, failure: String) -> CheckResult {
    if condition {
        Ok(())
    } else {
        Err(failure)
    }
}

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|&a| a.to_owned()).collect()
}

fn unexpected(what: &str, result: RuntimeResult) -> String {
    format!("{what}: unexpected {result:?}")
}

fn expect_error(what: &str, result: RuntimeResult, kind: RuntimeErrorKind) -> CheckResult {
    match result {
        Err(e) if e.kind == kind => Ok(()),
        other => Err(format!("{what}: want {kind:?}, got {other:?}")),
    }
}

async fn the_runtime_states_its_version<R: ContainerRuntime>(
    rt: &R,
    _scope: &mut Scope<'_>,
) -> CheckResult {
    let first = rt.version().await.map_err(|e| format!("version: {e:?}"))?;
    if first.trim().is_empty() {
        return Err("version: an empty version".to_owned());
    }
    let second = rt
        .version()
        .await
        .map_err(|e| format!("version again: {e:?}"))?;
    if first != second {
        return Err(format!("version: {first:?}, then {second:?}"));
    }
    Ok(())
}

async fn inspect_image<R: ContainerRuntime>(
    rt: &R,
    image: &str,
) -> Result<Option<ImageInfo>, String> {
    let op = RuntimeOp::InspectImage {
        image: image.to_owned(),
    };
    match rt.execute(op).await {
        Ok(RuntimeReply::ImageInspected { image }) => Ok(image),
        other => Err(unexpected(&format!("inspect image {image}"), other)),
    }
}

async fn inspect_image_answers_from_the_store<R: ContainerRuntime>(
    rt: &R,
    scope: &mut Scope<'_>,
) -> CheckResult {
    let present = inspect_image(rt, &scope.fixture.image).await?;
    ensure(
        present.as_ref().is_some_and(|i| !i.id.trim().is_empty()),
        format!(
            "inspect image {} (present) gave {present:?}, want an id",
            scope.fixture.image
        ),
    )?;
    let absent = inspect_image(rt, &scope.fixture.missing_image).await?;
    ensure(
        absent.is_none(),
        format!(
            "inspect image {} (absent) gave {absent:?}, want none",
            scope.fixture.missing_image
        ),
    )
}

async fn pull_from_an_unreachable_registry_is_a_network_failure<R: ContainerRuntime>(
    rt: &R,
    _scope: &mut Scope<'_>,
) -> CheckResult {
    // podman: "pinging container registry 127.0.0.1:1: ... connect:
    // connection refused".
    let op = RuntimeOp::Pull {
        image: UNREACHABLE_IMAGE.to_owned(),
    };
    expect_error(
        "pull from an unreachable registry",
        rt.execute(op).await,
        RuntimeErrorKind::Pull(PullFailure::Network),
    )?;
    let after = inspect_image(rt, UNREACHABLE_IMAGE).await?;
    ensure(
        after.is_none(),
        format!("inspect image after a failed pull gave {after:?}, want none"),
    )
}

async fn create<R: ContainerRuntime>(rt: &R, spec: &ContainerSpec) -> Result<String, String> {
    match rt.execute(RuntimeOp::Create { spec: spec.clone() }).await {
        Ok(RuntimeReply::Created { id }) => Ok(id),
        other => Err(unexpected(&format!("create {}", spec.name), other)),
    }
}

/// Creates and starts `spec`, returning the container's id.
async fn run<R: ContainerRuntime>(rt: &R, spec: &ContainerSpec) -> Result<String, String> {
    let id = create(rt, spec).await?;
    start(rt, &spec.name).await?;
    Ok(id)
}

async fn exec<R: ContainerRuntime>(
    rt: &R,
    name: &str,
    args: &[&str],
    timeout: Duration,
    max_bytes: usize,
) -> Result<ExecOutput, String> {
    rt.exec(name, &argv(args), timeout, max_bytes)
        .await
        .map_err(|e| format!("exec {args:?}: {e}"))
}

async fn start<R: ContainerRuntime>(rt: &R, name: &str) -> CheckResult {
    let op = RuntimeOp::Start {
        container: name.to_owned(),
    };
    match rt.execute(op).await {
        Ok(RuntimeReply::Started) => Ok(()),
        other => Err(unexpected(&format!("start {name}"), other)),
    }
}

async fn wait<R: ContainerRuntime>(rt: &R, name: &str) -> CheckResult {
    let op = RuntimeOp::Wait {
        container: name.to_owned(),
    };
    match rt.execute(op).await {
        Ok(RuntimeReply::Waited) => Ok(()),
        other => Err(unexpected(&format!("wait {name}"), other)),
    }
}

async fn inspect<R: ContainerRuntime>(rt: &R, name: &str) -> Result<ContainerStatus, String> {
    let op = RuntimeOp::Inspect {
        container: name.to_owned(),
    };
    match rt.execute(op).await {
        Ok(RuntimeReply::Inspected { status }) => Ok(status),
        other => Err(unexpected(&format!("inspect {name}"), other)),
    }
}

/// Inspects a container `wait` said has exited, retrying the libpod race as
/// the reconciler does (200 ms apart), a few more times than it does.
async fn inspect_after_wait<R: ContainerRuntime>(
    rt: &R,
    scope: &Scope<'_>,
    name: &str,
) -> Result<ContainerStatus, String> {
    let mut status = inspect(rt, name).await?;
    for _ in 0..5 {
        if status.state == ContainerState::Exited {
            return Ok(status);
        }
        scope.pause(Duration::from_millis(200)).await;
        status = inspect(rt, name).await?;
    }
    Err(format!(
        "still not exited a second after wait: {}",
        shown(&status)
    ))
}

async fn stop<R: ContainerRuntime>(
    rt: &R,
    name: &str,
    signal: Signal,
    grace: Duration,
) -> Result<StopOutcome, String> {
    let op = RuntimeOp::Stop {
        container: name.to_owned(),
        signal,
        grace,
    };
    match rt.execute(op).await {
        Ok(RuntimeReply::Stopped { outcome }) => Ok(outcome),
        other => Err(unexpected(&format!("stop {name}"), other)),
    }
}

async fn remove<R: ContainerRuntime>(rt: &R, name: &str, force: bool) -> CheckResult {
    let op = RuntimeOp::Remove {
        container: name.to_owned(),
        force,
    };
    match rt.execute(op).await {
        Ok(RuntimeReply::Removed) => Ok(()),
        other => Err(unexpected(&format!("remove {name}"), other)),
    }
}

async fn list<R: ContainerRuntime>(rt: &R) -> Result<Vec<ContainerSummary>, String> {
    match rt.execute(RuntimeOp::List).await {
        Ok(RuntimeReply::Listed { containers }) => Ok(containers),
        other => Err(unexpected("list", other)),
    }
}

/// The list row of the container `name`.
async fn list_row<R: ContainerRuntime>(rt: &R, name: &str) -> Result<ContainerSummary, String> {
    list(rt)
        .await?
        .into_iter()
        .find(|c| c.name == name)
        .ok_or_else(|| format!("list misses {name}"))
}

/// Polls the logs of `name` until a line equals `line` (5 s at most).
async fn until_logged<R: ContainerRuntime>(
    rt: &R,
    scope: &Scope<'_>,
    name: &str,
    line: &str,
) -> CheckResult {
    for _ in 0..100 {
        let logs = rt
            .logs(name, 100, 10_000)
            .await
            .map_err(|e| format!("logs of {name}: {e}"))?;
        if logs.text.lines().any(|l| l == line) {
            return Ok(());
        }
        scope.pause(Duration::from_millis(50)).await;
    }
    Err(format!("{name} never logged {line:?}"))
}

/// Runs two futures concurrently on the caller's task; the suite must not
/// depend on an executor.
async fn both<A: Future, B: Future>(a: A, b: B) -> (A::Output, B::Output) {
    let mut a = pin!(a);
    let mut b = pin!(b);
    let mut a_out = None;
    let mut b_out = None;
    poll_fn(|cx| {
        if a_out.is_none() {
            if let Poll::Ready(out) = a.as_mut().poll(cx) {
                a_out = Some(out);
            }
        }
        if b_out.is_none() {
            if let Poll::Ready(out) = b.as_mut().poll(cx) {
                b_out = Some(out);
            }
        }
        match (a_out.take(), b_out.take()) {
            (Some(a), Some(b)) => Poll::Ready((a, b)),
            (a, b) => {
                a_out = a;
                b_out = b;
                Poll::Pending
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_are_unique_and_usable_in_container_names() {
        let mut names = CHECKS.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CHECKS.len());
        assert!(CHECKS
            .iter()
            .all(|c| c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
    }

    #[test]
    fn exec_checks_are_the_checks_named_exec() {
        let named_exec: Vec<&str> = CHECKS
            .iter()
            .copied()
            .filter(|c| c.starts_with("exec_"))
            .collect();
        assert_eq!(EXEC_CHECKS, named_exec.as_slice());
    }
}
