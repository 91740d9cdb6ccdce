//! The HTTP API (docs/registry-protocol.md): the sparse index, blobs by sha256, and the
//! authenticated publish / yank endpoints, plus search. Every upload is validated here: the
//! server computes the digest itself, checks it against the one the client claims, verifies
//! the whole artifact (manifest, every frame, every mask) and derives the index line from the
//! manifest — nothing the client says about the artifact is trusted.

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
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use xpm_core::registry::IndexLine;
use xpm_core::registry::index::{RegistryConfig, SearchResults, index_rel_path};

use crate::auth::{ANONYMOUS_IDENTITY, Identities, Identity, Scope};
use crate::owners::{AuditRecord, State as Records};
use crate::storage::Storage;

/// How the server behaves.
#[derive(Clone)]
pub struct ServerConfig {
    /// Who may write, by token (tokens themselves are never kept or logged, only their sha256).
    pub identities: Identities,
    /// Require a token for publish, yank and owner changes.
    pub auth_required: bool,
    /// Largest accepted upload in bytes.
    pub max_upload_size: u64,
    /// Absolute URL clients should use for the API, if not the one they reached us on.
    pub public_url: Option<String>,
    /// Log one line per request to stderr.
    pub access_log: bool,
    /// Longest wait for the next piece of an upload body before the upload is refused (408).
    pub body_idle_timeout: std::time::Duration,
    /// Owners and the audit log; without it (an `s3://` registry with only plain tokens and no
    /// `--state-dir`) ownership is not enforced and nothing is audited.
    pub state: Option<Arc<crate::owners::State>>,
}

impl ServerConfig {
    /// Hash a token as [`Identities`] keeps it.
    pub fn hash_token(token: &str) -> [u8; 32] {
        crate::auth::hash_token(token)
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
            E::UnsupportedFormat { found, .. } => ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "the upload uses xpm format {found}; this registry reads formats 1.0 to \
                     {}.{}",
                    xpm_core::format::manifest::FORMAT_MAJOR,
                    xpm_core::format::manifest::FORMAT_MINOR
                ),
                Some(
                    "the artifact is newer than this server reads: upgrade xpm-registry to the \
                     publishing xpm's version",
                ),
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
        .route(
            "/api/v1/experts/{*rest}",
            get(get_owners).put(add_owners).delete(remove_owners),
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

/// The identity of the bearer token: 401 without a token, with an unknown one, or with an
/// expired one. A `--no-auth` server treats every request as the all-powerful `anonymous`.
fn identify(s: &AppState, headers: &HeaderMap) -> ApiResult<Identity> {
    if !s.cfg.auth_required {
        return Ok(Identity::all_powerful(ANONYMOUS_IDENTITY));
    }
    let hint = Some("pass a token this registry accepts with --token or $XPM_TOKEN");
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this registry requires a token to publish, yank or change owners, and none was sent",
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
    let id = (!token.trim().is_empty())
        .then(|| s.cfg.identities.by_token(token))
        .flatten()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the token is not valid for this registry",
                hint,
            )
        })?;
    if id.expired_at(std::time::SystemTime::now()) {
        let when = id
            .expires
            .map(|t| humantime::format_rfc3339_seconds(t).to_string())
            .unwrap_or_default();
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("the token of identity `{}` expired at {when}", id.name),
            Some("ask the registry's operator for a new token"),
        ));
    }
    Ok(id.clone())
}

/// 403 unless `id` has `scope` and (for a known name) a name pattern covering it.
fn require(id: &Identity, scope: Scope, name: Option<&str>) -> ApiResult<()> {
    let what = scope.as_str();
    if !id.scopes.contains(&scope) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("identity `{}` has no `{what}` scope", id.name),
            Some(&format!(
                "ask the registry's operator to add \"{what}\" to the scopes of identity `{}`",
                id.name
            )),
        ));
    }
    if let Some(n) = name
        && !id.covers(n)
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "identity `{}` may not {what} `{n}`: its names are {}",
                id.name,
                id.names.join(", ")
            ),
            Some(
                "use a name the identity's patterns cover, or ask the registry's operator to widen its `names`",
            ),
        ));
    }
    Ok(())
}

