//! The one thread that owns the resident model: it takes queued requests, groups them by
//! expert set so that the weights change only between groups, applies each group's delta in
//! place, runs the group's requests, and leaves the delta applied for the next group that wants
//! it.
//!
//! Rules (docs/serving.md): requests are drained from the queue in arrival order; the group of
//! the delta applied now runs first, then the others in order of their first request. A request
//! whose client has gone (its reply channel is closed: the client disconnected or its timeout
//! passed) is dropped unrun. A request never sees another request's expert: the weights change
//! only here, between groups, and every request of a group runs under that group's delta.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;

use candle_core::{Tensor, Var};
use tokio::sync::{mpsc, oneshot};

use super::ApiError;
use super::catalog::{Entry, ResolvedSet};
use super::metrics::Metrics;
use super::resident::{Delta, Resident};
use crate::error::{Error, Result};
use crate::format::ArtifactReader;
use crate::printer::Printer;
use crate::rng::SplitMix64;
use crate::train::bert::mean_pool;
use crate::train::model::{Net, ce};
use crate::train::nn::{Head, softmax};

/// What the worker is sent: a request, or a question about the resident weights.
pub enum Msg {
    Job(Job),
    Inspect(oneshot::Sender<super::Inspection>),
}

/// A queued request.
pub struct Job {
    pub set: Arc<ResolvedSet>,
    pub work: Work,
}

/// Where a classification's answer goes.
pub type ClassifyReply = oneshot::Sender<Result<Vec<Classified>, ApiError>>;

pub enum Work {
    Classify {
        inputs: Vec<String>,
        reply: ClassifyReply,
    },
    Generate {
        req: GenRequest,
        events: mpsc::UnboundedSender<GenEvent>,
    },
}

impl Job {
    /// The client is gone: nobody reads the answer.
    fn abandoned(&self) -> bool {
        match &self.work {
            Work::Classify { reply, .. } => reply.is_closed(),
            Work::Generate { events, .. } => events.is_closed(),
        }
    }

    fn fail(self, e: ApiError) {
        match self.work {
            Work::Classify { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Work::Generate { events, .. } => {
                let _ = events.send(GenEvent::Error(e));
            }
        }
    }
}

/// One classified input.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Classified {
    pub label: String,
    /// Label → probability, in the head's label order.
    pub probabilities: serde_json::Map<String, serde_json::Value>,
    /// The raw logits, in the same order.
    pub logits: Vec<f32>,
}

/// A generation request, checked by the HTTP layer.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: String,
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub stop: Vec<String>,
    pub seed: u64,
}

/// What a generation sends back, in order.
#[derive(Debug)]
pub enum GenEvent {
    /// Text generated since the last event.
    Text(String),
    Done {
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(ApiError),
}

/// Limits and sizes the worker needs.
pub struct WorkerConfig {
    /// Bound on the bytes of deltas kept in memory (least recently used go first).
    pub cache_bytes: usize,
    pub batch_size: usize,
    pub plugin_search: Vec<std::path::PathBuf>,
    /// Where merges are written while they are loaded.
    pub scratch: std::path::PathBuf,
}

struct Cached {
    delta: Arc<Delta>,
    used: u64,
}

pub struct Worker {
    pub resident: Resident,
    cfg: WorkerConfig,
    metrics: Arc<Metrics>,
    deltas: HashMap<String, Cached>,
    cached_bytes: usize,
    tick: u64,
    /// Classification heads by expert digest: (weight, bias, labels, max_len).
    heads: HashMap<String, (Var, Var, Vec<String>, usize)>,
}

impl Worker {
    pub fn new(resident: Resident, cfg: WorkerConfig, metrics: Arc<Metrics>) -> Self {
        Worker {
            resident,
            cfg,
            metrics,
            deltas: HashMap::new(),
            cached_bytes: 0,
            tick: 0,
            heads: HashMap::new(),
        }
    }

    /// Serve jobs until every sender is dropped.
    pub fn run(mut self, rx: Receiver<Msg>) {
        while let Ok(first) = rx.recv() {
            let mut jobs = Vec::new();
            let mut next = Some(first);
            while let Some(m) = next {
                match m {
                    Msg::Job(j) => jobs.push(j),
                    Msg::Inspect(reply) => {
                        let _ = reply.send(self.inspect());
                    }
                }
                next = rx.try_recv().ok();
            }
            self.metrics
                .queue_depth
                .fetch_sub(jobs.len() as i64, Ordering::Relaxed);
            for group in group_jobs(jobs, self.resident.applied()) {
                self.run_group(group);
            }
        }
    }

