//! A registry in a Hugging Face Hub repository: `hf://ORG/REPO` (a model repository),
//! `hf://datasets/ORG/REPO`, either with `@BRANCH` (default `main`). The repository holds
//! exactly a registry directory's layout (local.rs, docs/registry-protocol.md §3 and §13.3):
//!
//! ```text
//! config.json                 written by the first publish
//! index/<index path>          one JSON line per version
//! blobs/sha256/ab/<hex>       the .xpm files (stored by the Hub as LFS objects)
//! ```
//!
//! **Reads** go through the Hub's file URLs, `{endpoint}/[datasets/]ORG/REPO/resolve/BRANCH/…`,
//! with the HTTP registry client ([`HttpRegistry`]: ETag-cached index files, retries, the
//! offline cache), the token sent on reads for private repositories. So the same repository
//! also installs as a plain `https://huggingface.co/ORG/REPO/resolve/main` registry.
//!
//! **Writes** are one commit each, through the Hub's commit API, with the parent commit as
//! compare-and-swap:
//!
//! 1. the branch's head commit (`GET /api/{models|datasets}/ORG/REPO/revision/BRANCH`);
//! 2. the index file (and config.json) read at that commit, then edited as S3 does
//!    ([`super::index::edit_publish`], [`super::index::edit_yank`]);
//! 3. a publish uploads its artifact once, before the first commit: `preupload` says whether a
//!    file goes inline or to LFS; LFS objects go through the Git LFS batch API (`basic` or
//!    `multipart` transfer), then `verify`;
//! 4. `POST /api/…/commit/BRANCH` (NDJSON: a `header` with `parentCommit`, the index file and
//!    config.json inline as base64 `file`s, the blob as an `lfsFile`). A 412 means another
//!    writer committed since step 1: redo from step 1, up to [`COMMIT_ATTEMPTS`] times.
//!
//! Two publishers of one version cannot both win: the loser's retry finds the version in the
//! index and is told it exists. Who may write is the Hub's business (repository permissions);
//! xpm's owners and scoped tokens are the registry server's.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use reqwest::StatusCode;
use reqwest::blocking::{Body, Client, RequestBuilder, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, IoResultExt, Result};
use crate::home::XpmHome;
use crate::printer::{Printer, Progress};

use super::http::{HttpRegistry, retry};
use super::index::{
    Edit, IndexLine, RegistryConfig, SearchResults, blob_rel_path, collect_search, edit_publish,
    edit_yank, index_rel_path, now_rfc3339, parse_index,
};
use super::{ClientOptions, Registry};

/// Commits tried before a publish or yank gives up because other writers keep winning.
pub const COMMIT_ATTEMPTS: u32 = 32;
/// Whole-request limit for the small API calls and index files.
const SMALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Index files read at once by search.
const SEARCH_FETCHES: usize = 8;
/// Bytes of a file sent to `preupload` for the Hub's text/binary decision.
const SAMPLE_BYTES: usize = 512;
/// Largest index file, `config.json` or tree-listing page xpm reads from the Hub: an index file
/// holds one short line per version, so this is generous, and a hostile or broken server
/// cannot make xpm allocate without bound.
pub const MAX_SMALL_FILE: u64 = 64 << 20;

const TOKEN_HINT: &str = "set HF_TOKEN (or run `hf auth login`, or pass --token) to a token \
    with access to the repository; publishing and yanking need a write token";
const REPO_HINT: &str = "check ORG/REPO (and `datasets/` for a dataset repository); create \
    the repository first (`hf repo create ORG/REPO`, or on the Hub's web site): xpm creates a \
    registry's layout in an existing repository, not the repository. A private repository \
    looks missing without a token: set HF_TOKEN (or run `hf auth login`, or pass --token)";

/// A registry in a Hugging Face Hub repository.
pub struct HubRegistry {
    source: String,
    endpoint: String,
    /// `models` or `datasets`, for `/api/{kind}/…`.
    api_kind: &'static str,
    /// `ORG/REPO` or `datasets/ORG/REPO`, for file URLs and the LFS endpoint.
    url_repo: String,
    repo: String,
    branch: String,
    token: Option<String>,
    client: Client,
    reader: HttpRegistry,
    printer: Printer,
    offline: bool,
}

