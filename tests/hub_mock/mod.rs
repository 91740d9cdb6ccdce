//! A local stand-in for the Hugging Face Hub's write path, for the `hf://` registry tests
//! (mocked because the real Hub cannot be reached from here; tests talk to loopback only). It
//! keeps git-like history per repository (commits of whole file trees, branches) and serves
//! the endpoints `huggingface_hub` and xpm use, with the Hub's shapes:
//!
//! - `GET /api/{models|datasets}/ORG/REPO/revision/REV` → `{id, sha, siblings}`;
//! - `POST …/preupload/REV` → `uploadMode` `lfs` (binary sample or ≥ 10 MB) or `regular`;
//! - `POST /[datasets/]ORG/REPO.git/info/lfs/objects/batch` → `basic` (PUT + verify) or, over
//!   the multipart threshold, `multipart` (`chunk_size`, `00001`… part URLs, completion POST);
//! - `POST …/commit/REV` (NDJSON `header` with `parentCommit`, `file`, `lfsFile`,
//!   `deletedFile`) → a new commit, or **412** when `parentCommit` is not the branch head;
//! - `GET …/tree/REV/PATH?recursive=true` with `Link` pagination;
//! - `GET|HEAD /[datasets/]ORG/REPO/resolve/REV/PATH`: regular files inline (ETag,
//!   `If-None-Match` → 304), LFS files by a 302 to a CDN-like path; `X-Repo-Commit`,
//!   `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`) as the Hub sends them.
//!
//! Writes need `Authorization: Bearer TOKEN`; a private repository needs it for reads too.
//! `huggingface_hub` itself is run against this mock in the Python test, so the mock speaks
//! what the real client speaks.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sha2::{Digest, Sha256};

#[derive(Clone)]
struct File {
    bytes: Vec<u8>,
    /// Stored as an LFS object (its sha256).
    lfs: Option<String>,
}

#[derive(Default)]
struct Repo {
    commits: HashMap<String, Arc<BTreeMap<String, File>>>,
    branches: HashMap<String, String>,
    private: bool,
}

#[derive(Default)]
pub struct State {
    repos: HashMap<String, Repo>,
    lfs: HashMap<String, Vec<u8>>,
    parts: HashMap<(String, u32), Vec<u8>>,
    pub token: String,
    pub url: String,
    /// LFS objects larger than this use the multipart transfer.
    pub multipart_over: u64,
    /// Answer the next N commits with 412 as if another writer had committed first.
    pub stale_commits: usize,
    /// Entries per tree page.
    pub page: usize,
    /// Every request: "METHOD path".
    pub log: Vec<String>,
    /// Commits made.
    pub commits: usize,
}

pub struct HubMock {
    pub url: String,
    pub state: Arc<Mutex<State>>,
}

fn now_sha(parent: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(parent.as_bytes());
    h.update(body);
    h.update(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            .to_le_bytes(),
    );
    hex::encode(&h.finalize()[..20])
}

