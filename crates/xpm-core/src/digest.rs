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
