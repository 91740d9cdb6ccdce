//! Signed releases on the client: keys (`xpm key generate`), signing at publish, and the trust
//! policy `xpm install` applies (docs/registry-protocol.md, "Signed releases").
//!
//! Per expert, in this order:
//! 1. Keys pinned in `xpm.toml` (`[[trust.key]]`, per registry and name prefix) that cover the
//!    name: the release must be signed by one of them (or by a key that one of them rotated to).
//! 2. Else the signer recorded in `xpm.lock` for that name (trust on first use): the same key,
//!    or a new key with a rotation statement signed by the recorded one.
//! 3. Else the first signature seen is accepted and its key recorded in the lockfile.
//!
//! An unsigned release is refused under `--require-signatures` / `require-signatures = true`,
//! when pinned keys cover its name, or when an earlier version was signed; otherwise it
//! installs with a notice.

use std::path::{Path, PathBuf};

use crate::error::{Error, IoResultExt, Result};
use crate::home::XpmHome;
use crate::printer::Printer;
use crate::project::{Lockfile, TrustPolicy};
use crate::registry::IndexLine;
use crate::signing::{self, ReleaseSignature};

/// Where `xpm key generate` keeps keys: `$XPM_HOME/keys`.
pub fn keys_dir(home: &XpmHome) -> PathBuf {
    home.root.join("keys")
}

/// What `xpm key generate` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GeneratedKey {
    pub name: String,
    pub key_id: String,
    /// The public key (base64), for `[[trust.key]]` entries.
    pub public_key: String,
    pub secret_key_file: PathBuf,
    pub public_key_file: PathBuf,
    pub encrypted: bool,
}

/// `xpm key generate NAME`: a minisign key pair in `$XPM_HOME/keys/NAME.{key,pub}`, the secret
/// key encrypted with `password` when given.
pub fn generate_key(home: &XpmHome, name: &str, password: Option<String>) -> Result<GeneratedKey> {
    crate::format::manifest::validate_name(name)
        .ok()
        .filter(|_| !name.contains('/'))
        .ok_or_else(|| {
            Error::input(
                format!("`{name}` is not a key name"),
                Some("use lowercase letters, digits, `-` and `_`, e.g. `team-release`"),
            )
        })?;
    let dir = keys_dir(home);
    let (sk_path, pk_path) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.pub")),
    );
    if sk_path.exists() || pk_path.exists() {
        return Err(Error::Conflict {
            message: format!("a key named `{name}` already exists in {}", dir.display()),
            hint: Some("choose another name; xpm never overwrites a key".into()),
        });
    }
    std::fs::create_dir_all(&dir).at("create directory", &dir)?;
    let encrypted = password.is_some();
    let (sk, pk, id) = signing::generate(password, &format!("xpm signing key {name}"))?;
    crate::fsutil::write_atomic(&pk_path, pk.as_bytes())?;
    write_secret(&sk_path, sk.as_bytes())?;
    let public_key = signing::parse_public_key(&pk)?.to_base64();
    Ok(GeneratedKey {
        name: name.to_string(),
        key_id: id,
        public_key,
        secret_key_file: sk_path,
        public_key_file: pk_path,
        encrypted,
    })
}

/// A secret key file, readable by its owner only.
fn write_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).at("create", path)?;
    f.write_all(bytes).at("write", path)?;
    f.sync_all().at("write", path)
}

/// A signing key given as a path, or a name in `$XPM_HOME/keys`.
pub fn key_path(home: &XpmHome, key: &str) -> PathBuf {
    let p = PathBuf::from(key);
    if p.exists() || key.contains('/') || key.ends_with(".key") {
        p
    } else {
        keys_dir(home).join(format!("{key}.key"))
    }
}

/// Signing at publish: the key and, after a key change, the previous key.
#[derive(Debug, Clone)]
pub struct SignRequest {
    pub key: PathBuf,
    pub rotate_from: Option<PathBuf>,
    /// For encrypted keys (`$XPM_KEY_PASSWORD`).
    pub password: Option<String>,
}

/// Sign `artifact` for `line` on the registry `source`: the signature goes into the line.
pub fn sign_line(
    req: &SignRequest,
    artifact: &Path,
    source: &str,
    line: &mut IndexLine,
) -> Result<String> {
    let (sk, pk) = signing::load_secret_key(&req.key, req.password.clone())?;
    let vers = line.vers.to_string();
    let mut sig =
        signing::sign_release(&sk, &pk, artifact, source, &line.name, &vers, &line.cksum)?;
    if let Some(old) = &req.rotate_from {
        let (old_sk, old_pk) = signing::load_secret_key(old, req.password.clone())?;
        sig.rotation = Some(signing::sign_rotation(&old_sk, &old_pk, &pk, &line.name)?);
    }
    line.sig = Some(sig);
    Ok(signing::key_id(&pk))
}

