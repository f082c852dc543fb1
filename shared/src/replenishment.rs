//! Replenishment schedules: when they run (an interval or a cron
//! expression), what they buy, and why a run may not become a paid order.
//! The API checks and shows schedules with this; the replenisher runs them.

use std::str::FromStr;

use chrono::{DateTime, Duration, LocalResult, TimeZone, Utc};
pub use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Runs closer together than this are refused: a schedule is for restocking
/// a household, not for flooding sellers with orders.
pub const MIN_GAP: Duration = Duration::hours(1);

/// When a schedule runs: a rule read in a time zone.
#[derive(Debug, Clone)]
pub struct Cadence {
    rule: Rule,
    /// The customer's zone: "Mondays at 09:00" means 09:00 there, summer
    /// and winter alike (UTC unless given).
    zone: Tz,
}

#[derive(Debug, Clone)]
enum Rule {
    EveryDays(i32),
    Cron(Box<cron::Schedule>),
}

/// An IANA time zone name (`Europe/Berlin`), or why it is not one.
pub fn time_zone(name: &str) -> Result<Tz, String> {
    Tz::from_str(name)
        .map_err(|_| "must be an IANA time zone name, e.g. Europe/Berlin or UTC".into())
}

impl Cadence {
    /// A schedule's cadence as stored: exactly one of the two is set, read
    /// in the stored zone.
    pub fn from_columns(
        interval_days: Option<i32>,
        cron: Option<&str>,
        zone: &str,
    ) -> Result<Self, String> {
        let cadence = match (interval_days, cron) {
            (Some(days), None) => Self::every_days(days),
            // Checked for frequency when it was set; read back as it is.
            (None, Some(expr)) => Self::parse_cron(expr),
            _ => Err("give either interval_days or cron".into()),
        }?;
        Ok(cadence.in_zone(time_zone(zone)?))
    }

    /// The same rule read in `zone`.
    pub fn in_zone(self, zone: Tz) -> Self {
        Self { zone, ..self }
    }

    pub fn every_days(days: i32) -> Result<Self, String> {
        if (1..=365).contains(&days) {
            Ok(Self::utc(Rule::EveryDays(days)))
        } else {
            Err("must be between 1 and 365".into())
        }
    }

    fn utc(rule: Rule) -> Self {
        Self {
            rule,
            zone: Tz::UTC,
        }
    }

    /// A five-field cron expression (minute, hour, day of month, month, day
    /// of week), in the schedule's zone. Days of the week must be named
    /// (`MON-FRI`): cron dialects number them differently (the `cron` crate
    /// counts Sunday as 1, Unix cron as 0), and a number would silently pick
    /// the wrong day. Nor may it restrict both the day of the month and the
    /// day of the week: Unix cron runs when either matches, the `cron` crate
    /// only when both do, so `0 9 1 * MON` would mean something else than
    /// written.
    pub fn cron(expr: &str) -> Result<Self, String> {
        let cadence = Self::parse_cron(expr)?;
        let fields: Vec<&str> = expr.split_whitespace().collect();
        let any = |f: &str| f == "*" || f == "?";
        if !any(fields[2]) && !any(fields[4]) {
            return Err(
                "restrict the day of the month or the day of the week, not both (use * for one)"
                    .into(),
            );
        }
        // Too frequent anywhere in the next runs (e.g. `*/5 * * * *`)? The
        // gaps are between due times only: how soon the first one is does
        // not matter.
        let first = cadence.after(Utc::now()).ok_or("never runs")?;
        let times = cadence.upcoming(first, 24);
        if times.len() < 2 {
            return Err("never runs".into());
        }
        if times.windows(2).any(|w| w[1] - w[0] < MIN_GAP) {
            return Err("runs more than once an hour".into());
        }
        Ok(cadence)
    }

    fn parse_cron(expr: &str) -> Result<Self, String> {
        let fields: Vec<&str> = expr.split_whitespace().collect();
        if fields.len() != 5 {
            return Err("must have five fields: minute hour day-of-month month day-of-week".into());
        }
        if fields[4].bytes().any(|b| b.is_ascii_digit()) {
            return Err("name the days of the week (MON-FRI, SUN), not numbers".into());
        }
        let schedule = cron::Schedule::from_str(&format!("0 {}", fields.join(" ")))
            .map_err(|e| format!("is not a valid cron expression: {e}"))?;
        Ok(Self::utc(Rule::Cron(Box::new(schedule))))
    }