/// How a write stands against the owners of its name.
enum Ownership {
    /// The name has these owners, and the writer is one of them (or an admin).
    Owned(Vec<String>),
    /// Published before owners were recorded; the writer is an admin.
    Unowned,
    /// Nothing published and no owners: a new name.
    New,
}

/// Whether `id` may write `name` (the caller holds the owners lock): 403 for a non-owner, and
/// for a name without recorded owners unless `id` is an admin.
fn ownership(
    records: &Records,
    storage: &dyn Storage,
    id: &Identity,
    name: &str,
) -> ApiResult<Ownership> {
    match records.owners(name).map_err(ApiError::from_xpm)? {
        Some(list) if id.admin || list.contains(&id.name) => Ok(Ownership::Owned(list)),
        Some(list) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "`{name}` belongs to {}; identity `{}` is not one of its owners",
                list.join(", "),
                id.name
            ),
            Some(&format!(
                "an owner can add you with `xpm owner add {name} {}`",
                id.name
            )),
        )),
        None => {
            if storage.index(name).map_err(ApiError::from_xpm)?.is_none() {
                Ok(Ownership::New)
            } else if id.admin {
                Ok(Ownership::Unowned)
            } else {
                Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!(
                        "`{name}` has no recorded owners (it was published before owners were \
                         kept); only an admin identity may write it"
                    ),
                    Some(&format!(
                        "ask the registry's operator to run `xpm owner add {name} {}` with an \
                         admin token",
                        id.name
                    )),
                ))
            }
        }
    }
}

/// Run blocking work that may answer with its own error off the async threads.
async fn blocking_api<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("worker failed: {e}"),
            None,
        )
    })?
}

/// Append the outcome of a write to the audit log (a failure to do so goes to stderr).
async fn audit(s: &AppState, rec: AuditRecord, ok: StatusCode, err: Option<&ApiError>) {
    let Some(records) = s.cfg.state.clone() else {
        return;
    };
    let rec = outcome(rec, ok, err);
    let done = tokio::task::spawn_blocking(move || records.audit(&rec)).await;
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("xpm-registry: cannot append to the audit log: {e}"),
        Err(e) => eprintln!("xpm-registry: cannot append to the audit log: {e}"),
    }
}

fn outcome(mut rec: AuditRecord, ok: StatusCode, err: Option<&ApiError>) -> AuditRecord {
    match err {
        None => {
            rec.result = "ok".into();
            rec.status = ok.as_u16();
        }
        Some(e) => {
            rec.result = if e.status.is_client_error() {
                "refused"
            } else {
                "failed"
            }
            .into();
            rec.status = e.status.as_u16();
            rec.error = Some(e.error.clone());
        }
    }
    rec
}