/// The signature checks of one install.
pub struct TrustCheck<'a> {
    pub policy: &'a TrustPolicy,
    pub lock: Option<&'a Lockfile>,
    pub require: bool,
    pub source: &'a str,
    pub printer: &'a Printer,
}

impl TrustCheck<'_> {
    /// Check `line` against the artifact at `file`; the signer's key to record in xpm.lock.
    pub fn check(&self, line: &IndexLine, file: &Path) -> Result<Option<String>> {
        let id = line.id();
        let pinned: Vec<&str> = self
            .policy
            .keys_for(self.source, &line.name)
            .map(|k| k.key.trim())
            .collect();
        let prior = self
            .lock
            .and_then(|l| l.get(&line.name))
            .and_then(|e| e.signer.as_deref());
        let require = self.require || self.policy.require_signatures;
        let Some(sig) = &line.sig else {
            if require || !pinned.is_empty() || prior.is_some() {
                let why = if !pinned.is_empty() {
                    "xpm.toml pins signing keys for it".to_string()
                } else if let Some(p) = prior {
                    format!("xpm.lock records that it was signed by key {}", short_id(p))
                } else {
                    "signatures are required".to_string()
                };
                return Err(Error::input(
                    format!("{id} is not signed, and {why}"),
                    Some(
                        "ask the publisher to `xpm publish --sign`; do not install unsigned releases where a signature is expected",
                    ),
                ));
            }
            self.printer.warn(format!("{id} is not signed"));
            return Ok(None);
        };
        let f = std::fs::File::open(file).at("open", file)?;
        let vers = line.vers.to_string();
        let pk = signing::verify_release(sig, f, self.source, &line.name, &vers, &line.cksum)?;
        let key = pk.to_base64();
        let trusted: Vec<&str> = if pinned.is_empty() {
            prior.into_iter().collect()
        } else {
            pinned.clone()
        };
        if trusted.is_empty() {
            self.printer.status(
                "Trusting",
                format!(
                    "key {} for `{}` (first use; recorded in xpm.lock)",
                    signing::key_id(&pk),
                    line.name
                ),
            );
            return Ok(Some(key));
        }
        if trusted.contains(&key.as_str()) {
            return Ok(Some(key));
        }
        self.rotated(sig, &pk, &trusted, &id, pinned.is_empty())?;
        Ok(Some(key))
    }

    /// A release signed by a key that is not trusted: accepted only with a rotation statement
    /// by a trusted key.
    fn rotated(
        &self,
        sig: &ReleaseSignature,
        pk: &crate::signing::PublicKey,
        trusted: &[&str],
        id: &str,
        from_lock: bool,
    ) -> Result<()> {
        let name = id.split('@').next().unwrap_or(id);
        let whose = if from_lock {
            "xpm.lock records"
        } else {
            "xpm.toml trusts"
        };
        let Some(rot) = &sig.rotation else {
            return Err(Error::input(
                format!(
                    "{id} is signed by key {}, but {whose} {} for `{name}`, and the release has no rotation statement",
                    signing::key_id(pk),
                    trusted
                        .iter()
                        .map(|k| short_id(k))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Some(
                    "a changed signing key is refused unless the old key signed the new one (`xpm publish --sign NEW --rotate-from OLD`); if you know the key change is genuine, update [[trust.key]] in xpm.toml or delete the entry from xpm.lock",
                ),
            ));
        };
        let old = signing::verify_rotation(rot, pk, name)?;
        if !trusted.contains(&old.to_base64().as_str()) {
            return Err(Error::input(
                format!(
                    "{id}: the rotation statement is signed by key {}, which is not the trusted key {}",
                    signing::key_id(&old),
                    trusted
                        .iter()
                        .map(|k| short_id(k))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None,
            ));
        }
        self.printer.status(
            "Rotated",
            format!(
                "signing key of `{name}`: {} → {} (statement signed by the old key)",
                signing::key_id(&old),
                signing::key_id(pk)
            ),
        );
        Ok(())
    }
}

/// A key's id for messages, or the start of its text if it does not parse.
fn short_id(key: &str) -> String {
    signing::parse_public_key(key)
        .map(|k| signing::key_id(&k))
        .unwrap_or_else(|_| key.chars().take(12).collect())
}
