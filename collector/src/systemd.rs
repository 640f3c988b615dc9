//! systemd's service notifications (`Type=notify`, `sd_notify(3)`): `READY=1` once the agent
//! has attached, serves and has finished a first poll (read or not), so that `systemctl
//! start` returns only then and reports a refused start as a failed one; `STOPPING=1` when a clean stop begins; and, where the unit
//! sets `WatchdogSec=`, `WATCHDOG=1` every half period for as long as the poll loop is alive
//! by `/healthz`'s measure ([`Liveness`]). A stuck loop then gets the agent killed with
//! `SIGABRT`, as a crash, whose pins the next start takes over with every counter; the
//! kubelet's liveness probe does the same job in Kubernetes. Without `NOTIFY_SOCKET` (not run
//! by systemd, or another `Type=`) nothing is sent.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use sd_notify::NotifyState;

use crate::serve::Liveness;

/// How often the start looks for its first finished poll.
const FIRST_POLL_CHECK: Duration = Duration::from_millis(20);

/// Set when the stop begins: no `READY=1` or feed of the watchdog starts after it.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Held across each send, so that `STOPPING=1` goes out after a send already under way.
static SENDING: Mutex<()> = Mutex::new(());

/// How long the stop waits to tell systemd: a send blocks while the manager's queue is
/// full, and the stop must go on to detach whatever happens to the message.
const STOP_TELL_WAIT: Duration = Duration::from_secs(1);

/// A clean stop has begun. Sent from a thread of its own, waited for a second at most.
pub fn stopping() {
    STOPPING.store(true, Ordering::SeqCst);
    let (told, wait) = std::sync::mpsc::channel();
    let sender = std::thread::Builder::new().spawn(move || {
        let _sending = SENDING.lock().unwrap_or_else(PoisonError::into_inner);
        tell(&NotifyState::Stopping, "that the agent is stopping");
        let _ = told.send(());
    });
    // No thread to be had: the stop goes on without the message (systemd sees the exit).
    if let Err(err) = sender {
        tracing::warn!("telling systemd that the agent is stopping: no thread for it: {err}");
        return;
    }
    if wait.recv_timeout(STOP_TELL_WAIT).is_err() {
        tracing::warn!(
            "telling systemd that the agent is stopping is still under way; stopping all the same"
        );
    }
}

/// Sends `state` unless the stop has begun.
fn tell_while_running(state: &NotifyState<'_>, what: &str) {
    let _sending = SENDING.lock().unwrap_or_else(PoisonError::into_inner);
    if !STOPPING.load(Ordering::SeqCst) {
        tell(state, what);
    }
}

/// Says the agent is ready once `liveness` has seen a poll finish, then feeds systemd's
/// watchdog while the poll loop runs (where the unit has one). Runs until aborted. A first
/// poll stuck past the stall limit is said ready all the same: systemd arms the watchdog
/// only then, and the feeds it then misses get the agent restarted, where waiting for that
/// poll would hold the start until `TimeoutStartSec`.
///
/// The sends block while the receiver's queue is full, so they run on blocking threads,
/// not on an async worker (which a manager that stopped reading would otherwise hold, and
/// with it the HTTP side); a feed still under way skips the next.
pub async fn notify(liveness: Arc<Liveness>) {
    let mut first_poll = tokio::time::interval(FIRST_POLL_CHECK);
    while !liveness.has_polled() && liveness.alive() {
        first_poll.tick().await;
    }
    let mut under_way = tokio::task::spawn_blocking(|| {
        tell_while_running(&NotifyState::Ready, "that the agent is ready");
    });
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut ticks = tokio::time::interval(period / 2);
    loop {
        ticks.tick().await;
        if liveness.alive() && under_way.is_finished() {
            under_way = tokio::task::spawn_blocking(|| {
                tell_while_running(
                    &NotifyState::Watchdog,
                    "the watchdog that the agent is alive",
                );
            });
        }
    }
}

fn tell(state: &NotifyState<'_>, what: &str) {
    if let Err(err) = sd_notify::notify(std::slice::from_ref(state)) {
        tracing::warn!("telling systemd {what} failed: {err}");
    }
}
