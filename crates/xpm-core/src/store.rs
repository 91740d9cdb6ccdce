//! The local store: verified artifacts in a content-addressed cache, and the record of which
//! expert versions are installed.
//!
//! ```text
//! $XPM_CACHE_DIR (default $XPM_HOME/cache)
//!   blobs-v1/sha256/ab/<hex>.xpm      artifacts, named by the sha256 of their bytes
//!   tmp-v1/                           downloads in flight (renamed into blobs-v1 when verified)
//!   index-v1/<registry>/…             cached index files with their ETags
//!   .lock                             held while an install commits
//! $XPM_HOME/installed-v1/<name>/<version>.json   one record per installed version
//! ```
//!
//! Bucket names carry a layout version, so a future layout lives beside this one. Downloads
//! stream into a temporary file while hashing and are kept only if size and sha256 match the
//! index; an install renames everything into place only after every download is verified, under
//! the store lock, so a failed install leaves the store as it was and two processes can install
//! into one `$XPM_HOME` at once.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoResultExt, Result};
use crate::format::{BaseModel, ExpertKind};
use crate::fsutil::write_atomic_nosync;
use crate::home::XpmHome;
use crate::printer::Progress;
use crate::registry::http::retry;
use crate::registry::{IndexLine, Registry};
use sha2::{Digest, Sha256};

/// One installed expert version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Installed {
    #[serde(deserialize_with = "crate::format::manifest::deserialize_name")]
    pub name: String,
    #[schemars(with = "String")]
    pub version: semver::Version,
    /// `sha256:<hex>` of the artifact.
    #[serde(deserialize_with = "crate::digest::deserialize")]
    pub cksum: String,
    pub size: u64,
    pub base: BaseModel,
    pub kind: ExpertKind,
    /// The registry it came from.
    pub source: String,
    /// When it was installed (RFC 3339).
    pub installed_at: String,
}

/// What [`Store::verify_all`] found for one installed expert.
#[derive(Debug, Clone, Serialize)]
pub struct StoreCheck {
    /// `name@version`.
    pub id: String,
    pub path: PathBuf,
    /// What is wrong; `None` when the artifact is intact.
    pub problem: Option<String>,
}

impl StoreCheck {
    /// The error for a store where any of `checks` found damage (`xpm verify --store` fails).
    pub fn damage(checks: &[StoreCheck]) -> Result<()> {
        let damaged = checks.iter().filter(|c| c.problem.is_some()).count();
        if damaged > 0 {
            return Err(Error::input(
                format!(
                    "{damaged} of {} installed artifact(s) in the store are damaged",
                    checks.len()
                ),
                Some("`xpm install` in the projects that use them fetches them again"),
            ));
        }
        Ok(())
    }
}

/// A downloaded, verified artifact waiting to be committed into the store.
pub struct Staged {
    tmp: tempfile::TempPath,
    cksum: String,
}

impl Staged {
    /// The downloaded, digest-checked file, before [`Store::commit`] moves it into the store.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Its `sha256:` digest.
    pub fn cksum(&self) -> &str {
        &self.cksum
    }
}

/// The store under one `$XPM_HOME`.
#[derive(Debug, Clone)]
pub struct Store {
    cache: PathBuf,
    installed: PathBuf,
    printer: crate::printer::Printer,
}

/// The store's exclusive lock, held until dropped.
pub struct StoreLock {
    _file: File,
}

impl Store {
    pub fn new(home: &XpmHome) -> Self {
        Store {
            cache: home.cache.clone(),
            installed: home.root.join("installed-v1"),
            printer: crate::printer::Printer::silent(),
        }
    }

    /// Report through `printer` (a wait for the store's lock).
    pub fn with_printer(mut self, printer: crate::printer::Printer) -> Self {
        self.printer = printer;
        self
    }

