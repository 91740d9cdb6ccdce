//! Signed releases: minisign (Ed25519 over the BLAKE2b prehash of the `.xpm` file), compatible
//! with the `minisign` CLI (`minisign -Vm F.xpm -x F.xpm.minisig -p KEY.pub`).
//!
//! The signature's trusted comment (signed too) binds the release:
//! `xpm-release v1 registry=<source> name=<name> version=<version> sha256=<hex>`, so a signature
//! cannot be moved to another version, another expert or another registry. It travels in the
//! index line (`sig`), with the signer's public key and, after a key change, a rotation
//! statement: the new public key signed by the old one, with the trusted comment
//! `xpm-rotate v1 name=<name> new=<key id>`. Which keys a client accepts is its trust policy
//! (`[trust]` in `xpm.toml`, the signer pinned in `xpm.lock`): docs/registry-protocol.md.

use std::io::Cursor;
use std::path::Path;

pub use minisign::PublicKey;
use minisign::{KeyPair, PublicKeyBox, SecretKey, SecretKeyBox, SignatureBox};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoResultExt, Result};

/// The signature material an index line carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReleaseSignature {
    /// The signer's minisign public key (base64, as on the second line of a `.pub` file).
    pub key: String,
    /// The minisign signature file (`untrusted comment: …` and three more lines).
    pub minisig: String,
    /// After a key change: the new key (the bytes of `key`, decoded) signed by the previous
    /// key, as a minisign signature file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<Rotation>,
}

/// A statement by the previous key that `key` replaces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Rotation {
    /// The previous (pinned) key, base64.
    pub old_key: String,
    /// The old key's signature over the new key's bytes.
    pub minisig: String,
}

/// Size limits for what a hostile index may carry.
const MAX_SIG_LEN: usize = 4096;

fn bad(what: impl Into<String>) -> Error {
    Error::input(
        what,
        Some("the signature in the index is damaged or not xpm's"),
    )
}

/// A public key from its base64 form (or a whole `.pub` file).
pub fn parse_public_key(s: &str) -> Result<PublicKey> {
    let line = s
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
        .unwrap_or("");
    if line.len() > 128 {
        return Err(bad("a public key longer than 128 characters"));
    }
    PublicKey::from_base64(line)
        .map_err(|e| Error::input(format!("`{line}` is not a minisign public key: {e}"), None))
}

/// The 16-hex-digit key id minisign prints (`minisign -V` says "key ID …").
pub fn key_id(pk: &PublicKey) -> String {
    let n = pk.keynum();
    let mut v = [0u8; 8];
    v.copy_from_slice(&n[..8]);
    format!("{:016X}", u64::from_le_bytes(v))
}

/// The trusted comment that binds a release.
pub fn release_comment(registry: &str, name: &str, version: &str, cksum: &str) -> String {
    let hex = cksum.strip_prefix("sha256:").unwrap_or(cksum);
    format!("xpm-release v1 registry={registry} name={name} version={version} sha256={hex}")
}

fn rotation_comment(name: &str, new_key: &PublicKey) -> String {
    format!("xpm-rotate v1 name={name} new={}", key_id(new_key))
}

/// A new key pair: the secret key file (encrypted with `password`, or not) and the public key
/// file, in minisign's formats.
pub fn generate(password: Option<String>, comment: &str) -> Result<(String, String, String)> {
    let kp = match password {
        Some(p) => KeyPair::generate_encrypted_keypair(Some(p)),
        None => KeyPair::generate_unencrypted_keypair(),
    }
    .map_err(|e| Error::input(format!("cannot generate a key: {e}"), None))?;
    let pk_box = kp
        .pk
        .to_box()
        .map_err(|e| Error::input(format!("cannot encode the public key: {e}"), None))?;
    let sk_box = kp
        .sk
        .to_box(Some(comment))
        .map_err(|e| Error::input(format!("cannot encode the secret key: {e}"), None))?;
    Ok((sk_box.to_string(), pk_box.to_string(), key_id(&kp.pk)))
}

