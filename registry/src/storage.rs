//! Where the server keeps the index and the blobs. The API layer talks only to [`Storage`];
//! [`DiskStorage`] is the local-disk implementation (the same layout as a `file://` registry,
//! so a server's root can also be used directly as a local registry). An object-storage
//! backend implements the same trait (conditional puts give the atomic index updates).

use std::io::Read;
use std::path::{Path, PathBuf};

use xpm_core::Result;

use xpm_core::registry::{IndexLine, LocalRegistry, SearchHit};

/// Storage for one registry. Methods block; the API layer calls them on blocking threads.
pub trait Storage: Send + Sync + 'static {
    /// The raw index file of `name`, if any version was published.
    fn index(&self, name: &str) -> Result<Option<Vec<u8>>>;
    /// The parsed index of `name`.
    fn index_lines(&self, name: &str) -> Result<Option<Vec<IndexLine>>>;
    /// The blob with this `sha256:` digest and its length, if stored.
    fn open_blob(&self, cksum: &str) -> Result<Option<(u64, Box<dyn Read + Send>)>>;
    /// A directory for uploads in flight, on the same file system as the blobs where that
    /// matters (so [`Storage::publish`] can move instead of copy).
    fn staging_dir(&self) -> PathBuf;
    /// Store the verified upload at `staged` and append `line` to the index, atomically;
    /// refuses an existing version with [`xpm_core::Error::Conflict`].
    fn publish(&self, staged: &Path, line: &IndexLine) -> Result<()>;
    /// Set or clear `yanked`; returns the updated line.
    fn set_yanked(&self, name: &str, version: &semver::Version, yanked: bool) -> Result<IndexLine>;
    /// Experts whose name or description contains every word of `query`.
    fn search(&self, query: &str) -> Result<Vec<SearchHit>>;
}

/// A registry on local disk.
pub struct DiskStorage {
    reg: LocalRegistry,
}

impl DiskStorage {
    /// Open (creating if needed) the registry at `root`; clears uploads left by a crash.
    pub fn open(root: &Path) -> Result<Self> {
        let reg = LocalRegistry::open_or_init(root)?;
        let tmp = root.join("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)
            .map_err(|e| xpm_core::Error::io("create directory", &tmp, e))?;
        Ok(DiskStorage { reg })
    }
}

impl Storage for DiskStorage {
    fn index(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.reg.read_index_bytes(name)
    }

    fn index_lines(&self, name: &str) -> Result<Option<Vec<IndexLine>>> {
        self.reg.read_index(name)
    }

    fn open_blob(&self, cksum: &str) -> Result<Option<(u64, Box<dyn Read + Send>)>> {
        let p = self.reg.blob_path(cksum);
        match std::fs::File::open(&p) {
            Ok(f) => {
                let len = f
                    .metadata()
                    .map_err(|e| xpm_core::Error::io("read", &p, e))?
                    .len();
                Ok(Some((len, Box::new(f))))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(xpm_core::Error::io("open", &p, e)),
        }
    }

    fn staging_dir(&self) -> PathBuf {
        self.reg.root().join("tmp")
    }

    fn publish(&self, staged: &Path, line: &IndexLine) -> Result<()> {
        self.reg.publish(staged, line, true)
    }

    fn set_yanked(&self, name: &str, version: &semver::Version, yanked: bool) -> Result<IndexLine> {
        self.reg.set_yanked(name, version, yanked)
    }

    fn search(&self, query: &str) -> Result<Vec<SearchHit>> {
        let (hits, skipped) = self.reg.search_skipping(query)?;
        for e in skipped {
            // The error names the index file (its source) and the line.
            match &e {
                xpm_core::Error::Registry { url, message, .. } => {
                    eprintln!("xpm-registry: skipping a damaged index file {url}: {message}")
                }
                other => eprintln!("xpm-registry: skipping a damaged index file: {other}"),
            }
        }
        Ok(hits)
    }
}
