//! Cron expressions as the standalone TOML writes them: 5 fields (minute hour
//! day-of-month month day-of-week) or 6 with a leading seconds field, always in UTC.
//!
//! The fields are read here with standard (Vixie) cron rules: numbers, `*`, `a-b`
//! ranges, lists, `/n` steps, `JAN`–`DEC` and `SUN`–`SAT`, and a day-of-week of 0–7
//! where 0 and 7 are both Sunday. They are then translated into the `cron` crate's
//! dialect (seconds first, day-of-week 1–7 = Sunday–Saturday), and the crate finds the
//! fire times (month lengths, leap years). Standard cron matches a day when *either* day
//! field matches if both are restricted (neither starts with `*`); the crate demands
//! both, so such an expression becomes two crate schedules and the earlier fire wins.
//!
//! Pure code: no threads, no clock.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

/// A parsed cron expression. Fire times are whole seconds, in UTC.
#[derive(Clone, Debug)]
pub struct CronSchedule {
    source: String,
    /// One crate schedule, or two when both day fields are restricted (either matches).
    schedules: Vec<::cron::Schedule>,
}

impl CronSchedule {
    /// Parses a 5-field or 6-field expression; the error is a reason fit for a
    /// configuration message (it names the field and what is wrong with it).
    pub fn parse(expr: &str) -> Result<CronSchedule, String> {
        let fields: Vec<&str> = expr.split_whitespace().collect();
        let (seconds, rest) = match fields.len() {
            5 => ("0".to_string(), &fields[..]),
            6 => (parse_field(&SECOND, fields[0])?.crate_list(), &fields[1..]),
            0 => return Err(format!("empty cron expression; {FIELDS_EXPECTED}")),
            n => return Err(format!("{FIELDS_EXPECTED}, found {n}")),
        };
        let minute = parse_field(&MINUTE, rest[0])?;
        let hour = parse_field(&HOUR, rest[1])?;
        let day_of_month = parse_field(&DAY_OF_MONTH, rest[2])?;
        let month = parse_field(&MONTH, rest[3])?;
        let day_of_week = parse_field(&DAY_OF_WEEK, rest[4])?;

        let prefix = format!("{seconds} {} {}", minute.crate_list(), hour.crate_list());
        let month = month.crate_list();
        let dom = day_of_month.crate_list();
        let dow = day_of_week.crate_day_of_week_list();
        let day_rules = if day_of_month.star || day_of_week.star {
            vec![(dom, dow)]
        } else {
            vec![(dom, "*".to_string()), ("*".to_string(), dow)]
        };
        let mut schedules = Vec::new();
        for (dom, dow) in day_rules {
            let translated = format!("{prefix} {dom} {month} {dow}");
            let schedule = ::cron::Schedule::from_str(&translated)
                .map_err(|e| format!("cannot translate to \"{translated}\": {e}"))?;
            schedules.push(schedule);
        }
        let parsed = CronSchedule { source: fields.join(" "), schedules };
        if parsed.next_after(DateTime::<Utc>::UNIX_EPOCH).is_none() {
            return Err("never fires: none of the months given has that day of the month".to_string());
        }
        Ok(parsed)
    }

    /// The first fire time strictly after `t`, or `None` if there is none (the `cron`
    /// crate looks no further than the year 2100).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedules.iter().filter_map(|s| s.after(&t).next()).min()
    }

    /// Up to `n` fire times strictly after `t`, in order.
    pub fn upcoming(&self, t: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let mut at = t;
        while out.len() < n {
            match self.next_after(at) {
                Some(next) => {
                    out.push(next);
                    at = next;
                }
                None => break,
            }
        }
        out
    }

    /// The expression as written (whitespace normalised).
    pub fn source(&self) -> &str {
        &self.source
    }
}

impl FromStr for CronSchedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CronSchedule::parse(s)
    }
}

impl fmt::Display for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

const FIELDS_EXPECTED: &str =
    "expected 5 fields (minute hour day-of-month month day-of-week) or 6 with a leading seconds field";

