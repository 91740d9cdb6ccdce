//! The HTTP registry client (blocking `reqwest`), for the server in `registry/`.
//!
//! Index files are cached under `$XPM_HOME/cache/index-v1/<registry>/` with their ETag and
//! revalidated with `If-None-Match`; `--offline` reads only that cache. Requests that fail for a
//! transient reason (connection refused or reset, timeout, 5xx, 429) are retried with
//! exponential backoff.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde::{Deserialize, Serialize};

use crate::digest::sha256;
use crate::error::{Error, Result};
use crate::fsutil::write_atomic_nosync;
use crate::home::XpmHome;
use crate::printer::{Printer, Progress};

use super::index::{IndexLine, RegistryConfig, SearchResults, index_rel_path, parse_index_of};
use super::{ClientOptions, Registry};

/// Attempts per request (the first try and its retries).
pub const ATTEMPTS: u32 = 4;
/// The header that carries a release signature on publish: the JSON of
/// [`crate::signing::ReleaseSignature`], hex-encoded.
pub const SIGNATURE_HEADER: &str = "X-Xpm-Signature";
/// Delay before the first retry; doubled on each further one.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Whole-request limit for index files, config.json and API calls.
const SMALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Whole-request limit for moving `size` bytes: a minute plus 10 s per MB (100 kB/s), so a
/// stalled transfer ends instead of hanging (blocking reqwest has no idle-read timeout).
fn transfer_timeout(size: u64) -> Duration {
    Duration::from_secs(60 + size / 100_000)
}

/// A registry reached over HTTP.
pub struct HttpRegistry {
    base: String,
    client: Client,
    token: Option<String>,
    offline: bool,
    cache: PathBuf,
    config: OnceLock<RegistryConfig>,
    printer: Printer,
    /// Send the token on reads too (a private Hugging Face repository), not only on writes.
    token_on_reads: bool,
}

/// The owners of a name on an `xpm-registry` server: the identities (of the server's token
/// config) that may publish and yank it, and add or remove owners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owners {
    pub name: String,
    pub owners: Vec<String>,
}

/// The error body every registry API response carries on failure.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    hint: Option<String>,
}