impl HubMock {
    /// Start the mock with `token` as the one write token.
    pub fn start(token: &str) -> HubMock {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            token: token.to_string(),
            url: url.clone(),
            multipart_over: u64::MAX,
            page: 1000,
            ..Default::default()
        }));
        let st = state.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let app = axum::Router::new().fallback(
                    move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                        let st = st.clone();
                        async move { handle(&st, method, uri, headers, body) }
                    },
                );
                axum::serve(listener, app).await.unwrap();
            });
        });
        HubMock { url, state }
    }

    /// Create a repository (`models/ORG/REPO` or `datasets/ORG/REPO`) with an initial commit
    /// holding `.gitattributes`, as the Hub does.
    pub fn create_repo(&self, key: &str, private: bool) {
        let mut st = self.state.lock().unwrap();
        let mut files = BTreeMap::new();
        files.insert(
            ".gitattributes".to_string(),
            File {
                bytes: b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n".to_vec(),
                lfs: None,
            },
        );
        let sha = now_sha("", key.as_bytes());
        let mut repo = Repo {
            private,
            ..Default::default()
        };
        repo.commits.insert(sha.clone(), Arc::new(files));
        repo.branches.insert("main".into(), sha);
        st.repos.insert(key.to_string(), repo);
    }

    /// The file at the head of `main` of repository `key`.
    pub fn file(&self, key: &str, path: &str) -> Option<Vec<u8>> {
        let st = self.state.lock().unwrap();
        let repo = st.repos.get(key)?;
        let head = repo.branches.get("main")?;
        repo.commits[head].get(path).map(|f| f.bytes.clone())
    }

    /// Whether `path` at the head of `main` is stored as an LFS object.
    pub fn is_lfs(&self, key: &str, path: &str) -> bool {
        let st = self.state.lock().unwrap();
        let repo = &st.repos[key];
        repo.commits[&repo.branches["main"]][path].lfs.is_some()
    }

    /// The paths at the head of `main`.
    pub fn paths(&self, key: &str) -> Vec<String> {
        let st = self.state.lock().unwrap();
        let repo = &st.repos[key];
        repo.commits[&repo.branches["main"]]
            .keys()
            .cloned()
            .collect()
    }

    /// Flip a byte of every stored LFS object (a damaged or malicious storage).
    pub fn corrupt_lfs(&self) {
        let mut st = self.state.lock().unwrap();
        for v in st.lfs.values_mut() {
            let k = v.len() / 2;
            v[k] ^= 0x40;
        }
        for repo in st.repos.values_mut() {
            for files in repo.commits.values_mut() {
                let mut f = (**files).clone();
                for file in f.values_mut() {
                    if file.lfs.is_some() {
                        let k = file.bytes.len() / 2;
                        file.bytes[k] ^= 0x40;
                    }
                }
                *files = Arc::new(f);
            }
        }
    }

    pub fn set(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap());
    }

    pub fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }
}

impl Repo {
    /// The commit a branch name or commit id names.
    fn resolve(&self, rev: &str) -> Option<String> {
        self.branches
            .get(rev)
            .cloned()
            .or_else(|| self.commits.contains_key(rev).then(|| rev.to_string()))
    }
}

/// `models/ORG/REPO` or `datasets/ORG/REPO` for a URL's `[datasets/]ORG/REPO`.
fn repo_key(repo_path: &str) -> String {
    match repo_path.strip_prefix("datasets/") {
        Some(r) => format!("datasets/{r}"),
        None => format!("models/{repo_path}"),
    }
}

/// The repository `key` if it exists and the caller may see it; else the status the Hub
/// answers with `RepoNotFound` (a private repository is "not found" to anyone without access).
fn visible_repo<'a>(st: &'a State, key: &str, token_ok: bool) -> Result<&'a Repo, StatusCode> {
    match st.repos.get(key) {
        None => Err(StatusCode::NOT_FOUND),
        Some(r) if r.private && !token_ok => Err(StatusCode::UNAUTHORIZED),
        Some(r) => Ok(r),
    }
}