struct FieldSpec {
    name: &'static str,
    min: u32,
    max: u32,
    /// Three-letter names for `min`, `min + 1`, …
    names: &'static [&'static str],
}

const SECOND: FieldSpec = FieldSpec { name: "seconds", min: 0, max: 59, names: &[] };
const MINUTE: FieldSpec = FieldSpec { name: "minute", min: 0, max: 59, names: &[] };
const HOUR: FieldSpec = FieldSpec { name: "hour", min: 0, max: 23, names: &[] };
const DAY_OF_MONTH: FieldSpec = FieldSpec { name: "day-of-month", min: 1, max: 31, names: &[] };
const MONTH: FieldSpec = FieldSpec {
    name: "month",
    min: 1,
    max: 12,
    names: &["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"],
};
/// 0–7: both 0 and 7 are Sunday.
const DAY_OF_WEEK: FieldSpec = FieldSpec {
    name: "day-of-week",
    min: 0,
    max: 7,
    names: &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
};

/// One field's matching values as a bit set (bit v = value v).
struct Field {
    values: u64,
    /// The field starts with `*`: for the day fields, standard cron then ANDs instead of ORs.
    star: bool,
    min: u32,
    max: u32,
}

impl Field {
    fn list(&self, values: u64, min: u32, max: u32, offset: u32) -> String {
        let all = (min..=max).all(|v| values & (1 << v) != 0);
        if all {
            return "*".to_string();
        }
        let items: Vec<String> =
            (min..=max).filter(|v| values & (1 << v) != 0).map(|v| (v + offset).to_string()).collect();
        items.join(",")
    }

    fn crate_list(&self) -> String {
        self.list(self.values, self.min, self.max, 0)
    }

    /// Standard 0–7 (Sunday = 0 and 7) → the crate's 1–7 (Sunday = 1).
    fn crate_day_of_week_list(&self) -> String {
        let mut values = self.values & 0x7f;
        if self.values & (1 << 7) != 0 {
            values |= 1;
        }
        self.list(values, 0, 6, 1)
    }
}

fn parse_field(spec: &FieldSpec, text: &str) -> Result<Field, String> {
    let error = |why: String| format!("{} field \"{text}\": {why}", spec.name);
    let mut values = 0u64;
    for item in text.split(',') {
        let (base, step) = match item.split_once('/') {
            Some((base, step)) => (base, Some(parse_step(step).map_err(error)?)),
            None => (item, None),
        };
        let (low, high) = if base == "*" {
            (spec.min, spec.max)
        } else if let Some((a, b)) = base.split_once('-') {
            let (a, b) = (parse_value(spec, a).map_err(error)?, parse_value(spec, b).map_err(error)?);
            if a > b {
                return Err(error(format!("range {base} runs backwards")));
            }
            (a, b)
        } else {
            let a = parse_value(spec, base).map_err(error)?;
            // `a/n` means `a-max/n`, as in cronie.
            (a, if step.is_some() { spec.max } else { a })
        };
        for v in (low..=high).step_by(step.unwrap_or(1) as usize) {
            values |= 1 << v;
        }
    }
    Ok(Field { values, star: text.starts_with('*'), min: spec.min, max: spec.max })
}

fn parse_step(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(0) => Err("a step of 0 is not allowed".to_string()),
        Ok(n) if text.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(format!("step \"{text}\" is not a positive number")),
    }
}