/// `preupload`'s answer for one file.
#[derive(Deserialize)]
struct PreuploadFile {
    path: String,
    #[serde(rename = "uploadMode")]
    upload_mode: String,
}

#[derive(Deserialize)]
struct Preupload {
    files: Vec<PreuploadFile>,
}

/// The Git LFS batch API's answer.
#[derive(Deserialize)]
struct LfsBatch {
    #[serde(default)]
    transfer: Option<String>,
    objects: Vec<LfsObject>,
}

#[derive(Deserialize)]
struct LfsObject {
    oid: String,
    #[serde(default)]
    actions: Option<LfsActions>,
    #[serde(default)]
    error: Option<LfsError>,
}

#[derive(Deserialize)]
struct LfsActions {
    #[serde(default)]
    upload: Option<LfsAction>,
    #[serde(default)]
    verify: Option<LfsAction>,
}

#[derive(Deserialize)]
struct LfsAction {
    href: String,
    #[serde(default)]
    header: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct LfsError {
    #[serde(default)]
    code: u32,
    #[serde(default)]
    message: String,
}

/// A file of the tree listing.
#[derive(Deserialize)]
struct TreeEntry {
    #[serde(rename = "type")]
    kind: String,
    path: String,
}

#[derive(Serialize)]
struct LfsPart {
    #[serde(rename = "partNumber")]
    part_number: u32,
    etag: String,
}

/// How an artifact goes into a commit.
enum BlobOp {
    /// The repository has it already (another version with the same bytes).
    Present,
    /// Uploaded to LFS: committed as an `lfsFile`.
    Lfs,
    /// Small enough for the Hub to keep in git: committed inline.
    Inline,
}

impl HubRegistry {
    /// A client for the repository of `location` (`dataset`, `repo`, `revision` as parsed by
    /// [`super::Location`]), with the Hub's address and token from `opts.hub` (`--token`
    /// first).
    pub fn connect(
        dataset: bool,
        repo: &str,
        revision: Option<&str>,
        home: &XpmHome,
        opts: &ClientOptions,
    ) -> Result<Self> {
        let source = super::Location::Hub {
            dataset,
            repo: repo.to_string(),
            revision: revision.map(str::to_string),
        }
        .to_string();
        let branch = revision.unwrap_or("main").to_string();
        let endpoint = opts.hub.endpoint.trim_end_matches('/').to_string();
        let url_repo = if dataset {
            format!("datasets/{repo}")
        } else {
            repo.to_string()
        };
        let token = opts.token.clone().or_else(|| opts.hub.effective_token());
        let client = Client::builder()
            .user_agent(concat!("xpm/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(None::<Duration>)
            .build()
            .map_err(|e| {
                Error::registry(&source, format!("cannot start an HTTP client: {e}"), None)
            })?;
        let files = format!("{endpoint}/{url_repo}/resolve/{}", encode_rev(&branch));
        let reader = HttpRegistry::new(
            &files,
            home,
            &ClientOptions {
                token: token.clone(),
                ..opts.clone()
            },
        )?
        .with_token_on_reads();
        Ok(HubRegistry {
            source,
            endpoint,
            api_kind: if dataset { "datasets" } else { "models" },
            url_repo,
            repo: repo.to_string(),
            branch,
            token,
            client,
            reader,
            printer: opts.printer,
            offline: opts.offline,
        })
    }

    /// The URL of a file at `rev` (a commit or the branch).
    fn file_url(&self, rev: &str, path: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{path}",
            self.endpoint,
            self.url_repo,
            encode_rev(rev)
        )
    }

    fn api_url(&self, what: &str) -> String {
        format!(
            "{}/api/{}/{}/{what}/{}",
            self.endpoint,
            self.api_kind,
            self.repo,
            encode_rev(&self.branch)
        )
    }

    fn authed(&self, rb: RequestBuilder) -> RequestBuilder {
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// Send a small request, retrying connection failures, 5xx and 429.
    fn send(&self, what: &str, build: impl Fn() -> RequestBuilder) -> Result<Response> {
        retry(&self.printer, || {
            let resp = build()
                .timeout(SMALL_TIMEOUT)
                .send()
                .map_err(|e| self.transport_error(what, e))?;
            let status = resp.status();
            if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                return Err(Error::Registry {
                    url: self.source.clone(),
                    message: format!("{what}: the Hub answered {status}"),
                    hint: Some("the Hub is having trouble; try again later".into()),
                    transient: true,
                });
            }
            Ok(resp)
        })
    }

    fn transport_error(&self, what: &str, e: reqwest::Error) -> Error {
        Error::Registry {
            url: self.source.clone(),
            message: format!("{what}: {}", crate::error::chain(&e)),
            hint: Some("check your network and HF_ENDPOINT".into()),
            transient: !e.is_builder(),
        }
    }

    /// A non-success answer as an error: the Hub's `X-Error-Code` and message, and a hint.
    fn refused(&self, what: &str, resp: Response) -> Error {
        let status = resp.status();
        let code = resp
            .headers()
            .get("x-error-code")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let header_msg = resp
            .headers()
            .get("x-error-message")
            .and_then(|v| v.to_str().ok())
            .map(|m| m.chars().take(300).collect::<String>());
        let body: Option<serde_json::Value> = resp.json().ok();
        let msg = body
            .as_ref()
            .and_then(|b| b.get("error"))
            .and_then(|e| e.as_str())
            .map(|m| m.chars().take(300).collect::<String>())
            .or(header_msg)
            .unwrap_or_else(|| status.to_string());
        let hint = match (status, code.as_str()) {
            (_, "RepoNotFound") => Some(REPO_HINT.to_string()),
            (_, "RevisionNotFound") => Some(format!(
                "the repository has no branch `{}`; create it on the Hub or name another with \
                 @BRANCH",
                self.branch
            )),
            (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN, _) => Some(TOKEN_HINT.to_string()),
            (StatusCode::NOT_FOUND, _) => Some(REPO_HINT.to_string()),
            (StatusCode::PAYLOAD_TOO_LARGE, _) => {
                Some("the Hub refused the size; check the repository's storage limits".into())
            }
            _ => None,
        };
        Error::Registry {
            url: self.source.clone(),
            message: format!("{what}: {msg} ({status})"),
            hint,
            transient: false,
        }
    }

    fn require_online(&self, what: &str) -> Result<()> {
        super::require_online(self.offline, &self.source, what)
    }

    /// The branch's head commit.
    fn head(&self) -> Result<String> {
        let what = format!("reading the head of {}", self.source);
        let url = self.api_url("revision");
        let resp = self.send(&what, || self.authed(self.client.get(&url)))?;
        if !resp.status().is_success() {
            return Err(self.refused(&what, resp));
        }
        #[derive(Deserialize)]
        struct Info {
            sha: String,
        }
        let info: Info = resp.json().map_err(|e| self.bad_answer(&what, e))?;
        if info.sha.len() != 40 || !info.sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(self.bad_answer(&what, "the commit id is not 40 hex digits"));
        }
        Ok(info.sha)
    }