    /// Restore the plain base and hash its weights.
    fn inspect(&mut self) -> super::Inspection {
        self.resident.switch_to(None, None)?;
        Ok(super::InspectInfo {
            weights_digest: self.resident.weights_digest()?,
            swaps: self.resident.swaps,
            swap_seconds: self.resident.swap_time.as_secs_f64(),
        })
    }

    fn run_group(&mut self, group: Vec<Job>) {
        let jobs: Vec<Job> = group
            .into_iter()
            .filter(|j| {
                let gone = j.abandoned();
                if gone {
                    self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                }
                !gone
            })
            .collect();
        let Some(first) = jobs.first() else { return };
        let set = first.set.clone();
        if let Err(e) = self.prepare(&set) {
            let e = ApiError::from_error(&e);
            for j in jobs {
                j.fail(e.clone());
            }
            return;
        }
        let mut classify = Vec::new();
        for j in jobs {
            match j.work {
                Work::Classify { inputs, reply } => classify.push((inputs, reply)),
                Work::Generate { req, events } => self.generate(&req, &events),
            }
        }
        if !classify.is_empty() {
            self.classify_all(&set, classify);
        }
    }

    /// Apply `set`'s delta (from the cache, or loaded or merged now).
    fn prepare(&mut self, set: &ResolvedSet) -> Result<()> {
        if set.members.is_empty() {
            self.resident.switch_to(None, None)?;
            return Ok(());
        }
        if self.resident.applied() == Some(set.key.as_str()) {
            self.metrics.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let delta = self.delta(set)?;
        self.resident.switch_to(Some(&set.key), Some(&delta))?;
        self.metrics.swaps.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn delta(&mut self, set: &ResolvedSet) -> Result<Arc<Delta>> {
        self.tick += 1;
        if let Some(c) = self.deltas.get_mut(&set.key) {
            c.used = self.tick;
            self.metrics.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(c.delta.clone());
        }
        self.metrics.cache_misses.fetch_add(1, Ordering::Relaxed);
        let delta = Arc::new(match &set.recipe {
            None => Delta::load(&ArtifactReader::open(&set.members[0].path)?, &self.resident)?,
            Some(recipe) => self.merge(set, recipe)?,
        });
        self.cached_bytes += delta.bytes;
        self.deltas.insert(
            set.key.clone(),
            Cached {
                delta: delta.clone(),
                used: self.tick,
            },
        );
        // Evict the least recently used until within the bound (the newest always stays).
        while self.cached_bytes > self.cfg.cache_bytes && self.deltas.len() > 1 {
            let oldest = self
                .deltas
                .iter()
                .min_by_key(|(_, c)| c.used)
                .map(|(k, _)| k.clone())
                .expect("non-empty");
            let c = self.deltas.remove(&oldest).expect("present");
            self.cached_bytes -= c.delta.bytes;
        }
        Ok(delta)
    }

    /// Merge with the sparse engine (the code of `xpm merge`) into a scratch file, then load it.
    fn merge(&self, set: &ResolvedSet, recipe: &crate::merge::recipe::Recipe) -> Result<Delta> {
        let (method, weights) =
            crate::ops::merge::method_from_recipe(recipe, &[], &self.cfg.plugin_search)?;
        std::fs::create_dir_all(&self.cfg.scratch)
            .map_err(|e| Error::io("create", &self.cfg.scratch, e))?;
        let tmp = tempfile::Builder::new()
            .prefix(".xpm-serve-merge-")
            .suffix(".xpm")
            .tempfile_in(&self.cfg.scratch)
            .map_err(|e| Error::io("create a file in", &self.cfg.scratch, e))?;
        let out = tmp.path().to_path_buf();
        crate::ops::merge::merge(
            &crate::ops::merge::MergeOptions {
                experts: set.members.iter().map(|e| e.path.clone()).collect(),
                weights,
                method,
                name: "served-merge".into(),
                version: semver::Version::new(0, 1, 0),
                out: out.clone(),
                level: 1,
                recipe: Some(recipe.clone()),
            },
            &Printer::silent(),
        )?;
        let delta = Delta::load(&ArtifactReader::open(&out)?, &self.resident);
        drop(tmp);
        delta
    }

    /// The classification head of `e`: its weight and bias, labels and sequence length.
    fn head(&mut self, e: &Entry) -> Result<(Var, Var, Vec<String>, usize)> {
        if let Some(h) = self.heads.get(&e.digest) {
            return Ok(h.clone());
        }
        let r = ArtifactReader::open(&e.path)?;
        let (labels, max_len) = crate::train::eval::training_settings(Some(&r), None);
        let (w, b) =
            crate::train::eval::classification_head(Some(&r), &labels, &self.resident.device)?;
        let h = (
            Var::from_tensor(&w).map_err(ce("head"))?,
            Var::from_tensor(&b).map_err(ce("head"))?,
            labels,
            max_len,
        );
        self.heads.insert(e.digest.clone(), h.clone());
        Ok(h)
    }

    fn classify_all(&mut self, set: &ResolvedSet, jobs: Vec<(Vec<String>, ClassifyReply)>) {
        let head = match set.head.as_ref() {
            Some(e) => self.head(e),
            None => Err(Error::input(
                "classification needs an expert: its head and labels classify",
                Some("name an expert (`\"expert\": \"sst2@1\"`)"),
            )),
        };
        let (w, b, labels, max_len) = match head {
            Ok(h) => h,
            Err(e) => {
                let e = ApiError::from_error(&e);
                for (_, reply) in jobs {
                    let _ = reply.send(Err(e.clone()));
                }
                return;
            }
        };
        if let Net::Classifier { head, .. } = &mut self.resident.net {
            *head = Head { w, b };
        }
        // One batch list over every job of the group.
        let all: Vec<&str> = jobs
            .iter()
            .flat_map(|(inputs, _)| inputs.iter().map(String::as_str))
            .collect();
        let result = self.classify(&all, &labels, max_len);
        let mut at = 0;
        for (inputs, reply) in jobs {
            let n = inputs.len();
            let r = match &result {
                Ok(v) => Ok(v[at..at + n].to_vec()),
                Err(e) => Err(e.clone()),
            };
            at += n;
            let _ = reply.send(r);
        }
    }

    fn classify(
        &self,
        inputs: &[&str],
        labels: &[String],
        max_len: usize,
    ) -> Result<Vec<Classified>, ApiError> {
        let Net::Classifier { bert, head } = &self.resident.net else {
            return Err(ApiError::bad_request(
                "this server holds a causal language model: use /v1/completions",
                "classification needs an encoder base (BERT)",
            ));
        };
        let tok = &self.resident.md.tokenizer;
        let mut encoded = Vec::with_capacity(inputs.len());
        for (i, text) in inputs.iter().enumerate() {
            let ids = tok
                .encode(*text, true)
                .map_err(|e| ApiError::bad_request(format!("input {i}: {e}"), ""))?
                .get_ids()
                .to_vec();
            if ids.len() > max_len {
                return Err(ApiError::bad_request(
                    format!(
                        "input {i} is {} tokens, over the expert's limit of {max_len}",
                        ids.len()
                    ),
                    "shorten the input, or split it",
                ));
            }
            encoded.push(crate::train::data::Encoded { ids, target: 0 });
        }
        let dev = &self.resident.device;
        let mut out = Vec::with_capacity(inputs.len());
        let all: Vec<usize> = (0..encoded.len()).collect();
        for idx in all.chunks(self.cfg.batch_size.max(1)) {
            let batch = crate::train::model::make_batch(
                &encoded,
                idx,
                crate::train::data::Task::Classification,
                self.resident.md.pad_id(),
                dev,
            )
            .and_then(|b| {
                let h = bert.infer(&b.ids, &b.mask)?;
                let logits = head.forward(&mean_pool(&h, &b.mask)?)?;
                let probs = softmax(&logits)?;
                Ok((logits.to_vec2::<f32>()?, probs.to_vec2::<f32>()?))
            })
            .map_err(|e| ApiError::internal(format!("classify: {e}")))?;
            let (logits, probs) = batch;
            for (l, p) in logits.into_iter().zip(probs) {
                let best = argmax(&p);
                out.push(Classified {
                    label: labels.get(best).cloned().unwrap_or_default(),
                    probabilities: labels
                        .iter()
                        .zip(&p)
                        .map(|(k, v)| (k.clone(), serde_json::json!(v)))
                        .collect(),
                    logits: l,
                });
            }
        }
        Ok(out)
    }

    /// Generate for one request, sending text as it comes.
    fn generate(&self, req: &GenRequest, events: &mpsc::UnboundedSender<GenEvent>) {
        let r = self.generate_inner(req, events);
        if let Err(e) = r {
            let _ = events.send(GenEvent::Error(e));
        }
    }

    fn generate_inner(
        &self,
        req: &GenRequest,
        events: &mpsc::UnboundedSender<GenEvent>,
    ) -> Result<(), ApiError> {
        let Net::CausalLm { llama } = &self.resident.net else {
            return Err(ApiError::bad_request(
                "this server holds an encoder (classification) model: use /v1/classify",
                "text generation needs a causal language model base (Llama)",
            ));
        };
        let md = &self.resident.md;
        let tok = &md.tokenizer;
        let mut ids = tok
            .encode(req.prompt.as_str(), true)
            .map_err(|e| ApiError::bad_request(format!("prompt: {e}"), ""))?
            .get_ids()
            .to_vec();
        let prompt_tokens = ids.len();
        let limit = max_positions(&md.config);
        if prompt_tokens + req.max_tokens > limit {
            return Err(ApiError::bad_request(
                format!(
                    "the prompt ({prompt_tokens} tokens) plus max_tokens ({}) is over the model's context of {limit} tokens",
                    req.max_tokens
                ),
                "shorten the prompt or lower max_tokens",
            ));
        }
        let eos = md.eos_id();
        let dev = &self.resident.device;
        let mut rng = SplitMix64(req.seed);
        let mut generated: Vec<u32> = Vec::new();
        let mut sent = 0usize; // bytes of text sent
        let hold = req.stop.iter().map(String::len).max().unwrap_or(0);
        let mut finish = "length";
        let decode = |g: &[u32]| {
            tok.decode(g, true)
                .map_err(|e| ApiError::internal(format!("decode: {e}")))
        };
        while generated.len() < req.max_tokens {
            if events.is_closed() {
                return Ok(()); // the client went away
            }
            let n = ids.len();
            let logits = Tensor::from_vec(ids.clone(), (1, n), dev)
                .and_then(|t| {
                    let mask = Tensor::ones((1, n), candle_core::DType::F32, dev)?;
                    llama.forward(&t, &mask, None)
                })
                .and_then(|l| l.narrow(1, n - 1, 1)?.flatten_all()?.to_vec1::<f32>())
                .map_err(|e| ApiError::internal(format!("generate: {e}")))?;
            let next = sample(&logits, req.temperature, req.top_p, &mut rng);
            if Some(next) == eos {
                finish = "stop";
                break;
            }
            ids.push(next);
            generated.push(next);
            let text = decode(&generated)?;
            if let Some(cut) = req.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                if cut > sent {
                    let _ = events.send(GenEvent::Text(text[sent..cut].to_string()));
                }
                let _ = events.send(GenEvent::Done {
                    finish_reason: "stop",
                    prompt_tokens,
                    completion_tokens: generated.len(),
                });
                return Ok(());
            }
            // Hold back what could be the start of a stop string.
            let mut safe = text.len().saturating_sub(hold);
            while !text.is_char_boundary(safe) {
                safe -= 1;
            }
            if safe > sent {
                let _ = events.send(GenEvent::Text(text[sent..safe].to_string()));
                sent = safe;
            }
        }
        let text = decode(&generated)?;
        if text.len() > sent {
            let _ = events.send(GenEvent::Text(text[sent..].to_string()));
        }
        let _ = events.send(GenEvent::Done {
            finish_reason: finish,
            prompt_tokens,
            completion_tokens: generated.len(),
        });
        Ok(())
    }
}

/// The model's context length (`max_position_embeddings`, else 2048).
pub fn max_positions(config: &serde_json::Value) -> usize {
    config
        .get("max_position_embeddings")
        .and_then(|v| v.as_u64())
        .unwrap_or(2048) as usize
}

/// Groups of jobs with the same expert set: the one applied now first, then the others in the
/// order of their first job. Jobs keep their order within a group.
fn group_jobs(jobs: Vec<Job>, applied: Option<&str>) -> Vec<Vec<Job>> {
    let mut order: Vec<String> = Vec::new();
    let mut groups: HashMap<String, Vec<Job>> = HashMap::new();
    for j in jobs {
        let k = j.set.key.clone();
        if !groups.contains_key(&k) {
            order.push(k.clone());
        }
        groups.entry(k).or_default().push(j);
    }
    if let Some(a) = applied
        && let Some(p) = order.iter().position(|k| k == a)
    {
        let k = order.remove(p);
        order.insert(0, k);
    }
    order
        .into_iter()
        .map(|k| groups.remove(&k).expect("grouped"))
        .collect()
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// The next token: the argmax at temperature 0 (the first on ties, as a greedy decode takes
/// it), else a draw from the softmax at `temperature` cut to the smallest set of tokens whose
/// probability reaches `top_p` (nucleus sampling).
pub fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut SplitMix64) -> u32 {
    if temperature <= 0.0 {
        return argmax(logits) as u32;
    }
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let mut p: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i, ((x as f64 - max) / temperature).exp()))
        .collect();
    let z: f64 = p.iter().map(|x| x.1).sum();
    p.iter_mut().for_each(|x| x.1 /= z);
    p.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut keep = 0;
    let mut mass = 0.0;
    while keep < p.len() && (keep == 0 || mass < top_p) {
        mass += p[keep].1;
        keep += 1;
    }
    let u = rng.uniform() as f64 * mass;
    let mut acc = 0.0;
    for &(i, q) in &p[..keep] {
        acc += q;
        if u < acc {
            return i as u32;
        }
    }
    p[keep - 1].0 as u32
}
