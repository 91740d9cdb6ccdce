//! `xpm serve`: one resident base model, experts and merges swapped in per request
//! (docs/serving.md).
//!
//! - [`resident`]: the base, loaded once, and the in-place swap of a delta (bit-identical
//!   restore);
//! - [`catalog`]: which experts can be served and how a request's expert set resolves;
//! - [`worker`]: the one thread that owns the model, groups queued requests by expert set and
//!   runs them (classification, generation);
//! - [`http`]: the API (axum), with its checks, the bounded queue and timeouts;
//! - [`chat`], [`metrics`]: chat templates, Prometheus metrics.

pub mod catalog;
pub mod chat;
pub mod http;
pub mod metrics;
pub mod resident;
pub mod worker;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::home::XpmHome;
use crate::printer::Printer;
use crate::store::Store;
use crate::train::model::{DeviceChoice, ModelDir};

/// What `xpm serve` is asked to do.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub base: String,
    /// Serve the experts this project's `xpm.lock` pins (else everything installed).
    pub project: Option<PathBuf>,
    /// Artifacts to serve besides the installed ones.
    pub experts: Vec<PathBuf>,
    pub addr: SocketAddr,
    pub device: DeviceChoice,
    /// Requests waiting for the model before new ones get 429.
    pub queue: usize,
    pub timeout: Duration,
    /// Bound on the deltas kept in memory.
    pub cache_bytes: usize,
    pub batch_size: usize,
    pub max_body: usize,
    pub plugin_search: Vec<PathBuf>,
    pub hub: crate::train::hub::HubConfig,
}

/// An error answered to the client: status, message, hint (JSON body
/// `{"error": {"message", "type", "hint"}}`, OpenAI's shape plus the hint).
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub hint: String,
    pub kind: &'static str,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, hint: &str) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            hint: hint.into(),
            kind: "invalid_request_error",
            retry_after: None,
        }
    }

    pub fn not_found(message: impl Into<String>, hint: &str) -> Self {
        ApiError {
            status: 404,
            message: message.into(),
            hint: hint.into(),
            kind: "not_found_error",
            retry_after: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: 500,
            message: message.into(),
            hint: "see the server's log".into(),
            kind: "server_error",
            retry_after: None,
        }
    }

    /// A library error: the user's input (400), else the server's fault (500).
    pub fn from_error(e: &Error) -> Self {
        let message = crate::error::chain(e);
        let hint = e.hint().unwrap_or_default();
        match e {
            Error::Input { .. } | Error::Conflict { .. } => ApiError::bad_request(message, &hint),
            _ => ApiError {
                hint,
                ..ApiError::internal(message)
            },
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "message": self.message,
            "type": self.kind,
            "code": self.status,
            "hint": self.hint,
        })
    }
}

/// What `GET /health?weights=sha256` reports.
pub struct InspectInfo {
    pub weights_digest: String,
    pub swaps: u64,
    pub swap_seconds: f64,
}

pub type Inspection = Result<InspectInfo>;

/// Load the base, read the catalog, start the worker and serve until Ctrl-C (or SIGTERM).
pub fn run(opts: ServeOptions, home: &XpmHome, printer: &Printer) -> Result<()> {
    let (base_dir, base_id) = crate::train::hub::resolve_base_with(&opts.base, &opts.hub, printer)?;
    let md = ModelDir::open(&base_dir)?;
    printer.status("Hashing", format!("base model `{}`", base_dir.display()));
    let base_digest = md.checkpoint.digest(Some(&home.cache))?;
    let task = md.arch.task();
    let max_positions = worker::max_positions(&md.config);
    let chat_template = chat::ChatTemplate::load(&base_dir)?;
    let device = crate::train::model::device(opts.device)?;
    printer.status("Loading", format!("`{base_id}` onto {:?}", opts.device));
    let resident = resident::Resident::load(md, base_id.clone(), base_digest.clone(), device)?;

    let lock = match &opts.project {
        Some(dir) => {
            let p = crate::project::Project::discover(dir)?;
            Some(p.read_lock()?.ok_or_else(|| {
                Error::input(
                    format!("`{}` has no xpm.lock", p.dir.display()),
                    Some("run `xpm install` in the project first"),
                )
            })?)
        }
        None => None,
    };
    let store = Store::new(home);
    let catalog = Arc::new(catalog::Catalog::load(
        &store,
        lock.as_ref(),
        &opts.experts,
        &base_digest,
    )?);

    let metrics = Arc::new(metrics::Metrics::default());
    let (tx, rx) = std::sync::mpsc::sync_channel(opts.queue.max(1));
    let worker = worker::Worker::new(
        resident,
        worker::WorkerConfig {
            cache_bytes: opts.cache_bytes,
            batch_size: opts.batch_size,
            plugin_search: opts.plugin_search.clone(),
            scratch: home.root.join("tmp"),
        },
        metrics.clone(),
    );
    let worker = std::thread::Builder::new()
        .name("xpm-serve-model".into())
        .spawn(move || worker.run(rx))
        .map_err(|e| Error::io("start a thread for", &base_dir, e))?;

    let state = Arc::new(http::AppState {
        tx,
        catalog: catalog.clone(),
        metrics,
        base_id: base_id.clone(),
        base_digest,
        task,
        max_positions,
        timeout: opts.timeout,
        plugin_search: opts.plugin_search.clone(),
        chat_template,
        merges: Default::default(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("start the HTTP runtime for", &base_dir, e))?;
    let served = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(opts.addr)
            .await
            .map_err(|e| {
                Error::input(
                    format!("cannot listen on {}: {e}", opts.addr),
                    Some("pick another address with --addr (port 0 picks a free port)"),
                )
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("read the address of", &base_dir, e))?;
        printer.status(
            "Serving",
            format!(
                "`{base_id}` ({}) with {} expert version(s); Ctrl-C stops",
                task.as_str(),
                catalog.len()
            ),
        );
        // The one line on stdout: where to connect (port 0 picks one).
        let mut out = std::io::stdout();
        let _ = writeln!(out, "listening on http://{addr}");
        let _ = out.flush();
        axum::serve(listener, http::router(state, opts.max_body))
            .with_graceful_shutdown(shutdown())
            .await
            .map_err(|e| Error::io("serve on", &base_dir, e))
    });
    // The router (and its queue sender) is gone: the worker finishes its jobs and stops.
    drop(rt);
    let _ = worker.join();
    served
}

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