    fn bad_answer(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::registry(
            &self.source,
            format!("{what}: the Hub's answer is not what its API documents: {e}"),
            Some("check HF_ENDPOINT: it must be the Hub or a compatible server"),
        )
    }

    /// Check that the repository and branch exist and hold a registry (an install from a
    /// missing one gets a clear error before anything else). Skipped offline.
    pub fn require_registry(&self) -> Result<()> {
        if self.offline {
            return Ok(());
        }
        let head = self.head()?;
        if !self.has_file(&head, "config.json")? {
            return Err(Error::input(
                format!(
                    "`{}` is not an xpm registry (no config.json in the repository)",
                    self.source
                ),
                Some(
                    "check ORG/REPO and the branch; `xpm publish` creates a registry's layout \
                     in an existing repository on first use",
                ),
            ));
        }
        Ok(())
    }

    /// A file at commit `rev`, or `None` when the repository has no such file.
    fn get_file(&self, rev: &str, path: &str) -> Result<Option<Vec<u8>>> {
        let what = format!("reading {path} of {}", self.source);
        let url = self.file_url(rev, path);
        let resp = self.send(&what, || self.authed(self.client.get(&url)))?;
        if resp.status() == StatusCode::NOT_FOUND {
            let code = resp
                .headers()
                .get("x-error-code")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if code.is_empty() || code == "EntryNotFound" {
                return Ok(None);
            }
            return Err(self.refused(&what, resp));
        }
        if !resp.status().is_success() {
            return Err(self.refused(&what, resp));
        }
        self.read_small(&what, resp).map(Some)
    }