fn json(status: StatusCode, v: serde_json::Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn hub_error(status: StatusCode, code: &str, msg: &str) -> Response {
    let mut r = json(status, serde_json::json!({ "error": msg }));
    if !code.is_empty() {
        r.headers_mut()
            .insert("x-error-code", code.parse().unwrap());
    }
    r.headers_mut()
        .insert("x-error-message", msg.parse().unwrap());
    r
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("authorization")?.to_str().ok()?;
    if let Some(t) = v.strip_prefix("Bearer ") {
        return Some(t.to_string());
    }
    let b = v.strip_prefix("Basic ")?;
    let d = base64::engine::general_purpose::STANDARD.decode(b).ok()?;
    let s = String::from_utf8(d).ok()?;
    s.split_once(':').map(|(_, p)| p.to_string())
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// Split `kind/org/name/rest…` from a path after `/api/`.
fn api_parts(path: &str) -> Option<(String, String, String, String)> {
    let mut it = path.splitn(5, '/');
    let kind = it.next()?;
    let org = it.next()?;
    let name = it.next()?;
    // `/api/models/ORG/REPO` alone is the repository's info at `main`.
    let verb = it.next().unwrap_or("revision");
    let rest = it.next().unwrap_or("main");
    Some((
        format!("{kind}/{org}/{name}"),
        verb.to_string(),
        rest.to_string(),
        String::new(),
    ))
}

fn handle(
    st: &Mutex<State>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = st.lock().unwrap();
    let path = uri.path().to_string();
    st.log.push(format!("{method} {path}"));
    let query = uri.query().unwrap_or("").to_string();
    let token_ok = bearer(&headers).is_some_and(|t| t == st.token);

    if let Some(rest) = path.strip_prefix("/api/") {
        let Some((key, verb, rest, _)) = api_parts(rest) else {
            return hub_error(StatusCode::NOT_FOUND, "", "not found");
        };
        let repo = match visible_repo(&st, &key, token_ok) {
            Ok(r) => r,
            Err(code) => return hub_error(code, "RepoNotFound", "Repository not found"),
        };
        // The revision is the first segment of `rest`, percent-encoded.
        let (rev_enc, sub) = rest.split_once('/').unwrap_or((&rest, ""));
        let rev = percent_decode(rev_enc);
        let head = repo.resolve(&rev);
        match (method.as_str(), verb.as_str()) {
            ("GET", "revision") => {
                let Some(sha) = head else {
                    return hub_error(StatusCode::NOT_FOUND, "RevisionNotFound", "Invalid rev id");
                };
                let siblings: Vec<_> = repo.commits[&sha]
                    .keys()
                    .map(|p| serde_json::json!({ "rfilename": p }))
                    .collect();
                let id = key.split_once('/').unwrap().1;
                json(
                    StatusCode::OK,
                    serde_json::json!({"id": id, "sha": sha, "siblings": siblings, "private": repo.private}),
                )
            }
            ("GET", "tree") => {
                let Some(sha) = head else {
                    return hub_error(StatusCode::NOT_FOUND, "RevisionNotFound", "Invalid rev id");
                };
                let files = &repo.commits[&sha];
                let prefix = if sub.is_empty() {
                    String::new()
                } else {
                    format!("{}/", sub.trim_end_matches('/'))
                };
                let all: Vec<_> = files
                    .iter()
                    .filter(|(p, _)| p.starts_with(&prefix))
                    .map(|(p, f)| {
                        serde_json::json!({"type": "file", "path": p, "size": f.bytes.len(),
                                           "oid": hex::encode(&Sha256::digest(&f.bytes)[..20])})
                    })
                    .collect();
                if all.is_empty() && !prefix.is_empty() {
                    return hub_error(StatusCode::NOT_FOUND, "EntryNotFound", "no such path");
                }
                let cursor: usize = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("cursor="))
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                let end = (cursor + st.page).min(all.len());
                let mut r = json(
                    StatusCode::OK,
                    serde_json::Value::Array(all[cursor..end].to_vec()),
                );
                if end < all.len() {
                    let next = format!(
                        "<{}{}?recursive=true&cursor={end}>; rel=\"next\"",
                        st.url, path
                    );
                    r.headers_mut().insert("link", next.parse().unwrap());
                }
                r
            }
            ("POST", "preupload") => {
                if !token_ok {
                    return hub_error(
                        StatusCode::UNAUTHORIZED,
                        "",
                        "Invalid credentials in Authorization header",
                    );
                }
                let v: serde_json::Value = match serde_json::from_slice(&body) {
                    Ok(v) => v,
                    Err(e) => return hub_error(StatusCode::BAD_REQUEST, "", &e.to_string()),
                };
                let files: Vec<_> = v["files"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| {
                        let sample = base64::engine::general_purpose::STANDARD
                            .decode(f["sample"].as_str().unwrap_or(""))
                            .unwrap_or_default();
                        let size = f["size"].as_u64().unwrap_or(0);
                        let binary = sample.contains(&0) || std::str::from_utf8(&sample).is_err();
                        let mode = if binary || size >= 10 << 20 { "lfs" } else { "regular" };
                        serde_json::json!({"path": f["path"], "uploadMode": mode, "shouldIgnore": false, "oid": null})
                    })
                    .collect();
                json(
                    StatusCode::OK,
                    serde_json::json!({ "files": files, "commitOid": head }),
                )
            }
            ("POST", "commit") => {
                if !token_ok {
                    return hub_error(
                        StatusCode::UNAUTHORIZED,
                        "",
                        "Invalid credentials in Authorization header",
                    );
                }
                let Some(sha) = head else {
                    return hub_error(StatusCode::NOT_FOUND, "RevisionNotFound", "Invalid rev id");
                };
                commit(&mut st, &key, &rev, &sha, &body)
            }
            _ => hub_error(StatusCode::NOT_FOUND, "", "no such endpoint"),
        }
    } else if let Some(oid) = path.strip_prefix("/lfs-upload/") {
        let oid = oid.to_string();
        if hex::encode(Sha256::digest(&body)) != oid {
            return hub_error(
                StatusCode::BAD_REQUEST,
                "",
                "the bytes do not hash to the oid",
            );
        }
        st.lfs.insert(oid, body.to_vec());
        StatusCode::OK.into_response()
    } else if let Some(rest) = path.strip_prefix("/lfs-part/") {
        let (oid, n) = rest.split_once('/').unwrap();
        let etag = hex::encode(&Sha256::digest(&body)[..16]);
        st.parts
            .insert((oid.to_string(), n.parse().unwrap()), body.to_vec());
        (StatusCode::OK, [("etag", format!("\"{etag}\""))]).into_response()
    } else if let Some(oid) = path.strip_prefix("/lfs-complete/") {
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let mut all = Vec::new();
        for p in v["parts"].as_array().unwrap() {
            let n = p["partNumber"].as_u64().unwrap() as u32;
            let Some(bytes) = st.parts.remove(&(oid.to_string(), n)) else {
                return hub_error(StatusCode::BAD_REQUEST, "", "unknown part");
            };
            let etag = format!("\"{}\"", hex::encode(&Sha256::digest(&bytes)[..16]));
            if p["etag"].as_str() != Some(&etag) {
                return hub_error(StatusCode::BAD_REQUEST, "", "part etag mismatch");
            }
            all.extend(bytes);
        }
        if hex::encode(Sha256::digest(&all)) != oid {
            return hub_error(
                StatusCode::BAD_REQUEST,
                "",
                "the parts do not hash to the oid",
            );
        }
        st.lfs.insert(oid.to_string(), all);
        StatusCode::OK.into_response()
    } else if let Some(oid) = path.strip_prefix("/lfs-verify/") {
        if st.lfs.contains_key(oid) {
            StatusCode::OK.into_response()
        } else {
            hub_error(StatusCode::NOT_FOUND, "", "object not uploaded")
        }
    } else if let Some(oid) = path.strip_prefix("/lfs-cdn/") {
        match st.lfs.get(oid) {
            Some(b) => (StatusCode::OK, b.clone()).into_response(),
            None => StatusCode::NOT_FOUND.into_response(),
        }
    } else if path.ends_with(".git/info/lfs/objects/batch") {
        let repo_path = path
            .trim_start_matches('/')
            .trim_end_matches("/info/lfs/objects/batch")
            .trim_end_matches(".git");
        let key = repo_key(repo_path);
        if !st.repos.contains_key(&key) {
            return hub_error(
                StatusCode::NOT_FOUND,
                "RepoNotFound",
                "Repository not found",
            );
        }
        if !token_ok {
            return hub_error(StatusCode::UNAUTHORIZED, "", "Invalid credentials");
        }
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let transfers: Vec<&str> = v["transfers"]
            .as_array()
            .map(|a| a.iter().filter_map(|t| t.as_str()).collect())
            .unwrap_or_default();
        let mut multipart = false;
        let objects: Vec<_> = v["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                let oid = o["oid"].as_str().unwrap().to_string();
                let size = o["size"].as_u64().unwrap();
                if st.lfs.contains_key(&oid) {
                    return serde_json::json!({"oid": oid, "size": size});
                }
                if size > st.multipart_over && transfers.contains(&"multipart") {
                    multipart = true;
                    let chunk = st.multipart_over.max(1);
                    let mut header = serde_json::Map::new();
                    header.insert("chunk_size".into(), chunk.to_string().into());
                    for i in 1..=size.div_ceil(chunk) {
                        header.insert(
                            format!("{i:05}"),
                            format!("{}/lfs-part/{oid}/{i}", st.url).into(),
                        );
                    }
                    serde_json::json!({"oid": oid, "size": size, "authenticated": true,
                        "actions": {"upload": {"href": format!("{}/lfs-complete/{oid}", st.url), "header": header},
                                    "verify": {"href": format!("{}/lfs-verify/{oid}", st.url)}}})
                } else {
                    serde_json::json!({"oid": oid, "size": size, "authenticated": true,
                        "actions": {"upload": {"href": format!("{}/lfs-upload/{oid}", st.url)},
                                    "verify": {"href": format!("{}/lfs-verify/{oid}", st.url)}}})
                }
            })
            .collect();
        let transfer = if multipart { "multipart" } else { "basic" };
        (
            StatusCode::OK,
            [("content-type", "application/vnd.git-lfs+json")],
            serde_json::json!({"transfer": transfer, "objects": objects, "hash_algo": "sha256"})
                .to_string(),
        )
            .into_response()
    } else if path.contains("/resolve/") {
        let (repo_path, rest) = path
            .trim_start_matches('/')
            .split_once("/resolve/")
            .unwrap();
        let key = repo_key(repo_path);
        let repo = match visible_repo(&st, &key, token_ok) {
            Ok(r) => r,
            Err(code) => return hub_error(code, "RepoNotFound", "Repository not found"),
        };
        let (rev_enc, file) = rest.split_once('/').unwrap_or((rest, ""));
        let rev = percent_decode(rev_enc);
        let Some(sha) = repo.resolve(&rev) else {
            return hub_error(StatusCode::NOT_FOUND, "RevisionNotFound", "Invalid rev id");
        };
        let Some(f) = repo.commits[&sha].get(file) else {
            let mut r = hub_error(StatusCode::NOT_FOUND, "EntryNotFound", "Entry not found");
            r.headers_mut()
                .insert("x-repo-commit", sha.parse().unwrap());
            return r;
        };
        let etag = match &f.lfs {
            Some(oid) => format!("\"{oid}\""),
            None => format!("\"{}\"", hex::encode(&Sha256::digest(&f.bytes)[..20])),
        };
        let mut h = vec![
            ("x-repo-commit".to_string(), sha.clone()),
            ("etag".to_string(), etag.clone()),
        ];
        if let Some(oid) = &f.lfs {
            h.push(("x-linked-etag".into(), format!("\"{oid}\"")));
            h.push(("x-linked-size".into(), f.bytes.len().to_string()));
            // To another host, as the Hub's CDN is: clients stop there for metadata and
            // must not forward the token.
            let cdn = st.url.replace("127.0.0.1", "localhost");
            h.push(("location".into(), format!("{cdn}/lfs-cdn/{oid}")));
            let mut r = StatusCode::FOUND.into_response();
            for (k, v) in h {
                r.headers_mut().insert(
                    axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            return r;
        }
        if headers
            .get("if-none-match")
            .is_some_and(|v| v.to_str().unwrap_or("") == etag)
        {
            let mut r = StatusCode::NOT_MODIFIED.into_response();
            r.headers_mut().insert("etag", etag.parse().unwrap());
            return r;
        }
        let body = if method == Method::HEAD {
            Vec::new()
        } else {
            f.bytes.clone()
        };
        let mut r = (StatusCode::OK, body).into_response();
        for (k, v) in h {
            r.headers_mut().insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        r.headers_mut()
            .insert("content-length", f.bytes.len().to_string().parse().unwrap());
        r
    } else {
        hub_error(StatusCode::NOT_FOUND, "", "not found")
    }
}

/// Apply one NDJSON commit to branch `rev` of repository `key` whose head is `head`.
fn commit(st: &mut State, key: &str, rev: &str, head: &str, body: &[u8]) -> Response {
    let text = match std::str::from_utf8(body) {
        Ok(t) => t,
        Err(_) => return hub_error(StatusCode::BAD_REQUEST, "", "the body is not UTF-8"),
    };
    let mut files = (*st.repos[key].commits[head]).clone();
    let mut summary = String::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => return hub_error(StatusCode::BAD_REQUEST, "", &e.to_string()),
        };
        let val = &v["value"];
        match v["key"].as_str() {
            Some("header") => {
                summary = val["summary"].as_str().unwrap_or("").to_string();
                if let Some(parent) = val["parentCommit"].as_str()
                    && parent != head
                {
                    return hub_error(
                        StatusCode::PRECONDITION_FAILED,
                        "",
                        "A commit has happened since. Please refresh and try again.",
                    );
                }
                if st.stale_commits > 0 {
                    st.stale_commits -= 1;
                    return hub_error(
                        StatusCode::PRECONDITION_FAILED,
                        "",
                        "A commit has happened since. Please refresh and try again.",
                    );
                }
            }
            Some("file") => {
                let content = val["content"].as_str().unwrap_or("");
                let bytes = if val["encoding"] == "base64" {
                    match base64::engine::general_purpose::STANDARD.decode(content) {
                        Ok(b) => b,
                        Err(e) => return hub_error(StatusCode::BAD_REQUEST, "", &e.to_string()),
                    }
                } else {
                    content.as_bytes().to_vec()
                };
                files.insert(
                    val["path"].as_str().unwrap().to_string(),
                    File { bytes, lfs: None },
                );
            }
            Some("lfsFile") => {
                let oid = val["oid"].as_str().unwrap_or("");
                let Some(bytes) = st.lfs.get(oid) else {
                    return hub_error(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "",
                        &format!("LFS object {oid} was not uploaded"),
                    );
                };
                if val["size"].as_u64() != Some(bytes.len() as u64) {
                    return hub_error(StatusCode::UNPROCESSABLE_ENTITY, "", "LFS size mismatch");
                }
                files.insert(
                    val["path"].as_str().unwrap().to_string(),
                    File {
                        bytes: bytes.clone(),
                        lfs: Some(oid.to_string()),
                    },
                );
            }
            Some("deletedFile") => {
                files.remove(val["path"].as_str().unwrap_or(""));
            }
            _ => return hub_error(StatusCode::BAD_REQUEST, "", "unknown commit operation"),
        }
    }
    let sha = now_sha(head, body);
    let repo = st.repos.get_mut(key).unwrap();
    repo.commits.insert(sha.clone(), Arc::new(files));
    repo.branches.insert(rev.to_string(), sha.clone());
    st.commits += 1;
    let id = key.split_once('/').unwrap().1;
    json(
        StatusCode::OK,
        serde_json::json!({
            "commitUrl": format!("{}/{id}/commit/{sha}", st.url),
            "commitOid": sha,
            "commitMessage": summary,
            "pullRequestUrl": null,
        }),
    )
}
