//! Byte sizes for humans: `1.5 MB` out, `5GB` / `512MiB` / `1048576` in.

use crate::error::{Error, Result};

/// Parse a size: a number with an optional unit (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = |why: &str| {
        Error::input(
            format!("`{s}` is not a size: {why}"),
            Some("write e.g. `5GB`, `512MiB` or a number of bytes"),
        )
    };
    let n: u64 = num
        .parse()
        .map_err(|_| bad("it does not start with a number"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "kib" => 1 << 10,
        "mb" => 1000 * 1000,
        "mib" => 1 << 20,
        "gb" => 1000 * 1000 * 1000,
        "gib" => 1 << 30,
        "tb" => 1000 * 1000 * 1000 * 1000,
        "tib" => 1 << 40,
        _ => return Err(bad("unknown unit")),
    };
    n.checked_mul(mult).ok_or_else(|| bad("too large"))
}

/// `1.5 MB`-style sizes (decimal units).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("99999999999TB").is_err());
        assert_eq!(human_bytes(1500), "1.5 KB");
    }
}