    /// A small answer's body (an index file, a listing page), refused past [`MAX_SMALL_FILE`].
    fn read_small(&self, what: &str, resp: Response) -> Result<Vec<u8>> {
        match read_capped(resp, MAX_SMALL_FILE) {
            Ok(Some(b)) => Ok(b),
            Ok(None) => Err(Error::registry(
                &self.source,
                format!("{what}: the Hub sent more than {MAX_SMALL_FILE} bytes"),
                Some("the repository or the server at HF_ENDPOINT is not what xpm expects"),
            )),
            Err(e) => Err(Error::Registry {
                url: self.source.clone(),
                message: format!("{what}: {}", crate::error::chain(&e)),
                hint: Some("check your network and HF_ENDPOINT".into()),
                transient: true,
            }),
        }
    }

    /// Whether the repository has `path` at `rev` (a HEAD request).
    fn has_file(&self, rev: &str, path: &str) -> Result<bool> {
        let what = format!("checking {path} of {}", self.source);
        let url = self.file_url(rev, path);
        let resp = self.send(&what, || self.authed(self.client.head(&url)))?;
        match resp.status() {
            s if s.is_success() || s.is_redirection() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.refused(&what, resp)),
        }
    }

    /// Ask the Hub how each file goes up: `lfs` or `regular`.
    fn preupload(&self, files: &[(&str, u64, &[u8])]) -> Result<Vec<(String, String)>> {
        let what = format!("preparing the upload to {}", self.source);
        let b64 = base64::engine::general_purpose::STANDARD;
        let body = serde_json::json!({
            "files": files.iter().map(|(path, size, sample)| serde_json::json!({
                "path": path, "size": size, "sample": b64.encode(sample),
            })).collect::<Vec<_>>(),
        });
        let url = self.api_url("preupload");
        let resp = self.send(&what, || self.authed(self.client.post(&url).json(&body)))?;
        if !resp.status().is_success() {
            return Err(self.refused(&what, resp));
        }
        let p: Preupload = resp.json().map_err(|e| self.bad_answer(&what, e))?;
        Ok(p.files
            .into_iter()
            .map(|f| (f.path, f.upload_mode))
            .collect())
    }

    /// Upload `artifact` (whose digest and size `line` gives) as an LFS object, unless the
    /// Hub has it already; the bytes sent are hashed and must match.
    fn upload_lfs(&self, artifact: &Path, line: &IndexLine, progress: &dyn Progress) -> Result<()> {
        let what = format!("uploading the artifact of {}", line.id());
        let oid = line.sha_hex().to_string();
        let url = format!(
            "{}/{}.git/info/lfs/objects/batch",
            self.endpoint, self.url_repo
        );
        let body = serde_json::json!({
            "operation": "upload",
            "transfers": ["basic", "multipart"],
            "objects": [{"oid": oid, "size": line.size}],
            "hash_algo": "sha256",
            "ref": {"name": self.branch},
        });
        let resp = self.send(&what, || {
            self.authed(
                self.client
                    .post(&url)
                    .header("Accept", "application/vnd.git-lfs+json")
                    .header("Content-Type", "application/vnd.git-lfs+json")
                    .body(body.to_string()),
            )
        })?;
        if !resp.status().is_success() {
            return Err(self.refused(&what, resp));
        }
        let batch: LfsBatch = resp.json().map_err(|e| self.bad_answer(&what, e))?;
        let Some(obj) = batch.objects.into_iter().find(|o| o.oid == oid) else {
            return Err(self.bad_answer(&what, "the LFS batch answer omits the object"));
        };
        if let Some(e) = obj.error {
            return Err(Error::registry(
                &self.source,
                format!(
                    "{what}: the Hub refused the object: {} ({})",
                    e.message, e.code
                ),
                None,
            ));
        }
        let Some(actions) = obj.actions else {
            progress.inc(line.size); // the Hub has these bytes already
            return Ok(());
        };
        if let Some(up) = &actions.upload {
            let digest = if batch.transfer.as_deref() == Some("multipart") {
                self.put_multipart(artifact, line, up, progress, &what)?
            } else {
                self.put_basic(artifact, line, up, progress, &what)?
            };
            if digest != line.cksum {
                return Err(changed_while_publishing(artifact));
            }
        }
        if let Some(v) = &actions.verify {
            let mut rb = self
                .client
                .post(&v.href)
                .header("Accept", "application/vnd.git-lfs+json")
                .json(&serde_json::json!({"oid": oid, "size": line.size}));
            for (k, val) in &v.header {
                rb = rb.header(k, val);
            }
            if let Some(t) = &self.token {
                rb = rb.basic_auth("USER", Some(t));
            }
            let resp = rb
                .timeout(SMALL_TIMEOUT)
                .send()
                .map_err(|e| self.transport_error(&what, e))?;
            if !resp.status().is_success() {
                return Err(self.refused(&format!("{what} (verify)"), resp));
            }
        }
        Ok(())
    }

