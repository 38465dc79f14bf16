//! ZODB tids as times: a tid is a `ZODB.TimeStamp`, UTC. The high 32 bits
//! count minutes as
//! `((((year - 1900) * 12 + month - 1) * 31 + day - 1) * 24 + hour) * 60 + minute`,
//! the low 32 bits the seconds within that minute in units of `60 / 2^32` s.

/// The ZODB tid of the UTC second `unix_secs` (what `ZODB.TimeStamp` makes
/// of `time.gmtime(unix_secs)`).
pub fn tid_at(unix_secs: u64) -> u64 {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let minutes = ((((year - 1900) * 12 + month - 1) * 31 + day - 1) * 24 + (rem / 3600) as i64) * 60
        + ((rem % 3600) / 60) as i64;
    let seconds = rem % 60;
    ((minutes.max(0) as u64) << 32) | ((seconds << 32) / 60)
}

/// The calendar fields of a tid: year, month (1-12), day (1-31), hour,
/// minute, and the microseconds within the minute (rounded, at most
/// 59,999,999).
fn fields(tid: u64) -> (i64, i64, i64, i64, i64, u64) {
    let m = (tid >> 32) as i64;
    let minute = m % 60;
    let hour = (m / 60) % 24;
    let day = (m / 1440) % 31 + 1;
    let month = (m / 44_640) % 12 + 1;
    let year = m / 535_680 + 1900;
    let low = u128::from(tid & 0xffff_ffff);
    let micros = ((low * 60_000_000 + (1 << 31)) >> 32).min(59_999_999) as u64;
    (year, month, day, hour, minute, micros)
}

/// The UTC time of `tid`, seconds since 1970-01-01 (fractional: a tid
/// resolves about 14 ns).
pub fn unix_time(tid: u64) -> f64 {
    let (year, month, day, hour, minute, _) = fields(tid);
    let low = (tid & 0xffff_ffff) as f64;
    let days = days_from_civil(year, month, day);
    (days * 86_400 + hour * 3600 + minute * 60) as f64 + low * 60.0 / 4_294_967_296.0
}

/// `tid` as an ISO 8601 UTC time to the microsecond,
/// `2026-11-23T10:56:46.123456Z`.
pub fn iso(tid: u64) -> String {
    let (year, month, day, hour, minute, micros) = fields(tid);
    format!(
        "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{:02}.{:06}Z",
        micros / 1_000_000,
        micros % 1_000_000
    )
}

/// Days since 1970-01-01 to `(year, month, day)` (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// `(year, month, day)` to days since 1970-01-01 (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(unix time, u64(ZODB.TimeStamp.TimeStamp(*time.gmtime(t)[:6]).raw()))`.
    const KNOWN: [(u64, u64); 5] = [
        (0, 161_050_965_678_489_600),
        (951_782_400, 230_437_708_533_596_160),
        (1_700_000_000, 284_992_955_789_694_293),
        (1_795_400_000, 291_945_648_848_459_093),
        (4_102_531_199, 460_151_800_905_579_451),
    ];

    #[test]
    fn tids_are_zodb_timestamps() {
        for (t, tid) in KNOWN {
            assert_eq!(tid_at(t), tid, "unix time {t}");
        }
    }

    #[test]
    fn tids_read_back_as_times() {
        for (t, tid) in KNOWN {
            assert!(
                (unix_time(tid) - t as f64).abs() < 1e-6,
                "tid {tid}: {}",
                unix_time(tid)
            );
        }
        assert_eq!(iso(KNOWN[0].1), "1970-01-01T00:00:00.000000Z");
        assert_eq!(iso(KNOWN[1].1), "2000-02-29T00:00:00.000000Z");
        assert_eq!(iso(KNOWN[2].1), "2023-11-14T22:13:20.000000Z");
        assert_eq!(iso(KNOWN[4].1), "2100-01-01T23:59:59.000000Z");
        // Half a second past: the low word's units are 60 / 2^32 s.
        assert_eq!(iso(KNOWN[2].1 + (1 << 31) / 60), "2023-11-14T22:13:20.500000Z");
    }
}
