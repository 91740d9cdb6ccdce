//! A registry in an S3-compatible bucket (`s3://BUCKET/PREFIX`), through the `object_store`
//! crate. The layout under `PREFIX/` is exactly a registry directory's (local.rs,
//! docs/registry-protocol.md §3 and §13):
//!
//! ```text
//! config.json                 written once by the first publish (create-only PUT)
//! index/<index path>          one JSON line per version; `Cache-Control: no-cache`
//! blobs/sha256/ab/<hex>       the .xpm files, addressed by sha256; immutable
//! ```
//!
//! so any plain HTTP front of the bucket (a public-read bucket URL, a CDN) serves installs to the
//! HTTP client, with no server. There is no lock file: every write is conditional.
//!
//! - A blob is written with a create-only PUT (`If-None-Match: *`); one that exists already
//!   holds the same bytes (its key is their digest) and is checked, not rewritten. Artifacts
//!   over [`MULTIPART_THRESHOLD`] go up in parts (which S3 cannot make conditional), after a
//!   HEAD, hashed while they are read; the stored size is checked once the upload completes.
//! - An index object is updated by compare-and-swap: GET (body and ETag), edit, PUT with
//!   `If-Match: <etag>` (or `If-None-Match: *` for a new expert); when another publisher won the
//!   race the PUT fails with 412 and the edit is redone on the new object, up to
//!   [`CAS_ATTEMPTS`] times. Existing lines are kept byte for byte (a publish appends; a yank
//!   rewrites only its own line).
//! - Engines that accept conditional headers and ignore them exist (they answer 200 and
//!   overwrite). Before its first write, a process probes the engine (a create-only PUT of a
//!   probe key, twice; then a PUT with a wrong `If-Match`) and refuses to write to one that
//!   does not answer 412, naming what it ignored.
//!
//! `object_store` is async; the [`Registry`] trait is blocking, so the backend owns a small
//! tokio runtime and blocks on it (never call it from inside another runtime's async task;
//! `spawn_blocking` threads are fine).

use super::runtime::Runtime;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as Key;
use object_store::{
    Attribute, Attributes, ClientOptions as StoreClientOptions, ObjectStore, ObjectStoreExt,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, RetryConfig, UpdateVersion,
    WriteMultipart,
};
use sha2::{Digest, Sha256};

use crate::error::{Error, IoResultExt, Result};
use crate::printer::{Printer, Progress};

use super::index::{
    Edit, IndexLine, RegistryConfig, SearchHit, SearchResults, blob_rel_path, collect_search,
    edit_publish, edit_yank, exists, index_rel_path, now_rfc3339, parse_index, parse_index_of,
};
use super::local::same_version;
use super::{ClientOptions, MISSING_BLOB_HINT, Registry};

/// Index writes tried before a publish or yank gives up because other writers keep winning.
pub const CAS_ATTEMPTS: u32 = 64;
/// Artifacts up to this size go up in one create-only PUT; larger ones in parts.
pub const MULTIPART_THRESHOLD: u64 = 64 << 20;
/// Part size of multipart uploads.
pub const PART_SIZE: usize = 16 << 20;
/// Parts uploaded at once (bounds memory to about this many parts).
const PARTS_IN_FLIGHT: usize = 4;
/// Index files read at once by search.
const SEARCH_FETCHES: usize = 16;
/// Object metadata of index files and config.json: a CDN or proxy must revalidate them.
pub const INDEX_CACHE_CONTROL: &str = "no-cache";
/// Object metadata of blobs: their key is their digest, they never change.
pub const BLOB_CACHE_CONTROL: &str = "public, max-age=31536000, immutable";
/// The environment variable naming the S3 endpoint (overrides `AWS_ENDPOINT_URL`).
pub const ENDPOINT_ENV: &str = "XPM_S3_ENDPOINT";

const CONDITIONS_HINT: &str = "publish to an engine that honours conditional writes (AWS S3, \
    Cloudflare R2, Ceph RGW, recent MinIO, moto); Garage and some MinIO and SeaweedFS versions \
    accept the headers and ignore them. Reading (install) works from any engine";

/// A registry in a bucket.
pub struct S3Registry {
    /// `s3://bucket/prefix`: the lockfile source and the `url` of errors.
    source: String,
    /// Key prefix without a trailing `/` (possibly empty).
    prefix: String,
    /// Reads, blobs, listing: object_store retries transient failures itself.
    store: Arc<dyn ObjectStore>,
    /// Conditional index writes: no retries inside object_store, so that a 412 always means
    /// another writer's object (a retried PUT whose first try landed would meet its own).
    cas: Arc<dyn ObjectStore>,
    rt: Arc<Runtime>,
    printer: Printer,
    offline: bool,
    probed: Mutex<bool>,
    multipart_threshold: u64,
    part_size: usize,
}