async fn publish(State(s): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult<Response> {
    let id = identify(&s, &headers)?;
    let mut rec = AuditRecord::new(&id.name, "publish");
    let r = publish_as(&s, id, &headers, body, &mut rec).await;
    audit(&s, rec, StatusCode::CREATED, r.as_ref().err()).await;
    r
}

async fn publish_as(
    s: &AppState,
    id: Identity,
    headers: &HeaderMap,
    body: Body,
    rec: &mut AuditRecord,
) -> ApiResult<Response> {
    require(&id, Scope::Publish, None)?;
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
    rec.digest = Some(claimed.clone());
    let signature = parse_signature_header(headers)?;
    let (tmp, digest, size) = receive(s, headers, body, &claimed).await?;
    let (line, tmp) = blocking(move || {
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
        Ok((line, tmp))
    })
    .await?;
    rec.name = Some(line.name.clone());
    rec.version = Some(line.vers.to_string());
    require(&id, Scope::Publish, Some(&line.name))?;
    let storage = s.storage.clone();
    let records = s.cfg.state.clone();
    let line = blocking_api(move || {
        let store = |tmp: tempfile::NamedTempFile| -> xpm_core::Result<()> {
            let tmp = tmp.into_temp_path();
            storage.publish(&tmp, &line)?;
            // The file now lives in the store; do not delete it.
            let _ = tmp.keep();
            Ok(())
        };
        let Some(records) = records else {
            store(tmp).map_err(ApiError::from_xpm)?;
            return Ok(line);
        };
        let _lock = records.lock().map_err(ApiError::from_xpm)?;
        let new = matches!(
            ownership(&records, storage.as_ref(), &id, &line.name)?,
            Ownership::New
        );
        // A new name's first publisher becomes its owner; recorded first, undone on failure.
        let record = new && id.name != ANONYMOUS_IDENTITY;
        if record {
            records
                .set_owners(&line.name, std::slice::from_ref(&id.name))
                .map_err(ApiError::from_xpm)?;
        }
        if let Err(e) = store(tmp) {
            if record && let Err(e2) = records.clear_owners(&line.name) {
                eprintln!(
                    "xpm-registry: cannot undo the owners of `{}`: {e2}",
                    line.name
                );
            }
            return Err(ApiError::from_xpm(e));
        }
        Ok(line)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(line)).into_response())
}

/// Stream an upload into a staging file, hashing and counting as it arrives: 413 past the size
/// limit, 408 when it stalls, 400 when it breaks off or its digest is not the claimed one.
async fn receive(
    s: &AppState,
    headers: &HeaderMap,
    body: Body,
    claimed: &str,
) -> ApiResult<(tempfile::NamedTempFile, String, u64)> {
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
    Ok((tmp, digest, size))
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
    let id = identify(&s, &headers)?;
    let mut rec = AuditRecord::new(&id.name, if yanked { "yank" } else { "unyank" });
    rec.name = Some(r.name.clone());
    rec.version = Some(r.vers.clone());
    let result = set_yanked_as(&s, id, r, yanked).await;
    if let Ok(line) = &result {
        rec.digest = Some(line.cksum.clone());
    }
    audit(&s, rec, StatusCode::OK, result.as_ref().err()).await;
    result.map(Json)
}

async fn set_yanked_as(
    s: &AppState,
    id: Identity,
    r: YankRequest,
    yanked: bool,
) -> ApiResult<IndexLine> {
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
    require(&id, Scope::Yank, Some(&r.name))?;
    let storage = s.storage.clone();
    let records = s.cfg.state.clone();
    blocking_api(move || {
        let _lock = match &records {
            Some(records) => {
                let lock = records.lock().map_err(ApiError::from_xpm)?;
                ownership(records, storage.as_ref(), &id, &r.name)?;
                Some(lock)
            }
            None => None,
        };
        let lines = storage
            .index_lines(&r.name)
            .map_err(ApiError::from_xpm)?
            .ok_or_else(|| not_found(format!("no expert named `{}`", r.name)))?;
        if !lines.iter().any(|l| l.vers == version) {
            return Err(not_found(format!(
                "{}@{version} was never published",
                r.name
            )));
        }
        storage
            .set_yanked(&r.name, &version, yanked)
            .map_err(ApiError::from_xpm)
    })
    .await
}

/// `/api/v1/experts/<name>/owners`: the name, or 404.
fn owners_name(rest: &str) -> ApiResult<String> {
    let name = rest
        .strip_suffix("/owners")
        .ok_or_else(|| not_found(format!("no API path `/api/v1/experts/{rest}`")))?;
    xpm_core::format::manifest::validate_name(name).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid expert name: {e}"),
            Some(xpm_core::registry::index::NAME_HINT),
        )
    })?;
    Ok(name.to_string())
}

fn records_of(s: &AppState) -> ApiResult<Arc<Records>> {
    s.cfg.state.clone().ok_or_else(|| {
        // 404, not 501: clients retry 5xx answers.
        ApiError::new(
            StatusCode::NOT_FOUND,
            "this registry server keeps no owners",
            Some("its operator can start it with --state-dir DIR to keep owners and an audit log"),
        )
    })
}

