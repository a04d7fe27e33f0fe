//! Judging one field: what the agent reported (a value, NotSupported, or a
//! failed query) against nvidia-smi's reading, with the readers for
//! nvidia-smi's units and the tolerances of live values.

use std::fmt::Display;

use super::{Outcome, POWER_DRAW_TOLERANCE_MW, POWER_DRAW_TOLERANCE_REL};
use crate::smi::Reading;
use ringfence::pb;

/// What the agent reported for a field.
#[derive(Debug, Clone, Copy)]
pub(super) enum Ours<T> {
    Value(T),
    /// Listed in `unsupported` (NVML answered NotSupported).
    Unsupported,
    /// Absent without being unsupported: the NVML query failed.
    Failed,
}

impl<T> Ours<T> {
    pub(super) fn of(value: Option<T>, gpu: &pb::GpuReport, name: &str) -> Self {
        match value {
            Some(v) => Self::Value(v),
            None if gpu.unsupported.iter().any(|u| u == name) => Self::Unsupported,
            None => Self::Failed,
        }
    }
}

impl<T: Display> Ours<T> {
    pub(super) fn display(&self, unit: &str) -> String {
        match self {
            Self::Value(v) => format!("{v}{unit}"),
            Self::Unsupported => "not supported".to_owned(),
            Self::Failed => "query failed".to_owned(),
        }
    }
}

/// Judges one field: `parse` reads nvidia-smi's text, `same` decides equality
/// (and says how, for a tolerance).
pub(super) fn judge<T: Display>(
    ours: &Ours<T>,
    theirs: &Reading,
    parse: impl Fn(&str) -> Option<T>,
    same: impl Fn(&T, &T) -> Result<String, String>,
) -> Outcome {
    match theirs {
        Reading::Missing(path) => {
            Outcome::NotComparable(format!("nvidia-smi's XML has no <{path}>"))
        }
        Reading::Unavailable(t) => {
            Outcome::NotComparable(format!("nvidia-smi could not read it: {t}"))
        }
        Reading::Unsupported(t) => match ours {
            Ours::Unsupported => Outcome::Match("both not supported".to_owned()),
            Ours::Failed => Outcome::Mismatch(format!(
                "nvidia-smi says {t}; our NVML query failed instead of answering NotSupported"
            )),
            Ours::Value(_) => Outcome::Mismatch(format!("nvidia-smi says {t}")),
        },
        Reading::Value(text) => match parse(text) {
            None => Outcome::NotComparable(format!("cannot read nvidia-smi's `{text}`")),
            Some(t) => match ours {
                Ours::Value(o) => match same(o, &t) {
                    Ok(how) => Outcome::Match(how),
                    Err(how) => Outcome::Mismatch(how),
                },
                Ours::Unsupported => {
                    Outcome::Mismatch("we report NotSupported, nvidia-smi has a value".to_owned())
                }
                Ours::Failed => Outcome::Mismatch("our NVML query failed".to_owned()),
            },
        },
    }
}

pub(super) fn exact<T: PartialEq>(a: &T, b: &T) -> Result<String, String> {
    if a == b {
        Ok(String::new())
    } else {
        Err(String::new())
    }
}

/// "41 C" → 41; "16x" → 16; "5" → 5; "1024 MiB" → 1024.
pub(super) fn leading_u64(text: &str) -> Option<u64> {
    let digits: String = text
        .trim()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// A plain count: the whole text is a number.
pub(super) fn count(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// "71.50 W" → 71500 (mW).
pub(super) fn watts_to_mw(text: &str) -> Option<u64> {
    let number = text.trim().strip_suffix('W')?.trim();
    let w: f64 = number.parse().ok()?;
    if !w.is_finite() || w < 0.0 {
        return None;
    }
    // Rounded to the milliwatt: the value has at most a few decimals.
    Some((w * 1000.0).round() as u64)
}

pub(super) fn yes_no(text: &str) -> Option<bool> {
    match text.trim() {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

pub(super) fn within(
    tolerance: u64,
    unit: &'static str,
) -> impl Fn(&u64, &u64) -> Result<String, String> {
    move |a, b| {
        let d = a.abs_diff(*b);
        if d == 0 {
            Ok(String::new())
        } else if d <= tolerance {
            Ok(format!("within ±{tolerance}{unit}"))
        } else {
            Err(format!("differ by {d}{unit}, more than ±{tolerance}{unit}"))
        }
    }
}

pub(super) fn power_draw_close(ours: &u64, theirs: &u64) -> Result<String, String> {
    let rel = (*theirs as f64 * POWER_DRAW_TOLERANCE_REL).round() as u64;
    within(POWER_DRAW_TOLERANCE_MW.max(rel), " mW")(ours, theirs)
}

/// The power limit is printed in watts with two decimals.
pub(super) fn power_limit_close(ours: &u64, theirs: &u64) -> Result<String, String> {
    within(10, " mW")(ours, theirs)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::compare::TEMPERATURE_TOLERANCE_C;
    use crate::render::outcome_text;

    #[test]
    fn unit_readers() {
        assert_eq!(watts_to_mw("71.50 W"), Some(71_500));
        assert_eq!(watts_to_mw("700.00 W"), Some(700_000));
        assert_eq!(watts_to_mw("71.50"), None);
        assert_eq!(leading_u64("41 C"), Some(41));
        assert_eq!(leading_u64("16x"), Some(16));
        assert_eq!(leading_u64("x"), None);
        assert_eq!(count("3"), Some(3));
        assert_eq!(count("3 pages"), None);
        assert_eq!(yes_no("Yes"), Some(true));
        assert_eq!(yes_no("yes"), None);
    }

    #[test]
    fn judgement_table() {
        let v = |s: &str| Reading::Value(s.to_owned());
        let na = Reading::Unsupported("N/A".to_owned());
        let cases: Vec<(Ours<u64>, Reading, &str)> = vec![
            (Ours::Value(3), v("3"), "match"),
            (Ours::Value(3), v("4"), "MISMATCH"),
            (Ours::Unsupported, na.clone(), "match (both not supported)"),
            (Ours::Value(0), na.clone(), "MISMATCH (nvidia-smi says N/A)"),
            (Ours::Failed, na, "MISMATCH"),
            (Ours::Unsupported, v("1"), "MISMATCH"),
            (
                Ours::Value(1),
                Reading::Unavailable("[Unknown Error]".into()),
                "not comparable",
            ),
            (
                Ours::Value(1),
                Reading::Missing("a/b".into()),
                "not comparable (nvidia-smi's XML has no <a/b>)",
            ),
            (
                Ours::Value(1),
                v("lots"),
                "not comparable (cannot read nvidia-smi's `lots`)",
            ),
        ];
        for (ours, theirs, want) in cases {
            let got = outcome_text(&judge(&ours, &theirs, count, exact));
            assert!(got.starts_with(want), "{ours:?} vs {theirs:?}: {got}");
        }
    }

    #[test]
    fn tolerances() {
        let t = within(TEMPERATURE_TOLERANCE_C, " C");
        assert_eq!(t(&41, &41), Ok(String::new()));
        assert!(t(&41, &44).is_ok());
        assert!(t(&41, &45).is_err());
        // 10 W floor; 10% above 100 W.
        assert!(power_draw_close(&72_000, &81_900).is_ok());
        assert!(power_draw_close(&72_000, &83_000).is_err());
        assert!(power_draw_close(&650_000, &700_000).is_ok());
        assert!(power_draw_close(&600_000, &700_000).is_err());
        assert!(power_limit_close(&700_000, &700_000).is_ok());
        assert!(power_limit_close(&699_000, &700_000).is_err());
    }
}
