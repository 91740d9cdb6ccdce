//! A project: `xpm.toml` (what experts it needs) and `xpm.lock` (exactly which artifacts it
//! got). Both are described in docs/registry-protocol.md; the lockfile's schema is
//! `schemas/lockfile.schema.json`.
//!
//! ```toml
//! # xpm.toml
//! registry = "http://127.0.0.1:8417"   # optional; default: the local registry
//! base = "sentence-transformers/all-MiniLM-L6-v2"   # optional: a base id or sha256 digest
//!
//! [experts]
//! sst2 = "^1.2"
//! "team/news" = "~2.0.1"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoResultExt, Result};
use crate::format::{BaseModel, ExpertKind};
use crate::fsutil::write_atomic;
use crate::resolve::Requirement;

/// The project manifest file name.
pub const MANIFEST: &str = "xpm.toml";
/// The lockfile name.
pub const LOCKFILE: &str = "xpm.lock";
/// The lockfile layout this build writes and reads.
pub const LOCK_VERSION: u32 = 1;

/// `xpm.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectManifest {
    /// Registry URL or path for this project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
    /// Pin the base model: a base id or a `sha256:` digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Expert name → version requirement.
    #[serde(default)]
    pub experts: BTreeMap<String, String>,
    /// Which signatures `xpm install` accepts (docs/registry-protocol.md, "Signed releases").
    #[serde(default, skip_serializing_if = "TrustPolicy::is_empty")]
    pub trust: TrustPolicy,
}

/// `[trust]` in `xpm.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustPolicy {
    /// Refuse unsigned experts (as `xpm install --require-signatures` does).
    #[serde(default, rename = "require-signatures")]
    pub require_signatures: bool,
    /// Pinned signing keys; an expert they cover must be signed by one of them.
    #[serde(default, rename = "key")]
    pub keys: Vec<TrustedKey>,
}

impl TrustPolicy {
    fn is_empty(&self) -> bool {
        !self.require_signatures && self.keys.is_empty()
    }

    /// The pinned keys for `name` on the registry `source`.
    pub fn keys_for<'a>(
        &'a self,
        source: &'a str,
        name: &'a str,
    ) -> impl Iterator<Item = &'a TrustedKey> {
        self.keys.iter().filter(move |k| {
            k.registry
                .as_deref()
                .is_none_or(|r| r.trim_end_matches('/') == source.trim_end_matches('/'))
                && k.prefix.as_deref().is_none_or(|p| name.starts_with(p))
        })
    }
}

/// One `[[trust.key]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedKey {
    /// A minisign public key (base64, the second line of its `.pub` file).
    pub key: String,
    /// Only for this registry (its source, as in xpm.lock) [default: every registry].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
    /// Only for names starting with this prefix (e.g. `team/`) [default: every name].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// A project directory and its manifest (if any).
#[derive(Debug, Clone)]
pub struct Project {
    pub dir: PathBuf,
    pub manifest: Option<ProjectManifest>,
}

impl Project {
    /// The nearest directory from `start` upwards that holds `xpm.toml`; else `start` itself,
    /// without a manifest.
    pub fn discover(start: &Path) -> Result<Project> {
        let mut dir = Some(start);
        while let Some(d) = dir {
            let p = d.join(MANIFEST);
            if p.is_file() {
                return Ok(Project {
                    dir: d.to_path_buf(),
                    manifest: Some(read_manifest(&p)?),
                });
            }
            dir = d.parent();
        }
        Ok(Project {
            dir: start.to_path_buf(),
            manifest: None,
        })
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.dir.join(MANIFEST)
    }

    pub fn lock_path(&self) -> PathBuf {
        self.dir.join(LOCKFILE)
    }

    /// The manifest's requirements.
    pub fn requirements(&self) -> Result<Vec<Requirement>> {
        let Some(m) = &self.manifest else {
            return Ok(Vec::new());
        };
        m.experts
            .iter()
            .map(|(name, req)| {
                crate::format::manifest::validate_name(name).map_err(|e| {
                    Error::input(
                        format!(
                            "{}: invalid expert name: {e}",
                            self.manifest_path().display()
                        ),
                        Some(crate::registry::index::NAME_HINT),
                    )
                })?;
                Requirement::new(name, req).map_err(|e| {
                    Error::input(
                        format!("{}: expert `{name}`: {e}", self.manifest_path().display()),
                        e.hint().as_deref(),
                    )
                })
            })
            .collect()
    }