impl S3Registry {
    /// Connect to `bucket` with the standard AWS environment (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`/`AWS_DEFAULT_REGION`,
    /// `AWS_ENDPOINT_URL`, web identity, container and instance credentials) and
    /// `$XPM_S3_ENDPOINT`, which takes precedence over the AWS endpoint variables. An `http://`
    /// endpoint is allowed as given. Nothing is sent yet.
    pub fn connect(bucket: &str, prefix: &str, opts: &ClientOptions) -> Result<Self> {
        let source = super::Location::S3 {
            bucket: bucket.into(),
            prefix: prefix.into(),
        }
        .to_string();
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let endpoint = env(ENDPOINT_ENV);
        let effective = endpoint
            .clone()
            .or_else(|| env("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| env("AWS_ENDPOINT"));
        let allow_http = effective
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"))
            || env("AWS_ALLOW_HTTP").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let build = |retries: usize, timeout: Option<Duration>| -> Result<Arc<dyn ObjectStore>> {
            let mut client = StoreClientOptions::new()
                .with_allow_http(allow_http)
                .with_connect_timeout(Duration::from_secs(10));
            client = match timeout {
                Some(t) => client.with_timeout(t),
                // Blob transfers: no whole-request limit, but a stalled read ends.
                None => client
                    .with_timeout_disabled()
                    .with_read_timeout(Duration::from_secs(60)),
            };
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_client_options(client)
                .with_retry(RetryConfig {
                    max_retries: retries,
                    retry_timeout: Duration::from_secs(120),
                    ..Default::default()
                });
            if let Some(e) = &endpoint {
                b = b.with_endpoint(e);
            }
            let s = b.build().map_err(|e| {
                Error::input(
                    format!(
                        "cannot set up the S3 client for {source}: {}",
                        crate::error::chain(&e)
                    ),
                    Some(&format!(
                        "check the AWS_* variables and {ENDPOINT_ENV} (an endpoint is a URL \
                         such as https://s3.example.com)"
                    )),
                )
            })?;
            Ok(Arc::new(s))
        };
        let store = build(6, None)?;
        let cas = build(0, Some(Duration::from_secs(30)))?;
        let mut reg = Self::with_stores(&source, prefix, store, cas)?;
        reg.printer = opts.printer;
        reg.offline = opts.offline;
        Ok(reg)
    }

    /// A registry over given stores (tests use `object_store`'s in-memory store). `cas`
    /// should not retry failed requests itself.
    pub fn with_stores(
        source: &str,
        prefix: &str,
        store: Arc<dyn ObjectStore>,
        cas: Arc<dyn ObjectStore>,
    ) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("xpm-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::io("start", "the S3 client's runtime", e))?;
        Ok(S3Registry {
            source: source.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            store,
            cas,
            rt: Arc::new(Runtime::new(rt)),
            printer: Printer::silent(),
            offline: false,
            probed: Mutex::new(false),
            multipart_threshold: MULTIPART_THRESHOLD,
            part_size: PART_SIZE,
        })
    }

    /// Use multipart uploads above `threshold` bytes, in parts of `part_size` (tests).
    pub fn with_multipart(mut self, threshold: u64, part_size: usize) -> Self {
        self.multipart_threshold = threshold;
        self.part_size = part_size;
        self
    }

    /// The object key of a path relative to the registry root.
    fn key(&self, rel: &str) -> Key {
        if self.prefix.is_empty() {
            Key::from(rel)
        } else {
            Key::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// `s3://bucket/prefix/rel`, for messages.
    fn url_of(&self, rel: &str) -> String {
        format!("{}/{rel}", self.source)
    }

    fn err(&self, what: &str, e: object_store::Error) -> Error {
        use object_store::Error as E;
        let hint = match &e {
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
                "check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
                 AWS_SESSION_TOKEN, or the machine's role) and the bucket's policy"
            }
            _ => {
                "check the endpoint (XPM_S3_ENDPOINT or AWS_ENDPOINT_URL), the region \
                 (AWS_REGION) and that the bucket exists (xpm does not create buckets)"
            }
        };
        Error::Registry {
            url: self.source.clone(),
            message: format!("{what}: {}", crate::error::chain(&e)),
            hint: Some(hint.into()),
            transient: false,
        }
    }

    fn require_online(&self, what: &str) -> Result<()> {
        super::require_online(self.offline, &self.source, what)
    }

    /// An error unless the registry's `config.json` exists (a read of a wrong bucket or prefix
    /// fails here, naming it, instead of as "no such expert").
    pub fn require_registry(&self) -> Result<()> {
        if self.offline {
            return Ok(());
        }
        let key = self.key("config.json");
        match self.rt.block_on(self.store.head(&key)) {
            Ok(_) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => Err(Error::input(
                format!(
                    "`{}` is not an xpm registry (no config.json in the bucket)",
                    self.source
                ),
                Some(
                    "check the bucket and prefix; `xpm publish` creates a registry's layout in \
                     an existing bucket on first use (xpm does not create buckets)",
                ),
            )),
            Err(e) => Err(self.err("reading config.json", e)),
        }
    }

    /// Make the bucket ready for writes now (the registry server does this at start): probe
    /// the engine's conditional writes and create `config.json` if missing.
    pub fn init(&self) -> Result<()> {
        self.require_online("writing to the registry")?;
        self.prepare_write(true)
    }

    /// Before the first write of this process: probe the engine's conditional writes (once),
    /// and create `config.json` when `init` (publish) and it is missing.
    fn prepare_write(&self, init: bool) -> Result<()> {
        let mut probed = self.probed.lock().unwrap_or_else(|p| p.into_inner());
        if !*probed {
            self.rt.block_on(self.probe())?;
            *probed = true;
        }
        drop(probed);
        if init {
            let config = RegistryConfig::directory_layout();
            let body = serde_json::to_vec_pretty(&config).expect("config");
            let key = self.key("config.json");
            let put = self.store.put_opts(
                &key,
                PutPayload::from(body),
                PutOptions {
                    mode: PutMode::Create,
                    attributes: attrs("application/json", INDEX_CACHE_CONTROL),
                    ..Default::default()
                },
            );
            match self.rt.block_on(put) {
                Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(self.err("writing config.json", e)),
            }
        }
        Ok(())
    }

    /// Check that the engine enforces `If-None-Match: *` and `If-Match` on PUT. Refuses (with
    /// what it ignored) an engine that overwrites instead of answering 412.
    pub async fn probe(&self) -> Result<()> {
        let nonce = {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            format!(
                "{}-{}-{}",
                std::process::id(),
                t.as_secs(),
                t.subsec_nanos()
            )
        };
        let rel = format!(".xpm-probe/{nonce}");
        let key = self.key(&rel);
        let create = || PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let refuse = |what: String| {
            Err(Error::Registry {
                url: self.source.clone(),
                message: format!("refusing to write to this storage: {what}"),
                hint: Some(CONDITIONS_HINT.into()),
                transient: false,
            })
        };
        let first = match self
            .cas
            .put_opts(&key, PutPayload::from_static(b"1"), create())
            .await
        {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::registry(
                    &self.source,
                    "cannot write to the bucket: it does not exist (the storage answered 404)",
                    Some(
                        "create the bucket first (xpm does not create buckets), or check the \
                         endpoint (XPM_S3_ENDPOINT or AWS_ENDPOINT_URL)",
                    ),
                ));
            }
            Err(e) => {
                return Err(self.err("writing a probe object (checking conditional writes)", e));
            }
        };
        let outcome = async {
            match self
                .cas
                .put_opts(&key, PutPayload::from_static(b"2"), create())
                .await
            {
                Err(object_store::Error::AlreadyExists { .. }) => {}
                Ok(_) => {
                    return refuse(format!(
                        "it ignores `If-None-Match: *` on PUT: a second create-only write of {} \
                         succeeded and overwrote the first, so two publishers of one version \
                         would both \"win\"",
                        self.url_of(&rel)
                    ));
                }
                Err(e) => {
                    return refuse(format!(
                        "it does not support create-only writes (`If-None-Match: *`): {}",
                        crate::error::chain(&e)
                    ));
                }
            }
            let wrong = UpdateVersion {
                e_tag: Some(match first.e_tag.as_deref() {
                    Some("\"00000000000000000000000000000000\"") => {
                        "\"11111111111111111111111111111111\"".into()
                    }
                    _ => "\"00000000000000000000000000000000\"".into(),
                }),
                version: None,
            };
            match self
                .cas
                .put_opts(
                    &key,
                    PutPayload::from_static(b"3"),
                    PutOptions {
                        mode: PutMode::Update(wrong),
                        ..Default::default()
                    },
                )
                .await
            {
                Err(object_store::Error::Precondition { .. }) => Ok(()),
                Ok(_) => refuse(format!(
                    "it ignores `If-Match` on PUT: a write to {} with a wrong ETag succeeded, so \
                     concurrent publishers would overwrite each other's index lines",
                    self.url_of(&rel)
                )),
                Err(e) => refuse(format!(
                    "it does not support compare-and-swap writes (`If-Match`): {}",
                    crate::error::chain(&e)
                )),
            }
        }
        .await;
        // Best effort: a probe object left behind is harmless (nothing reads `.xpm-probe/`).
        let _ = self.cas.delete(&key).await;
        outcome
    }

    /// The raw index object of `name` and its version (ETag), if any version was published.
    async fn get_index(&self, name: &str) -> Result<Option<(Bytes, UpdateVersion)>> {
        let rel = format!("index/{}", index_rel_path(name)?);
        let what = format!("reading the index of `{name}`");
        match self.store.get(&self.key(&rel)).await {
            Ok(r) => {
                let v = UpdateVersion {
                    e_tag: r.meta.e_tag.clone(),
                    version: r.meta.version.clone(),
                };
                let body = r.bytes().await.map_err(|e| self.err(&what, e))?;
                Ok(Some((body, v)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(&what, e)),
        }
    }

    /// The raw index file of `name`, or `None` if nothing was published under it.
    pub fn read_index_bytes(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .rt
            .block_on(self.get_index(name))?
            .map(|(b, _)| b.to_vec()))
    }

    /// The parsed index of `name`.
    pub fn read_index(&self, name: &str) -> Result<Option<Vec<IndexLine>>> {
        let src = self.url_of(&format!("index/{}", index_rel_path(name)?));
        match self.rt.block_on(self.get_index(name))? {
            Some((b, _)) => Ok(Some(parse_index_of(&b, &src, name)?)),
            None => Ok(None),
        }
    }

    /// A reader over the blob with this `sha256:` digest and its length, if stored.
    pub fn open_blob_by_digest(&self, cksum: &str) -> Result<Option<(u64, Box<dyn Read + Send>)>> {
        let what = format!("downloading {cksum}");
        match self
            .rt
            .block_on(self.store.get(&self.key(&blob_rel_path(cksum))))
        {
            Ok(r) => Ok(Some((
                r.meta.size,
                Box::new(
                    self.rt
                        .reader(r.into_stream().map(|c| {
                            c.map_err(|e| std::io::Error::other(crate::error::chain(&e)))
                        })),
                ),
            ))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(&what, e)),
        }
    }

    /// Store `artifact` (whose line is `line`, `pubtime` included) and add `line` to the index.
    /// Refuses an existing version with [`Error::Conflict`], whatever its bytes.
    pub fn publish(
        &self,
        artifact: &Path,
        line: &IndexLine,
        progress: &dyn Progress,
    ) -> Result<IndexLine> {
        self.require_online("publishing")?;
        self.prepare_write(true)?;
        // Fail before uploading when the version is there already (the CAS checks again).
        if let Some(lines) = self.read_index(&line.name)?
            && let Some(old) = lines.iter().find(|l| same_version(&l.vers, &line.vers))
        {
            return Err(exists(line, old));
        }
        self.rt.block_on(self.put_blob(artifact, line, progress))?;
        let src = self.url_of(&format!("index/{}", index_rel_path(&line.name)?));
        self.rt
            .block_on(self.update_index(&line.name, |cur, ambiguous| {
                edit_publish(cur, &src, line, ambiguous)
            }))
    }

    /// Upload the blob of `line` unless the bucket holds it already.
    async fn put_blob(
        &self,
        artifact: &Path,
        line: &IndexLine,
        progress: &dyn Progress,
    ) -> Result<()> {
        if line.size <= self.multipart_threshold {
            self.put_small_blob(artifact, line).await?;
            progress.inc(line.size);
            return Ok(());
        }
        self.put_large_blob(artifact, line, progress).await
    }

    /// The error for an artifact whose bytes differ from its line's digest or size.
    fn changed_while_publishing(artifact: &Path) -> Error {
        Error::input(
            format!(
                "`{}` changed while it was being published",
                artifact.display()
            ),
            Some("publish it again once nothing else writes to it"),
        )
    }

    /// A blob up to the multipart threshold: one create-only PUT; an existing object is kept
    /// if it holds these bytes, else replaced.
    async fn put_small_blob(&self, artifact: &Path, line: &IndexLine) -> Result<()> {
        let rel = blob_rel_path(&line.cksum);
        let key = self.key(&rel);
        let what = format!("uploading the artifact of {}", line.id());
        let bytes = std::fs::read(artifact).at("read", artifact)?;
        if bytes.len() as u64 != line.size || crate::digest::sha256(&bytes) != line.cksum {
            return Err(Self::changed_while_publishing(artifact));
        }
        let bytes = Bytes::from(bytes);
        let put = self
            .store
            .put_opts(
                &key,
                PutPayload::from(bytes.clone()),
                PutOptions {
                    mode: PutMode::Create,
                    attributes: attrs("application/octet-stream", BLOB_CACHE_CONTROL),
                    ..Default::default()
                },
            )
            .await;
        match put {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => {
                // Another version (or publisher) stored these bytes: keep the stored copy if
                // it is intact, else replace it.
                let stored = match self.store.get(&key).await {
                    Ok(r) => r.bytes().await.ok(),
                    Err(_) => None,
                };
                if stored.as_ref() != Some(&bytes) {
                    self.printer.warn(format!(
                        "{} held damaged bytes; replacing them",
                        self.url_of(&rel)
                    ));
                    self.store
                        .put_opts(
                            &key,
                            PutPayload::from(bytes),
                            PutOptions {
                                attributes: attrs("application/octet-stream", BLOB_CACHE_CONTROL),
                                ..Default::default()
                            },
                        )
                        .await
                        .map_err(|e| self.err(&what, e))?;
                }
                Ok(())
            }
            Err(e) => Err(self.err(&what, e)),
        }
    }

    /// A blob over the threshold. Multipart uploads cannot be conditional: a stored object of
    /// the right size under the digest's key is these bytes; otherwise upload, hashing what is
    /// sent (identical bytes racing with another publisher's are harmless).
    async fn put_large_blob(
        &self,
        artifact: &Path,
        line: &IndexLine,
        progress: &dyn Progress,
    ) -> Result<()> {
        let rel = blob_rel_path(&line.cksum);
        let key = self.key(&rel);
        let what = format!("uploading the artifact of {}", line.id());
        match self.store.head(&key).await {
            Ok(m) if m.size == line.size => {
                progress.inc(line.size);
                return Ok(());
            }
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.err(&what, e)),
        }
        let upload = self
            .store
            .put_multipart_opts(
                &key,
                PutMultipartOptions {
                    attributes: attrs("application/octet-stream", BLOB_CACHE_CONTROL),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| self.err(&what, e))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, self.part_size);
        let sent = self.send_parts(artifact, &mut w, &what, progress).await;
        // The bytes sent are the bytes the line describes (each part is signed with its own
        // SHA-256, which S3 checks on arrival).
        let result = sent.and_then(|(size, digest)| {
            if size == line.size && digest == line.cksum {
                Ok(())
            } else {
                Err(Self::changed_while_publishing(artifact))
            }
        });
        if let Err(e) = result {
            let _ = w.abort().await;
            return Err(e);
        }
        w.finish().await.map_err(|e| self.err(&what, e))?;
        let stored = self
            .store
            .head(&key)
            .await
            .map_err(|e| self.err(&what, e))?;
        if stored.size != line.size {
            return Err(Error::registry(
                &self.source,
                format!(
                    "{what}: the storage holds {} bytes at {} after the upload, not {}",
                    stored.size,
                    self.url_of(&rel),
                    line.size
                ),
                Some("publish again; if it persists, the storage is misbehaving"),
            ));
        }
        Ok(())
    }

    /// Stream `artifact` into the multipart upload `w`; the bytes sent and their digest.
    async fn send_parts(
        &self,
        artifact: &Path,
        w: &mut WriteMultipart,
        what: &str,
        progress: &dyn Progress,
    ) -> Result<(u64, String)> {
        let mut f = std::fs::File::open(artifact).at("open", artifact)?;
        let mut hasher = Sha256::new();
        let mut sent = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).at("read", artifact)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            sent += n as u64;
            w.wait_for_capacity(PARTS_IN_FLIGHT)
                .await
                .map_err(|e| self.err(what, e))?;
            w.write(&buf[..n]);
            progress.inc(n as u64);
        }
        Ok((sent, crate::digest::format_digest(&hasher.finalize())))
    }

    /// Compare-and-swap on the index object of `name`: read it with its ETag, let `edit`
    /// decide, write conditionally; on a lost race, read again and redo the edit. `edit` gets
    /// the current bytes (`None`: no object yet) and whether an earlier write of this call may
    /// have landed unseen (its answer was lost).
    async fn update_index(
        &self,
        name: &str,
        mut edit: impl FnMut(Option<&[u8]>, bool) -> Result<Edit>,
    ) -> Result<IndexLine> {
        let rel = format!("index/{}", index_rel_path(name)?);
        let key = self.key(&rel);
        let what = format!("writing the index of `{name}`");
        let mut ambiguous = false;
        let mut failures = 0u32;
        let mut rng = seed();
        for attempt in 0..CAS_ATTEMPTS {
            let cur = self.get_index(name).await?;
            let (bytes, line) = match edit(cur.as_ref().map(|(b, _)| &b[..]), ambiguous)? {
                Edit::Done(l) => return Ok(l),
                Edit::Write(b, l) => (b, l),
            };
            let mode = match cur {
                None => PutMode::Create,
                Some((_, v)) if v.e_tag.is_none() && v.version.is_none() => {
                    return Err(Error::registry(
                        &self.source,
                        format!("{what}: the storage sent no ETag for {}", self.url_of(&rel)),
                        Some(CONDITIONS_HINT),
                    ));
                }
                Some((_, v)) => PutMode::Update(v),
            };
            let put = self
                .cas
                .put_opts(
                    &key,
                    PutPayload::from(bytes),
                    PutOptions {
                        mode,
                        attributes: attrs("application/x-ndjson", INDEX_CACHE_CONTROL),
                        ..Default::default()
                    },
                )
                .await;
            match put {
                Ok(_) => return Ok(line),
                Err(
                    object_store::Error::Precondition { .. }
                    | object_store::Error::AlreadyExists { .. },
                ) => {
                    // Another writer changed the index since we read it: read it again.
                }
                Err(
                    e @ (object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::NotImplemented { .. }),
                ) => return Err(self.err(&what, e)),
                Err(e) => {
                    // Sent or not, landed or not: the next read tells.
                    failures += 1;
                    if failures >= 4 {
                        return Err(self.err(&what, e));
                    }
                    ambiguous = true;
                    self.printer.warn(format!(
                        "{what}: {}; retrying (attempt {} of 4)",
                        crate::error::chain(&e),
                        failures + 1
                    ));
                }
            }
            tokio::time::sleep(backoff(attempt, &mut rng)).await;
        }
        Err(Error::registry(
            &self.source,
            format!(
                "{what}: gave up after {CAS_ATTEMPTS} attempts; other publishers kept changing \
                 it"
            ),
            Some("try again"),
        ))
    }

    /// Set or clear `yanked` on `name@version`; returns the updated line. Only that line of
    /// the index object is rewritten.
    pub fn set_yanked(
        &self,
        name: &str,
        version: &semver::Version,
        yanked: bool,
    ) -> Result<IndexLine> {
        self.require_online("yanking")?;
        self.prepare_write(false)?;
        let src = self.url_of(&format!("index/{}", index_rel_path(name)?));
        self.rt
            .block_on(self.update_index(name, |cur, _| edit_yank(cur, &src, name, version, yanked)))
    }

    /// Every expert whose name or description contains all words of `query`, and the errors of
    /// index objects that could not be read or parsed (skipped, as local.rs does).
    pub fn search_skipping(&self, query: &str) -> Result<(Vec<SearchHit>, Vec<Error>)> {
        let root = self.key("index");
        self.rt.block_on(async {
            let objects: Vec<object_store::ObjectMeta> = self
                .store
                .list(Some(&root))
                .try_collect()
                .await
                .map_err(|e| self.err("listing the index", e))?;
            let fetched: Vec<Result<Vec<IndexLine>>> =
                futures_util::stream::iter(objects.into_iter().filter(|m| {
                    m.location
                        .prefix_match(&root)
                        .is_some_and(|mut parts| parts.all(|p| !p.as_ref().starts_with('.')))
                }))
                .map(|m| async move {
                    let src = format!("s3://{}", m.location);
                    let what = format!("reading {src}");
                    let r = self
                        .store
                        .get(&m.location)
                        .await
                        .map_err(|e| self.err(&what, e))?;
                    let b = r.bytes().await.map_err(|e| self.err(&what, e))?;
                    parse_index(&b, &self.url_of(&rel_of(&m.location, &self.prefix)))
                })
                .buffer_unordered(SEARCH_FETCHES)
                .collect()
                .await;
            Ok(collect_search(
                query,
                fetched.into_iter().map(|r| r.map(Some)),
            ))
        })
    }
}

