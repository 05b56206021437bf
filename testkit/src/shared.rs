//! [`SharedFake`]: the pure [`FakeRuntime`] behind the agent's async
//! [`ContainerRuntime`] trait, so the agent's event loop can drive it.
//!
//! Time comes from the loop's [`Clock`]: before every operation the fake is
//! advanced to `clock.now()`, and a `wait` (or a `stop` in its grace period)
//! sleeps on that clock until the container's exit is due, or until another
//! operation changes something; a pull sleeps until its transfer is done,
//! and an exec until its time or its container's stop, whichever is first. Under turmoil that clock is simulated, so
//! an hour-long container costs nothing.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use podfleet_core::runtime::{
    PullProgress, RuntimeError, RuntimeErrorKind, RuntimeOp, RuntimeResult,
};
use podfleet_core::time::Timestamp;
use tokio::sync::Notify;

use podfleet_agent::event_loop::Clock;
use podfleet_agent::runtime::{ContainerRuntime, ExecOutput, LogsOutput};

use crate::runtime::{Completion, FakeRuntime};

/// A [`FakeRuntime`] shared between the agent's loop and whoever plays the
/// world around it (a test, the simulator's fault injector).
#[derive(Debug)]
pub struct SharedFake<C> {
    fake: Arc<Mutex<FakeRuntime>>,
    changed: Arc<Notify>,
    clock: C,
}

impl<C: Clone> Clone for SharedFake<C> {
    fn clone(&self) -> Self {
        Self {
            fake: Arc::clone(&self.fake),
            changed: Arc::clone(&self.changed),
            clock: self.clock.clone(),
        }
    }
}

impl<C: Clock + Clone> SharedFake<C> {
    /// Wraps `fake`, on `clock`'s time.
    pub fn new(fake: FakeRuntime, clock: C) -> Self {
        Self {
            fake: Arc::new(Mutex::new(fake)),
            changed: Arc::new(Notify::new()),
            clock,
        }
    }

    /// The time on the fake's clock.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Runs `f` on the fake, advanced to now, and wakes pending waits.
    ///
    /// The lock is a plain mutex, never held across an await.
    pub fn with<T>(&self, f: impl FnOnce(&mut FakeRuntime) -> T) -> T {
        let out = {
            let mut fake = self.lock();
            fake.advance(self.clock.now());
            f(&mut fake)
        };
        self.changed.notify_waiters();
        out
    }

    fn lock(&self) -> MutexGuard<'_, FakeRuntime> {
        // A panic while holding the lock already fails the test or the run.
        self.fake.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn until_stopped(&self, id: String, result: RuntimeResult) -> RuntimeResult {
        loop {
            let notified = self.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let next = {
                let mut fake = self.lock();
                fake.advance(self.clock.now());
                if !fake.is_running(&id) {
                    return result;
                }
                fake.next_event()
            };
            match next {
                Some(at) => {
                    tokio::select! {
                        biased;
                        () = self.clock.sleep_until(at) => {}
                        () = notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

impl<C: Clock + Clone> ContainerRuntime for SharedFake<C> {
    fn pull_progress(&self, image: &str) -> Option<PullProgress> {
        self.with(|fake| fake.pull_progress(image))
    }

    async fn execute(&self, op: RuntimeOp) -> RuntimeResult {
        match self.with(|fake| fake.execute(&op)) {
            Completion::Ready(result) => result,
            Completion::WhenStopped { id, result } => self.until_stopped(id, result).await,
            Completion::At { at, result } => {
                self.clock.sleep_until(at).await;
                // Lands the pull (and anything else due) before the answer.
                self.with(|_| ());
                result
            }
            Completion::AtUnlessStopped {
                at,
                result,
                id,
                stopped,
            } => {
                tokio::select! {
                    biased;
                    stopped = self.until_stopped(id, stopped) => stopped,
                    () = self.clock.sleep_until(at) => result,
                }
            }
        }
    }

    async fn version(&self) -> Result<String, RuntimeError> {
        Ok(self.lock().version())
    }

    async fn logs(
        &self,
        container: &str,
        tail_lines: u32,
        max_bytes: usize,
    ) -> Result<LogsOutput, RuntimeError> {
        let lines = self.with(|fake| fake.log_lines(container))?;
        let keep = usize::try_from(tail_lines).unwrap_or(usize::MAX);
        let tail = &lines[lines.len().saturating_sub(keep)..];
        let mut text = tail.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        let truncated = text.len() > max_bytes;
        if truncated {
            let mut cut = text.len() - max_bytes;
            while !text.is_char_boundary(cut) {
                cut += 1;
            }
            text.drain(..cut);
        }
        Ok(LogsOutput { text, truncated })
    }

    async fn exec(
        &self,
        container: &str,
        _argv: &[String],
        _timeout: Duration,
        _max_bytes: usize,
    ) -> Result<ExecOutput, RuntimeError> {
        self.with(|fake| fake.log_lines(container))?;
        Err(RuntimeError::new(
            RuntimeErrorKind::Other,
            "the fake runtime runs no programs, so it cannot exec",
        ))
    }
}
