//! systemd's service notifications (`Type=notify`, `sd_notify(3)`): `READY=1` once the agent
//! has attached and serves, so that `systemctl start` returns only then and reports a
//! refused start as a failed one; `STOPPING=1` when a clean stop begins; and, where the unit
//! sets `WatchdogSec=`, `WATCHDOG=1` every half period for as long as the poll loop is alive
//! by `/healthz`'s measure ([`Liveness`]). A stuck loop then gets the agent killed with
//! `SIGABRT`, as a crash, whose pins the next start takes over with every counter; the
//! kubelet's liveness probe does the same job in Kubernetes. Without `NOTIFY_SOCKET` (not run
//! by systemd, or another `Type=`) nothing is sent.

use std::sync::Arc;

use sd_notify::NotifyState;

use crate::serve::Liveness;

/// Attached and serving.
pub fn ready() {
    tell(&NotifyState::Ready, "that the agent is ready");
}

/// A clean stop has begun.
pub fn stopping() {
    tell(&NotifyState::Stopping, "that the agent is stopping");
}

/// Feeds systemd's watchdog while `liveness` says the poll loop runs; returns at once when
/// the unit has no watchdog.
pub async fn feed_watchdog(liveness: Arc<Liveness>) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut ticks = tokio::time::interval(period / 2);
    loop {
        ticks.tick().await;
        if liveness.alive() {
            tell(
                &NotifyState::Watchdog,
                "the watchdog that the agent is alive",
            );
        }
    }
}

fn tell(state: &NotifyState<'_>, what: &str) {
    if let Err(err) = sd_notify::notify(std::slice::from_ref(state)) {
        tracing::warn!("telling systemd {what} failed: {err}");
    }
}