impl Registry for S3Registry {
    fn source(&self) -> &str {
        &self.source
    }

    fn index(&self, name: &str) -> Result<Option<Vec<IndexLine>>> {
        self.require_online(&format!("reading the index of `{name}`"))?;
        self.read_index(name)
    }

    fn open_blob(&self, line: &IndexLine) -> Result<Box<dyn Read + Send>> {
        self.require_online(&format!("downloading {}", line.id()))?;
        match self.open_blob_by_digest(&line.cksum)? {
            Some((_, r)) => Ok(r),
            None => Err(Error::registry(
                &self.source,
                format!(
                    "the artifact of {} is missing from the registry ({} not found)",
                    line.id(),
                    self.url_of(&blob_rel_path(&line.cksum))
                ),
                Some(MISSING_BLOB_HINT),
            )),
        }
    }

    fn publish(
        &self,
        artifact: &Path,
        line: &IndexLine,
        progress: &dyn Progress,
    ) -> Result<IndexLine> {
        let mut line = line.clone();
        line.pubtime = now_rfc3339();
        S3Registry::publish(self, artifact, &line, progress)
    }

    fn set_yanked(&self, name: &str, version: &semver::Version, yanked: bool) -> Result<IndexLine> {
        S3Registry::set_yanked(self, name, version, yanked)
    }