/// The owners of a name (also the answer to an owner change).
#[derive(Debug, Serialize, Deserialize)]
struct OwnersBody {
    name: String,
    owners: Vec<String>,
}

/// Body of an owner change: the identities to add or remove.
#[derive(Debug, Deserialize)]
struct OwnersChange {
    owners: Vec<String>,
}

async fn get_owners(
    State(s): State<AppState>,
    Path(rest): Path<String>,
) -> ApiResult<Json<OwnersBody>> {
    let name = owners_name(&rest)?;
    let records = records_of(&s)?;
    let storage = s.storage.clone();
    blocking_api(move || {
        let owners = match records.owners(&name).map_err(ApiError::from_xpm)? {
            Some(o) => o,
            None if storage.index(&name).map_err(ApiError::from_xpm)?.is_some() => Vec::new(),
            None => return Err(not_found(format!("no expert named `{name}`"))),
        };
        Ok(Json(OwnersBody { name, owners }))
    })
    .await
}

async fn add_owners(
    s: State<AppState>,
    p: Path<String>,
    h: HeaderMap,
    b: Json<OwnersChange>,
) -> ApiResult<Json<OwnersBody>> {
    change_owners(s, p, h, b, true).await
}

async fn remove_owners(
    s: State<AppState>,
    p: Path<String>,
    h: HeaderMap,
    b: Json<OwnersChange>,
) -> ApiResult<Json<OwnersBody>> {
    change_owners(s, p, h, b, false).await
}

async fn change_owners(
    State(s): State<AppState>,
    Path(rest): Path<String>,
    headers: HeaderMap,
    Json(change): Json<OwnersChange>,
    add: bool,
) -> ApiResult<Json<OwnersBody>> {
    let id = identify(&s, &headers)?;
    let mut rec = AuditRecord::new(&id.name, if add { "owner-add" } else { "owner-remove" });
    rec.name = rest.strip_suffix("/owners").map(str::to_string);
    rec.owners = Some(change.owners.clone());
    let result = change_owners_as(&s, id, &rest, change.owners, add).await;
    audit(&s, rec, StatusCode::OK, result.as_ref().err()).await;
    result.map(Json)
}

async fn change_owners_as(
    s: &AppState,
    id: Identity,
    rest: &str,
    who: Vec<String>,
    add: bool,
) -> ApiResult<OwnersBody> {
    let name = owners_name(rest)?;
    let records = records_of(s)?;
    require(&id, Scope::Owners, Some(&name))?;
    let bad = |msg: String| ApiError::new(StatusCode::BAD_REQUEST, msg, None);
    if who.is_empty() {
        return Err(bad(
            "the request names no identity (`{\"owners\": [\"alice\"]}`)".into(),
        ));
    }
    for w in &who {
        if add && s.cfg.identities.get(w).is_none() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("this registry has no identity `{w}`"),
                Some("owners are identities of the server's token config; ask its operator"),
            ));
        }
    }
    let storage = s.storage.clone();
    blocking_api(move || {
        let _lock = records.lock().map_err(ApiError::from_xpm)?;
        let mut owners = match ownership(&records, storage.as_ref(), &id, &name)? {
            Ownership::Owned(list) => list,
            Ownership::Unowned => Vec::new(),
            Ownership::New => return Err(not_found(format!("no expert named `{name}`"))),
        };
        for w in who {
            let at = owners.iter().position(|o| *o == w);
            match (add, at) {
                (true, None) => owners.push(w),
                (true, Some(_)) => {}
                (false, Some(i)) => {
                    owners.remove(i);
                }
                (false, None) => {
                    return Err(bad(format!("`{w}` is not an owner of `{name}`")));
                }
            }
        }
        if owners.is_empty() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("`{name}` would have no owner left"),
                Some("add the new owner first, then remove the old one"),
            ));
        }
        records
            .set_owners(&name, &owners)
            .map_err(ApiError::from_xpm)?;
        Ok(OwnersBody { name, owners })
    })
    .await
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
