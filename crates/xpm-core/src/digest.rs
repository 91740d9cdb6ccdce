//! SHA-256 helpers. Digests are written `sha256:<64 lowercase hex>` everywhere.

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

/// Prefix of every digest string.
pub const PREFIX: &str = "sha256:";

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format_digest(&Sha256::digest(bytes))
}

/// `sha256:<hex>` of raw digest bytes.
pub fn format_digest(raw: &[u8]) -> String {
    format!("{PREFIX}{}", hex::encode(raw))
}

/// Whether `s` is a well-formed `sha256:<hex>` string.
pub fn is_digest(s: &str) -> bool {
    s.strip_prefix(PREFIX)
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// Serde: a `sha256:` digest field of a file someone else wrote (a lockfile, an index line, a
/// manifest, an install record); anything but `sha256:` and 64 lowercase hex digits is refused
/// at read, before the value can name a path or a URL.
pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    if is_digest(&s) {
        Ok(s)
    } else {
        Err(serde::de::Error::custom(format!(
            "{} is not a sha256 digest (`sha256:` and 64 lowercase hex digits)",
            quoted(&s)
        )))
    }
}

/// Serde: an optional `sha256:` digest field, checked as [`deserialize`] checks one.
pub fn deserialize_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(serde::Deserialize)]
    struct Checked(#[serde(deserialize_with = "deserialize")] String);
    Ok(<Option<Checked> as serde::Deserialize>::deserialize(d)?.map(|c| c.0))
}

/// `s` in backticks for an error message, escaped and cut to 80 characters (the value may come
/// from a hostile file).
pub fn quoted(s: &str) -> String {
    let mut e: String = s.chars().take(80).flat_map(char::escape_debug).collect();
    if s.chars().count() > 80 {
        e.push('…');
    }
    format!("`{e}`")
}

/// Hash everything read from `r`; returns the digest and the byte count.
pub fn sha256_reader(mut r: impl Read) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((format_digest(&hasher.finalize()), total))
}

/// A writer that hashes what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The raw digest of everything written so far, and the inner writer.
    pub fn finish(self) -> ([u8; 32], W) {
        (self.hasher.finalize().into(), self.inner)
    }

    /// The inner writer, for writes that must not be hashed.
    pub fn inner_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize, Debug)]
    struct D {
        #[serde(deserialize_with = "super::deserialize")]
        d: String,
    }

    #[test]
    fn only_well_formed_digests_deserialize() {
        let good = format!("sha256:{}", "ab".repeat(32));
        let ok: D = serde_json::from_str(&format!(r#"{{"d":"{good}"}}"#)).unwrap();
        assert_eq!(ok.d, good);
        for bad in [
            "sha256:../../../etc/passwd".to_string(),
            format!("sha256:{}", "AB".repeat(32)),
            format!("sha256:{}", "ab".repeat(31)),
            format!("sha256:{}/", "ab".repeat(32)),
            "ab".repeat(32),
            String::new(),
        ] {
            let e = serde_json::from_str::<D>(&format!(r#"{{"d":"{bad}"}}"#)).unwrap_err();
            assert!(
                e.to_string().contains("is not a sha256 digest"),
                "{bad}: {e}"
            );
        }
    }
}