    fn search(&self, query: &str, limit: usize) -> Result<SearchResults> {
        self.require_online("searching")?;
        Ok(super::search_results(
            &self.printer,
            "a damaged index object",
            self.search_skipping(query)?,
            limit,
        ))
    }
}

fn attrs(content_type: &'static str, cache_control: &'static str) -> Attributes {
    let mut a = Attributes::new();
    a.insert(Attribute::ContentType, content_type.into());
    a.insert(Attribute::CacheControl, cache_control.into());
    a
}

/// `key` relative to the registry root.
fn rel_of(key: &Key, prefix: &str) -> String {
    let k = key.as_ref();
    if prefix.is_empty() {
        k.to_string()
    } else {
        k.strip_prefix(prefix)
            .map(|r| r.trim_start_matches('/'))
            .unwrap_or(k)
            .to_string()
    }
}

/// A per-call seed for backoff jitter (publishers that collide must not retry in lockstep).
pub(crate) fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut h = Sha256::new();
    h.update(t.as_nanos().to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(format!("{:?}", std::thread::current().id()).as_bytes());
    u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

/// Sleep before CAS attempt `attempt + 1`: 10 ms doubling to 640 ms, times a random factor in
/// [0.5, 1.5).
pub(crate) fn backoff(attempt: u32, rng: &mut u64) -> Duration {
    *rng = crate::rng::splitmix64(*rng);
    let base = 10u64 << attempt.min(6);
    let jitter = (*rng >> 11) as f64 / (1u64 << 53) as f64 + 0.5;
    Duration::from_micros((base as f64 * 1000.0 * jitter) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::index::render_index;
    use futures_util::stream::BoxStream;
    use object_store::memory::InMemory;

    fn registry() -> (S3Registry, Arc<InMemory>) {
        let mem = Arc::new(InMemory::new());
        let reg = S3Registry::with_stores("s3://test-bucket/reg", "reg", mem.clone(), mem.clone())
            .unwrap();
        (reg, mem)
    }

    fn artifact(
        dir: &Path,
        name: &str,
        vers: &str,
        bytes: &[u8],
    ) -> (std::path::PathBuf, IndexLine) {
        let p = dir.join(format!("{}-{vers}.xpm", name.replace('/', "-")));
        std::fs::write(&p, bytes).unwrap();
        let line: IndexLine = serde_json::from_value(serde_json::json!({
            "name": name, "vers": vers, "cksum": crate::digest::sha256(bytes),
            "size": bytes.len(), "base": {"id": "b", "digest": crate::digest::sha256(b"b")},
            "kind": "sparse", "density": 0.5, "targets": ["t"], "pubtime": now_rfc3339(),
            "format": "1.0", "description": format!("about {name}"),
        }))
        .unwrap();
        (p, line)
    }

    fn get(reg: &S3Registry, mem: &InMemory, rel: &str) -> Option<(Bytes, Attributes)> {
        reg.rt.block_on(async {
            match mem.get(&reg.key(rel)).await {
                Ok(r) => {
                    let a = r.attributes.clone();
                    Some((r.bytes().await.unwrap(), a))
                }
                Err(_) => None,
            }
        })
    }

    #[test]
    fn publish_yank_search_round_trip_in_the_directory_layout() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, mem) = registry();
        assert!(reg.require_registry().is_err());
        let pb = indicatif::ProgressBar::hidden();
        let (a, la) = artifact(dir.path(), "sst2", "1.0.0", b"artifact one");
        let (b, lb) = artifact(dir.path(), "sst2", "1.1.0", b"artifact two");
        let (c, lc) = artifact(dir.path(), "team/news", "2.0.0", b"artifact one");
        reg.publish(&a, &la, &pb).unwrap();
        reg.publish(&b, &lb, &pb).unwrap();
        reg.publish(&c, &lc, &pb).unwrap();
        reg.require_registry().unwrap();
        assert_eq!(pb.position(), 3 * 12);

        let (cfg, cfg_attrs) = get(&reg, &mem, "config.json").unwrap();
        let cfg: RegistryConfig = serde_json::from_slice(&cfg).unwrap();
        assert_eq!(cfg.dl, "blobs/sha256/{prefix}/{sha256}");
        assert_eq!(cfg.api, None);
        assert_eq!(
            cfg_attrs.get(&Attribute::CacheControl).map(|v| v.as_ref()),
            Some("no-cache")
        );
        let (idx, idx_attrs) = get(&reg, &mem, "index/ss/t2/sst2").unwrap();
        assert_eq!(&idx[..], &render_index(&[la.clone(), lb.clone()])[..]);
        assert_eq!(
            idx_attrs.get(&Attribute::CacheControl).map(|v| v.as_ref()),
            Some("no-cache")
        );
        assert!(get(&reg, &mem, "index/@team/ne/ws/news").is_some());
        let (blob, blob_attrs) = get(&reg, &mem, &blob_rel_path(&la.cksum)).unwrap();
        assert_eq!(&blob[..], b"artifact one");
        assert_eq!(
            blob_attrs.get(&Attribute::CacheControl).map(|v| v.as_ref()),
            Some(BLOB_CACHE_CONTROL)
        );

        // Reads through the Registry trait.
        let r: &dyn Registry = &reg;
        assert_eq!(
            r.index("sst2").unwrap().unwrap(),
            vec![la.clone(), lb.clone()]
        );
        assert_eq!(r.index("nope").unwrap(), None);
        let mut got = Vec::new();
        r.open_blob(&lb).unwrap().read_to_end(&mut got).unwrap();
        assert_eq!(got, b"artifact two");

        // Versions are immutable, whatever the bytes.
        let e = reg.publish(&b, &lb, &pb).unwrap_err();
        assert!(matches!(e, Error::Conflict { .. }), "{e}");
        assert!(e.to_string().contains("sst2@1.1.0 already exists"), "{e}");

        // Yank rewrites one line and keeps the others byte for byte (even unknown fields).
        let mut raw = get(&reg, &mem, "index/ss/t2/sst2").unwrap().0.to_vec();
        let first_end = raw.iter().position(|&c| c == b'\n').unwrap();
        raw.splice(
            first_end - 1..first_end - 1,
            br#","future":{"x":1}"#.iter().copied(),
        );
        reg.rt
            .block_on(mem.put(&reg.key("index/ss/t2/sst2"), PutPayload::from(raw.clone())))
            .unwrap();
        let y = reg.set_yanked("sst2", &lb.vers, true).unwrap();
        assert!(y.yanked);
        let after = get(&reg, &mem, "index/ss/t2/sst2").unwrap().0;
        let after = std::str::from_utf8(&after).unwrap();
        let before = std::str::from_utf8(&raw).unwrap();
        assert_eq!(after.lines().next(), before.lines().next());
        assert!(after.lines().nth(1).unwrap().contains(r#""yanked":true"#));
        assert!(
            reg.set_yanked("sst2", &"9.9.9".parse().unwrap(), true)
                .is_err()
        );
        assert!(reg.set_yanked("nope", &lb.vers, true).is_err());

        let found = r.search("", 10).unwrap();
        assert_eq!(found.total, 2);
        assert_eq!(found.experts[0].name, "sst2");
        assert_eq!(found.experts[0].max_version, la.vers, "1.1.0 is yanked");
        assert_eq!(r.search("news", 10).unwrap().experts[0].name, "team/news");
    }

    #[test]
    fn concurrent_publishers_lose_no_line_and_one_version_has_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, _mem) = registry();
        let reg = Arc::new(reg);
        let pb = indicatif::ProgressBar::hidden();
        let jobs: Vec<_> = (0..16)
            .map(|i| {
                artifact(
                    dir.path(),
                    "busy",
                    &format!("1.0.{i}"),
                    format!("bytes {i}").as_bytes(),
                )
            })
            .collect();
        std::thread::scope(|s| {
            for (p, l) in &jobs {
                let (reg, pb) = (reg.clone(), pb.clone());
                s.spawn(move || reg.publish(p, l, &pb).unwrap());
            }
        });
        let lines = reg.read_index("busy").unwrap().unwrap();
        assert_eq!(lines.len(), 16);

        // Same version, different bytes: exactly one wins.
        let rivals: Vec<_> = (0..8)
            .map(|i| {
                let d = dir.path().join(format!("r{i}"));
                std::fs::create_dir_all(&d).unwrap();
                artifact(&d, "race", "1.0.0", format!("rival {i}").as_bytes())
            })
            .collect();
        let results: Vec<Result<IndexLine>> = std::thread::scope(|s| {
            let hs: Vec<_> = rivals
                .iter()
                .map(|(p, l)| {
                    let (reg, pb) = (reg.clone(), pb.clone());
                    s.spawn(move || reg.publish(p, l, &pb))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
        for e in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(e.to_string().contains("already exists"), "{e}");
        }
        assert_eq!(reg.read_index("race").unwrap().unwrap().len(), 1);
    }

    #[test]
    fn large_artifacts_go_up_in_parts_and_shared_blobs_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, mem) = registry();
        let reg = reg.with_multipart(1000, 5 << 20);
        let pb = indicatif::ProgressBar::hidden();
        let big: Vec<u8> = (0..(11u32 << 20)).map(|i| (i % 251) as u8).collect();
        let (p, l) = artifact(dir.path(), "big", "1.0.0", &big);
        reg.publish(&p, &l, &pb).unwrap();
        let (stored, _) = get(&reg, &mem, &blob_rel_path(&l.cksum)).unwrap();
        assert_eq!(crate::digest::sha256(&stored), l.cksum);
        // A second version with the same bytes reuses the blob.
        let (p2, mut l2) = artifact(dir.path(), "big", "1.0.1", &big);
        l2.vers = "1.0.1".parse().unwrap();
        reg.publish(&p2, &l2, &pb).unwrap();
        assert_eq!(reg.read_index("big").unwrap().unwrap().len(), 2);
        // A file that does not hash to its line is refused, and nothing is indexed.
        let (p3, mut l3) = artifact(dir.path(), "big", "1.0.2", &big);
        l3.cksum = crate::digest::sha256(b"something else");
        let e = reg.publish(&p3, &l3, &pb).unwrap_err();
        assert!(e.to_string().contains("changed while"), "{e}");
        assert_eq!(reg.read_index("big").unwrap().unwrap().len(), 2);
    }

    #[test]
    fn a_damaged_shared_blob_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, mem) = registry();
        let pb = indicatif::ProgressBar::hidden();
        let (p, l) = artifact(dir.path(), "dmg", "1.0.0", b"the real bytes");
        reg.rt
            .block_on(mem.put(
                &reg.key(&blob_rel_path(&l.cksum)),
                PutPayload::from_static(b"garbage"),
            ))
            .unwrap();
        reg.publish(&p, &l, &pb).unwrap();
        let (stored, _) = get(&reg, &mem, &blob_rel_path(&l.cksum)).unwrap();
        assert_eq!(&stored[..], b"the real bytes");
    }

    /// A store that accepts conditional writes and ignores them (as Garage does).
    #[derive(Debug)]
    struct Ignoring(InMemory);

    impl std::fmt::Display for Ignoring {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Ignoring")
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Ignoring {
        async fn put_opts(
            &self,
            location: &Key,
            payload: PutPayload,
            mut opts: PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            opts.mode = PutMode::Overwrite;
            self.0.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &Key,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.0.put_multipart_opts(location, opts).await
        }
        async fn get_opts(
            &self,
            location: &Key,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.0.get_opts(location, options).await
        }
        fn delete_stream(
            &self,
            locations: BoxStream<'static, object_store::Result<Key>>,
        ) -> BoxStream<'static, object_store::Result<Key>> {
            self.0.delete_stream(locations)
        }
        fn list(
            &self,
            prefix: Option<&Key>,
        ) -> BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
            self.0.list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&Key>,
        ) -> object_store::Result<object_store::ListResult> {
            self.0.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &Key,
            to: &Key,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.0.copy_opts(from, to, options).await
        }
    }

    #[test]
    fn the_probe_refuses_an_engine_that_ignores_conditions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Ignoring(InMemory::new()));
        let reg = S3Registry::with_stores("s3://garage/x", "x", store.clone(), store).unwrap();
        let (p, l) = artifact(dir.path(), "sst2", "1.0.0", b"bytes");
        let e = reg
            .publish(&p, &l, &indicatif::ProgressBar::hidden())
            .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("refusing to write"), "{text}");
        assert!(text.contains("ignores `If-None-Match: *`"), "{text}");
        assert!(reg.read_index("sst2").unwrap().is_none(), "nothing written");
    }
}
