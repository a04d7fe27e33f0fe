//! Time as a seam: production code reads the system clock, tests and the
//! maintenance-window logic inject their own. The only read of the wall clock
//! in the workspace is [`system_time`] (clippy's `disallowed_methods`, listed
//! in clippy.toml, refuses `SystemTime::now` and `chrono`'s `now` elsewhere).
//! Code that needs "now" in milliseconds takes a [`Clock`] (the binaries
//! construct one [`SystemClock`] and hand it down); the free [`now_ms`] is
//! refused by the same lint outside this module.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// A source of "now", in milliseconds since the Unix epoch (UTC).
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        system_time()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to. Cloning shares the same instant.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock standing at `ms`.
    pub fn at(ms: i64) -> Self {
        Self(Arc::new(AtomicI64::new(ms)))
    }
    /// Set the clock to `ms`.
    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }
    /// Move the clock forward by `ms`.
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The system clock in milliseconds since the Unix epoch (0 if the clock is
/// before 1970): [`SystemClock`]'s reading. Refused by clippy's
/// `disallowed_methods` (clippy.toml): take a [`Clock`] instead, so that
/// tests can inject time.
pub fn now_ms() -> i64 {
    SystemClock.now_ms()
}

/// The system clock as a [`SystemTime`](std::time::SystemTime), for what is
/// dated in that type (certificate validity, CRL updates).
pub fn system_time() -> std::time::SystemTime {
    // The seam itself: the one place that reads the wall clock.
    #[allow(clippy::disallowed_methods)]
    std::time::SystemTime::now()
}
