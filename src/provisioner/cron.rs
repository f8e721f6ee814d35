//! 5-field cron expressions in UTC (`minute hour day-of-month month day-of-week`), for
//! VolumeBackupSchedules. Each field is `*`, a number, a range `a-b`, a step
//! (`*/n`, `a-b/n`, `a/n` meaning `a` to the field's end), or a comma list of those.
//! Day of week is 0–7 (0 and 7 are Sunday). As in classic cron, when both day fields
//! are restricted a day matching either counts; otherwise both must match. Names
//! (`MON`, `JAN`) and `@daily` shortcuts are not understood: refused with a message,
//! as is an expression never due in some year (`0 0 30 2 *`, and 29 February).
//!
//! Times are unix minutes (UTC); [`Cron::latest_due`] is what the schedule reconciler
//! asks: the latest due time in a window, so an outage runs at most one missed backup.

/// A parsed expression: for each field, which values match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    /// Whether day-of-month / day-of-week were `*` (see the module doc).
    any_day: bool,
    any_weekday: bool,
}

/// (name, lowest, highest) of each field.
const FIELDS: [(&str, u32, u32); 5] = [
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
];

/// How far back [`Cron::latest_due`] looks at most (a year and a day: every valid
/// expression is due within it, so an older window is never needed).
const MAX_LOOKBACK_MINUTES: i64 = 366 * 24 * 60;

fn num(s: &str, name: &str, lo: u32, hi: u32) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("{name}: `{s}` is not a number"))?;
    if n < lo || n > hi {
        return Err(format!("{name}: {n} is outside {lo}-{hi}"));
    }
    Ok(n)
}

/// The bit set of one field.
fn field(s: &str, name: &str, lo: u32, hi: u32) -> Result<u64, String> {
    let mut bits = 0u64;
    for part in s.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, st)) => {
                let st = num(st, name, 1, hi.max(1))?;
                (r, st)
            }
            None => (part, 1),
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (num(a, name, lo, hi)?, num(b, name, lo, hi)?);
            if a > b {
                return Err(format!("{name}: range {a}-{b} runs backwards"));
            }
            (a, b)
        } else {
            let a = num(range, name, lo, hi)?;
            // `a/n` runs from a to the field's end; a bare number is itself.
            (a, if part.contains('/') { hi } else { a })
        };
        let mut v = a;
        while v <= b {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok(bits)
}

/// Whether some month in `months` has some day in `days` every year (February as 28
/// days: the 29th comes only in leap years, past [`MAX_LOOKBACK_MINUTES`]).
fn some_day_exists(days: u64, months: u64) -> bool {
    (1..=12u32).filter(|m| months & (1 << m) != 0).any(|m| {
        let len = match m {
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        days & ((1u64 << (len + 1)) - 2) != 0
    })
}

impl Cron {
    /// Parses an expression; the error says which field is wrong and why.
    pub fn parse(expr: &str) -> Result<Cron, String> {
        let parts: Vec<&str> = expr.split_whitespace().collect();
        if parts.len() != 5 {
            return Err(format!(
                "`{expr}` has {} fields; a schedule has 5: minute hour day-of-month month day-of-week (UTC)",
                parts.len()
            ));
        }
        let mut sets = [0u64; 5];
        for (i, (name, lo, hi)) in FIELDS.iter().enumerate() {
            sets[i] = field(parts[i], name, *lo, *hi)?;
        }
        // Sunday is 0 and 7.
        if sets[4] & (1 << 7) != 0 {
            sets[4] |= 1;
        }
        let any_day = parts[2] == "*";
        let any_weekday = parts[4] == "*";
        // Only a restricted day of month with an unrestricted weekday can be
        // impossible (every weekday comes each month); checked here so the
        // reconciler never scans a year of minutes on every look.
        if !any_day && any_weekday && !some_day_exists(sets[2], sets[3]) {
            return Err(format!(
                "`{expr}` is never due: no chosen month has the chosen day of month (29 February counts as never: a schedule must be due every year)"
            ));
        }
        Ok(Cron {
            minutes: sets[0],
            hours: sets[1],
            days: sets[2],
            months: sets[3],
            weekdays: sets[4],
            any_day,
            any_weekday,
        })
    }

    /// Whether unix minute `t` (UTC) is due.
    pub fn matches(&self, t: i64) -> bool {
        let c = Civil::of(t);
        let bit = |set: u64, v: u32| set & (1 << v) != 0;
        let day = bit(self.days, c.day);
        let weekday = bit(self.weekdays, c.weekday);
        let day_ok = match (self.any_day, self.any_weekday) {
            (false, false) => day || weekday,
            _ => day && weekday,
        };
        bit(self.minutes, c.minute)
            && bit(self.hours, c.hour)
            && bit(self.months, c.month)
            && day_ok
    }

    /// The latest due minute `m` with `after < m <= now` (at most a year back), if any.
    pub fn latest_due(&self, after: i64, now: i64) -> Option<i64> {
        let floor = after.max(now - MAX_LOOKBACK_MINUTES);
        (floor + 1..=now).rev().find(|&m| self.matches(m))
    }

    /// The first due minute after `now` (within a year and a day), if any.
    pub fn next_due(&self, now: i64) -> Option<i64> {
        (now + 1..=now + MAX_LOOKBACK_MINUTES).find(|&m| self.matches(m))
    }
}

/// A unix minute as UTC calendar fields.
#[derive(Debug, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    /// 0 = Sunday.
    pub weekday: u32,
}