    /// Where the artifact with this digest lives once installed.
    pub fn blob_path(&self, cksum: &str) -> PathBuf {
        let hex = cksum.strip_prefix("sha256:").unwrap_or(cksum);
        self.cache
            .join("blobs-v1/sha256")
            .join(&hex[..2.min(hex.len())])
            .join(format!("{hex}.xpm"))
    }

    /// Whether the artifact is in the store with the expected size.
    pub fn has_blob(&self, cksum: &str, size: u64) -> bool {
        std::fs::metadata(self.blob_path(cksum)).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    /// Take the store's exclusive lock (blocks while another process commits).
    pub fn lock(&self) -> Result<StoreLock> {
        Ok(StoreLock {
            _file: crate::fsutil::lock_file(&self.cache.join(".lock"), &self.printer)?,
        })
    }

    /// Download `line`'s artifact from `reg` into a temporary file, verifying size and sha256
    /// while streaming; retried on transient failures. `progress` advances by the bytes
    /// received (and goes back when a retry starts over).
    pub fn fetch(
        &self,
        reg: &dyn Registry,
        line: &IndexLine,
        progress: &dyn Progress,
    ) -> Result<Staged> {
        let tmp_dir = self.cache.join("tmp-v1");
        std::fs::create_dir_all(&tmp_dir).at("create directory", &tmp_dir)?;
        remove_stale_temp_files(&tmp_dir);
        retry(&self.printer, || {
            let tmp = crate::fsutil::temp_builder(false)
                .tempfile_in(&tmp_dir)
                .at("create a temporary file in", &tmp_dir)?;
            let mut reader = reg.open_blob(line)?;
            let mut file = tmp.as_file();
            let mut hasher = Sha256::new();
            // Small chunks: each is hashed and written while it is still in the CPU cache
            // (1 MiB chunks measured ~1.5× slower on the install benchmark).
            let mut buf = vec![0u8; 64 << 10];
            let mut got = 0u64;
            let broke = |got: u64, e: std::io::Error| Error::Registry {
                url: reg.source().to_string(),
                message: format!(
                    "downloading {}: the connection broke after {got} of {} bytes: {e}",
                    line.id(),
                    line.size
                ),
                hint: Some("check that the registry is running; then retry".into()),
                transient: true,
            };
            let result: Result<()> = (|| {
                loop {
                    let mut fill = 0;
                    while fill < buf.len() {
                        match reader.read(&mut buf[fill..]) {
                            Ok(0) => break,
                            Ok(n) => fill += n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(broke(got + fill as u64, e)),
                        }
                    }
                    if fill == 0 {
                        return Ok(());
                    }
                    got += fill as u64;
                    if got > line.size {
                        return Err(Error::registry(
                            reg.source(),
                            format!(
                                "downloading {}: the registry sent more than the {} bytes its index declares",
                                line.id(),
                                line.size
                            ),
                            Some("the registry's blob is damaged; tell its operator"),
                        ));
                    }
                    hasher.update(&buf[..fill]);
                    file.write_all(&buf[..fill]).at("write", tmp.path())?;
                    progress.inc(fill as u64);
                }
            })();
            if let Err(e) = result {
                progress.dec(got);
                return Err(e);
            }
            let digest = crate::digest::format_digest(&hasher.finalize());
            if got != line.size || digest != line.cksum {
                progress.dec(got);
                return Err(Error::registry(
                    reg.source(),
                    format!(
                        "downloading {}: the artifact does not match the registry's index \
                         (expected {} bytes with {}, got {got} bytes with {digest}); nothing was kept",
                        line.id(),
                        line.size,
                        line.cksum
                    ),
                    Some("the registry's copy is damaged or was replaced; tell its operator"),
                ));
            }
            check_identity(tmp.path(), line, reg.source())?;
            // No fsync: a cache entry is content-addressed and every read of an artifact
            // checks the manifest and frame digests, so a file damaged by a crash is caught
            // where it is used (and `xpm verify` names it). Skipping it makes installs of
            // many large experts markedly faster (docs/benchmarks.md); the lockfile is fsynced.
            Ok(Staged {
                tmp: tmp.into_temp_path(),
                cksum: line.cksum.clone(),
            })
        })
    }

    /// Whether the cached blob for `line` is intact: its whole-file sha256 equals the index's
    /// (so nothing in it changed since it was verified), and its manifest names the expert,
    /// version, kind and base that `line` names. A damaged entry is `Ok(false)`: fetch it again.
    pub fn cached_intact(&self, line: &IndexLine) -> Result<bool> {
        let p = self.blob_path(&line.cksum);
        let f = File::open(&p).at("open", &p)?;
        let (digest, size) = crate::digest::sha256_reader(f).at("read", &p)?;
        if digest != line.cksum || size != line.size {
            return Ok(false);
        }
        check_identity(&p, line, "the store")?;
        Ok(true)
    }

    /// Check every installed artifact: present, its whole-file sha256 equal to its record's,
    /// and every tensor readable (frame digests, masks, finite values). One result per install
    /// record, in the order of [`installed`](Self::installed).
    pub fn verify_all(&self, printer: &crate::printer::Printer) -> Result<Vec<StoreCheck>> {
        let records = self.installed()?;
        let pb = printer.progress(records.len() as u64, "Verifying");
        let out = records
            .into_iter()
            .map(|r| {
                let path = self.blob_path(&r.cksum);
                // One read of the file: `verify` hashes it whole and checks every tensor.
                let problem = if !path.is_file() {
                    Some("its artifact is missing from the store".to_string())
                } else {
                    match crate::format::verify::verify(&path, &crate::printer::Printer::silent()) {
                        Err(e) => Some(e.to_string()),
                        Ok(v) if v.sha256 != r.cksum => Some(format!(
                            "its artifact has digest {}, not the recorded {}",
                            v.sha256, r.cksum
                        )),
                        Ok(_) => None,
                    }
                };
                pb.inc(1);
                StoreCheck {
                    id: format!("{}@{}", r.name, r.version),
                    path,
                    problem,
                }
            })
            .collect();
        pb.finish_and_clear();
        Ok(out)
    }

    /// Move verified downloads into the store and write the install records, under the lock.
    pub fn commit(&self, staged: Vec<Staged>, records: &[Installed]) -> Result<()> {
        let _lock = self.lock()?;
        for s in staged {
            let dest = self.blob_path(&s.cksum);
            let dir = crate::fsutil::parent_dir(&dest);
            std::fs::create_dir_all(&dir).at("create directory", &dir)?;
            s.tmp
                .persist(&dest)
                .map_err(|e| Error::io("store", &dest, e.error))?;
        }
        for r in records {
            let p = self.record_path(&r.name, &r.version);
            let json = serde_json::to_vec_pretty(r).expect("record serializes");
            // Atomic but not fsynced, like the blobs it points to (see `fetch`).
            write_atomic_nosync(&p, &json)?;
        }
        Ok(())
    }

    fn record_path(&self, name: &str, version: &semver::Version) -> PathBuf {
        self.installed.join(name).join(format!("{version}.json"))
    }

    /// Every installed version, sorted by name then version.
    pub fn installed(&self) -> Result<Vec<Installed>> {
        let mut out = Vec::new();
        collect_records(&self.installed, &mut out)?;
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.version.cmp(&b.version)));
        Ok(out)
    }

    /// The highest installed version of `name` matching `req` whose artifact is present.
    pub fn find_installed(
        &self,
        name: &str,
        req: &semver::VersionReq,
    ) -> Result<Option<Installed>> {
        let mut best: Option<Installed> = None;
        let dir = self.installed.join(name);
        if !dir.is_dir() {
            return Ok(None);
        }
        let mut recs = Vec::new();
        collect_records(&dir, &mut recs)?;
        for r in recs {
            if r.name == name
                && req.matches(&r.version)
                && self.has_blob(&r.cksum, r.size)
                && best.as_ref().is_none_or(|b| r.version > b.version)
            {
                best = Some(r);
            }
        }
        Ok(best)
    }
}

