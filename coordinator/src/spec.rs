//! The wave spec (TOML): what to install, what to expect afterwards, and how
//! carefully to move through the rings.
//!
//! ```toml
//! wave_id = "driver-560-2026-11"
//! profile = "nvidia-driver"            # patch profile name in the agents' config
//! version = "560.35.03"                # what to install
//! expect_driver_version = "560.35.03"  # every host must report this after the patch
//! expect_cuda_version = "12.6"         # optional
//! rollback_version = "550.54.15"       # optional; default: the version each host attested before
//! failure_budget = 0                   # failures tolerated across the whole wave
//! protected_rings = [2, 3, 4]          # rings that wait for approvals
//! approver_threshold = 2               # distinct approver keys per ring approval
//! on_failure = "hold"                  # or "rollback"
//! rollback_drill = false               # prove rollback on one ring-0 host first
//! max_parallel_hosts = 64              # global cap on hosts in flight
//! task_timeout_s = 1800                # one task (a reboot included)
//! task_lifetime_s = 900                # validity of a signed task
//! attestation_max_age_s = 300          # oldest attestation accepted
//! approval_ttl_s = 86400               # validity (and --ttl cap) of approvals `wave approve` signs; 1 s-30 d
//!
//! [ring.2]                             # per ring; each key defaults on its own:
//! batch_size = 1                       # batch_size 1; soak_s 0 for rings 0-1,
//! soak_s = 600                         # 600 for rings 2-4
//!
//! [window]                             # optional maintenance window
//! days = ["mon", "tue", "wed", "thu"]
//! start = "22:00"
//! end = "04:00"                        # may wrap past midnight
//! timezone = "Europe/Berlin"
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use chrono::{Datelike, NaiveTime, TimeZone, Timelike, Weekday};
use ringfence::config::{ConfigError, Source};
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// Per-ring pacing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RingSpec {
    /// Hosts of the ring patched at once (further bounded by pool reserves).
    pub batch_size: usize,
    /// Seconds the ring is watched after its last host before the next ring starts.
    pub soak_s: u64,
}

/// Default pacing of ring `r`.
pub fn default_ring(r: u32) -> RingSpec {
    RingSpec {
        batch_size: 1,
        soak_s: if r >= 2 { 600 } else { 0 },
    }
}

/// What to do with a host that fails validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Leave it drained for a human (default).
    #[default]
    Hold,
    /// Patch it back to its previous version, validate, leave it drained.
    Rollback,
}

/// A maintenance window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Window {
    /// Days on which the window opens (in its time zone).
    pub days: BTreeSet<u32>,
    /// Opening time.
    pub start: NaiveTime,
    /// Closing time (earlier than start: the window wraps past midnight).
    pub end: NaiveTime,
    /// IANA time zone name.
    pub timezone: String,
    #[serde(skip)]
    tz: Option<chrono_tz::Tz>,
}

impl Window {
    fn tz(&self) -> chrono_tz::Tz {
        self.tz.unwrap_or(chrono_tz::UTC)
    }

    /// Whether the window is open at `now_ms`.
    pub fn is_open(&self, now_ms: i64) -> bool {
        let Some(t) = self.tz().timestamp_millis_opt(now_ms).single() else {
            return false;
        };
        let time = t.time();
        let day = t.weekday().num_days_from_monday();
        if self.start <= self.end {
            self.days.contains(&day) && time >= self.start && time < self.end
        } else if time >= self.start {
            self.days.contains(&day)
        } else if time < self.end {
            // After midnight: belongs to the window that opened yesterday.
            self.days.contains(&((day + 6) % 7))
        } else {
            false
        }
    }

    /// The next opening at or after `now_ms` (minute resolution, within 8 days).
    pub fn next_open(&self, now_ms: i64) -> Option<i64> {
        if self.is_open(now_ms) {
            return Some(now_ms);
        }
        let mut t = now_ms - now_ms.rem_euclid(60_000) + 60_000;
        let limit = now_ms + 8 * 86_400_000;
        while t <= limit {
            if self.is_open(t) {
                return Some(t);
            }
            t += 60_000;
        }
        None
    }

