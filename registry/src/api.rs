//! The HTTP API (docs/registry-protocol.md): the sparse index, blobs by sha256, and the
//! authenticated publish / yank endpoints, plus search. Every upload is validated here: the
//! server computes the digest itself, checks it against the one the client claims, verifies
//! the whole artifact (manifest, every frame, every mask) and derives the index line from the
//! manifest — nothing the client says about the artifact is trusted.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use xpm_core::registry::IndexLine;
use xpm_core::registry::index::{RegistryConfig, SearchResults, index_rel_path};

use crate::storage::Storage;

/// How the server behaves.
#[derive(Clone)]
pub struct ServerConfig {
    /// sha256 of every accepted token (tokens themselves are never kept or logged).
    pub token_hashes: HashSet<[u8; 32]>,
    /// Require a token for publish and yank.
    pub auth_required: bool,
    /// Largest accepted upload in bytes.
    pub max_upload_size: u64,
    /// Absolute URL clients should use for the API, if not the one they reached us on.
    pub public_url: Option<String>,
    /// Log one line per request to stderr.
    pub access_log: bool,
    /// Longest wait for the next piece of an upload body before the upload is refused (408).
    pub body_idle_timeout: std::time::Duration,
}

impl ServerConfig {
    /// Hash a token for [`ServerConfig::token_hashes`].
    pub fn hash_token(token: &str) -> [u8; 32] {
        Sha256::digest(token.trim().as_bytes()).into()
    }
}

#[derive(Clone)]
struct AppState {
    storage: Arc<dyn Storage>,
    cfg: Arc<ServerConfig>,
}

/// An error response: `{"error": "...", "hint": "..."}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: String,
    hint: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, error: impl Into<String>, hint: Option<&str>) -> Self {
        ApiError {
            status,
            error: error.into(),
            hint: hint.map(str::to_string),
        }
    }

    /// Map a library error, without leaking server paths.
    fn from_xpm(e: xpm_core::Error) -> Self {
        use xpm_core::Error as E;
        let hint = e.hint();
        match e {
            E::Conflict { message, hint } => ApiError {
                status: StatusCode::CONFLICT,
                error: message,
                hint,
            },
            E::Input { message, hint } => ApiError {
                status: StatusCode::BAD_REQUEST,
                error: message,
                hint,
            },
            // Only the server's own storage yields these (e.g. a damaged index file).
            E::Registry { url, message, .. } => {
                eprintln!("xpm-registry: storage error in {url}: {message}");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal storage error",
                    None,
                )
            }
            E::Corrupt { detail, .. } => ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("the upload is not a valid xpm artifact: {detail}"),
                Some("check it with `xpm verify FILE` and re-create it with `xpm pack`"),
            ),
            E::UnsupportedFormat {
                found, supported, ..
            } => ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "the upload uses xpm format {found}; this registry accepts format {supported}.x"
                ),
                None,
            ),
            E::Compute { what, source } => {
                eprintln!("xpm-registry: internal error: {what}: {source}");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error", None)
            }
            E::Plugin { .. } | E::Internal(_) => {
                eprintln!("xpm-registry: internal error: {e}");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error", None)
            }
            E::Io { action, source, .. } => {
                eprintln!("xpm-registry: storage error: cannot {action}: {source}");
                ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    error: "internal storage error".into(),
                    hint,
                }
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "error": self.error });
        if let Some(h) = self.hint {
            body["hint"] = h.into();
        }
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Run blocking storage work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> xpm_core::Result<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("worker failed: {e}"),
                None,
            )
        })?
        .map_err(ApiError::from_xpm)
}

/// The router for a registry on `storage`.
pub fn router(storage: Arc<dyn Storage>, cfg: ServerConfig) -> Router {
    let access_log = cfg.access_log;
    let state = AppState {
        storage,
        cfg: Arc::new(cfg),
    };
    let app = Router::new()
        .route("/config.json", get(get_config))
        .route("/index/{*path}", get(get_index))
        .route("/blobs/sha256/{prefix}/{hex}", get(get_blob))
        .route(
            "/api/v1/experts/new",
            put(publish).layer(DefaultBodyLimit::disable()),
        )
        .route("/api/v1/yank", post(yank))
        .route("/api/v1/unyank", post(unyank))
        .route("/api/v1/search", get(search))
        .route("/health", get(|| async { "ok" }))
        .with_state(state);
    if access_log {
        app.layer(middleware::from_fn(log_request))
    } else {
        app
    }
}