impl Store {
    /// The artifact a merge input names: an existing file path as is; otherwise a requirement
    /// (`name`, `name@req`) resolved to the version the project's lockfile pins, else the
    /// highest installed version that matches.
    pub fn locate(&self, input: &str, lock: Option<&crate::project::Lockfile>) -> Result<PathBuf> {
        let as_path = Path::new(input);
        if as_path.exists() || input.ends_with(".xpm") {
            return Ok(as_path.to_path_buf());
        }
        let Ok(req) = crate::resolve::Requirement::parse(input) else {
            // Not a requirement either: let the reader report the missing file.
            return Ok(as_path.to_path_buf());
        };
        if let Some(e) = lock.and_then(|l| l.get(&req.name))
            && req.req.matches(&e.version)
            && self.has_blob(&e.cksum, e.size)
        {
            return Ok(self.blob_path(&e.cksum));
        }
        match self.find_installed(&req.name, &req.req)? {
            Some(r) => Ok(self.blob_path(&r.cksum)),
            None => Err(Error::input(
                format!(
                    "no installed version of `{}` matches `{}`",
                    req.name, req.req
                ),
                Some(&format!(
                    "install it first with `xpm install {input}`, or give a path to a .xpm file"
                )),
            )),
        }
    }
}

/// Remove `.xpm-tmp-*` files in `dir` untouched for an hour: what interrupted downloads left
/// behind. A download in progress writes to its file continually, so it is never that old.
fn remove_stale_temp_files(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let hour = std::time::Duration::from_secs(3600);
    for e in rd.flatten() {
        let stale = e.file_name().to_string_lossy().starts_with(".xpm-tmp-")
            && e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > hour));
        if stale {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The artifact at `path` (whose bytes match `line`'s digest) must be the expert `line` says it
/// is: same name, version, kind and base digest in its manifest. An index line or a lockfile
/// entry that points at another expert's artifact is refused.
fn check_identity(path: &Path, line: &IndexLine, source: &str) -> Result<()> {
    let reader = crate::format::ArtifactReader::open(path)?;
    let m = reader.manifest();
    let mut wrong = Vec::new();
    if m.name != line.name {
        wrong.push(format!("name `{}`", m.name));
    }
    if m.version != line.vers {
        wrong.push(format!("version {}", m.version));
    }
    if m.kind != line.kind {
        wrong.push(format!("kind {}", m.kind));
    }
    if m.base.digest != line.base.digest {
        wrong.push(format!("base {}", m.base.digest));
    }
    if wrong.is_empty() {
        return Ok(());
    }
    Err(Error::registry(
        source,
        format!(
            "{} ({} {}) points at an artifact whose manifest says {}; nothing was installed",
            line.id(),
            line.kind,
            line.cksum,
            wrong.join(", ")
        ),
        Some(
            "the index or lockfile entry does not describe the artifact it names; \
             if it is a lockfile, delete it and run `xpm install`, else tell the registry's operator",
        ),
    ))
}

fn collect_records(dir: &Path, out: &mut Vec<Installed>) -> Result<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("read directory", dir, e)),
    };
    for e in rd {
        let p = e.at("read directory", dir)?.path();
        if p.is_dir() {
            collect_records(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "json") {
            let bytes = std::fs::read(&p).at("read", &p)?;
            let rec: Installed = serde_json::from_slice(&bytes).map_err(|e| {
                Error::input(
                    format!("`{}` is not a valid install record: {e}", p.display()),
                    Some("remove it and run `xpm install` again"),
                )
            })?;
            out.push(rec);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::manifest::Manifest;
    use crate::format::{ArtifactWriter, Content, Dtype, TensorData, encode_tensor};
    use crate::printer::NoProgress;
    use crate::registry::LocalRegistry;

    /// A local registry with `x@1.0.0` published, and a store in another directory.
    fn setup(d: &Path) -> (Store, LocalRegistry, IndexLine) {
        let art = d.join("x.xpm");
        let mut w = ArtifactWriter::create(&art, 1).unwrap();
        let t = TensorData {
            name: "w".into(),
            shape: vec![4],
            dtype: Dtype::F32,
            content: Content::Sparse {
                indices: vec![1, 3],
                values: Dtype::F32.from_f32(&[0.5, -1.0]),
                block_size: None,
            },
        };
        w.push(encode_tensor(&t, 1).unwrap()).unwrap();
        let base = BaseModel {
            id: "b".into(),
            digest: crate::digest::sha256(b"b"),
        };
        let m = w
            .finish(Manifest::new(
                "x",
                "1.0.0".parse().unwrap(),
                base,
                ExpertKind::Sparse,
            ))
            .unwrap();
        let (cksum, size) = crate::digest::sha256_reader(File::open(&art).unwrap()).unwrap();
        let reg = LocalRegistry::open_or_init(&d.join("reg")).unwrap();
        let line = IndexLine::for_artifact(&m, &cksum, size);
        reg.publish(&art, &line, false).unwrap();
        (Store::new(&home(d)), reg, line)
    }

    #[test]
    fn fetch_commit_locate_and_verify_the_store() {
        let d = tempfile::tempdir().unwrap();
        let (store, reg, line) = setup(d.path());
        let backend = open_registry(d.path());
        assert!(!store.has_blob(&line.cksum, line.size));
        let staged = store.fetch(backend.as_ref(), &line, &NoProgress).unwrap();
        let record = Installed {
            name: line.name.clone(),
            version: line.vers.clone(),
            cksum: line.cksum.clone(),
            size: line.size,
            base: line.base.clone(),
            kind: line.kind,
            source: backend.source().to_string(),
            installed_at: "now".into(),
        };
        store
            .commit(vec![staged], std::slice::from_ref(&record))
            .unwrap();
        assert!(store.has_blob(&line.cksum, line.size));
        assert!(store.cached_intact(&line).unwrap());
        assert_eq!(store.installed().unwrap(), vec![record]);
        assert_eq!(
            store.locate("x@^1", None).unwrap(),
            store.blob_path(&line.cksum)
        );
        assert!(store.locate("y", None).is_err());
        let checks = store
            .verify_all(&crate::printer::Printer::silent())
            .unwrap();
        assert!(checks.iter().all(|c| c.problem.is_none()), "{checks:?}");
        // A damaged blob of the right size: not intact, and named by the store check.
        let p = store.blob_path(&line.cksum);
        let mut bytes = std::fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 1;
        std::fs::write(&p, bytes).unwrap();
        assert!(!store.cached_intact(&line).unwrap());
        let checks = store
            .verify_all(&crate::printer::Printer::silent())
            .unwrap();
        assert!(checks[0].problem.is_some());
        drop(reg);
    }

    #[test]
    fn an_index_line_that_names_another_artifact_is_refused_after_download() {
        let d = tempfile::tempdir().unwrap();
        let (store, _reg, line) = setup(d.path());
        let backend = open_registry(d.path());
        // Same bytes and digest, but the line claims another version.
        let mut lie = line.clone();
        lie.vers = "2.0.0".parse().unwrap();
        let e = store
            .fetch(backend.as_ref(), &lie, &NoProgress)
            .err()
            .unwrap();
        assert!(e.to_string().contains("manifest says version 1.0.0"), "{e}");
    }

    fn home(d: &Path) -> XpmHome {
        XpmHome {
            root: d.join("home"),
            cache: d.join("home/cache"),
        }
    }

    fn open_registry(d: &Path) -> Box<dyn Registry> {
        let loc = format!("file://{}", d.join("reg").display());
        crate::registry::open(&loc, &home(d), &Default::default(), false).unwrap()
    }
}