impl HttpRegistry {
    pub fn new(url: &str, home: &XpmHome, opts: &ClientOptions) -> Result<Self> {
        let base = url.trim_end_matches('/').to_string();
        reqwest::Url::parse(&base)
            .map_err(|e| Error::input(format!("`{url}` is not a valid registry URL: {e}"), None))?;
        let client = Client::builder()
            .user_agent(concat!("xpm/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(None::<Duration>)
            .build()
            .map_err(|e| {
                Error::registry(&base, format!("cannot start an HTTP client: {e}"), None)
            })?;
        let key = &sha256(base.as_bytes())["sha256:".len()..][..16];
        Ok(HttpRegistry {
            cache: home.cache.join("index-v1").join(key),
            base,
            client,
            token: opts.token.clone(),
            printer: opts.printer,
            offline: opts.offline,
            config: OnceLock::new(),
            token_on_reads: false,
        })
    }

    /// Send the token (if any) on reads as well: index files, config.json and blobs. A
    /// redirect to another host (a CDN) drops it, as reqwest does for every redirect.
    pub fn with_token_on_reads(mut self) -> Self {
        self.token_on_reads = true;
        self
    }

    /// A GET of `url` for reading, with the token when [`Self::with_token_on_reads`].
    fn read(&self, url: &str) -> RequestBuilder {
        let rb = self.client.get(url);
        if self.token_on_reads {
            self.authed(rb)
        } else {
            rb
        }
    }

    fn offline_error(&self, what: &str) -> Error {
        Error::registry(
            &self.base,
            format!("{what} is not in the cache and --offline forbids the network"),
            Some("run the command once without --offline"),
        )
    }

    /// Send a request once; 5xx and 429 answers become transient errors.
    fn attempt(&self, what: &str, rb: RequestBuilder) -> Result<Response> {
        let resp = rb.send().map_err(|e| self.transport_error(what, e))?;
        let status = resp.status();
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Err(Error::Registry {
                url: self.base.clone(),
                message: format!("{what}: the registry answered {status}"),
                hint: Some("the registry is having trouble; try again later".into()),
                transient: true,
            });
        }
        Ok(resp)
    }

    /// Send a small request (index, config, API), retrying transient failures.
    fn send(&self, what: &str, build: impl Fn() -> RequestBuilder) -> Result<Response> {
        retry(&self.printer, || {
            self.attempt(what, build().timeout(SMALL_TIMEOUT))
        })
    }

    fn transport_error(&self, what: &str, e: reqwest::Error) -> Error {
        // Connection failures (refused, reset, DNS, TLS), timeouts and broken bodies are worth
        // retrying; a request xpm could not even build is not. Errors never show the token.
        Error::Registry {
            url: self.base.clone(),
            message: format!("{what}: {}", crate::error::chain(&e)),
            hint: Some("check that the registry is running and reachable".into()),
            transient: !e.is_builder(),
        }
    }

    /// Turn a non-success response into an error carrying the server's message and hint.
    fn refused(&self, what: &str, resp: Response) -> Error {
        let status = resp.status();
        let body: Option<ErrorBody> = resp.json().ok();
        let (detail, server_hint) = match body {
            Some(b) => (b.error, b.hint),
            None => (status.to_string(), None),
        };
        let hint = server_hint.or_else(|| match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Some("pass a token the registry accepts with --token or $XPM_TOKEN".to_string())
            }
            StatusCode::PAYLOAD_TOO_LARGE => {
                Some("the registry limits upload size; ask its operator".to_string())
            }
            _ => None,
        });
        Error::Registry {
            url: self.base.clone(),
            message: format!("{what}: {detail}"),
            hint,
            transient: false,
        }
    }

    fn config(&self) -> Result<&RegistryConfig> {
        if let Some(c) = self.config.get() {
            return Ok(c);
        }
        let cached = self.cache.join("config.json");
        let cfg: RegistryConfig = if self.offline {
            let bytes = std::fs::read(&cached).map_err(|_| self.offline_error("config.json"))?;
            serde_json::from_slice(&bytes).map_err(|e| self.bad_response("config.json", e))?
        } else {
            let url = format!("{}/config.json", self.base);
            let resp = self.send("fetching config.json", || self.read(&url))?;
            if !resp.status().is_success() {
                let e = self.refused("fetching config.json", resp);
                return Err(match e {
                    Error::Registry { url, message, .. } => Error::Registry {
                        url,
                        message: format!("{message}; is this an xpm registry?"),
                        hint: Some("check the --registry URL".into()),
                        transient: false,
                    },
                    e => e,
                });
            }
            let bytes = resp
                .bytes()
                .map_err(|e| self.transport_error("reading config.json", e))?;
            let cfg =
                serde_json::from_slice(&bytes).map_err(|e| self.bad_response("config.json", e))?;
            write_atomic_nosync(&cached, &bytes)?;
            cfg
        };
        Ok(self.config.get_or_init(|| cfg))
    }

    fn bad_response(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::registry(
            &self.base,
            format!("the registry sent an invalid {what}: {e}"),
            Some("check that the URL points at an xpm registry"),
        )
    }

    /// The API base URL, or an error for a read-only registry.
    fn api(&self) -> Result<String> {
        match &self.config()?.api {
            Some(a) => Ok(resolve(&self.base, a)),
            None => Err(Error::registry(
                &self.base,
                "this registry is read-only (its config.json names no API)",
                None,
            )),
        }
    }

    fn authed(&self, rb: RequestBuilder) -> RequestBuilder {
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    fn require_online(&self, what: &str) -> Result<()> {
        if self.offline {
            return Err(Error::input(
                format!("{what} needs the network, and --offline is set"),
                None,
            ));
        }
        Ok(())
    }
}

/// Owners (docs/registry-protocol.md §6.1): only an `xpm-registry` server keeps them.
impl HttpRegistry {
    fn owners_url(&self, name: &str) -> Result<String> {
        index_rel_path(name)?;
        Ok(format!("{}/api/v1/experts/{name}/owners", self.api()?))
    }

    /// The owners of `name` (no token needed).
    pub fn owners(&self, name: &str) -> Result<Owners> {
        self.require_online("listing owners")?;
        let url = self.owners_url(name)?;
        let what = format!("listing the owners of {name}");
        let resp = self.send(&what, || self.client.get(&url))?;
        if !resp.status().is_success() {
            return Err(self.refused(&what, resp));
        }
        resp.json()
            .map_err(|e| self.bad_response("owners response", e))
    }

