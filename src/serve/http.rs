//! The HTTP API of `xpm serve` (docs/serving.md): `/v1/classify`, the OpenAI-compatible
//! `/v1/completions` and `/v1/chat/completions`, `/v1/models`, `/health`, `/metrics`.
//!
//! Every request is checked here (JSON, names, parameters, sizes) and answered with a 4xx JSON
//! error before it reaches the queue when it is wrong; the queue is bounded (429 with
//! `Retry-After` when full) and every request has a timeout (504).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use super::ApiError;
use super::catalog::{Catalog, ResolvedSet, SetSpec};
use super::metrics::Metrics;
use super::worker::{GenEvent, GenRequest, Job, Msg, Work};

/// Most inputs in one classify request.
pub const MAX_INPUTS: usize = 256;
/// Most stop strings (as OpenAI's API), and their length in bytes.
const MAX_STOP: usize = 4;
const MAX_STOP_BYTES: usize = 256;

pub struct AppState {
    pub tx: SyncSender<Msg>,
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<Metrics>,
    pub base_id: String,
    pub base_digest: String,
    /// `classification` or `causal-lm`.
    pub task: crate::train::data::Task,
    /// Context length of the model (causal LM).
    pub max_positions: usize,
    pub timeout: Duration,
    pub plugin_search: Vec<std::path::PathBuf>,
    /// The chat template of the model (`tokenizer_config.json`), if it has one.
    pub chat_template: Option<super::chat::ChatTemplate>,
    /// The merges served so far (label → key), for `/v1/models`.
    pub merges: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

pub fn router(state: Arc<AppState>, body_limit: usize) -> Router {
    Router::new()
        .route("/v1/classify", post(classify))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::not_found(
                "no such endpoint",
                "see docs/serving.md: /v1/classify, /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// Parse a JSON body, as a 400 (or 413) with a JSON error when it is not.
fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| ApiError {
        status: e.status().as_u16(),
        message: format!("cannot read the request body: {}", e.body_text()),
        hint: "send at most the body limit (`xpm serve --max-body`)".into(),
        kind: "invalid_request_error",
        retry_after: None,
    })?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            format!("the request body is not valid JSON for this endpoint: {e}"),
            "see docs/serving.md for the request's fields",
        )
    })
}

/// Queue a job; 429 when the queue is full.
fn enqueue(st: &AppState, job: Job) -> Result<(), ApiError> {
    st.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
    match st.tx.try_send(Msg::Job(job)) {
        Ok(()) => Ok(()),
        Err(e) => {
            st.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            Err(match e {
                TrySendError::Full(_) => {
                    st.metrics.rejected.fetch_add(1, Ordering::Relaxed);
                    ApiError {
                        status: 429,
                        message: "the server is busy: its request queue is full".into(),
                        hint: "retry after the time in `Retry-After`".into(),
                        kind: "rate_limit_error",
                        retry_after: Some(1),
                    }
                }
                TrySendError::Disconnected(_) => ApiError {
                    status: 503,
                    message: "the model worker has stopped".into(),
                    hint: "the server is shutting down; retry on another instance".into(),
                    kind: "server_error",
                    retry_after: Some(5),
                },
            })
        }
    }
}

fn timed_out(st: &AppState) -> ApiError {
    ApiError {
        status: 504,
        message: format!(
            "the request did not finish within the server's timeout of {:?}",
            st.timeout
        ),
        hint: "retry later, or send less work per request".into(),
        kind: "timeout",
        retry_after: Some(1),
    }
}

fn resolve(st: &AppState, spec: &SetSpec) -> Result<Arc<ResolvedSet>, ApiError> {
    let set = st.catalog.resolve_set(spec, &st.plugin_search)?;
    if set.recipe.is_some() {
        st.merges
            .lock()
            .expect("merges")
            .insert(set.label.clone(), set.key.clone());
    }
    Ok(Arc::new(set))
}