    /// One PUT of the whole file, hashed while it is read; the digest of what was sent.
    fn put_basic(
        &self,
        artifact: &Path,
        line: &IndexLine,
        up: &LfsAction,
        progress: &dyn Progress,
        what: &str,
    ) -> Result<String> {
        let f = std::fs::File::open(artifact).at("open", artifact)?;
        let hasher = std::sync::Arc::new(std::sync::Mutex::new(Sha256::new()));
        let reader = HashingReader {
            inner: f,
            hasher: hasher.clone(),
        };
        let mut rb = self.client.put(&up.href);
        for (k, v) in &up.header {
            rb = rb.header(k, v);
        }
        // Streamed from the file, hashed on the way out.
        let resp = rb
            .header("Content-Type", "application/octet-stream")
            .body(Body::sized(reader, line.size))
            .send()
            .map_err(|e| self.transport_error(what, e))?;
        if !resp.status().is_success() {
            return Err(self.refused(what, resp));
        }
        progress.inc(line.size);
        let h = std::mem::take(&mut *hasher.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(crate::digest::format_digest(&h.finalize()))
    }

    /// The multipart transfer: `header.chunk_size`, one presigned URL per part under the keys
    /// `00001`, `00002`, …; then a POST of the parts' ETags to the upload href.
    fn put_multipart(
        &self,
        artifact: &Path,
        line: &IndexLine,
        up: &LfsAction,
        progress: &dyn Progress,
        what: &str,
    ) -> Result<String> {
        let chunk: u64 = up
            .header
            .get("chunk_size")
            .and_then(|c| c.parse().ok())
            .filter(|&c| c > 0)
            .ok_or_else(|| self.bad_answer(what, "a multipart upload without a chunk_size"))?;
        let parts = line.size.div_ceil(chunk);
        if parts > 10_000 {
            return Err(self.bad_answer(what, "more than 10 000 parts"));
        }
        let mut f = std::fs::File::open(artifact).at("open", artifact)?;
        let mut hasher = Sha256::new();
        let mut done = Vec::new();
        for i in 1..=parts {
            let key = format!("{i:05}");
            let url = up
                .header
                .get(&key)
                .ok_or_else(|| self.bad_answer(what, format!("no URL for part {key}")))?;
            let n = chunk.min(line.size - (i - 1) * chunk) as usize;
            let mut buf = vec![0u8; n];
            f.read_exact(&mut buf).at("read", artifact)?;
            hasher.update(&buf);
            let resp = self
                .client
                .put(url)
                .body(buf)
                .send()
                .map_err(|e| self.transport_error(what, e))?;
            if !resp.status().is_success() {
                return Err(self.refused(&format!("{what} (part {i})"), resp));
            }
            let etag = resp
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| self.bad_answer(what, format!("part {i} has no ETag")))?
                .to_string();
            done.push(LfsPart {
                part_number: i as u32,
                etag,
            });
            progress.inc(n as u64);
        }
        let resp = self
            .client
            .post(&up.href)
            .json(&serde_json::json!({"oid": line.sha_hex(), "parts": done}))
            .timeout(SMALL_TIMEOUT)
            .send()
            .map_err(|e| self.transport_error(what, e))?;
        if !resp.status().is_success() {
            return Err(self.refused(&format!("{what} (completing the parts)"), resp));
        }
        Ok(crate::digest::format_digest(&hasher.finalize()))
    }

