//! A registry in a local directory (`file://…`): the embedded default at `$XPM_HOME/registry`,
//! and the disk storage of the registry server. Layout (docs/registry-protocol.md):
//!
//! ```text
//! config.json                 dl template, api, auth-required
//! index/<prefix>/<name>       one JSON line per version
//! blobs/sha256/ab/<hex>       the .xpm files, addressed by sha256
//! .lock                       serialises publishers (an OS file lock, released on exit)
//! ```
//!
//! Every write is a temporary file in the same directory, fsync, rename: a reader sees the old
//! or the new index file, never a torn one, and a publish that fails leaves the index as it was.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoResultExt, Result};
use crate::fsutil::write_atomic;

use super::index::{
    IndexLine, RegistryConfig, SearchHit, blob_rel_path, collect_search, index_rel_path,
    parse_index, parse_index_of, render_index,
};

/// A registry rooted at a directory.
#[derive(Debug, Clone)]
pub struct LocalRegistry {
    root: PathBuf,
    printer: crate::printer::Printer,
}

/// An exclusive lock on the registry, held until dropped.
pub struct RegistryLock {
    _file: File,
}

impl LocalRegistry {
    /// Open the registry at `root`, creating its layout and `config.json` if it does not exist.
    pub fn open_or_init(root: &Path) -> Result<Self> {
        let reg = LocalRegistry {
            root: root.to_path_buf(),
            printer: crate::printer::Printer::silent(),
        };
        let cfg = root.join("config.json");
        if !cfg.exists() {
            std::fs::create_dir_all(root.join("index")).at("create directory", root)?;
            std::fs::create_dir_all(root.join("blobs")).at("create directory", root)?;
            let config = RegistryConfig::directory_layout();
            let _lock = reg.lock()?;
            if !cfg.exists() {
                write_atomic(&cfg, &serde_json::to_vec_pretty(&config).expect("config"))?;
            }
        }
        Ok(reg)
    }

