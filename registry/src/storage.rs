//! Where the server keeps the index and the blobs. The API layer talks only to [`Storage`];
//! [`DiskStorage`] is the local-disk implementation (the same layout as a `file://` registry,
//! so a server's root can also be used directly as a local registry); [`S3Storage`] keeps them
//! in an S3-compatible bucket (the same layout again, the client's `s3://` backend:
//! conditional puts give the atomic index updates).

use std::io::Read;
use std::path::{Path, PathBuf};

use xpm_core::Result;

use xpm_core::registry::{IndexLine, LocalRegistry, S3Registry, SearchHit};

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

/// A registry in an S3-compatible bucket (`--storage s3://BUCKET/PREFIX`): the `s3://` client
/// backend of xpm-core, credentials and endpoint from the AWS environment and
/// `$XPM_S3_ENDPOINT`. Several servers (and `xpm publish --registry s3://…`) may write to one
/// bucket at once. Uploads are staged in a local temporary directory.
pub struct S3Storage {
    reg: S3Registry,
    staging: tempfile::TempDir,
}

impl S3Storage {
    /// Connect to `bucket`, probe that the engine enforces conditional writes (refusing one
    /// that does not) and create `config.json` if missing. The bucket must exist.
    pub fn open(bucket: &str, prefix: &str) -> Result<Self> {
        let reg = S3Registry::connect(bucket, prefix, &Default::default())?;
        reg.init()?;
        let staging = tempfile::Builder::new()
            .prefix("xpm-registry-staging-")
            .tempdir()
            .map_err(|e| xpm_core::Error::io("create", std::env::temp_dir(), e))?;
        Ok(S3Storage { reg, staging })
    }
}

impl Storage for S3Storage {
    fn index(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.reg.read_index_bytes(name)
    }

    fn index_lines(&self, name: &str) -> Result<Option<Vec<IndexLine>>> {
        self.reg.read_index(name)
    }

    fn open_blob(&self, cksum: &str) -> Result<Option<(u64, Box<dyn Read + Send>)>> {
        self.reg.open_blob_by_digest(cksum)
    }

    fn staging_dir(&self) -> PathBuf {
        self.staging.path().to_path_buf()
    }

    fn publish(&self, staged: &Path, line: &IndexLine) -> Result<()> {
        self.reg
            .publish(staged, line, &xpm_core::printer::NoProgress)?;
        // The bucket holds the bytes now; the staged file is this storage's to remove.
        let _ = std::fs::remove_file(staged);
        Ok(())
    }

    fn set_yanked(&self, name: &str, version: &semver::Version, yanked: bool) -> Result<IndexLine> {
        self.reg.set_yanked(name, version, yanked)
    }

    fn search(&self, query: &str) -> Result<Vec<SearchHit>> {
        let (hits, skipped) = self.reg.search_skipping(query)?;
        for e in skipped {
            eprintln!("xpm-registry: skipping a damaged index object: {e}");
        }
        Ok(hits)
    }
}