    /// One commit on the branch: `files` inline (path, bytes), `lfs` (path, oid, size) as LFS
    /// pointers. `Ok(false)`: the parent is stale (412), read again.
    fn commit(
        &self,
        summary: &str,
        parent: &str,
        files: &[(String, Vec<u8>)],
        lfs: &[(String, String, u64)],
    ) -> Result<bool> {
        let what = format!("committing to {}", self.source);
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut body = Vec::new();
        let mut push = |v: serde_json::Value| {
            serde_json::to_writer(&mut body, &v).expect("JSON serializes");
            body.push(b'\n');
        };
        push(serde_json::json!({"key": "header", "value": {
            "summary": summary, "description": "", "parentCommit": parent,
        }}));
        for (path, oid, size) in lfs {
            push(serde_json::json!({"key": "lfsFile", "value": {
                "path": path, "algo": "sha256", "oid": oid, "size": size,
            }}));
        }
        for (path, bytes) in files {
            push(serde_json::json!({"key": "file", "value": {
                "path": path, "encoding": "base64", "content": b64.encode(bytes),
            }}));
        }
        let url = self.api_url("commit");
        // One attempt: a lost answer is settled by the next read (the caller's loop).
        let resp = self
            .authed(
                self.client
                    .post(&url)
                    .header("Content-Type", "application/x-ndjson")
                    .body(body),
            )
            .timeout(SMALL_TIMEOUT)
            .send()
            .map_err(|e| self.transport_error(&what, e))?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT => Ok(false),
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                Err(Error::Registry {
                    url: self.source.clone(),
                    message: format!("{what}: the Hub answered {s}"),
                    hint: Some("try again later".into()),
                    transient: true,
                })
            }
            _ => Err(self.refused(&what, resp)),
        }
    }

    /// The commit loop shared by publish and yank: read the head and the index file at it
    /// (the first attempt may start from `read`, a pair the caller just read), `edit`, commit
    /// with the head as parent; on a stale parent read again. `extra` adds the other files of
    /// the commit.
    fn update_index(
        &self,
        name: &str,
        summary: &str,
        mut read: Option<(String, Option<Vec<u8>>)>,
        mut edit: impl FnMut(Option<&[u8]>, bool) -> Result<Edit>,
        mut extra: impl FnMut() -> Result<(Vec<(String, Vec<u8>)>, Vec<(String, String, u64)>)>,
    ) -> Result<IndexLine> {
        let rel = format!("index/{}", index_rel_path(name)?);
        let mut ambiguous = false;
        let mut failures = 0u32;
        let mut rng = super::s3::seed();
        for attempt in 0..COMMIT_ATTEMPTS {
            let (head, cur) = match read.take() {
                Some(r) => r,
                None => {
                    let head = self.head()?;
                    let cur = self.get_file(&head, &rel)?;
                    (head, cur)
                }
            };
            let (bytes, line) = match edit(cur.as_deref(), ambiguous)? {
                Edit::Done(l) => return Ok(l),
                Edit::Write(b, l) => (b, l),
            };
            let (mut files, lfs) = extra()?;
            files.push((rel.clone(), bytes));
            match self.commit(summary, &head, &files, &lfs) {
                Ok(true) => return Ok(line),
                Ok(false) => {} // another writer committed first
                Err(e) if e.is_transient() => {
                    failures += 1;
                    if failures >= 4 {
                        return Err(e);
                    }
                    ambiguous = true;
                    self.printer
                        .warn(format!("{e}; retrying (attempt {} of 4)", failures + 1));
                }
                Err(e) => return Err(e),
            }
            std::thread::sleep(super::s3::backoff(attempt, &mut rng));
        }
        Err(Error::registry(
            &self.source,
            format!(
                "writing the index of `{name}`: gave up after {COMMIT_ATTEMPTS} commits; other \
                 writers kept committing first"
            ),
            Some("try again"),
        ))
    }

    /// Publish `line` (its artifact at `artifact`): upload the artifact, then commit it with
    /// the index line (and config.json on first use).
    pub fn publish(
        &self,
        artifact: &Path,
        line: &IndexLine,
        progress: &dyn Progress,
    ) -> Result<IndexLine> {
        self.require_online("publishing")?;
        let blob = blob_rel_path(&line.cksum);
        let rel = format!("index/{}", index_rel_path(&line.name)?);
        let src = format!("{}/{rel}", self.source);
        // Fail before uploading when the version is there already (the commit checks again).
        let head = self.head()?;
        let cur = self.get_file(&head, &rel)?;
        edit_publish(cur.as_deref(), &src, line, false)?;
        // The first publish writes config.json. Two first publishers racing both write it,
        // with the same bytes, so checking once is enough.
        let config = if self.has_file(&head, "config.json")? {
            None
        } else {
            Some(serde_json::to_vec_pretty(&RegistryConfig::directory_layout()).expect("config"))
        };
        let op = if self.has_file(&head, &blob)? {
            progress.inc(line.size);
            BlobOp::Present
        } else {
            let mut sample = vec![0u8; SAMPLE_BYTES.min(line.size as usize)];
            std::fs::File::open(artifact)
                .and_then(|mut f| f.read_exact(&mut sample))
                .at("read", artifact)?;
            let modes = self.preupload(&[(&blob, line.size, &sample)])?;
            let lfs = modes
                .iter()
                .find(|(p, _)| *p == blob)
                .is_none_or(|(_, m)| m == "lfs");
            if lfs {
                self.upload_lfs(artifact, line, progress)?;
                BlobOp::Lfs
            } else {
                BlobOp::Inline
            }
        };
        let summary = format!("xpm publish {}", line.id());
        self.update_index(
            &line.name,
            &summary,
            Some((head, cur)),
            |cur, ambiguous| edit_publish(cur, &src, line, ambiguous),
            || {
                let mut files = Vec::new();
                let mut lfs = Vec::new();
                if let Some(cfg) = &config {
                    files.push(("config.json".to_string(), cfg.clone()));
                }
                match op {
                    BlobOp::Present => {}
                    BlobOp::Lfs => lfs.push((blob.clone(), line.sha_hex().to_string(), line.size)),
                    BlobOp::Inline => {
                        let bytes = std::fs::read(artifact).at("read", artifact)?;
                        if crate::digest::sha256(&bytes) != line.cksum {
                            return Err(changed_while_publishing(artifact));
                        }
                        progress.inc(line.size);
                        files.push((blob.clone(), bytes));
                    }
                }
                Ok((files, lfs))
            },
        )
    }

    /// Set or clear `yanked` on `name@version`, in one commit.
    pub fn set_yanked(
        &self,
        name: &str,
        version: &semver::Version,
        yanked: bool,
    ) -> Result<IndexLine> {
        self.require_online("yanking")?;
        let src = format!("{}/index/{}", self.source, index_rel_path(name)?);
        let verb = if yanked { "yank" } else { "unyank" };
        self.update_index(
            name,
            &format!("xpm {verb} {name}@{version}"),
            None,
            |cur, _| edit_yank(cur, &src, name, version, yanked),
            || Ok((Vec::new(), Vec::new())),
        )
    }

    /// Every index file's path at the branch (the tree listing, following `Link` pages).
    fn index_paths(&self) -> Result<Vec<String>> {
        let what = format!("listing the index of {}", self.source);
        let mut url = format!(
            "{}/api/{}/{}/tree/{}/index?recursive=true",
            self.endpoint,
            self.api_kind,
            self.repo,
            encode_rev(&self.branch)
        );
        let mut out = Vec::new();
        for _ in 0..10_000 {
            let resp = self.send(&what, || self.authed(self.client.get(&url)))?;
            if resp.status() == StatusCode::NOT_FOUND
                && resp
                    .headers()
                    .get("x-error-code")
                    .is_some_and(|c| c == "EntryNotFound")
            {
                return Ok(out); // no index yet
            }
            if !resp.status().is_success() {
                return Err(self.refused(&what, resp));
            }
            let next = next_link(&resp);
            let body = self.read_small(&what, resp)?;
            let entries: Vec<TreeEntry> =
                serde_json::from_slice(&body).map_err(|e| self.bad_answer(&what, e))?;
            for e in entries {
                // Only plain index paths: a listing is input like any other.
                if e.kind == "file" && plain_index_path(&e.path) {
                    out.push(e.path);
                }
            }
            match next {
                Some(n) if n.starts_with(&self.endpoint) => url = n,
                _ => return Ok(out),
            }
        }
        Ok(out)
    }

    /// Experts whose name or description holds every word of `query`, and the index files
    /// that could not be read (skipped).
    pub fn search_skipping(&self, query: &str) -> Result<(Vec<super::SearchHit>, Vec<Error>)> {
        let paths = self.index_paths()?;
        let head = self.head()?;
        let fetched: Vec<Result<Option<Vec<IndexLine>>>> =
            crate::parallel::collect_ordered(SEARCH_FETCHES, &paths, |p| {
                let src = format!("{}/{p}", self.source);
                Ok(self
                    .get_file(&head, p)
                    .and_then(|b| b.map(|b| parse_index(&b, &src)).transpose()))
            })?;
        Ok(collect_search(query, fetched))
    }
}