    /// Open an existing registry; an error if `root` holds none.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.join("config.json").is_file() {
            return Err(Error::input(
                format!(
                    "`{}` is not an xpm registry (no config.json)",
                    root.display()
                ),
                Some(
                    "check the --registry path; `xpm publish` creates a local registry on first use",
                ),
            ));
        }
        Ok(LocalRegistry {
            root: root.to_path_buf(),
            printer: crate::printer::Printer::silent(),
        })
    }

    /// Report through `printer` (a wait for the registry's lock).
    pub fn with_printer(mut self, printer: crate::printer::Printer) -> Self {
        self.printer = printer;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Take the registry's exclusive lock (blocks while another publisher holds it).
    pub fn lock(&self) -> Result<RegistryLock> {
        Ok(RegistryLock {
            _file: crate::fsutil::lock_file(&self.root.join(".lock"), &self.printer)?,
        })
    }

    /// The registry's `config.json`.
    pub fn config(&self) -> Result<RegistryConfig> {
        let p = self.root.join("config.json");
        let bytes = std::fs::read(&p).at("read", &p)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::input(
                format!("`{}` is not a valid registry config: {e}", p.display()),
                None,
            )
        })
    }

    /// Path of `name`'s index file.
    pub fn index_path(&self, name: &str) -> Result<PathBuf> {
        Ok(self.root.join("index").join(index_rel_path(name)?))
    }

    /// The raw index file of `name`, or `None` if nothing was published under it.
    pub fn read_index_bytes(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let p = self.index_path(name)?;
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read", &p, e)),
        }
    }

    /// The parsed index of `name`.
    pub fn read_index(&self, name: &str) -> Result<Option<Vec<IndexLine>>> {
        match self.read_index_bytes(name)? {
            Some(b) => Ok(Some(parse_index_of(
                &b,
                &self.index_path(name)?.display().to_string(),
                name,
            )?)),
            None => Ok(None),
        }
    }

    /// Where the blob with this `sha256:` digest lives.
    pub fn blob_path(&self, cksum: &str) -> PathBuf {
        self.root.join(blob_rel_path(cksum))
    }

    /// Add a version: store the artifact's bytes under its digest, then append `line` to the
    /// index, under the registry lock. `take` moves `artifact` instead of copying it (it must
    /// then be on the same file system). Refuses a version that exists already, yanked or not,
    /// whatever its bytes: versions are immutable.
    pub fn publish(&self, artifact: &Path, line: &IndexLine, take: bool) -> Result<()> {
        let _lock = self.lock()?;
        let mut lines = self.read_index(&line.name)?.unwrap_or_default();
        // Build metadata does not make a new version (as in Cargo): 1.0.0+a is 1.0.0.
        if let Some(old) = lines.iter().find(|l| same_version(&l.vers, &line.vers)) {
            return Err(Error::Conflict {
                message: format!(
                    "{} already exists in the registry (published {}{}); versions are immutable",
                    line.id(),
                    old.pubtime,
                    if old.yanked { ", yanked" } else { "" }
                ),
                hint: Some("bump the version (e.g. with `--version`) and publish again".into()),
            });
        }
        let blob = self.blob_path(&line.cksum);
        // Another version may share these bytes; keep the stored copy only if it is intact
        // (this also repairs a blob damaged on disk).
        let blob_ok = std::fs::metadata(&blob).is_ok_and(|m| m.len() == line.size)
            && File::open(&blob)
                .and_then(crate::digest::sha256_reader)
                .is_ok_and(|(d, _)| d == line.cksum);
        if blob_ok {
            if take {
                std::fs::remove_file(artifact).at("remove", artifact)?;
            }
        } else {
            let dir = crate::fsutil::parent_dir(&blob);
            std::fs::create_dir_all(&dir).at("create directory", &dir)?;
            if take {
                std::fs::rename(artifact, &blob).at("store", &blob)?;
            } else {
                // Hash while copying: the bytes stored are the bytes the line describes, even
                // if the source file changed after it was verified.
                let (tmp, w) = crate::fsutil::temp_file_beside(&blob)?;
                let mut w = crate::digest::HashingWriter::new(w);
                let mut src = File::open(artifact).at("open", artifact)?;
                std::io::copy(&mut src, &mut w).at("copy", artifact)?;
                let (digest, w) = w.finish();
                if crate::digest::format_digest(&digest) != line.cksum {
                    return Err(Error::input(
                        format!(
                            "`{}` changed while it was being published",
                            artifact.display()
                        ),
                        Some("publish it again once nothing else writes to it"),
                    ));
                }
                let f = w
                    .into_inner()
                    .map_err(|e| Error::io("write", &blob, e.into_error()))?;
                f.sync_all().at("write", &blob)?;
                tmp.persist(&blob)
                    .map_err(|e| Error::io("store", &blob, e.error))?;
            }
        }
        lines.push(line.clone());
        write_atomic(&self.index_path(&line.name)?, &render_index(&lines))
    }

    /// Set or clear `yanked` on `name@version`; returns the updated line.
    pub fn set_yanked(
        &self,
        name: &str,
        version: &semver::Version,
        yanked: bool,
    ) -> Result<IndexLine> {
        let _lock = self.lock()?;
        let mut lines = self.read_index(name)?.ok_or_else(|| unknown_expert(name))?;
        let Some(l) = lines.iter_mut().find(|l| &l.vers == version) else {
            let known: Vec<String> = lines.iter().map(|l| l.vers.to_string()).collect();
            return Err(Error::input(
                format!("{name}@{version} is not in the registry"),
                Some(&format!("published versions: {}", known.join(", "))),
            ));
        };
        l.yanked = yanked;
        let out = l.clone();
        write_atomic(&self.index_path(name)?, &render_index(&lines))?;
        Ok(out)
    }

    /// Every expert whose name or description contains all words of `query`.
    pub fn search(&self, query: &str) -> Result<Vec<SearchHit>> {
        Ok(self.search_skipping(query)?.0)
    }

    /// [`search`](Self::search), and the errors of index files that could not be read or
    /// parsed: those are skipped (one damaged file must not hide every other expert), and the
    /// caller reports them (the server logs them with the file's path).
    pub fn search_skipping(&self, query: &str) -> Result<(Vec<SearchHit>, Vec<Error>)> {
        let index = self.root.join("index");
        let parsed = walk_files(&index)?.into_iter().map(|path| {
            std::fs::read(&path)
                .at("read", &path)
                .and_then(|bytes| parse_index(&bytes, &path.display().to_string()))
                .map(Some)
        });
        Ok(collect_search(query, parsed))
    }
}

/// Equal versions, ignoring build metadata.
pub fn same_version(a: &semver::Version, b: &semver::Version) -> bool {
    (a.major, a.minor, a.patch, &a.pre) == (b.major, b.minor, b.patch, &b.pre)
}

/// The error for a name with no index file.
pub fn unknown_expert(name: &str) -> Error {
    Error::input(
        format!("no expert named `{name}` in the registry"),
        Some("check the spelling, or look with `xpm search WORDS`"),
    )
}

fn walk_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io("read directory", dir, e)),
    };
    for e in rd {
        let e = e.at("read directory", dir)?;
        let p = e.path();
        let name = e.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        if p.is_dir() {
            out.extend(walk_files(&p)?);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}