/// Load a secret key file; `password` for an encrypted one.
pub fn load_secret_key(path: &Path, password: Option<String>) -> Result<(SecretKey, PublicKey)> {
    let text = std::fs::read_to_string(path).at("read", path)?;
    let sk_box = SecretKeyBox::from_string(&text).map_err(|e| {
        Error::input(
            format!("`{}` is not a minisign secret key: {e}", path.display()),
            Some("create one with `xpm key generate`"),
        )
    })?;
    let sk = match password {
        Some(p) => sk_box.into_secret_key(Some(p)),
        None => sk_box.into_unencrypted_secret_key(),
    }
    .map_err(|e| {
        Error::input(
            format!("cannot open the secret key `{}`: {e}", path.display()),
            Some("an encrypted key needs its password in $XPM_KEY_PASSWORD"),
        )
    })?;
    let pk = PublicKey::from_secret_key(&sk)
        .map_err(|e| Error::input(format!("bad secret key `{}`: {e}", path.display()), None))?;
    Ok((sk, pk))
}

/// Sign the artifact at `path` for release on `registry`.
pub fn sign_release(
    sk: &SecretKey,
    pk: &PublicKey,
    path: &Path,
    registry: &str,
    name: &str,
    version: &str,
    cksum: &str,
) -> Result<ReleaseSignature> {
    let file = std::fs::File::open(path).at("open", path)?;
    let comment = release_comment(registry, name, version, cksum);
    let sig = minisign::sign(
        Some(pk),
        sk,
        std::io::BufReader::new(file),
        Some(&comment),
        Some(&format!("signature of {name}@{version} by xpm")),
    )
    .map_err(|e| Error::input(format!("cannot sign `{}`: {e}", path.display()), None))?;
    Ok(ReleaseSignature {
        key: pk.to_base64(),
        minisig: sig.to_string(),
        rotation: None,
    })
}

/// A rotation statement: `old` vouches for `new` as the signer of `name`.
pub fn sign_rotation(
    old_sk: &SecretKey,
    old_pk: &PublicKey,
    new: &PublicKey,
    name: &str,
) -> Result<Rotation> {
    let sig = minisign::sign(
        Some(old_pk),
        old_sk,
        Cursor::new(new.to_bytes()),
        Some(&rotation_comment(name, new)),
        Some("xpm key rotation statement"),
    )
    .map_err(|e| Error::input(format!("cannot sign the rotation: {e}"), None))?;
    Ok(Rotation {
        old_key: old_pk.to_base64(),
        minisig: sig.to_string(),
    })
}

fn parse_sig(s: &str) -> Result<SignatureBox> {
    if s.len() > MAX_SIG_LEN {
        return Err(bad("a signature longer than 4096 bytes"));
    }
    SignatureBox::from_string(s).map_err(|e| bad(format!("not a minisign signature: {e}")))
}

/// Check `sig` over the artifact bytes in `reader` with its own key, and that its trusted
/// comment binds exactly this release. Returns the signer's key.
pub fn verify_release(
    sig: &ReleaseSignature,
    reader: impl std::io::Read + std::io::Seek,
    registry: &str,
    name: &str,
    version: &str,
    cksum: &str,
) -> Result<PublicKey> {
    verify_release_on(sig, reader, Some(registry), name, version, cksum)
}

/// [`verify_release`] where the registry part of the binding is not checked (`None`): what a
/// registry server can check, not knowing the address its clients use.
pub fn verify_release_on(
    sig: &ReleaseSignature,
    reader: impl std::io::Read + std::io::Seek,
    registry: Option<&str>,
    name: &str,
    version: &str,
    cksum: &str,
) -> Result<PublicKey> {
    let pk = parse_public_key(&sig.key)?;
    let sbox = parse_sig(&sig.minisig)?;
    let release = format!("{name}@{version}");
    minisign::verify(&pk, &sbox, reader, true, false, false).map_err(|e| {
        Error::input(
            format!(
                "the signature of {release} does not verify with key {}: {e}",
                key_id(&pk)
            ),
            Some("the artifact or its signature was changed after signing; do not use it"),
        )
    })?;
    let comment = sbox
        .trusted_comment()
        .map_err(|e| bad(format!("no trusted comment: {e}")))?;
    let want = release_comment(registry.unwrap_or("*"), name, version, cksum);
    let binds = match registry {
        Some(_) => comment == want,
        None => {
            let tail = want.split_once(" name=").map_or("", |(_, t)| t);
            let head = "xpm-release v1 registry=";
            let end = format!(" name={tail}");
            comment.starts_with(head)
                && comment.ends_with(&end)
                && comment
                    .len()
                    .checked_sub(end.len())
                    .and_then(|e| comment.get(head.len()..e))
                    .is_some_and(|reg| !reg.contains(' '))
        }
    };
    if !binds {
        return Err(Error::input(
            format!("the signature of {release} was made for another release: it says `{comment}`"),
            Some(&format!(
                "a valid signature binds `{want}`; it was copied from another version, expert or registry"
            )),
        ));
    }
    Ok(pk)
}

