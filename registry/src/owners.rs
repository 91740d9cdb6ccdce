//! The server's own records beside the registry: who owns each name, and the audit log.
//!
//! ```text
//! <state dir>/owners/.lock           serialises owner checks and changes (an OS file lock)
//! <state dir>/owners/<index path>    {"owners": ["alice", "bob"]}, rewritten atomically
//! <state dir>/audit.log              one JSON object per write, appended (O_APPEND)
//! ```
//!
//! The state directory is the `--root` of a disk registry, or `--state-dir` (required with a
//! token config for an `s3://` registry; owners then live on that server's disk).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use xpm_core::Result;
use xpm_core::registry::index::index_rel_path;

/// The owners of one name.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OwnersFile {
    pub owners: Vec<String>,
}

/// Owners and audit log in a local directory.
pub struct State {
    dir: PathBuf,
    audit: Mutex<()>,
}

impl State {
    /// Open (creating) the state directory.
    pub fn open(dir: &Path) -> Result<Self> {
        let owners = dir.join("owners");
        std::fs::create_dir_all(&owners)
            .map_err(|e| xpm_core::Error::io("create directory", &owners, e))?;
        Ok(State {
            dir: dir.to_path_buf(),
            audit: Mutex::new(()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Hold this while checking and changing owners (and while publishing a new name, so two
    /// first publishes cannot both become its owner).
    pub fn lock(&self) -> Result<std::fs::File> {
        xpm_core::fsutil::lock_file(
            &self.dir.join("owners").join(".lock"),
            &xpm_core::printer::Printer::silent(),
        )
    }

    fn path(&self, name: &str) -> Result<PathBuf> {
        Ok(self.dir.join("owners").join(index_rel_path(name)?))
    }

    /// The recorded owners of `name`, if any were ever recorded.
    pub fn owners(&self, name: &str) -> Result<Option<Vec<String>>> {
        let p = self.path(name)?;
        match std::fs::read(&p) {
            Ok(bytes) => {
                let f: OwnersFile = serde_json::from_slice(&bytes).map_err(|e| {
                    xpm_core::Error::registry(
                        p.display().to_string(),
                        format!("damaged owners file: {e}"),
                        None,
                    )
                })?;
                Ok(Some(f.owners))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(xpm_core::Error::io("read", &p, e)),
        }
    }

    /// Record the owners of `name` (the caller holds [`State::lock`]).
    pub fn set_owners(&self, name: &str, owners: &[String]) -> Result<()> {
        let p = self.path(name)?;
        let dir = xpm_core::fsutil::parent_dir(&p);
        std::fs::create_dir_all(&dir)
            .map_err(|e| xpm_core::Error::io("create directory", &dir, e))?;
        let mut bytes = serde_json::to_vec(&OwnersFile {
            owners: owners.to_vec(),
        })
        .expect("owners serialize");
        bytes.push(b'\n');
        xpm_core::fsutil::write_atomic(&p, &bytes)
    }

    /// Forget the owners of `name` (undoing a first publish that failed).
    pub fn clear_owners(&self, name: &str) -> Result<()> {
        let p = self.path(name)?;
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(xpm_core::Error::io("remove", &p, e)),
        }
    }

    /// Append one record to `audit.log`: a single `write` of one line on a file opened with
    /// O_APPEND, then fsync.
    pub fn audit(&self, rec: &AuditRecord) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(rec).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let _g = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.dir.join("audit.log"))?;
        f.write_all(&line)?;
        f.sync_data()
    }
}

/// One line of `audit.log`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRecord {
    /// RFC 3339, UTC, seconds.
    pub time: String,
    /// Who (the token's identity).
    pub identity: String,
    /// `publish`, `yank`, `unyank`, `owner-add` or `owner-remove`.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The identities added or removed (owner changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owners: Option<Vec<String>>,
    /// `ok`, or `refused` / `failed`.
    pub result: String,
    /// The HTTP status answered.
    pub status: u16,
    /// The error answered, for a write that did not happen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AuditRecord {
    pub fn new(identity: &str, action: &str) -> Self {
        AuditRecord {
            time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            identity: identity.to_string(),
            action: action.to_string(),
            name: None,
            version: None,
            digest: None,
            owners: None,
            result: String::new(),
            status: 0,
            error: None,
        }
    }
}
