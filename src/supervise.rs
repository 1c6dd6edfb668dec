//! Crash-only supervision of the long-lived tasks billing depends on (the spool writer, the
//! shipper, the proxy's accept loop, the admin listener, and any task registered later).
//!
//! A registered task that panics, or ends while the daemon is not shutting down, fails the
//! daemon: an ERROR line names it, `/healthz` and `/readyz` answer 503 naming it, and
//! [`Supervisor::failed`] resolves so `app::run` exits non-zero within seconds and systemd
//! (`Restart=on-failure`) starts a fresh process. The daemon never goes on relaying with a dead
//! billing stage behind it: every later billing record would be lost while the probes said 200.
//!
//! The names in use: `spool_writer`, `shipper`, `shipper_lookups`, `shipper_backlog`,
//! `proxy_accept`, `admin_listener`, `steve_recovery`, `reconcile`.
//!
//! Registering a task is one line: wrap its future in [`Supervisor::watch`] where it is spawned,
//! `tokio::spawn(supervisor.watch("steve_recovery", recovery.run()))`.
//!
//! In debug builds only (the integration tests), `OCPP_LAGO_BRIDGE_TEST_PANIC=TASK[@MILLIS]`
//! (comma-separated for several) makes the named task panic MILLIS after it starts; the release
//! binary does not contain this.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::FutureExt;
use tokio::sync::watch;

use crate::telemetry::Readiness;

/// The environment variable that injects a panic into a task, honoured in debug builds only.
#[cfg(debug_assertions)]
pub const INJECT_PANIC_ENV: &str = "OCPP_LAGO_BRIDGE_TEST_PANIC";

/// The first task that failed: its name and what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFailure {
    /// The name the task was registered with.
    pub task: &'static str,
    /// "panicked: …" or "ended".
    pub reason: String,
}

/// Watches registered tasks; cheap to clone (hand a clone to whatever spawns a task).
#[derive(Clone, Debug)]
pub struct Supervisor {
    readiness: Readiness,
    stopping: Arc<AtomicBool>,
    first_failure: watch::Sender<Option<TaskFailure>>,
}

impl Supervisor {
    /// A supervisor that reports failures through `readiness` (`/healthz`, `/readyz`).
    pub fn new(readiness: Readiness) -> Supervisor {
        Supervisor {
            readiness,
            stopping: Arc::new(AtomicBool::new(false)),
            first_failure: watch::Sender::new(None),
        }
    }

    /// Wraps the future of the long-lived task `task`: if it panics, or returns before
    /// [`Supervisor::stopping`] was called, the daemon fails (see the module doc).
    pub fn watch<F>(
        &self,
        task: &'static str,
        future: F,
    ) -> impl Future<Output = ()> + Send + use<F>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.watch_ending(task, future, || false)
    }

    /// [`Supervisor::watch`], where an end is no failure when `expected_end` says so at that
    /// moment (a panic always is).
    fn watch_ending<F, E>(
        &self,
        task: &'static str,
        future: F,
        expected_end: E,
    ) -> impl Future<Output = ()> + Send + use<F, E>
    where
        F: Future<Output = ()> + Send + 'static,
        E: Fn() -> bool + Send + 'static,
    {
        let supervisor = self.clone();
        async move {
            let outcome = AssertUnwindSafe(with_injected_fault(task, future))
                .catch_unwind()
                .await;
            match outcome {
                Ok(()) if supervisor.stopping.load(Ordering::SeqCst) || expected_end() => {}
                Ok(()) => supervisor.fail(task, "ended".to_owned()),
                Err(panic) => {
                    supervisor.fail(task, format!("panicked: {}", panic_message(&*panic)))
                }
            }
        }
    }

    /// [`Supervisor::watch`] for a helper whose life is bound to a parent task (the shipper's
    /// subscription lookups and backlog watch) through `parent_gone`, which the parent cancels
    /// when it returns, panics or shuts down: an end after that is the helper following its
    /// parent, not a failure of its own (the parent's watch reports the parent); an end before
    /// it, or a panic at any time, fails the daemon under the helper's name. Without this, a
    /// helper winding down after its parent panicked could be the first failure reported,
    /// naming the wrong task. The token is cancelled before the helper can see it, so reading
    /// it when the helper has ended leaves no window.
    pub fn watch_helper<F>(
        &self,
        task: &'static str,
        future: F,
        parent_gone: tokio_util::sync::CancellationToken,
    ) -> impl Future<Output = ()> + Send + use<F>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.watch_ending(task, future, move || parent_gone.is_cancelled())
    }

    /// An orderly shutdown has begun: tasks that end from now on are not failures (a panic
    /// still is).
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Resolves with the first failure; never resolves while every task runs.
    pub async fn failed(&self) -> TaskFailure {
        let mut first = self.first_failure.subscribe();
        let failure = first
            .wait_for(Option::is_some)
            .await
            .map(|failure| failure.clone());
        match failure {
            Ok(Some(failure)) => failure,
            // The sender lives in `self`, so the channel cannot close while this waits.
            _ => std::future::pending().await,
        }
    }

    /// The first failure so far, if any.
    pub fn failure(&self) -> Option<TaskFailure> {
        self.first_failure.borrow().clone()
    }

    fn fail(&self, task: &'static str, reason: String) {
        metrics::counter!("ocpp_lago_bridge_task_failures_total", "task" => task).increment(1);
        tracing::error!(
            task,
            error = %reason,
            "a task billing depends on stopped: /healthz fails and the process exits so that systemd restarts it"
        );
        self.readiness.set_failed(task, reason.clone());
        self.first_failure.send_if_modified(|first| {
            if first.is_some() {
                return false;
            }
            *first = Some(TaskFailure { task, reason });
            true
        });
    }
}

