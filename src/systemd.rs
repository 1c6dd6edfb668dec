//! systemd integration (`Type=notify`): READY=1, STOPPING=1, STATUS= lines with live counts, and
//! WATCHDOG=1 pings sent only while the relay accepts and the spool writer's loop turns. A writer
//! that merely fails to commit still turns (and reports through /readyz); one that hangs stops
//! the pings. Without NOTIFY_SOCKET every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;

/// Tells systemd the daemon is ready (listeners bound, spool open).
pub fn ready() {
    let _ = sd_notify::notify(&[NotifyState::Ready]);
}

/// Tells systemd the daemon is stopping.
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// Tells systemd it is reloading (SIGHUP), then ready again.
pub fn reloading(done: bool) {
    let state = if done {
        NotifyState::Ready
    } else {
        NotifyState::Reloading
    };
    let _ = sd_notify::notify(&[state]);
}

/// Publishes a one-line status (`systemctl status` shows it).
pub fn status(line: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(line)]);
}

/// Pings the watchdog.
pub fn watchdog() {
    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
}

/// How often to report: half the watchdog period when systemd set one, else every 5 s.
pub fn report_every() -> Duration {
    sd_notify::watchdog_enabled()
        .map(|period| period / 2)
        .unwrap_or(Duration::from_secs(5))
        .clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// Whether systemd expects watchdog pings.
pub fn watchdog_enabled() -> bool {
    sd_notify::watchdog_enabled().is_some()
}