    /// The first due time after `t`. `None` only for a cron expression that
    /// never matches again (a 31st of February).
    ///
    /// Read on the zone's clock: a wall time the clocks pass twice (autumn)
    /// runs once, at the first; one they skip (spring) is, for a cron
    /// expression, skipped that day, and for an interval taken as the first
    /// time after the gap.
    pub fn after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.rule {
            Rule::EveryDays(days) => Some(self.days_on(t, i64::from(*days))),
            // The crate searches by wall time and answers an ambiguous one
            // with its earlier instant first, which may lie before `t` (asked
            // during the repeated hour's second pass): the first instant
            // after `t` is taken. Asked again from a due time, the search
            // starts past its wall time, so the repeated hour is one run.
            Rule::Cron(schedule) => schedule
                .after(&t.with_timezone(&self.zone))
                .map(|d| d.with_timezone(&Utc))
                .find(|d| *d > t),
        }
    }

    /// `t` moved `days` calendar days on, at the same wall time in the zone.
    fn days_on(&self, t: DateTime<Utc>, days: i64) -> DateTime<Utc> {
        let wall = t.with_timezone(&self.zone).naive_local() + Duration::days(days);
        let at = |wall| match self.zone.from_local_datetime(&wall) {
            LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => Some(t.with_timezone(&Utc)),
            LocalResult::None => None,
        };
        // Skipped by the clocks (at most an hour in any zone in use): the
        // first wall time after the gap.
        at(wall)
            .or_else(|| at(wall + Duration::hours(1)))
            .unwrap_or_else(|| t + Duration::days(days))
    }

    /// The first run of a new (or re-timed) schedule: `starts_at` if given
    /// (the first cron time from then), else one interval from now, or the
    /// next cron time.
    pub fn first(
        &self,
        now: DateTime<Utc>,
        starts_at: Option<DateTime<Utc>>,
    ) -> Option<DateTime<Utc>> {
        match (&self.rule, starts_at) {
            (Rule::EveryDays(_), Some(at)) => Some(at),
            (Rule::Cron(_), Some(at)) => self.after(at - Duration::seconds(1)),
            (_, None) => self.after(now),
        }
    }

    /// `n` due times from `next` on (`next` included).
    pub fn upcoming(&self, next: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        std::iter::successors(Some(next), |t| self.after(*t))
            .take(n)
            .collect()
    }

    /// The first due time after `due` that is still ahead of `now`: runs
    /// missed while no replenisher ran are not made up (one order, not a
    /// pile of them).
    pub fn next_after(&self, due: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut next = self.after(due)?;
        if next <= now {
            next = match &self.rule {
                Rule::EveryDays(days) => {
                    // Whole intervals at once (the zone's clock changes
                    // move it by an hour at most), then one at a time.
                    let days = i64::from(*days);
                    let behind = (now - next).num_days() / days;
                    let mut t = self.days_on(next, behind * days);
                    while t <= now {
                        t = self.days_on(t, days);
                    }
                    t
                }
                Rule::Cron(_) => self.after(now)?,
            };
        }
        Some(next)
    }
}

/// One item of a schedule, with the price it had when it was chosen.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Item {
    pub variant_id: Uuid,
    pub quantity: i32,
    /// The unit price when the item was scheduled; a run whose price rose
    /// more than the schedule's limit above it is not placed.
    pub reference_price_minor: i64,
}

impl Item {
    /// Whether `price` is more than `limit_percent` above the reference.
    /// Integer arithmetic: `price / reference > 1 + limit / 100`.
    pub fn beyond_limit(&self, price: i64, limit_percent: i32) -> bool {
        i128::from(price) * 100
            > i128::from(self.reference_price_minor) * i128::from(100 + limit_percent)
    }
}