    /// Add (`add`) or remove identities as owners of `name`; returns the owners after the change.
    pub fn change_owners(&self, name: &str, identities: &[String], add: bool) -> Result<Owners> {
        self.require_online("changing owners")?;
        let url = self.owners_url(name)?;
        let what = if add {
            format!("adding owners to {name}")
        } else {
            format!("removing owners from {name}")
        };
        let body = serde_json::json!({ "owners": identities });
        let resp = self.send(&what, || {
            let rb = if add {
                self.client.put(&url)
            } else {
                self.client.delete(&url)
            };
            self.authed(rb).json(&body)
        })?;
        if !resp.status().is_success() {
            return Err(self.refused(&what, resp));
        }
        resp.json()
            .map_err(|e| self.bad_response("owners response", e))
    }
}

/// Resolve a possibly relative `path` against the registry base URL.
fn resolve(base: &str, path: &str) -> String {
    if path.trim_matches('/').is_empty() {
        base.to_string()
    } else if path.starts_with("http://") || path.starts_with("https://") {
        path.trim_end_matches('/').to_string()
    } else {
        format!(
            "{}/{}",
            base,
            path.trim_start_matches('/').trim_end_matches('/')
        )
    }
}

/// Run `f` up to [`ATTEMPTS`] times while it fails transiently, sleeping with exponential
/// backoff in between.
pub fn retry<T>(printer: &Printer, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let mut delay = FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
        match f() {
            Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                printer.warn(format!(
                    "{e}; retrying in {} s (attempt {} of {ATTEMPTS})",
                    delay.as_secs_f64(),
                    attempt + 1
                ));
                std::thread::sleep(delay);
                delay *= 2;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// A cached index file: its ETag (first line) and its body.
fn read_cached(path: &Path) -> Option<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).ok()?;
    let nl = bytes.iter().position(|&b| b == b'\n')?;
    let etag = String::from_utf8(bytes[..nl].to_vec()).ok()?;
    Some((etag, bytes[nl + 1..].to_vec()))
}