fn parse_value(spec: &FieldSpec, text: &str) -> Result<u32, String> {
    let range = || format!("{}-{}", spec.min, spec.max);
    if text.is_empty() {
        return Err("empty value".to_string());
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return match text.parse::<u32>() {
            Ok(v) if (spec.min..=spec.max).contains(&v) => Ok(v),
            _ => Err(format!("{text} is out of range {}", range())),
        };
    }
    if spec.names.is_empty() {
        return Err(format!("\"{text}\" is not a number in {}", range()));
    }
    match spec.names.iter().position(|n| n.eq_ignore_ascii_case(text)) {
        Some(i) => Ok(spec.min + i as u32),
        None => Err(format!("unknown name \"{text}\" (expected {} or {})", range(), spec.names.join(", "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn day_of_week_is_translated_to_the_crate_numbering() {
        let f = parse_field(&DAY_OF_WEEK, "0").unwrap();
        assert_eq!(f.crate_day_of_week_list(), "1");
        let f = parse_field(&DAY_OF_WEEK, "7").unwrap();
        assert_eq!(f.crate_day_of_week_list(), "1");
        let f = parse_field(&DAY_OF_WEEK, "5-7").unwrap();
        assert_eq!(f.crate_day_of_week_list(), "1,6,7");
        let f = parse_field(&DAY_OF_WEEK, "mon-fri").unwrap();
        assert_eq!(f.crate_day_of_week_list(), "2,3,4,5,6");
        let f = parse_field(&DAY_OF_WEEK, "*").unwrap();
        assert_eq!(f.crate_day_of_week_list(), "*");
        let f = parse_field(&DAY_OF_WEEK, "0-6").unwrap();
        assert_eq!(f.crate_day_of_week_list(), "*");
    }

    #[test]
    fn steps_ranges_and_lists_follow_standard_cron() {
        assert_eq!(parse_field(&MINUTE, "*/15").unwrap().crate_list(), "0,15,30,45");
        assert_eq!(parse_field(&MINUTE, "10-20/5").unwrap().crate_list(), "10,15,20");
        assert_eq!(parse_field(&MINUTE, "50/5").unwrap().crate_list(), "50,55");
        assert_eq!(parse_field(&HOUR, "1,3,22").unwrap().crate_list(), "1,3,22");
        assert_eq!(parse_field(&MONTH, "JAN,jul-aug").unwrap().crate_list(), "1,7,8");
        assert_eq!(parse_field(&DAY_OF_MONTH, "*/10").unwrap().crate_list(), "1,11,21,31");
    }

    #[test]
    fn bad_fields_name_the_field_and_the_fault() {
        let e = |spec, s| parse_field(spec, s).err().unwrap();
        assert_eq!(e(&MINUTE, "61"), "minute field \"61\": 61 is out of range 0-59");
        assert_eq!(e(&HOUR, "5-1"), "hour field \"5-1\": range 5-1 runs backwards");
        assert_eq!(e(&MINUTE, "*/0"), "minute field \"*/0\": a step of 0 is not allowed");
        assert_eq!(e(&MINUTE, "1,,2"), "minute field \"1,,2\": empty value");
        assert_eq!(e(&HOUR, "MON"), "hour field \"MON\": \"MON\" is not a number in 0-23");
        assert!(e(&DAY_OF_WEEK, "MONX").contains("unknown name \"MONX\""));
        assert!(e(&DAY_OF_MONTH, "0").contains("out of range 1-31"));
        assert!(e(&MINUTE, "?").contains("not a number"));
    }

    #[test]
    fn both_day_fields_restricted_means_either_matches() {
        // 13th of the month OR Friday: from Sat 2028-10-07, Fri 10-13 is both, then Fri 10-20.
        let s = CronSchedule::parse("0 0 13 * 5").unwrap();
        let got = s.upcoming(t("2028-10-07T00:00:00Z"), 3);
        assert_eq!(
            got,
            vec![t("2028-10-13T00:00:00Z"), t("2028-10-20T00:00:00Z"), t("2028-10-27T00:00:00Z")]
        );
        // A day-of-month starting with `*` keeps standard cron's AND.
        let s = CronSchedule::parse("0 0 */2 * 5").unwrap();
        assert_eq!(s.next_after(t("2028-10-07T00:00:00Z")), Some(t("2028-10-13T00:00:00Z")));
    }

    #[test]
    fn an_expression_that_never_fires_is_refused() {
        let e = CronSchedule::parse("0 0 30 2 *").unwrap_err();
        assert!(e.starts_with("never fires"), "{e}");
        assert!(CronSchedule::parse("0 0 29 2 *").is_ok());
    }
}
