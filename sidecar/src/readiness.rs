//! Readiness notifications to a service manager (systemd's `Type=notify`,
//! the `sd_notify` protocol): a datagram to the Unix socket named by
//! `$NOTIFY_SOCKET`, a path (an abstract `@name` is not supported). Without
//! the variable nothing is sent. A failure to send is logged and does not
//! stop the sidecar: the service manager then times the start out itself.

use sd_notify::NotifyState;

/// `READY=1` and `STATUS=<status>`: the socket accepts connections.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)], "READY=1");
}

/// `STOPPING=1` and a status: the sidecar is shutting down.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")], "STOPPING=1");
}

fn send(states: &[NotifyState<'_>], what: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    match sd_notify::notify(false, states) {
        Ok(()) => tracing::debug!(what, "service manager notified"),
        Err(e) => tracing::warn!(what, error = %e, "cannot notify the service manager (NOTIFY_SOCKET)"),
    }
}
