//! systemd integration (`Type=notify`): READY, STATUS, STOPPING and
//! watchdog pings, sent as datagrams to `$NOTIFY_SOCKET` in the format of
//! `sd_notify(3)` (messages formatted by the sd-notify crate). Without
//! `NOTIFY_SOCKET` every call is a no-op.
//!
//! The watchdog only pings while the main loop is alive: the loop calls
//! [`Heartbeat::beat`], and the pinging task stops pinging when the last
//! beat is older than its limit, so that a wedged agent is restarted by
//! systemd instead of being kept alive by a healthy side task.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Sends notifications to one socket (the service manager's).
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    socket: Option<PathBuf>,
}

impl Notifier {
    /// The socket named by `$NOTIFY_SOCKET`, if set (a leading `@` names an
    /// abstract socket).
    pub fn from_env() -> Self {
        Self {
            socket: std::env::var_os("NOTIFY_SOCKET").map(PathBuf::from),
        }
    }

    /// A notifier for an explicit socket path (tests, a supervisor).
    pub fn to_socket(path: impl Into<PathBuf>) -> Self {
        Self {
            socket: Some(path.into()),
        }
    }

    /// Whether there is a service manager to notify.
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Send states in one datagram.
    pub fn send(&self, states: &[NotifyState<'_>]) -> io::Result<()> {
        let Some(path) = &self.socket else {
            return Ok(());
        };
        let mut msg = String::new();
        for s in states {
            msg.push_str(&s.to_string());
            msg.push('\n');
        }
        let sock = UnixDatagram::unbound()?;
        let bytes = path.as_os_str().as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.connect_addr(&addr)?;
        } else {
            sock.connect(path)?;
        }
        let n = sock.send(msg.as_bytes())?;
        if n == msg.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "incomplete notify datagram",
            ))
        }
    }

    /// READY=1: the listener is up.
    pub fn ready(&self) -> io::Result<()> {
        self.send(&[NotifyState::Ready])
    }

    /// STATUS=...: one line for `systemctl status`.
    pub fn status(&self, line: &str) -> io::Result<()> {
        // A newline would end the field early.
        let line = line.replace('\n', " ");
        self.send(&[NotifyState::Status(&line)])
    }

    /// STOPPING=1: graceful shutdown began.
    pub fn stopping(&self) -> io::Result<()> {
        self.send(&[NotifyState::Stopping])
    }

    /// WATCHDOG=1: the service is alive.
    pub fn watchdog(&self) -> io::Result<()> {
        self.send(&[NotifyState::Watchdog])
    }
}

/// READY=1 to `$NOTIFY_SOCKET` (no-op without it).
pub fn ready() -> io::Result<()> {
    Notifier::from_env().ready()
}

/// STATUS=line to `$NOTIFY_SOCKET`.
pub fn status(line: &str) -> io::Result<()> {
    Notifier::from_env().status(line)
}

/// STOPPING=1 to `$NOTIFY_SOCKET`.
pub fn stopping() -> io::Result<()> {
    Notifier::from_env().stopping()
}

/// How often to ping: half of `$WATCHDOG_USEC`, when the watchdog is
/// enabled for this process (`$WATCHDOG_PID` unset or ours).
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// [`watchdog_interval`] over explicit values (testable without touching the environment).
pub fn watchdog_interval_from(
    usec: Option<&str>,
    pid: Option<&str>,
    my_pid: u32,
) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(my_pid)
    {
        return None;
    }
    Some(Duration::from_micros(usec / 2))
}

/// Proof of life from the main loop, read by the watchdog task.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self::new()
    }
}

impl Heartbeat {
    /// A heartbeat that has just beaten.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Called by the main loop on every iteration.
    pub fn beat(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn age(&self) -> Duration {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Ping WATCHDOG=1 every `interval` while `heartbeat` is younger than
/// `stale_after`; a stale heartbeat stops the pings (and systemd restarts us).
pub fn spawn_watchdog(
    notifier: Notifier,
    interval: Duration,
    heartbeat: Heartbeat,
    stale_after: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let age = heartbeat.age();
            if age <= stale_after {
                if let Err(e) = notifier.watchdog() {
                    tracing::warn!(error = %e, "watchdog ping failed");
                }
            } else {
                tracing::error!(
                    age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
                    "main loop heartbeat is stale; withholding watchdog ping"
                );
            }
        }
    })
}

/// Forward the engine's activity lines (see `TaskEngine::activity`) as STATUS.
pub fn spawn_status_forwarder(
    notifier: Notifier,
    mut lines: tokio::sync::watch::Receiver<String>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let line = lines.borrow_and_update().clone();
            if let Err(e) = notifier.status(&line) {
                tracing::debug!(error = %e, "STATUS notify failed");
            }
            if lines.changed().await.is_err() {
                break;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_is_half_and_respects_pid() {
        assert_eq!(
            watchdog_interval_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(None, None, 7), None);
        assert_eq!(watchdog_interval_from(Some("x"), None, 7), None);
    }
}