/// One line per request: method, path (never headers, so never tokens), status, time.
async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let t = Instant::now();
    let resp = next.run(req).await;
    eprintln!(
        "{method} {path} {} {:.1}ms",
        resp.status().as_u16(),
        t.elapsed().as_secs_f64() * 1e3
    );
    resp
}

async fn get_config(State(s): State<AppState>) -> Json<RegistryConfig> {
    Json(RegistryConfig {
        dl: "blobs/sha256/{prefix}/{sha256}".into(),
        api: Some(s.cfg.public_url.clone().unwrap_or_else(|| "/".into())),
        auth_required: s.cfg.auth_required,
        max_upload_size: Some(s.cfg.max_upload_size),
    })
}

/// The name an index path belongs to, if the path is the canonical one for that name.
fn name_of_index_path(path: &str) -> Option<String> {
    let last = path.rsplit('/').next()?;
    let name = match path.strip_prefix('@') {
        Some(rest) => format!("{}/{last}", rest.split('/').next()?),
        None => last.to_string(),
    };
    (index_rel_path(&name).ok()? == path).then_some(name)
}

fn not_found(what: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, what, None)
}

async fn get_index(
    State(s): State<AppState>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let name =
        name_of_index_path(&path).ok_or_else(|| not_found(format!("no index file `{path}`")))?;
    let storage = s.storage.clone();
    let n = name.clone();
    let bytes = blocking(move || storage.index(&n))
        .await?
        .ok_or_else(|| not_found(format!("no expert named `{name}`")))?;
    let etag = format!("\"{}\"", &hex::encode(Sha256::digest(&bytes))[..32]);
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let etag_h = HeaderValue::from_str(&etag).expect("ascii etag");
    if matches {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_h)]).into_response());
    }
    Ok((
        [
            (header::ETAG, etag_h),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-ndjson"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        bytes,
    )
        .into_response())
}

async fn get_blob(
    State(s): State<AppState>,
    Path((prefix, hex)): Path<(String, String)>,
) -> ApiResult<Response> {
    let valid = hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && hex[..2] == prefix;
    if !valid {
        return Err(not_found(format!("no blob `{prefix}/{hex}`")));
    }
    let storage = s.storage.clone();
    let cksum = format!("sha256:{hex}");
    let c = cksum.clone();
    let (len, mut reader) = blocking(move || storage.open_blob(&c))
        .await?
        .ok_or_else(|| not_found(format!("no blob {cksum}")))?;
    // Stream from the blocking reader through a small channel.
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx
                        .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
                        .is_err()
                    {
                        break;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    break;
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok((
        [
            (header::CONTENT_LENGTH, HeaderValue::from(len)),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=31536000, immutable"),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

use std::io::Read as _;

/// Check the bearer token.
fn authorize(s: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    if !s.cfg.auth_required {
        return Ok(());
    }
    let hint = Some("pass a token this registry accepts with --token or $XPM_TOKEN");
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this registry requires a token to publish or yank, and none was sent",
            hint,
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .unwrap_or("");
    if token.is_empty()
        || !s
            .cfg
            .token_hashes
            .contains(&ServerConfig::hash_token(token))
    {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the token is not valid for this registry",
            hint,
        ));
    }
    Ok(())
}

async fn publish(State(s): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult<Response> {
    authorize(&s, &headers)?;
    let claimed = headers
        .get("x-xpm-sha256")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .filter(|c| xpm_core::digest::is_digest(c))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "the upload has no valid X-Xpm-Sha256 header (`sha256:<64 hex digits>`)",
                Some("publish with `xpm publish`, which sends it"),
            )
        })?;
    let signature = parse_signature_header(&headers)?;
    let max = s.cfg.max_upload_size;
    let too_big = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the upload is larger than this registry's limit of {max} bytes"),
            Some("ask the registry's operator to raise --max-upload-size"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > max
    {
        return Err(too_big());
    }
    // Stream the body to a staging file, hashing as it arrives.
    let dir = s.storage.staging_dir();
    let tmp = xpm_core::fsutil::temp_builder(false)
        .tempfile_in(&dir)
        .map_err(|e| {
            ApiError::from_xpm(xpm_core::Error::io("create a temporary file in", &dir, e))
        })?;
    let io_err = |e: std::io::Error| ApiError::from_xpm(xpm_core::Error::io("write", "upload", e));
    let mut file = tokio::fs::File::from_std(tmp.reopen().map_err(io_err)?);
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut stream = body.into_data_stream();
    loop {
        let next = tokio::time::timeout(s.cfg.body_idle_timeout, stream.next())
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the upload stalled: nothing arrived for {} s",
                        s.cfg.body_idle_timeout.as_secs_f64()
                    ),
                    Some("check the connection and publish again"),
                )
            })?;
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("the upload broke off: {e}"),
                None,
            )
        })?;
        size += chunk.len() as u64;
        if size > max {
            return Err(too_big());
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(io_err)?;
    }
    file.flush().await.map_err(io_err)?;
    file.sync_all().await.map_err(io_err)?;
    drop(file);
    let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
    if digest != claimed {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the uploaded bytes have digest {digest}, not the claimed {claimed}"),
            Some("the upload was damaged in transit or the file changed; publish again"),
        ));
    }
    let storage = s.storage.clone();
    let line = blocking(move || {
        let path = tmp.path().to_path_buf();
        xpm_core::format::verify::verify(&path, &xpm_core::printer::Printer::silent())?;
        let manifest = xpm_core::format::ArtifactReader::open(&path)?
            .manifest()
            .clone();
        xpm_core::format::manifest::validate_name(&manifest.name).map_err(|e| {
            xpm_core::Error::input(
                format!("invalid expert name: {e}"),
                Some(xpm_core::registry::index::NAME_HINT),
            )
        })?;
        let mut line = IndexLine::for_artifact(&manifest, &digest, size);
        if let Some(sig) = signature {
            // The server cannot know the address its clients use, so it checks the signature
            // and its binding to name, version and digest; clients check the registry too.
            let f =
                std::fs::File::open(&path).map_err(|e| xpm_core::Error::io("open", &path, e))?;
            xpm_core::signing::verify_release_on(
                &sig,
                f,
                None,
                &line.name,
                &line.vers.to_string(),
                &line.cksum,
            )?;
            line.sig = Some(sig);
        }
        let tmp = tmp.into_temp_path();
        storage.publish(&tmp, &line)?;
        // The file now lives in the store; do not delete it.
        let _ = tmp.keep();
        Ok(line)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(line)).into_response())
}