/// Answer `f`'s result, counting it in the metrics.
async fn observed<F>(st: &AppState, endpoint: &str, f: F) -> Response
where
    F: std::future::Future<Output = Result<Response, ApiError>>,
{
    let start = Instant::now();
    let r = match f.await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    st.metrics
        .observe(endpoint, r.status().as_u16(), start.elapsed());
    r
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassifyRequest {
    #[serde(flatten)]
    set: SetSpec,
    inputs: Vec<String>,
}

async fn classify(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    observed(&st, "classify", async {
        let req: ClassifyRequest = parse(body)?;
        if st.task != crate::train::data::Task::Classification {
            return Err(ApiError::bad_request(
                "this server holds a causal language model: use /v1/completions",
                "classification needs an encoder base (BERT)",
            ));
        }
        if req.inputs.is_empty() || req.inputs.len() > MAX_INPUTS {
            return Err(ApiError::bad_request(
                format!(
                    "`inputs` has {} texts; give 1 to {MAX_INPUTS}",
                    req.inputs.len()
                ),
                "split a larger batch over several requests",
            ));
        }
        let set = resolve(&st, &req.set)?;
        if set.head.is_none() {
            return Err(ApiError::bad_request(
                "classification needs an expert: its head and labels classify",
                "name an expert (`\"expert\": \"sst2@1\"`)",
            ));
        }
        let (reply, rx) = oneshot::channel();
        enqueue(
            &st,
            Job {
                set: set.clone(),
                work: Work::Classify {
                    inputs: req.inputs,
                    reply,
                },
            },
        )?;
        let results = match tokio::time::timeout(st.timeout, rx).await {
            Err(_) => return Err(timed_out(&st)),
            Ok(Err(_)) => return Err(ApiError::internal("the model worker dropped the request")),
            Ok(Ok(r)) => r?,
        };
        Ok(axum::Json(json!({
            "object": "classification",
            "model": set.label,
            "base": st.base_id,
            "results": results,
        }))
        .into_response())
    })
    .await
}

/// The fields `/v1/completions` and `/v1/chat/completions` share.
#[derive(Deserialize)]
struct Sampling {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    n: Option<u32>,
    /// xpm's extension: the expert set (experts, strategy, params, weights, seed).
    #[serde(default)]
    xpm: Option<SetSpec>,
}

impl Sampling {
    /// The expert set the request names: `xpm`, else `model` (`base`, the base's id,
    /// `NAME@REQ` or `base+NAME@REQ`).
    fn set(&self, st: &AppState) -> Result<SetSpec, ApiError> {
        if let Some(x) = &self.xpm {
            return Ok(x.clone());
        }
        let model = self.model.as_deref().unwrap_or("base");
        if model == "base" || model == st.base_id {
            return Ok(SetSpec::default());
        }
        let rest = model.strip_prefix("base+").unwrap_or(model);
        let experts: Vec<String> = rest.split('+').map(str::to_string).collect();
        Ok(if experts.len() == 1 {
            SetSpec {
                expert: Some(experts[0].clone()),
                ..SetSpec::default()
            }
        } else {
            SetSpec {
                experts,
                ..SetSpec::default()
            }
        })
    }

    fn request(&self, st: &AppState, prompt: String) -> Result<GenRequest, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request(
                "`n` must be 1",
                "send one request per completion",
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad_request(
                format!("`temperature` is {temperature}; it must be in [0, 2]"),
                "0 is greedy decoding",
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad_request(
                format!("`top_p` is {top_p}; it must be in (0, 1]"),
                "1 keeps every token",
            ));
        }
        let stop = match &self.stop {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    ApiError::bad_request("`stop` must be a string or a list of strings", "")
                })?,
            Some(_) => {
                return Err(ApiError::bad_request(
                    "`stop` must be a string or a list of strings",
                    "",
                ));
            }
        };
        if stop.len() > MAX_STOP
            || stop
                .iter()
                .any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
        {
            return Err(ApiError::bad_request(
                format!(
                    "give at most {MAX_STOP} non-empty `stop` strings of at most {MAX_STOP_BYTES} bytes"
                ),
                "",
            ));
        }
        let max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(16.min(st.max_positions));
        if max_tokens == 0 || max_tokens > st.max_positions {
            return Err(ApiError::bad_request(
                format!(
                    "`max_tokens` is {max_tokens}; it must be 1 to the model's context of {}",
                    st.max_positions
                ),
                "",
            ));
        }
        let seed = self.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        Ok(GenRequest {
            prompt,
            max_tokens,
            temperature,
            top_p,
            stop,
            seed,
        })
    }
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Value,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<super::chat::Message>,
    #[serde(flatten)]
    sampling: Sampling,
}