/// Why a run did not end in a paid order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    OutOfStock,
    /// A product was taken off sale (or its shop closed).
    Unavailable,
    PriceChanged,
    PaymentDeclined,
    /// The order expired before its payment was confirmed; a late payment
    /// may still make it paid, so it is never retried with another order.
    Unpaid,
    NoAddress,
    NoCard,
    SkippedByCustomer,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OutOfStock => "out_of_stock",
            Self::Unavailable => "unavailable",
            Self::PriceChanged => "price_changed",
            Self::PaymentDeclined => "payment_declined",
            Self::Unpaid => "unpaid",
            Self::NoAddress => "no_address",
            Self::NoCard => "no_card",
            Self::SkippedByCustomer => "skipped_by_customer",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::OutOfStock,
            Self::Unavailable,
            Self::PriceChanged,
            Self::PaymentDeclined,
            Self::Unpaid,
            Self::NoAddress,
            Self::NoCard,
            Self::SkippedByCustomer,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }

    /// Whether trying again later could help: a missing address or card
    /// needs the customer first, and an unpaid order may yet be paid.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Self::OutOfStock | Self::Unavailable | Self::PriceChanged | Self::PaymentDeclined
        )
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Datelike, TimeZone, Timelike, Weekday};

    use super::*;

    fn at(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
    }

    #[test]
    fn a_weekly_cron_runs_on_the_named_day_in_utc() {
        let c = Cadence::cron("0 9 * * MON").unwrap();
        let next = c.after(at(2026, 11, 26, 12)).unwrap(); // a Thursday
        assert_eq!(next.weekday(), Weekday::Mon);
        assert_eq!((next.hour(), next.minute()), (9, 0));
        let runs = c.upcoming(next, 3);
        assert_eq!(runs[1] - runs[0], Duration::weeks(1));
    }

    #[test]
    fn bad_cron_expressions_are_refused_with_a_reason() {
        assert!(
            Cadence::cron("0 9 * *")
                .unwrap_err()
                .contains("five fields")
        );
        assert!(
            Cadence::cron("0 9 * * 1")
                .unwrap_err()
                .contains("name the days")
        );
        assert!(
            Cadence::cron("*/5 * * * *")
                .unwrap_err()
                .contains("once an hour")
        );
        assert!(
            Cadence::cron("0 25 * * *")
                .unwrap_err()
                .contains("not a valid")
        );
        assert!(
            Cadence::cron("0 9 1 * MON")
                .unwrap_err()
                .contains("not both")
        );
        assert!(Cadence::cron("0 9 1 * *").is_ok());
        assert!(Cadence::every_days(0).is_err());
    }

    #[test]
    fn a_cron_due_within_the_hour_is_accepted_and_read_back() {
        // Whatever the time now, one of these is due in under an hour.
        let soon = Utc::now() + Duration::minutes(30);
        let expr = format!("{} {} * * *", soon.minute(), soon.hour());
        let c = Cadence::cron(&expr).expect("a daily cron is never too frequent");
        assert!(c.after(Utc::now()).unwrap() - Utc::now() < MIN_GAP);
        assert!(Cadence::from_columns(None, Some(&expr), "UTC").is_ok());
        // Two runs exactly an hour apart are allowed; stored ones read back
        // even when the next is under an hour away.
        assert!(Cadence::cron("0 8,9 * * SAT").is_ok());
        assert!(Cadence::from_columns(None, Some("0 8,9 * * SAT"), "UTC").is_ok());
    }

    #[test]
    fn missed_runs_are_not_made_up() {
        let weekly = Cadence::every_days(7).unwrap();
        let due = at(2026, 11, 1, 9);
        let now = at(2026, 11, 26, 12);
        let next = weekly.next_after(due, now).unwrap();
        assert!(next > now && next - now <= Duration::days(7));
        assert_eq!((next - due).num_days() % 7, 0);
        // On time: simply the next one.
        assert_eq!(weekly.next_after(due, due).unwrap(), at(2026, 11, 8, 9));
    }

    fn berlin() -> Tz {
        time_zone("Europe/Berlin").unwrap()
    }

    #[test]
    fn a_cron_in_a_zone_keeps_its_wall_time_across_the_clock_change() {
        // 09:00 in Berlin: 08:00 UTC in winter, 07:00 UTC in summer.
        let c = Cadence::cron("0 9 * * MON").unwrap().in_zone(berlin());
        let runs = c.upcoming(c.after(at(2027, 3, 20, 0)).unwrap(), 2);
        assert_eq!(runs, [at(2027, 3, 22, 8), at(2027, 3, 29, 7)]);
        // A wall time the clocks pass twice (the last Sunday of October,
        // 02:30) runs once; one they skip (the last of March) is skipped.
        let nightly = Cadence::cron("30 2 * * *").unwrap().in_zone(berlin());
        let autumn = nightly.upcoming(nightly.after(at(2027, 10, 30, 12)).unwrap(), 2);
        assert_eq!(autumn[1] - autumn[0], Duration::hours(25));
        // Asked during the repeated hour's second pass (02:15 CET, 01:15
        // UTC), the next time is 02:30 CET that night, never one behind.
        let asked = Utc.with_ymd_and_hms(2027, 10, 31, 1, 15, 0).unwrap();
        let next = nightly.after(asked).unwrap();
        assert_eq!(next, Utc.with_ymd_and_hms(2027, 10, 31, 1, 30, 0).unwrap());
        assert_eq!(nightly.after(next).unwrap() - next, Duration::hours(24));
        let spring = nightly.upcoming(nightly.after(at(2027, 3, 27, 12)).unwrap(), 1);
        assert_eq!(spring[0].with_timezone(&berlin()).day(), 29);
    }

    #[test]
    fn an_interval_in_a_zone_keeps_its_wall_time_and_catches_up() {
        let weekly = Cadence::every_days(7).unwrap().in_zone(berlin());
        // Monday 9:00 Berlin in winter (08:00 UTC), then in summer (07:00 UTC).
        let due = at(2027, 3, 22, 8);
        assert_eq!(weekly.after(due).unwrap(), at(2027, 3, 29, 7));
        let next = weekly.next_after(due, at(2027, 6, 1, 0)).unwrap();
        let wall = next.with_timezone(&berlin());
        assert_eq!((wall.weekday(), wall.hour()), (Weekday::Mon, 9));
        assert_eq!(wall.date_naive().to_string(), "2027-06-07");
        // Stored zones read back; a bad one is refused by name.
        assert!(Cadence::from_columns(Some(7), None, "Europe/Berlin").is_ok());
        assert!(time_zone("Mars/Olympus").unwrap_err().contains("IANA"));
    }

    #[test]
    fn the_price_limit_is_checked_in_integers() {
        let item = Item {
            variant_id: Uuid::nil(),
            quantity: 1,
            reference_price_minor: 1000,
        };
        assert!(!item.beyond_limit(1100, 10));
        assert!(item.beyond_limit(1101, 10));
        assert!(item.beyond_limit(1001, 0));
        assert!(!item.beyond_limit(900, 0));
    }
}