/// The text of a panic payload (`panic!` with a literal or a format string).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// In debug builds, `future` raced against the panic `INJECT_PANIC_ENV` asks for this task.
#[cfg(debug_assertions)]
async fn with_injected_fault<F: Future<Output = ()>>(task: &'static str, future: F) {
    let after = std::env::var(INJECT_PANIC_ENV).ok().and_then(|spec| {
        spec.split(',').find_map(|item| {
            let (name, millis) = item.trim().split_once('@').unwrap_or((item.trim(), "0"));
            (name == task).then(|| std::time::Duration::from_millis(millis.parse().unwrap_or(0)))
        })
    });
    let Some(after) = after else {
        return future.await;
    };
    tokio::select! {
        () = future => {}
        () = tokio::time::sleep(after) => panic!("fault injected into {task} by {INJECT_PANIC_ENV}"),
    }
}

/// Release builds: the future as it is.
#[cfg(not(debug_assertions))]
async fn with_injected_fault<F: Future<Output = ()>>(_task: &'static str, future: F) {
    future.await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_or_ending_task_fails_the_daemon_and_an_orderly_end_does_not() {
        let readiness = Readiness::default();
        let supervisor = Supervisor::new(readiness.clone());
        tokio::spawn(supervisor.watch("quiet", std::future::pending())).abort();
        assert_eq!(supervisor.failure(), None);

        let panicking = tokio::spawn(supervisor.watch("spool_writer", async {
            let registers: Vec<i64> = Vec::new();
            let _ = registers[3];
        }));
        panicking.await.expect("the panic is caught by the watch");
        let failure = tokio::time::timeout(std::time::Duration::from_secs(1), supervisor.failed())
            .await
            .expect("failed() resolves");
        assert_eq!(failure.task, "spool_writer");
        assert!(
            failure.reason.starts_with("panicked: index out of bounds"),
            "{failure:?}"
        );
        assert!(readiness.failures().contains_key("spool_writer"));
        assert!(readiness.problems().contains_key("spool_writer"));

        // Later failures are recorded too; the first stays the first.
        supervisor.watch("shipper", async {}).await;
        assert_eq!(supervisor.failure().unwrap().task, "spool_writer");
        assert_eq!(readiness.failures()["shipper"], "ended");

        // A helper ending because its parent is gone is not a failure of its own; one ending
        // or panicking while its parent runs is.
        let helpers = Supervisor::new(Readiness::default());
        let parent_gone = tokio_util::sync::CancellationToken::new();
        let token = parent_gone.clone();
        let winding_down = tokio::spawn(helpers.watch_helper(
            "shipper_backlog",
            async move { token.cancelled().await },
            parent_gone.clone(),
        ));
        parent_gone.cancel();
        winding_down.await.unwrap();
        assert_eq!(helpers.failure(), None);
        helpers
            .watch_helper("shipper_lookups", async {}, Default::default())
            .await;
        assert_eq!(helpers.failure().unwrap().task, "shipper_lookups");

        // After an orderly shutdown began, ending is what tasks are asked to do.
        let orderly = Supervisor::new(Readiness::default());
        orderly.stopping();
        orderly.watch("proxy_accept", async {}).await;
        assert_eq!(orderly.failure(), None);
    }
}