fn lm_only(st: &AppState) -> Result<(), ApiError> {
    if st.task != crate::train::data::Task::CausalLm {
        return Err(ApiError::bad_request(
            "this server holds an encoder (classification) model: use /v1/classify",
            "text generation needs a causal language model base (Llama)",
        ));
    }
    Ok(())
}

async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let st2 = st.clone();
    observed(&st2, "completions", async move {
        let req: CompletionRequest = parse(body)?;
        lm_only(&st)?;
        let prompt = match &req.prompt {
            Value::String(s) => s.clone(),
            Value::Array(a) if a.len() == 1 && a[0].is_string() => {
                a[0].as_str().expect("string").to_string()
            }
            _ => {
                return Err(ApiError::bad_request(
                    "`prompt` must be a string (or a list of one string)",
                    "send one request per prompt",
                ));
            }
        };
        let g = req.sampling.request(&st, prompt)?;
        let spec = req.sampling.set(&st)?;
        run_generation(st, spec, g, req.sampling.stream, false).await
    })
    .await
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let st2 = st.clone();
    observed(&st2, "chat_completions", async move {
        let req: ChatRequest = parse(body)?;
        lm_only(&st)?;
        if req.messages.is_empty() {
            return Err(ApiError::bad_request("`messages` is empty", ""));
        }
        let prompt = match &st.chat_template {
            Some(t) => t.render(&req.messages)?,
            None => super::chat::plain_prompt(&req.messages),
        };
        let g = req.sampling.request(&st, prompt)?;
        let spec = req.sampling.set(&st)?;
        run_generation(st, spec, g, req.sampling.stream, true).await
    })
    .await
}