fn write_cached(path: &Path, etag: &str, body: &[u8]) -> Result<()> {
    let mut out = Vec::with_capacity(etag.len() + 1 + body.len());
    out.extend_from_slice(etag.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(body);
    write_atomic_nosync(path, &out)
}

impl Registry for HttpRegistry {
    fn source(&self) -> &str {
        &self.base
    }

    fn index(&self, name: &str) -> Result<Option<Vec<IndexLine>>> {
        let rel = index_rel_path(name)?;
        let cached_path = self.cache.join("index").join(&rel);
        let cached = read_cached(&cached_path);
        let source = format!("{}/index/{rel}", self.base);
        if self.offline {
            return match cached {
                Some((_, body)) => Ok(Some(parse_index_of(&body, &source, name)?)),
                None => Err(self.offline_error(&format!("the index of `{name}`"))),
            };
        }
        let what = format!("fetching the index of `{name}`");
        let resp = self.send(&what, || {
            let rb = self.read(&source);
            match &cached {
                Some((etag, _)) if !etag.is_empty() => rb.header("If-None-Match", etag),
                _ => rb,
            }
        })?;
        match resp.status() {
            StatusCode::NOT_MODIFIED => match cached {
                Some((_, body)) => Ok(Some(parse_index_of(&body, &source, name)?)),
                None => Err(Error::Registry {
                    url: self.base.clone(),
                    message: format!(
                        "{what}: the registry answered 304 to an unconditional request"
                    ),
                    hint: Some("a proxy between xpm and the registry may be misbehaving".into()),
                    transient: true,
                }),
            },
            StatusCode::NOT_FOUND => {
                let _ = std::fs::remove_file(&cached_path);
                Ok(None)
            }
            s if s.is_success() => {
                let etag = resp
                    .headers()
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let body = resp.bytes().map_err(|e| self.transport_error(&what, e))?;
                let lines = parse_index_of(&body, &source, name)?;
                write_cached(&cached_path, &etag, &body)?;
                Ok(Some(lines))
            }
            _ => Err(self.refused(&what, resp)),
        }
    }

    fn open_blob(&self, line: &IndexLine) -> Result<Box<dyn Read + Send>> {
        if self.offline {
            return Err(self.offline_error(&format!("the artifact of {}", line.id())));
        }
        let url = resolve(&self.base, &self.config()?.blob_location(&line.cksum));
        let what = format!("downloading {}", line.id());
        // One attempt: the caller (Store::fetch) retries the whole download.
        let resp = self.attempt(&what, self.read(&url).timeout(transfer_timeout(line.size)))?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(Error::registry(
                &self.base,
                format!("{what}: the registry has no blob {}", line.cksum),
                Some(super::MISSING_BLOB_HINT),
            ));
        }
        if !resp.status().is_success() {
            return Err(self.refused(&what, resp));
        }
        Ok(Box::new(resp))
    }

    fn publish(
        &self,
        artifact: &Path,
        line: &IndexLine,
        progress: &dyn Progress,
    ) -> Result<IndexLine> {
        self.require_online("publishing")?;
        let url = format!("{}/api/v1/experts/new", self.api()?);
        let cfg = self.config()?;
        if cfg.auth_required && self.token.is_none() {
            return Err(Error::registry(
                &self.base,
                format!("publishing {}: this registry requires a token", line.id()),
                Some("pass one with --token or $XPM_TOKEN"),
            ));
        }
        if let Some(max) = cfg.max_upload_size
            && line.size > max
        {
            return Err(Error::registry(
                &self.base,
                format!(
                    "publishing {}: the artifact is {} bytes, over this registry's limit of {max}",
                    line.id(),
                    line.size
                ),
                Some("ask the registry's operator to raise --max-upload-size"),
            ));
        }
        let what = format!("publishing {}", line.id());
        let mut tries = 0;
        let result = retry(&self.printer, || {
            tries += 1;
            let file = std::fs::File::open(artifact).map_err(|e| Error::io("open", artifact, e))?;
            progress.reset();
            let file = progress.wrap_read(Box::new(file));
            let mut rb = self
                .authed(self.client.put(&url))
                .timeout(transfer_timeout(line.size))
                .header("X-Xpm-Sha256", &line.cksum);
            if let Some(sig) = &line.sig {
                // The signature (JSON) hex-encoded: a header value is one line of ASCII.
                let json = serde_json::to_vec(sig).expect("a signature serializes");
                rb = rb.header(SIGNATURE_HEADER, hex::encode(json));
            }
            let rb = rb
                .header("Content-Type", "application/octet-stream")
                .body(reqwest::blocking::Body::sized(file, line.size));
            self.attempt(&what, rb)
        });
        let resp = result?;
        if resp.status() == StatusCode::CONFLICT && tries > 1 {
            // An earlier attempt may have been committed before its answer was lost: if the
            // registry holds exactly these bytes under this version, that attempt succeeded.
            if let Some(lines) = self.index(&line.name)?
                && let Some(l) = lines
                    .iter()
                    .find(|l| l.vers == line.vers && l.cksum == line.cksum)
            {
                return Ok(l.clone());
            }
        }
        if !resp.status().is_success() {
            return Err(self.refused(&what, resp));
        }
        resp.json()
            .map_err(|e| self.bad_response("publish response", e))
    }

    fn set_yanked(&self, name: &str, version: &semver::Version, yanked: bool) -> Result<IndexLine> {
        self.require_online("yanking")?;
        let verb = if yanked { "yank" } else { "unyank" };
        let url = format!("{}/api/v1/{verb}", self.api()?);
        let what = format!("{verb} {name}@{version}");
        let body = serde_json::json!({ "name": name, "vers": version.to_string() });
        let resp = self.send(&what, || self.authed(self.client.post(&url)).json(&body))?;
        if !resp.status().is_success() {
            return Err(self.refused(&what, resp));
        }
        resp.json()
            .map_err(|e| self.bad_response("yank response", e))
    }

    fn search(&self, query: &str, limit: usize) -> Result<SearchResults> {
        self.require_online("searching")?;
        let mut url = reqwest::Url::parse(&format!("{}/api/v1/search", self.api()?))
            .map_err(|e| Error::registry(&self.base, format!("bad API URL: {e}"), None))?;
        url.query_pairs_mut()
            .append_pair("q", query)
            .append_pair("limit", &limit.to_string());
        let resp = self.send("searching", || self.client.get(url.clone()))?;
        if !resp.status().is_success() {
            return Err(self.refused("searching", resp));
        }
        resp.json()
            .map_err(|e| self.bad_response("search response", e))
    }
}