impl Registry for HubRegistry {
    fn source(&self) -> &str {
        &self.source
    }

    fn index(&self, name: &str) -> Result<Option<Vec<IndexLine>>> {
        self.reader.index(name)
    }

    fn open_blob(&self, line: &IndexLine) -> Result<Box<dyn Read + Send>> {
        self.reader.open_blob(line)
    }

    fn publish(
        &self,
        artifact: &Path,
        line: &IndexLine,
        progress: &dyn Progress,
    ) -> Result<IndexLine> {
        let mut line = line.clone();
        line.pubtime = now_rfc3339();
        HubRegistry::publish(self, artifact, &line, progress)
    }

    fn set_yanked(&self, name: &str, version: &semver::Version, yanked: bool) -> Result<IndexLine> {
        HubRegistry::set_yanked(self, name, version, yanked)
    }

    fn search(&self, query: &str, limit: usize) -> Result<SearchResults> {
        self.require_online("searching")?;
        Ok(super::search_results(
            &self.printer,
            "a damaged index file",
            self.search_skipping(query)?,
            limit,
        ))
    }
}

/// Whether a path of the Hub's tree listing is one to read as an index file: under `index/`,
/// made of expert-name segments (index.rs: ASCII letters, digits, `-`, `_`, `.` and a
/// leading `@`), so nothing in it changes the meaning of the URL it goes into.
fn plain_index_path(path: &str) -> bool {
    path.starts_with("index/")
        && path.len() < 256
        && path.split('/').all(|s| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.bytes().enumerate().all(|(i, c)| {
                    c.is_ascii_alphanumeric()
                        || matches!(c, b'-' | b'_' | b'.')
                        || (c == b'@' && i == 0)
                })
        })
}