/// The release signature of a publish (`X-Xpm-Signature`: hex of its JSON), if any.
fn parse_signature_header(
    headers: &HeaderMap,
) -> ApiResult<Option<xpm_core::signing::ReleaseSignature>> {
    let Some(v) = headers.get(xpm_core::registry::http::SIGNATURE_HEADER) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "the X-Xpm-Signature header is not a hex-encoded xpm release signature",
            Some("publish with `xpm publish --sign`, which sends it"),
        )
    };
    let bytes = v
        .to_str()
        .ok()
        .and_then(|s| hex::decode(s).ok())
        .ok_or_else(bad)?;
    serde_json::from_slice(&bytes).map(Some).map_err(|_| bad())
}

#[derive(Debug, Deserialize)]
struct YankRequest {
    name: String,
    vers: String,
}

async fn yank(
    s: State<AppState>,
    h: HeaderMap,
    r: Json<YankRequest>,
) -> ApiResult<Json<IndexLine>> {
    set_yanked(s, h, r, true).await
}

async fn unyank(
    s: State<AppState>,
    h: HeaderMap,
    r: Json<YankRequest>,
) -> ApiResult<Json<IndexLine>> {
    set_yanked(s, h, r, false).await
}

async fn set_yanked(
    State(s): State<AppState>,
    headers: HeaderMap,
    Json(r): Json<YankRequest>,
    yanked: bool,
) -> ApiResult<Json<IndexLine>> {
    authorize(&s, &headers)?;
    xpm_core::format::manifest::validate_name(&r.name).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid expert name: {e}"),
            None,
        )
    })?;
    let version = semver::Version::parse(&r.vers).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("`{}` is not a version: {e}", r.vers),
            None,
        )
    })?;
    let storage = s.storage.clone();
    let name = r.name.clone();
    let lines = blocking(move || storage.index_lines(&name))
        .await?
        .ok_or_else(|| not_found(format!("no expert named `{}`", r.name)))?;
    if !lines.iter().any(|l| l.vers == version) {
        return Err(not_found(format!(
            "{}@{version} was never published",
            r.name
        )));
    }
    let storage = s.storage.clone();
    let line = blocking(move || storage.set_yanked(&r.name, &version, yanked)).await?;
    Ok(Json(line))
}

#[derive(Debug, Deserialize)]
struct SearchQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    limit: Option<usize>,
}

async fn search(
    State(s): State<AppState>,
    Query(q): Query<SearchQuery>,
) -> ApiResult<Json<SearchResults>> {
    let storage = s.storage.clone();
    let query = q.q.clone();
    let mut hits = blocking(move || storage.search(&query)).await?;
    let total = hits.len();
    hits.truncate(q.limit.unwrap_or(20).min(100));
    Ok(Json(SearchResults {
        experts: hits,
        total,
    }))
}