/// Check a rotation statement: `rot.old_key` signed `new` for `name`.
pub fn verify_rotation(rot: &Rotation, new: &PublicKey, name: &str) -> Result<PublicKey> {
    let old = parse_public_key(&rot.old_key)?;
    let sbox = parse_sig(&rot.minisig)?;
    minisign::verify(&old, &sbox, Cursor::new(new.to_bytes()), true, false, false).map_err(
        |e| {
            Error::input(
                format!(
                    "the key rotation statement for `{name}` does not verify with key {}: {e}",
                    key_id(&old)
                ),
                None,
            )
        },
    )?;
    let comment = sbox
        .trusted_comment()
        .map_err(|e| bad(format!("no trusted comment: {e}")))?;
    if comment != rotation_comment(name, new) {
        return Err(Error::input(
            format!(
                "the key rotation statement says `{comment}`, not that {} replaces the key of `{name}`",
                key_id(new)
            ),
            None,
        ));
    }
    Ok(old)
}

/// The public key file text for `key` (what `minisign -p` reads).
pub fn public_key_file(key: &PublicKey) -> Result<String> {
    let b: PublicKeyBox = key
        .to_box()
        .map_err(|e| Error::input(format!("cannot encode the public key: {e}"), None))?;
    Ok(b.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (SecretKey, PublicKey) {
        let (sk, _, _) = generate(None, "test").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.key");
        std::fs::write(&p, sk).unwrap();
        load_secret_key(&p, None).unwrap()
    }

    #[test]
    fn a_release_signature_binds_name_version_digest_and_registry() {
        let (sk, pk) = pair();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.xpm");
        std::fs::write(&f, b"artifact bytes").unwrap();
        let sig = sign_release(&sk, &pk, &f, "file:///r", "e", "1.0.0", "sha256:ab").unwrap();
        let read = || std::fs::File::open(&f).unwrap();
        verify_release(&sig, read(), "file:///r", "e", "1.0.0", "sha256:ab").unwrap();
        for (reg, name, ver) in [
            ("file:///other", "e", "1.0.0"),
            ("file:///r", "f", "1.0.0"),
            ("file:///r", "e", "1.0.1"),
        ] {
            let e = verify_release(&sig, read(), reg, name, ver, "sha256:ab").unwrap_err();
            assert!(e.to_string().contains("made for another release"), "{e}");
        }
        std::fs::write(&f, b"artifact bytez").unwrap();
        let e = verify_release(&sig, read(), "file:///r", "e", "1.0.0", "sha256:ab").unwrap_err();
        assert!(e.to_string().contains("does not verify"), "{e}");
    }

    #[test]
    fn rotations_verify_only_for_their_new_key_and_name() {
        let (old_sk, old_pk) = pair();
        let (_, new_pk) = pair();
        let (_, other) = pair();
        let rot = sign_rotation(&old_sk, &old_pk, &new_pk, "team/e").unwrap();
        assert_eq!(
            key_id(&verify_rotation(&rot, &new_pk, "team/e").unwrap()),
            key_id(&old_pk)
        );
        assert!(verify_rotation(&rot, &other, "team/e").is_err());
        assert!(verify_rotation(&rot, &new_pk, "team/f").is_err());
    }
}