    /// A time as text in the window's zone.
    pub fn format(&self, ms: i64) -> String {
        self.tz()
            .timestamp_millis_opt(ms)
            .single()
            .map(|t| {
                format!(
                    "{} {:02}:{:02} {}",
                    t.date_naive(),
                    t.hour(),
                    t.minute(),
                    self.timezone
                )
            })
            .unwrap_or_default()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    days: Spanned<Vec<String>>,
    start: Spanned<String>,
    end: Spanned<String>,
    #[serde(default = "utc")]
    timezone: Spanned<String>,
}

fn utc() -> Spanned<String> {
    Spanned::new(0..0, "UTC".to_string())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    wave_id: Spanned<String>,
    profile: Spanned<String>,
    version: Spanned<String>,
    #[serde(default)]
    expect_driver_version: String,
    #[serde(default)]
    expect_cuda_version: String,
    #[serde(default)]
    rollback_version: String,
    #[serde(default)]
    failure_budget: u32,
    #[serde(default)]
    protected_rings: Option<Spanned<Vec<u32>>>,
    #[serde(default = "two")]
    approver_threshold: Spanned<usize>,
    #[serde(default)]
    on_failure: OnFailure,
    #[serde(default)]
    rollback_drill: bool,
    #[serde(default = "max_parallel")]
    max_parallel_hosts: Spanned<usize>,
    #[serde(default = "task_timeout")]
    task_timeout_s: u64,
    #[serde(default = "task_lifetime")]
    task_lifetime_s: u64,
    #[serde(default = "attestation_age")]
    attestation_max_age_s: u64,
    #[serde(default = "approval_ttl")]
    approval_ttl_s: Spanned<u64>,
    #[serde(default)]
    ring: BTreeMap<String, Spanned<RawRing>>,
    #[serde(default)]
    window: Option<RawWindow>,
}

/// A `[ring.N]` table as written: each key defaults on its own
/// ([`default_ring`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRing {
    batch_size: Option<usize>,
    soak_s: Option<u64>,
}

fn two() -> Spanned<usize> {
    Spanned::new(0..0, 2)
}
fn max_parallel() -> Spanned<usize> {
    Spanned::new(0..0, 64)
}
fn task_timeout() -> u64 {
    1800
}
fn task_lifetime() -> u64 {
    900
}
fn attestation_age() -> u64 {
    300
}
fn approval_ttl() -> Spanned<u64> {
    Spanned::new(0..0, 86_400)
}

/// Longest `approval_ttl_s` accepted: 30 days.
pub const MAX_APPROVAL_TTL_S: u64 = 30 * 86_400;

/// A validated wave spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WaveSpec {
    /// Wave id (names state files and task ids).
    pub wave_id: String,
    /// Patch profile name.
    pub profile: String,
    /// Version to install.
    pub version: String,
    /// Driver version required after the patch ("" = unchecked).
    pub expect_driver_version: String,
    /// CUDA version required after the patch ("" = unchecked).
    pub expect_cuda_version: String,
    /// Version a rollback returns to ("" = what each host attested before).
    pub rollback_version: String,
    /// Failures tolerated across the wave.
    pub failure_budget: u32,
    /// Rings that wait for approvals.
    pub protected_rings: BTreeSet<u32>,
    /// Distinct approver keys per approval.
    pub approver_threshold: usize,
    /// Hold or roll back a failed host.
    pub on_failure: OnFailure,
    /// Prove rollback on ring 0 first.
    pub rollback_drill: bool,
    /// Global cap on hosts in flight.
    pub max_parallel_hosts: usize,
    /// Longest wait for one task, seconds.
    pub task_timeout_s: u64,
    /// Validity of a signed task, seconds.
    pub task_lifetime_s: u64,
    /// Oldest attestation accepted, seconds.
    pub attestation_max_age_s: u64,
    /// Validity of approvals made by `wave approve`, seconds (also the
    /// longest `--ttl` it accepts; 1 s to 30 days).
    pub approval_ttl_s: u64,
    /// Pacing per ring (every ring 0-4 present).
    pub rings: BTreeMap<u32, RingSpec>,
    /// Maintenance window.
    pub window: Option<Window>,
}

fn day(s: &str) -> Option<u32> {
    let d = match s.to_ascii_lowercase().as_str() {
        "mon" | "monday" => Weekday::Mon,
        "tue" | "tuesday" => Weekday::Tue,
        "wed" | "wednesday" => Weekday::Wed,
        "thu" | "thursday" => Weekday::Thu,
        "fri" | "friday" => Weekday::Fri,
        "sat" | "saturday" => Weekday::Sat,
        "sun" | "sunday" => Weekday::Sun,
        _ => return None,
    };
    Some(d.num_days_from_monday())
}

