//! Durations as Go writes and reads them (`time.ParseDuration`, `time.Duration.String`), the
//! format of every duration flag and KubeProxyConfiguration field.

use std::time::Duration;

/// A parsed Go duration: Go allows negative values, which validation then rejects by field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoDuration {
    pub negative: bool,
    pub value: Duration,
}

/// Parses `300ms`, `1.5h`, `2h45m`, `-1s`, `0`: Go's `time.ParseDuration`.
pub fn parse_go_duration(s: &str) -> Option<GoDuration> {
    let mut rest = s;
    let mut negative = false;
    if let Some(r) = rest.strip_prefix('-') {
        negative = true;
        rest = r;
    } else if let Some(r) = rest.strip_prefix('+') {
        rest = r;
    }
    if rest == "0" {
        return Some(GoDuration {
            negative,
            value: Duration::ZERO,
        });
    }
    if rest.is_empty() {
        return None;
    }
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let int_end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let (int_part, after) = rest.split_at(int_end);
        let (frac_part, after) = match after.strip_prefix('.') {
            Some(a) => {
                let end = a.find(|c: char| !c.is_ascii_digit()).unwrap_or(a.len());
                a.split_at(end)
            }
            None => ("", after),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return None;
        }
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_end);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        let whole: u128 = if int_part.is_empty() { 0 } else { int_part.parse().ok()? };
        nanos = nanos.checked_add(whole.checked_mul(scale)?)?;
        if !frac_part.is_empty() {
            let digits = frac_part.len().min(30) as u32;
            let frac: u128 = frac_part[..digits as usize].parse().ok()?;
            nanos = nanos.checked_add(frac * scale / 10u128.pow(digits))?;
        }
        rest = after;
    }
    // Go's Duration is an int64 of nanoseconds.
    if nanos > i64::MAX as u128 {
        return None;
    }
    let value = Duration::new((nanos / 1_000_000_000) as u64, (nanos % 1_000_000_000) as u32);
    Some(GoDuration { negative, value })
}

/// Parses a duration that may not be negative (what every kproxy setting needs).
pub fn parse_duration(s: &str) -> Option<Duration> {
    match parse_go_duration(s.trim())? {
        GoDuration { negative: true, value } if !value.is_zero() => None,
        d => Some(d.value),
    }
}

/// Go's `time.Duration.String()`: `0s`, `250ms`, `1.5s`, `15m0s`, `24h0m0s`.
pub fn format_go_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    if nanos < 1_000_000_000 {
        let (unit, scale) = if nanos < 1_000 {
            ("ns", 1u128)
        } else if nanos < 1_000_000 {
            ("µs", 1_000)
        } else {
            ("ms", 1_000_000)
        };
        return format!("{}{unit}", decimal(nanos, scale));
    }
    let hours = nanos / 3_600_000_000_000;
    let minutes = nanos / 60_000_000_000 % 60;
    let secs = decimal(nanos % 60_000_000_000, 1_000_000_000);
    if hours > 0 {
        format!("{hours}h{minutes}m{secs}s")
    } else if minutes > 0 {
        format!("{minutes}m{secs}s")
    } else {
        format!("{secs}s")
    }
}

/// `value / scale` with the fraction's trailing zeros dropped, as Go prints it.
fn decimal(value: u128, scale: u128) -> String {
    let whole = value / scale;
    let frac = value % scale;
    if frac == 0 {
        return whole.to_string();
    }
    let width = scale.ilog10() as usize;
    let digits = format!("{frac:0width$}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_go_parses() {
        let ok = |s: &str, d: Duration| assert_eq!(parse_duration(s), Some(d), "{s}");
        ok("200ms", Duration::from_millis(200));
        ok("1s", Duration::from_secs(1));
        ok("1m30s", Duration::from_secs(90));
        ok("1.5h", Duration::from_secs(5400));
        ok("24h0m0s", Duration::from_secs(86_400));
        ok("0", Duration::ZERO);
        ok("0s", Duration::ZERO);
        ok("-0s", Duration::ZERO);
        ok("1h0m0s", Duration::from_secs(3600));
        ok("10us", Duration::from_micros(10));
        ok(".5s", Duration::from_millis(500));
        for bad in ["", "10", "1x", "s", "-1s", "1s2", "."] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        assert_eq!(
            parse_go_duration("-1s"),
            Some(GoDuration {
                negative: true,
                value: Duration::from_secs(1)
            })
        );
    }

    #[test]
    fn formats_as_go_prints() {
        let f = |d: Duration| format_go_duration(d);
        assert_eq!(f(Duration::ZERO), "0s");
        assert_eq!(f(Duration::from_millis(250)), "250ms");
        assert_eq!(f(Duration::from_millis(1500)), "1.5s");
        assert_eq!(f(Duration::from_secs(1)), "1s");
        assert_eq!(f(Duration::from_secs(30)), "30s");
        assert_eq!(f(Duration::from_secs(900)), "15m0s");
        assert_eq!(f(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(f(Duration::from_secs(86_400)), "24h0m0s");
        assert_eq!(f(Duration::from_secs(5)), "5s");
        assert_eq!(f(Duration::from_micros(1500)), "1.5ms");
        assert_eq!(f(Duration::from_nanos(42)), "42ns");
    }
}
