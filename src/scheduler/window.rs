//! The maintenance window: a daily span of UTC wall-clock time in which scheduled runs
//! do not start (manual runs do). A window whose start is later than its end spans
//! midnight (22:00–02:00); start = end means no window at all. Pure code.

use std::fmt;

use chrono::{DateTime, NaiveTime, TimeDelta, Utc};

/// `start` is inside the window, `end` is not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaintenanceWindow {
    pub start: NaiveTime,
    pub end: NaiveTime,
}

impl MaintenanceWindow {
    /// Both times as `HH:MM` (UTC); the error says which one is wrong.
    pub fn parse(start: &str, end: &str) -> Result<MaintenanceWindow, String> {
        Ok(MaintenanceWindow { start: parse_hh_mm("start", start)?, end: parse_hh_mm("end", end)? })
    }

    /// True when start = end: such a window never contains anything.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        let time = t.time();
        if self.start < self.end {
            self.start <= time && time < self.end
        } else if self.start > self.end {
            time >= self.start || time < self.end
        } else {
            false
        }
    }

    /// The first moment at or after `t` that is outside the window: `t` itself, or the
    /// window's next end.
    pub fn end_after(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        if !self.contains(t) {
            return t;
        }
        let end_today = t.date_naive().and_time(self.end).and_utc();
        if end_today > t { end_today } else { end_today + TimeDelta::days(1) }
    }
}

impl fmt::Display for MaintenanceWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}–{} UTC", self.start.format("%H:%M"), self.end.format("%H:%M"))
    }
}

fn parse_hh_mm(which: &str, text: &str) -> Result<NaiveTime, String> {
    let bad = || format!("maintenance window {which} \"{text}\": expected HH:MM between 00:00 and 23:59");
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    let number = |s: &str, max: u32| {
        let ok = (1..=2).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
        s.parse::<u32>().ok().filter(|v| ok && *v <= max)
    };
    match (number(h, 23), number(m, 59)) {
        (Some(h), Some(m)) => NaiveTime::from_hms_opt(h, m, 0).ok_or_else(bad),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_window_whose_start_is_later_than_its_end_spans_midnight() {
        let w = MaintenanceWindow::parse("22:00", "02:00").unwrap();
        for inside in
            ["2028-01-01T22:00:00Z", "2028-01-01T23:59:59Z", "2028-01-02T00:00:00Z", "2028-01-02T01:59:59Z"]
        {
            assert!(w.contains(t(inside)), "{inside}");
        }
        for outside in ["2028-01-01T21:59:59Z", "2028-01-02T02:00:00Z", "2028-01-02T12:00:00Z"] {
            assert!(!w.contains(t(outside)), "{outside}");
        }
        assert_eq!(w.end_after(t("2028-01-01T23:00:00Z")), t("2028-01-02T02:00:00Z"));
        assert_eq!(w.end_after(t("2028-01-02T01:00:00Z")), t("2028-01-02T02:00:00Z"));
        assert_eq!(w.end_after(t("2028-01-02T03:00:00Z")), t("2028-01-02T03:00:00Z"));
    }

    #[test]
    fn a_window_within_one_day() {
        let w = MaintenanceWindow::parse("9:30", "17:00").unwrap();
        assert!(w.contains(t("2028-01-01T09:30:00Z")));
        assert!(w.contains(t("2028-01-01T16:59:59Z")));
        assert!(!w.contains(t("2028-01-01T17:00:00Z")));
        assert!(!w.contains(t("2028-01-01T09:29:59Z")));
        assert_eq!(w.end_after(t("2028-01-01T12:00:00Z")), t("2028-01-01T17:00:00Z"));
    }

    #[test]
    fn start_equal_to_end_means_no_window() {
        let w = MaintenanceWindow::parse("03:00", "03:00").unwrap();
        assert!(w.is_empty());
        assert!(!w.contains(t("2028-01-01T03:00:00Z")));
        assert!(!w.contains(t("2028-01-01T15:00:00Z")));
    }

    #[test]
    fn malformed_times_are_refused_with_the_reason() {
        for bad in ["24:00", "12:60", "1200", "12:5x", "", "-1:00", "12:00:00", "123:00"] {
            let e = MaintenanceWindow::parse(bad, "02:00").unwrap_err();
            assert!(e.contains("maintenance window start") && e.contains("HH:MM"), "{bad}: {e}");
        }
        assert!(MaintenanceWindow::parse("01:00", "x").unwrap_err().contains("maintenance window end \"x\""));
    }
}