    /// The lockfile, if there is one.
    pub fn read_lock(&self) -> Result<Option<Lockfile>> {
        let p = self.lock_path();
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", &p, e)),
        };
        let lock: Lockfile = toml_edit::de::from_str(&text).map_err(|e| {
            Error::input(
                format!("`{}` is not a valid lockfile: {e}", p.display()),
                Some("delete it and run `xpm install` to write a new one"),
            )
        })?;
        if lock.version != LOCK_VERSION {
            return Err(Error::input(
                format!(
                    "`{}` has lockfile version {}, this xpm reads version {LOCK_VERSION}",
                    p.display(),
                    lock.version
                ),
                Some("upgrade xpm, or delete the lockfile and run `xpm install`"),
            ));
        }
        Ok(Some(lock))
    }

    /// Write the lockfile atomically.
    pub fn write_lock(&self, lock: &Lockfile) -> Result<()> {
        let body = toml_edit::ser::to_string_pretty(lock).expect("lockfile serializes");
        let text = format!(
            "# This file is written by `xpm install`. Do not edit it by hand.\n\
             # It records the exact expert versions, sources and digests of this project.\n{body}"
        );
        write_atomic(&self.lock_path(), text.as_bytes())
    }

    /// Add (or update) requirements in `xpm.toml`, keeping its comments and layout.
    pub fn add_requirements(&self, reqs: &[Requirement]) -> Result<()> {
        let p = self.manifest_path();
        let text = std::fs::read_to_string(&p).at("read", &p)?;
        let mut doc: toml_edit::DocumentMut = text
            .parse()
            .map_err(|e| Error::input(format!("`{}` is not valid TOML: {e}", p.display()), None))?;
        // `[experts]` or an inline `experts = { … }`: either keeps what it holds.
        if doc.get("experts").and_then(|i| i.as_table_like()).is_none() {
            doc["experts"] = toml_edit::table();
        }
        for r in reqs {
            doc["experts"][r.name.as_str()] = toml_edit::value(r.req.to_string());
        }
        write_atomic(&p, doc.to_string().as_bytes())
    }
}

/// Read and check `xpm.toml`.
pub fn read_manifest(path: &Path) -> Result<ProjectManifest> {
    let text = std::fs::read_to_string(path).at("read", path)?;
    toml_edit::de::from_str(&text).map_err(|e| {
        Error::input(
            format!("`{}` is not a valid xpm.toml: {e}", path.display()),
            Some("see docs/registry-protocol.md (\"xpm.toml\") for the format"),
        )
    })
}

/// `xpm.lock`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Lockfile {
    /// Lockfile layout version (1).
    pub version: u32,
    /// The base model every locked expert applies to.
    pub base: BaseModel,
    /// One entry per expert, sorted by name.
    #[serde(default, rename = "expert")]
    pub experts: Vec<LockedExpert>,
}

/// One locked expert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LockedExpert {
    #[serde(deserialize_with = "crate::format::manifest::deserialize_name")]
    pub name: String,
    /// The exact version.
    #[schemars(with = "String")]
    pub version: semver::Version,
    /// The registry it resolves from (`file:///…` or an HTTP base URL).
    pub source: String,
    /// `sha256:<hex>` of the artifact; install refuses any other bytes.
    #[serde(deserialize_with = "crate::digest::deserialize")]
    pub cksum: String,
    /// Artifact size in bytes.
    pub size: u64,
    pub kind: ExpertKind,
    /// The minisign public key that signed this version (trust on first use: a later version
    /// signed by another key needs a rotation statement by this one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
}

impl Lockfile {
    pub fn get(&self, name: &str) -> Option<&LockedExpert> {
        self.experts.iter().find(|e| e.name == name)
    }
}

/// The `xpm.toml` that `xpm init` writes.
pub fn template(registry: Option<&str>, base: Option<&str>) -> String {
    let mut s = String::from(
        "# xpm project: the experts this project uses. `xpm install` resolves them (all on one\n\
         # base model), downloads and verifies them, and writes xpm.lock.\n",
    );
    match registry {
        Some(r) => s.push_str(&format!("registry = {}\n", toml_edit::value(r))),
        None => {
            s.push_str("# registry = \"http://127.0.0.1:8417\"   # default: $XPM_HOME/registry\n")
        }
    }
    match base {
        Some(b) => s.push_str(&format!("base = {}\n", toml_edit::value(b))),
        None => s.push_str(
            "# base = \"sentence-transformers/all-MiniLM-L6-v2\"   # or a sha256: base digest\n",
        ),
    }
    s.push_str("\n[experts]\n# sst2 = \"^1.2\"\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing (tests/fuzz/regressions/project_toml): adding a requirement to an
    /// `xpm.toml` whose experts are an inline table dropped the ones it held.
    #[test]
    fn adding_to_an_inline_experts_table_keeps_what_it_holds() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join(MANIFEST),
            "experts = { a = \"1\", \"ns/b\" = \">=0.1, <2\" }\n",
        )
        .unwrap();
        let p = Project::discover(d.path()).unwrap();
        p.add_requirements(&[Requirement::parse("c@^2").unwrap()])
            .unwrap();
        let m = read_manifest(&d.path().join(MANIFEST)).unwrap();
        let names: Vec<&str> = m.experts.keys().map(String::as_str).collect();
        assert_eq!(names, ["a", "c", "ns/b"]);
    }
}
