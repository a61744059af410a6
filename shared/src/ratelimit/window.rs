//! Windows: fixed, aligned to UTC, so every worker and every Envoy that
//! counts the same window agrees on when it starts and ends without talking.
//! Second to day are multiples of the epoch (a day starts at 00:00 UTC); a
//! month starts on its first day at 00:00 UTC, as a provider's billing month.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Window {
    Second,
    Minute,
    Hour,
    Day,
    Month,
}

const DAY_MS: u64 = 86_400_000;

impl Window {
    pub fn parse(s: &str) -> Option<Window> {
        Some(match s {
            "second" => Window::Second,
            "minute" => Window::Minute,
            "hour" => Window::Hour,
            "day" => Window::Day,
            "month" => Window::Month,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Window::Second => "second",
            Window::Minute => "minute",
            Window::Hour => "hour",
            Window::Day => "day",
            Window::Month => "month",
        }
    }

    /// The envoyproxy/ratelimit unit name (`SECOND` ... `MONTH`).
    pub fn unit(self) -> &'static str {
        match self {
            Window::Second => "SECOND",
            Window::Minute => "MINUTE",
            Window::Hour => "HOUR",
            Window::Day => "DAY",
            Window::Month => "MONTH",
        }
    }

    /// The window holding `now_ms`: `[start, end)` in ms since the epoch.
    pub fn span(self, now_ms: u64) -> (u64, u64) {
        let fixed = |len: u64| {
            let start = now_ms - now_ms % len;
            (start, start + len)
        };
        match self {
            Window::Second => fixed(1000),
            Window::Minute => fixed(60_000),
            Window::Hour => fixed(3_600_000),
            Window::Day => fixed(DAY_MS),
            Window::Month => {
                let days = now_ms / DAY_MS;
                let (y, m, _) = civil_from_days(days);
                let start = days_from_civil(y, m, 1) * DAY_MS;
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (start, days_from_civil(ny, nm, 1) * DAY_MS)
            }
        }
    }

    /// The nominal length in seconds (a month as 30 days), for the IETF
    /// `RateLimit-Policy` `w` parameter.
    pub fn nominal_secs(self) -> u64 {
        match self {
            Window::Second => 1,
            Window::Minute => 60,
            Window::Hour => 3600,
            Window::Day => 86_400,
            Window::Month => 30 * 86_400,
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Days since 1970-01-01 → (year, month 1-12, day 1-31), proleptic Gregorian
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// (year, month, day) → days since 1970-01-01 (for years from 1970).
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A duration as OpenAI's `x-ratelimit-reset-*` headers write it: `1s`,
/// `6m0s`, `1h2m3s`, `250ms`.
pub fn openai_duration(ms: u64) -> String {
    // Written piece by piece, as the other rate-limit headers: two of these
    // go on every answer.
    let mut out = String::with_capacity(12);
    if ms < 1000 {
        crate::wire::push_decimal(&mut out, ms);
        out.push_str("ms");
        return out;
    }
    let s = ms.div_ceil(1000);
    let (h, m, s) = (s / 3600, (s % 3600) / 60, s % 60);
    if h > 0 {
        crate::wire::push_decimal(&mut out, h);
        out.push('h');
    }
    if h > 0 || m > 0 {
        crate::wire::push_decimal(&mut out, m);
        out.push('m');
    }
    crate::wire::push_decimal(&mut out, s);
    out.push('s');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-01T07:48:19.5Z
    const NOW: u64 = 1_796_111_299_500;

    #[test]
    fn windows_align_to_utc() {
        let cases = [
            (Window::Second, 1_796_111_299_000, 1_796_111_300_000),
            (Window::Minute, 1_796_111_280_000, 1_796_111_340_000),
            (Window::Hour, 1_796_108_400_000, 1_796_112_000_000),
            // 2026-12-01T00:00Z .. 2026-12-02T00:00Z
            (Window::Day, 1_796_083_200_000, 1_796_169_600_000),
            // 2026-12-01 .. 2027-01-01
            (Window::Month, 1_796_083_200_000, 1_798_761_600_000),
        ];
        for (w, start, end) in cases {
            assert_eq!(w.span(NOW), (start, end), "{w}");
        }
        // February of a leap year: 2028-02-10 → 2028-02-01 .. 2028-03-01 (29 days).
        let feb10 = days_from_civil(2028, 2, 10) * DAY_MS + 5;
        let (s, e) = Window::Month.span(feb10);
        assert_eq!((e - s) / DAY_MS, 29);
        assert_eq!(civil_from_days(s / DAY_MS), (2028, 2, 1));
    }

    #[test]
    fn civil_dates_round_trip() {
        for days in (0..80_000).step_by(17) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn durations_read_like_openai() {
        for (ms, want) in [
            (250, "250ms"),
            (1000, "1s"),
            (1001, "2s"),
            (360_000, "6m0s"),
            (3_723_000, "1h2m3s"),
            (0, "0ms"),
            (59_999, "1m0s"),
            (3_600_000, "1h0m0s"),
            (90_061_000, "25h1m1s"),
        ] {
            assert_eq!(openai_duration(ms), want);
        }
    }
}