impl WaveSpec {
    /// Load and validate a wave spec.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_source(&Source::read(path)?)
    }

    /// Validate spec text.
    pub fn from_source(src: &Source) -> Result<Self, ConfigError> {
        let raw: RawSpec = src.parse()?;
        let name_ok = |s: &str| ringfence::spiffe::valid_name(s);
        if !name_ok(raw.wave_id.get_ref()) {
            return Err(src.invalid(
                raw.wave_id.span(),
                "wave_id",
                "must be 1-253 of [A-Za-z0-9._-]",
            ));
        }
        if raw.profile.get_ref().is_empty() {
            return Err(src.invalid(raw.profile.span(), "profile", "must not be empty"));
        }
        if raw.version.get_ref().is_empty() {
            return Err(src.invalid(raw.version.span(), "version", "must not be empty"));
        }
        let protected_rings = match &raw.protected_rings {
            Some(p) => {
                if let Some(bad) = p.get_ref().iter().find(|r| **r > 4) {
                    return Err(src.invalid(
                        p.span(),
                        "protected_rings",
                        format!("ring {bad} is outside 0-4"),
                    ));
                }
                p.get_ref().iter().copied().collect()
            }
            None => [2, 3, 4].into_iter().collect(),
        };
        if *raw.approver_threshold.get_ref() == 0 {
            return Err(src.invalid(
                raw.approver_threshold.span(),
                "approver_threshold",
                "must be at least 1",
            ));
        }
        if *raw.max_parallel_hosts.get_ref() == 0 {
            return Err(src.invalid(
                raw.max_parallel_hosts.span(),
                "max_parallel_hosts",
                "must be at least 1",
            ));
        }
        let ttl = *raw.approval_ttl_s.get_ref();
        if ttl == 0 || ttl > MAX_APPROVAL_TTL_S {
            return Err(src.invalid(
                raw.approval_ttl_s.span(),
                "approval_ttl_s",
                format!("{ttl} s is outside 1-{MAX_APPROVAL_TTL_S} s (30 days)"),
            ));
        }
        let mut rings: BTreeMap<u32, RingSpec> = (0..=4).map(|r| (r, default_ring(r))).collect();
        for (k, v) in &raw.ring {
            let r: u32 = match k.parse() {
                Ok(r) if r <= 4 => r,
                _ => {
                    return Err(src.invalid(v.span(), &format!("ring.{k}"), "rings are 0-4"));
                }
            };
            let d = default_ring(r);
            let ring = RingSpec {
                batch_size: v.get_ref().batch_size.unwrap_or(d.batch_size),
                soak_s: v.get_ref().soak_s.unwrap_or(d.soak_s),
            };
            if ring.batch_size == 0 {
                return Err(src.invalid(
                    v.span(),
                    &format!("ring.{k}.batch_size"),
                    "must be at least 1",
                ));
            }
            rings.insert(r, ring);
        }
        let window = match raw.window {
            Some(w) => {
                let mut days = BTreeSet::new();
                for d in w.days.get_ref() {
                    days.insert(day(d).ok_or_else(|| {
                        src.invalid(
                            w.days.span(),
                            "window.days",
                            format!("`{d}` is not a day (mon..sun)"),
                        )
                    })?);
                }
                if days.is_empty() {
                    return Err(src.invalid(w.days.span(), "window.days", "no days given"));
                }
                let time = |s: &Spanned<String>, key: &str| {
                    NaiveTime::parse_from_str(s.get_ref(), "%H:%M").map_err(|_| {
                        src.invalid(s.span(), key, format!("`{}` is not HH:MM", s.get_ref()))
                    })
                };
                let start = time(&w.start, "window.start")?;
                let end = time(&w.end, "window.end")?;
                if start == end {
                    return Err(src.invalid(
                        w.end.span(),
                        "window.end",
                        "equals start: the window would be empty",
                    ));
                }
                let tz: chrono_tz::Tz = w.timezone.get_ref().parse().map_err(|_| {
                    src.invalid(
                        w.timezone.span(),
                        "window.timezone",
                        format!("`{}` is not an IANA time zone", w.timezone.get_ref()),
                    )
                })?;
                Some(Window {
                    days,
                    start,
                    end,
                    timezone: w.timezone.into_inner(),
                    tz: Some(tz),
                })
            }
            None => None,
        };
        Ok(Self {
            wave_id: raw.wave_id.into_inner(),
            profile: raw.profile.into_inner(),
            version: raw.version.into_inner(),
            expect_driver_version: raw.expect_driver_version,
            expect_cuda_version: raw.expect_cuda_version,
            rollback_version: raw.rollback_version,
            failure_budget: raw.failure_budget,
            protected_rings,
            approver_threshold: raw.approver_threshold.into_inner(),
            on_failure: raw.on_failure,
            rollback_drill: raw.rollback_drill,
            max_parallel_hosts: raw.max_parallel_hosts.into_inner(),
            task_timeout_s: raw.task_timeout_s,
            task_lifetime_s: raw.task_lifetime_s,
            attestation_max_age_s: raw.attestation_max_age_s,
            approval_ttl_s: raw.approval_ttl_s.into_inner(),
            rings,
            window,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str) -> Result<WaveSpec, ConfigError> {
        WaveSpec::from_source(&Source::from_text(
            "wave.toml",
            format!("wave_id = \"w1\"\nprofile = \"drv\"\nversion = \"560.1.2\"\n{extra}"),
        ))
    }

    #[test]
    fn defaults_are_explicit() {
        let s = spec("").unwrap();
        assert_eq!(s.protected_rings, [2, 3, 4].into_iter().collect());
        assert_eq!(
            s.rings[&0],
            RingSpec {
                batch_size: 1,
                soak_s: 0
            }
        );
        assert_eq!(
            s.rings[&3],
            RingSpec {
                batch_size: 1,
                soak_s: 600
            }
        );
        assert_eq!(s.failure_budget, 0);
        assert_eq!(s.on_failure, OnFailure::Hold);
    }

    #[test]
    fn each_ring_key_defaults_on_its_own() {
        let s = spec("[ring.3]\nsoak_s = 60\n[ring.1]\nbatch_size = 4\n").unwrap();
        assert_eq!(
            s.rings[&3],
            RingSpec {
                batch_size: 1,
                soak_s: 60
            }
        );
        assert_eq!(
            s.rings[&1],
            RingSpec {
                batch_size: 4,
                soak_s: 0
            }
        );
        let e = spec("[ring.2]\nsoak = 5\n").unwrap_err().to_string();
        assert!(e.contains("soak"), "{e}");
        let e = spec("[ring.2]\nbatch_size = 0\n").unwrap_err().to_string();
        assert!(e.contains("ring.2.batch_size"), "{e}");
    }

    #[test]
    fn mistakes_name_line_and_key() {
        let e = spec("[ring.7]\nbatch_size = 1\nsoak_s = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("wave.toml:4:") && e.contains("key `ring.7`"),
            "{e}"
        );
        let e = spec("protected_rings = [2, 9]\n").unwrap_err().to_string();
        assert!(
            e.starts_with("wave.toml:4:") && e.contains("protected_rings"),
            "{e}"
        );
        let e = spec("approval_ttl_s = 0\n").unwrap_err().to_string();
        assert!(
            e.starts_with("wave.toml:4:") && e.contains("key `approval_ttl_s`"),
            "{e}"
        );
        let e = spec("approval_ttl_s = 9999999\n").unwrap_err().to_string();
        assert!(e.contains("approval_ttl_s") && e.contains("30 days"), "{e}");
        assert_eq!(spec("approval_ttl_s = 600\n").unwrap().approval_ttl_s, 600);
        let e = spec("on_failure = \"pray\"\n").unwrap_err().to_string();
        assert!(e.starts_with("wave.toml:4:"), "{e}");
        let e = spec("[window]\ndays = [\"mon\"]\nstart = \"25:00\"\nend = \"04:00\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("window.start"), "{e}");
        let e = spec("[window]\ndays = [\"mon\"]\nstart = \"22:00\"\nend = \"04:00\"\ntimezone = \"Mars/Olympus\"\n").unwrap_err().to_string();
        assert!(e.contains("window.timezone"), "{e}");
    }

    #[test]
    fn window_wrapping_midnight() {
        let s = spec(
            "[window]\ndays = [\"mon\"]\nstart = \"22:00\"\nend = \"04:00\"\ntimezone = \"UTC\"\n",
        )
        .unwrap();
        let w = s.window.unwrap();
        // 2026-11-30 is a Monday.
        let mon_23 = chrono::Utc
            .with_ymd_and_hms(2026, 11, 30, 23, 0, 0)
            .unwrap()
            .timestamp_millis();
        let tue_03 = chrono::Utc
            .with_ymd_and_hms(2026, 12, 1, 3, 0, 0)
            .unwrap()
            .timestamp_millis();
        let tue_05 = chrono::Utc
            .with_ymd_and_hms(2026, 12, 1, 5, 0, 0)
            .unwrap()
            .timestamp_millis();
        let tue_23 = chrono::Utc
            .with_ymd_and_hms(2026, 12, 1, 23, 0, 0)
            .unwrap()
            .timestamp_millis();
        assert!(w.is_open(mon_23));
        assert!(w.is_open(tue_03));
        assert!(!w.is_open(tue_05));
        assert!(!w.is_open(tue_23));
        let next = w.next_open(tue_05).unwrap();
        let expect = chrono::Utc
            .with_ymd_and_hms(2026, 12, 7, 22, 0, 0)
            .unwrap()
            .timestamp_millis();
        assert_eq!(next, expect);
    }
}
