//! SHA-256 helpers. Digests are written `sha256:<64 lowercase hex>` everywhere, except the
//! frame digests of artifact format 1.2 and later: BLAKE3, written `blake3:<64 lowercase hex>`
//! ([`FrameDigest`]).

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
    s.strip_prefix(PREFIX).is_some_and(is_hex64)
}

/// 64 lowercase hex digits: the hex of a 256-bit digest, as every digest string writes it.
fn is_hex64(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
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

/// Prefix of a BLAKE3 frame digest.
pub const BLAKE3_PREFIX: &str = "blake3:";

/// The digest of one compressed frame of an artifact, as its manifest names it: SHA-256 in
/// formats 1.0 and 1.1, BLAKE3 from format 1.2 on (docs/format.md §5.1; BLAKE3 hashes a frame
/// three to four times as fast on one core, and every frame is hashed on every read). In the
/// manifest it is one field named after the algorithm: `"sha256": "sha256:<hex>"` or
/// `"blake3": "blake3:<hex>"`.
///
/// Read from a hostile manifest: a frame that names both digests, or neither, is refused (the
/// derived reader would take one and ignore the other).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FrameDigest {
    /// `sha256:<64 lowercase hex>` (formats 1.0 and 1.1).
    Sha256(String),
    /// `blake3:<64 lowercase hex>` (format 1.2 and later).
    Blake3(String),
}

impl FrameDigest {
    /// The digest this build's writer records for `frame` (BLAKE3).
    pub fn of(frame: &[u8]) -> FrameDigest {
        FrameDigest::Blake3(format!(
            "{BLAKE3_PREFIX}{}",
            blake3::hash(frame).to_hex().as_str()
        ))
    }

    /// The algorithm's name, for messages: `sha256` or `blake3`.
    pub fn algorithm(&self) -> &'static str {
        match self {
            FrameDigest::Sha256(_) => "sha256",
            FrameDigest::Blake3(_) => "blake3",
        }
    }

    /// The digest as written, `<algorithm>:<hex>`.
    pub fn as_str(&self) -> &str {
        match self {
            FrameDigest::Sha256(s) | FrameDigest::Blake3(s) => s,
        }
    }

    /// Whether the value is well formed: the algorithm's prefix and 64 lowercase hex digits.
    pub fn is_well_formed(&self) -> bool {
        match self {
            FrameDigest::Sha256(s) => is_digest(s),
            FrameDigest::Blake3(s) => s.strip_prefix(BLAKE3_PREFIX).is_some_and(is_hex64),
        }
    }

    /// Whether `frame` has this digest (every frame read: one-shot hashing, no hasher state).
    pub fn matches(&self, frame: &[u8]) -> bool {
        match self {
            FrameDigest::Sha256(w) => sha256(frame) == *w,
            FrameDigest::Blake3(w) => is_blake3(w, blake3::hash(frame)),
        }
    }

    /// A hasher of this digest's algorithm, for a frame read in pieces.
    pub fn hasher(&self) -> FrameHasher {
        match self {
            FrameDigest::Sha256(_) => FrameHasher::Sha256(Sha256::new()),
            FrameDigest::Blake3(_) => FrameHasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }
}

impl<'de> serde::Deserialize<'de> for FrameDigest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        struct Named {
            sha256: Option<String>,
            blake3: Option<String>,
        }
        match <Named as serde::Deserialize>::deserialize(d)? {
            Named {
                sha256: Some(s),
                blake3: None,
            } => Ok(FrameDigest::Sha256(s)),
            Named {
                sha256: None,
                blake3: Some(b),
            } => Ok(FrameDigest::Blake3(b)),
            Named {
                sha256: Some(_),
                blake3: Some(_),
            } => Err(serde::de::Error::custom(
                "a frame names two digests, `sha256` and `blake3`",
            )),
            _ => Err(serde::de::Error::custom(
                "a frame names no digest (`blake3` or `sha256`)",
            )),
        }
    }
}

impl std::fmt::Display for FrameDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the `blake3:<hex>` string `want` names `hash`.
fn is_blake3(want: &str, hash: blake3::Hash) -> bool {
    want.strip_prefix(BLAKE3_PREFIX) == Some(hash.to_hex().as_str())
}

/// [`FrameDigest::hasher`]: SHA-256 or BLAKE3 over a frame fed in pieces.
pub enum FrameHasher {
    Sha256(Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl FrameHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            FrameHasher::Sha256(h) => h.update(bytes),
            FrameHasher::Blake3(h) => {
                h.update(bytes);
            }
        }
    }

    /// Whether what was fed has digest `want` (of the same algorithm; another never matches).
    pub fn matches(self, want: &FrameDigest) -> bool {
        match (self, want) {
            (FrameHasher::Sha256(h), FrameDigest::Sha256(w)) => format_digest(&h.finalize()) == *w,
            (FrameHasher::Blake3(h), FrameDigest::Blake3(w)) => is_blake3(w, h.finalize()),
            _ => false,
        }
    }
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
    use super::FrameDigest;

    #[test]
    fn frame_digests_are_blake3_and_read_back_either_algorithm() {
        // BLAKE3's published digest of the empty input.
        let empty = FrameDigest::of(b"");
        assert_eq!(
            empty.as_str(),
            "blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert!(empty.is_well_formed() && empty.matches(b"") && !empty.matches(b"x"));
        let old = FrameDigest::Sha256(super::sha256(b"frame"));
        assert!(old.is_well_formed() && old.matches(b"frame") && !old.matches(b"frames"));
        // Fed in pieces, the same; a digest of the other algorithm never matches.
        let mut h = old.hasher();
        h.update(b"fra");
        h.update(b"me");
        assert!(h.matches(&old));
        assert!(
            !empty
                .hasher()
                .matches(&FrameDigest::Sha256(super::sha256(b"")))
        );
        // In JSON: one field named after the algorithm; both or neither refused.
        #[derive(serde::Serialize, serde::Deserialize)]
        struct F {
            size: u64,
            #[serde(flatten)]
            d: FrameDigest,
        }
        let json = serde_json::to_string(&F {
            size: 1,
            d: empty.clone(),
        })
        .unwrap();
        assert_eq!(
            json,
            format!(r#"{{"size":1,"blake3":"{}"}}"#, empty.as_str())
        );
        assert_eq!(serde_json::from_str::<F>(&json).unwrap().d, empty);
        let both = format!(r#"{{"size":1,"blake3":"{}","sha256":"{}"}}"#, empty, old);
        let e = serde_json::from_str::<F>(&both).err().unwrap().to_string();
        assert!(e.contains("two digests"), "{e}");
        let e = serde_json::from_str::<F>(r#"{"size":1}"#)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no digest"), "{e}");
        assert!(!FrameDigest::Blake3("blake3:../x".into()).is_well_formed());
        assert!(!FrameDigest::Sha256(format!("blake3:{}", "0".repeat(64))).is_well_formed());
    }

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