async fn run_generation(
    st: Arc<AppState>,
    spec: SetSpec,
    g: GenRequest,
    stream: bool,
    chat: bool,
) -> Result<Response, ApiError> {
    let set = resolve(&st, &spec)?;
    let (events, mut rx) = mpsc::unbounded_channel();
    enqueue(
        &st,
        Job {
            set: set.clone(),
            work: Work::Generate { req: g, events },
        },
    )?;
    let created = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = format!(
        "{}-{:016x}",
        if chat { "chatcmpl" } else { "cmpl" },
        crate::rng::splitmix64(created ^ NEXT.fetch_add(1, Ordering::Relaxed))
    );
    let model = set.label.clone();
    if stream {
        let (object, chunk) = if chat {
            ("chat.completion.chunk", true)
        } else {
            ("text_completion", false)
        };
        let deadline = tokio::time::Instant::now() + st.timeout;
        // After the last chunk (or an error), one more event: `[DONE]`, then the end.
        let s = futures_util::stream::unfold(
            (rx, Phase::Running, id, model),
            move |(mut rx, phase, id, model)| async move {
                match phase {
                    Phase::End => return None,
                    Phase::Done => {
                        let ev = Event::default().data("[DONE]");
                        return Some((Ok::<_, Infallible>(ev), (rx, Phase::End, id, model)));
                    }
                    Phase::Running => {}
                }
                let ev = match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(ev) => ev,
                    Err(_) => Some(GenEvent::Error(ApiError {
                        status: 504,
                        message: "the stream did not finish within the server's timeout".into(),
                        hint: String::new(),
                        kind: "timeout",
                        retry_after: None,
                    })),
                };
                let (data, next) = match ev {
                    None => ("[DONE]".to_string(), Phase::End),
                    Some(GenEvent::Text(t)) => (
                        chunk_json(&id, object, created, &model, chunk, Some(&t), None).to_string(),
                        Phase::Running,
                    ),
                    Some(GenEvent::Done { finish_reason, .. }) => (
                        chunk_json(
                            &id,
                            object,
                            created,
                            &model,
                            chunk,
                            None,
                            Some(finish_reason),
                        )
                        .to_string(),
                        Phase::Done,
                    ),
                    Some(GenEvent::Error(e)) => {
                        (json!({"error": e.body()}).to_string(), Phase::Done)
                    }
                };
                Some((
                    Ok::<_, Infallible>(Event::default().data(data)),
                    (rx, next, id, model),
                ))
            },
        );
        return Ok(Sse::new(s).into_response());
    }
    let mut text = String::new();
    let collect = async {
        while let Some(ev) = rx.recv().await {
            match ev {
                GenEvent::Text(t) => text.push_str(&t),
                GenEvent::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                } => return Ok((finish_reason, prompt_tokens, completion_tokens)),
                GenEvent::Error(e) => return Err(e),
            }
        }
        Err(ApiError::internal("the model worker dropped the request"))
    };
    let (finish, prompt_tokens, completion_tokens) =
        match tokio::time::timeout(st.timeout, collect).await {
            Err(_) => return Err(timed_out(&st)),
            Ok(r) => r?,
        };
    let choice = if chat {
        json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish})
    } else {
        json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
    };
    Ok(axum::Json(json!({
        "id": id,
        "object": if chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
    .into_response())
}

/// Where a stream is.
enum Phase {
    Running,
    /// The last chunk went out: `[DONE]` is next.
    Done,
    End,
}

fn chunk_json(
    id: &str,
    object: &str,
    created: u64,
    model: &str,
    chat: bool,
    text: Option<&str>,
    finish: Option<&str>,
) -> Value {
    let choice = if chat {
        json!({"index": 0, "delta": text.map_or(json!({}), |t| json!({"content": t})), "finish_reason": finish})
    } else {
        json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
    };
    json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    observed(&st, "models", async {
        let mut data = vec![json!({
            "id": "base", "object": "model", "owned_by": "xpm",
            "xpm": {"type": "base", "base": st.base_id, "digest": st.base_digest},
        })];
        for e in st.catalog.all() {
            data.push(json!({
                "id": e.id(), "object": "model", "owned_by": "xpm",
                "xpm": {"type": "expert", "name": e.name, "version": e.version.to_string(),
                        "kind": e.kind.to_string(), "digest": e.digest},
            }));
        }
        for (label, key) in st.merges.lock().expect("merges").iter() {
            data.push(json!({
                "id": label, "object": "model", "owned_by": "xpm",
                "xpm": {"type": "merge", "key": key},
            }));
        }
        Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
    })
    .await
}

#[derive(Deserialize)]
struct HealthQuery {
    /// `sha256`: restore the plain base and report its weights' digest.
    #[serde(default)]
    weights: Option<String>,
}

async fn health(State(st): State<Arc<AppState>>, q: Query<HealthQuery>) -> Response {
    observed(&st, "health", async {
        let mut body = json!({
            "status": "ok",
            "base": st.base_id,
            "base_digest": st.base_digest,
            "experts": st.catalog.len(),
            "queue_depth": st.metrics.queue_depth.load(Ordering::Relaxed).max(0),
        });
        if let Some(w) = &q.weights {
            if w != "sha256" {
                return Err(ApiError::bad_request(
                    format!("unknown `weights` value `{w}`"),
                    "`?weights=sha256` reports the digest of the plain base's resident weights",
                ));
            }
            let (reply, rx) = oneshot::channel();
            st.tx.try_send(Msg::Inspect(reply)).map_err(|_| ApiError {
                status: 503,
                message: "the model worker is busy or stopped".into(),
                hint: "retry".into(),
                kind: "server_error",
                retry_after: Some(1),
            })?;
            let ins = match tokio::time::timeout(st.timeout, rx).await {
                Ok(Ok(i)) => i,
                Ok(Err(_)) => return Err(ApiError::internal("the worker dropped the request")),
                Err(_) => return Err(timed_out(&st)),
            };
            let ins = ins.map_err(|e| ApiError::from_error(&e))?;
            body["weights_sha256"] = json!(ins.weights_digest);
            body["swaps"] = json!(ins.swaps);
            body["swap_seconds"] = json!(ins.swap_seconds);
        }
        Ok(axum::Json(body).into_response())
    })
    .await
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let mut r = st.metrics.render().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, axum::Json(json!({"error": self.body()}))).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}