impl Civil {
    /// Days-to-date after Howard Hinnant's `civil_from_days` (proleptic Gregorian).
    pub fn of(t: i64) -> Civil {
        let days = t.div_euclid(1440);
        let mins = t.rem_euclid(1440);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Civil {
            year,
            month,
            day,
            hour: (mins / 60) as u32,
            minute: (mins % 60) as u32,
            // 1970-01-01 was a Thursday (4).
            weekday: (days + 4).rem_euclid(7) as u32,
        }
    }

    /// `YYYYMMDDHHMM`: the suffix of a scheduled VolumeBackup's name.
    pub fn stamp(&self) -> String {
        format!(
            "{:04}{:02}{:02}{:02}{:02}",
            self.year, self.month, self.day, self.hour, self.minute
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix minute of a UTC date and time.
    fn at(y: i64, mo: u32, d: u32, h: u32, mi: u32) -> i64 {
        // Inverse of `Civil::of` by search from a day near it (tests only).
        let mut t = (y - 1970) * 365 * 1440;
        loop {
            let c = Civil::of(t);
            if (c.year, c.month, c.day) == (y, mo, d) {
                return t + i64::from(h) * 60 + i64::from(mi);
            }
            t += if (c.year, c.month, c.day) < (y, mo, d) {
                1440
            } else {
                -1440
            };
        }
    }

    #[test]
    fn calendar_fields_are_utc() {
        let c = Civil::of(at(2026, 12, 7, 3, 15));
        assert_eq!(
            (c.year, c.month, c.day, c.hour, c.minute),
            (2026, 12, 7, 3, 15)
        );
        assert_eq!(c.weekday, 1, "2026-12-07 is a Monday");
        assert_eq!(Civil::of(0).weekday, 4, "1970-01-01 was a Thursday");
        assert_eq!(Civil::of(at(2024, 2, 29, 0, 0)).day, 29, "leap day");
        assert_eq!(Civil::of(at(2026, 12, 7, 3, 15)).stamp(), "202612070315");
    }

    #[test]
    fn star_matches_every_minute() {
        let c = Cron::parse("* * * * *").expect("valid");
        let t = at(2026, 12, 7, 3, 15);
        assert!(c.matches(t) && c.matches(t + 1));
        assert_eq!(c.latest_due(t - 10, t), Some(t));
        assert_eq!(c.next_due(t), Some(t + 1));
    }

    #[test]
    fn nightly_runs_once_a_day_at_its_time() {
        let c = Cron::parse("0 3 * * *").expect("valid");
        let due = at(2026, 12, 7, 3, 0);
        assert!(c.matches(due));
        assert!(!c.matches(due + 1));
        assert_eq!(c.next_due(due), Some(due + 1440));
    }

    #[test]
    fn steps_lists_and_ranges() {
        let c = Cron::parse("*/15 9-17/4 1,15 * *").expect("valid");
        let day = at(2026, 12, 15, 0, 0);
        for (h, m, want) in [
            (9, 0, true),
            (9, 45, true),
            (13, 30, true),
            (17, 15, true),
            (10, 0, false),
            (9, 5, false),
            (21, 0, false),
        ] {
            assert_eq!(c.matches(day + h * 60 + m), want, "{h}:{m}");
        }
        assert!(
            !c.matches(at(2026, 12, 2, 9, 0)),
            "the 2nd is not in the list"
        );
        let c = Cron::parse("5/20 * * * *").expect("valid");
        let h = at(2026, 1, 1, 0, 0);
        let due: Vec<i64> = (0..60).filter(|m| c.matches(h + m)).collect();
        assert_eq!(due, [5, 25, 45]);
    }

    #[test]
    fn day_of_week_sunday_is_0_and_7() {
        let sunday = at(2026, 12, 6, 0, 0);
        assert!(Cron::parse("0 0 * * 0").expect("valid").matches(sunday));
        assert!(Cron::parse("0 0 * * 7").expect("valid").matches(sunday));
        assert!(
            Cron::parse("0 0 * * 1-5")
                .expect("valid")
                .matches(sunday + 1440)
        );
        assert!(!Cron::parse("0 0 * * 1-5").expect("valid").matches(sunday));
    }

    #[test]
    fn both_day_fields_restricted_match_either() {
        // The 1st of the month, or any Monday.
        let c = Cron::parse("0 0 1 * 1").expect("valid");
        assert!(c.matches(at(2026, 12, 1, 0, 0)), "the 1st (a Tuesday)");
        assert!(c.matches(at(2026, 12, 7, 0, 0)), "a Monday");
        assert!(!c.matches(at(2026, 12, 8, 0, 0)));
    }

    #[test]
    fn after_an_outage_only_the_latest_missed_time_is_due() {
        let c = Cron::parse("0 * * * *").expect("valid");
        let last = at(2026, 12, 7, 0, 0);
        let now = at(2026, 12, 7, 5, 30);
        assert_eq!(c.latest_due(last, now), Some(at(2026, 12, 7, 5, 0)));
        assert_eq!(c.latest_due(now, now + 10), None, "nothing new is due");
        // A due time equal to the last one is not due again.
        assert_eq!(c.latest_due(at(2026, 12, 7, 5, 0), now), None);
    }

    #[test]
    fn bad_expressions_say_which_field() {
        for (expr, words) in [
            ("* * * *", "has 4 fields"),
            ("60 * * * *", "minute: 60 is outside 0-59"),
            ("* 24 * * *", "hour: 24"),
            ("* * 0 * *", "day of month: 0"),
            ("* * * 13 *", "month: 13"),
            ("* * * * 8", "day of week: 8"),
            ("*/0 * * * *", "minute: 0 is outside"),
            ("5-1 * * * *", "runs backwards"),
            ("@daily", "has 1 fields"),
            ("0 3 * * MON", "day of week: `MON` is not a number"),
        ] {
            let e = Cron::parse(expr).expect_err(expr);
            assert!(e.contains(words), "{expr}: {e}");
        }
    }

    #[test]
    fn an_impossible_date_is_refused_rather_than_scanned_for() {
        for expr in [
            "0 0 30 2 *",
            "0 0 31 4,6,9,11 *",
            "0 0 29 2 *",
            "0 0 30-31 2 *",
        ] {
            let e = Cron::parse(expr).expect_err(expr);
            assert!(e.contains("never due"), "{expr}: {e}");
        }
        // A possible day in one chosen month, or a weekday as well, is fine.
        for expr in ["0 0 31 2,3 *", "0 0 30 2 1", "0 0 28 2 *", "0 0 * 2 *"] {
            let c = Cron::parse(expr).expect(expr);
            assert!(c.next_due(at(2026, 1, 1, 0, 0)).is_some(), "{expr}");
        }
    }
}