/// All of `r` if it holds at most `limit` bytes, else `None` (having read `limit + 1`).
fn read_capped(r: impl Read, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut out = Vec::new();
    r.take(limit + 1).read_to_end(&mut out)?;
    Ok((out.len() as u64 <= limit).then_some(out))
}

/// A branch name in a URL path segment (`/` as `%2F`, as the Hub expects).
fn encode_rev(rev: &str) -> String {
    rev.replace('/', "%2F")
}

/// The `rel="next"` target of a `Link` header.
fn next_link(resp: &Response) -> Option<String> {
    let link = resp.headers().get("link")?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            url.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
}

fn changed_while_publishing(artifact: &Path) -> Error {
    Error::input(
        format!(
            "`{}` changed while it was being published",
            artifact.display()
        ),
        Some("publish it again once nothing else writes to it"),
    )
}

/// A reader that hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: std::sync::Arc<std::sync::Mutex<Sha256>>,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::{plain_index_path, read_capped};

    #[test]
    fn small_answers_are_read_up_to_their_cap_and_refused_past_it() {
        assert_eq!(read_capped(&b"abc"[..], 3).unwrap(), Some(b"abc".to_vec()));
        assert_eq!(read_capped(&b"abcd"[..], 3).unwrap(), None);
        assert_eq!(read_capped(std::io::repeat(7), 1 << 10).unwrap(), None);
    }

    #[test]
    fn only_plain_index_paths_from_a_tree_listing_are_read() {
        for ok in [
            "index/ss/t2/sst2",
            "index/@team/ne/ws/news",
            "index/1/a",
            "index/3/a/abc",
        ] {
            assert!(plain_index_path(ok), "{ok}");
        }
        for bad in [
            "config.json",
            "index/../config.json",
            "index/.hidden/x",
            "index//x",
            "index/a?x=1",
            "index/a#b",
            "index/a%2Fb",
            "index/a b",
            "index/x@y",
            "blobs/sha256/ab/cd",
        ] {
            assert!(!plain_index_path(bad), "{bad}");
        }
        assert!(!plain_index_path(&format!("index/{}", "a".repeat(300))));
    }
}
