//! `xpm-registry serve --root DIR --addr HOST:PORT`: run a registry server.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use xpm_registry::auth::{self, Identities, TokenFile};
use xpm_registry::owners::State;
use xpm_registry::{DiskStorage, S3Storage, ServerConfig, Storage, router};

/// The xpm registry server.
#[derive(Debug, Parser)]
#[command(name = "xpm-registry", version, about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a registry stored in a directory
    Serve(Serve),
}

#[derive(Debug, clap::Args)]
struct Serve {
    /// Directory holding the index and blobs (created if missing)
    #[arg(long, value_name = "DIR", required_unless_present = "storage")]
    root: Option<PathBuf>,
    /// Keep the index and blobs in an S3-compatible bucket instead of --root: `s3://BUCKET`
    /// or `s3://BUCKET/PREFIX` (credentials and endpoint from AWS_* and $XPM_S3_ENDPOINT; the
    /// bucket must exist and honour conditional writes)
    #[arg(long, value_name = "s3://BUCKET/PREFIX", conflicts_with = "root")]
    storage: Option<String>,
    /// Address to listen on (port 0 picks a free port; the address is printed)
    #[arg(long, default_value = "127.0.0.1:8417", value_name = "HOST:PORT")]
    addr: String,
    /// Token config: `[[identity]]` tables with a token's sha256, scopes, name patterns and an
    /// expiry (docs/registry-protocol.md §6.1); an older file of one token per line (`#` starts a
    /// comment) still works, as one all-powerful identity `default`
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Accepted tokens, comma-separated, all of the all-powerful identity `default` (prefer
    /// --token-file; never logged)
    #[arg(
        long,
        env = "XPM_REGISTRY_TOKENS",
        hide_env_values = true,
        value_name = "TOKENS"
    )]
    tokens: Option<String>,
    /// Allow publish, yank and owner changes without a token (only for a private network)
    #[arg(long)]
    no_auth: bool,
    /// Where owners (`owners/`) and the audit log (`audit.log`) are kept [default: --root;
    /// an s3:// registry with a token config needs it]
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Largest accepted upload, e.g. `1GiB`, `500MB`, `1048576`
    #[arg(long, default_value = "2GiB", value_name = "SIZE")]
    max_upload_size: String,
    /// The URL clients reach the API at, if not the one they used for config.json
    #[arg(long, value_name = "URL")]
    public_url: Option<String>,
    /// No access log
    #[arg(short, long)]
    quiet: bool,
    /// Longest time a client may take to send a request's headers, and to stay idle between
    /// requests on a kept-alive connection
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    header_timeout: std::time::Duration,
    /// Longest pause in an upload body before the upload is refused (408)
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    body_idle_timeout: std::time::Duration,
    /// Connections served at once; more clients wait until one closes
    #[arg(long, default_value_t = 512, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Largest request head (request line and headers)
    #[arg(long, default_value = "64KiB", value_name = "SIZE")]
    max_header_size: String,
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    Ok(xpm_core::units::parse_size(s)?)
}

fn main() -> anyhow::Result<()> {
    let Command::Serve(mut a) = Cli::parse().command;
    let (identities, config) = load_identities(&mut a)?;
    let state_dir = match (&a.state_dir, &a.root) {
        (Some(d), _) => Some(d.clone()),
        (None, Some(root)) if a.storage.is_none() => Some(root.clone()),
        _ if config => bail!(
            "an s3:// registry with a token config keeps its owners and audit log on local \
             disk: pass --state-dir DIR"
        ),
        _ => {
            eprintln!(
                "xpm-registry: warning: no --state-dir: owners are not recorded or enforced and \
                 writes are not audited"
            );
            None
        }
    };
    let mut cfg = ServerConfig {
        identities,
        auth_required: !a.no_auth,
        max_upload_size: parse_size(&a.max_upload_size)?,
        public_url: a.public_url.clone(),
        access_log: !a.quiet,
        body_idle_timeout: a.body_idle_timeout,
        state: None,
    };
    let limits = xpm_registry::Limits {
        header_timeout: a.header_timeout,
        max_connections: a.max_connections as usize,
        max_header_bytes: usize::try_from(parse_size(&a.max_header_size)?).unwrap_or(usize::MAX),
    };
    let (storage, place): (Arc<dyn Storage>, String) = match (&a.root, &a.storage) {
        (_, Some(loc)) => match xpm_core::registry::Location::parse(loc)? {
            xpm_core::registry::Location::S3 { bucket, prefix } => (
                Arc::new(
                    S3Storage::open(&bucket, &prefix)
                        .with_context(|| format!("cannot open the registry at `{loc}`"))?,
                ),
                format!("storage {loc}"),
            ),
            _ => {
                bail!("--storage takes an s3://BUCKET/PREFIX location; use --root for a directory")
            }
        },
        (Some(root), None) => (
            Arc::new(
                DiskStorage::open(root)
                    .with_context(|| format!("cannot open the registry at `{}`", root.display()))?,
            ),
            format!("root {}", root.display()),
        ),
        (None, None) => bail!("pass --root DIR or --storage s3://BUCKET/PREFIX"),
    };
    // After the storage: a new --root must be created (empty) by the registry first.
    cfg.state = match &state_dir {
        Some(d) => Some(Arc::new(State::open(d).with_context(|| {
            format!("cannot open the state directory `{}`", d.display())
        })?)),
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&a.addr)
            .await
            .with_context(|| format!("cannot listen on {}", a.addr))?;
        let addr = listener.local_addr()?;
        println!("xpm-registry listening on http://{addr} ({place})");
        std::io::stdout().flush()?;
        let app = router(storage, cfg);
        xpm_registry::serve(listener, app, limits, shutdown_signal()).await?;
        anyhow::Ok(())
    })
}

/// The identities of `--token-file` and `--tokens` (whose plaintext is dropped here), and
/// whether the token file was a config (not plain tokens).
fn load_identities(a: &mut Serve) -> anyhow::Result<(Identities, bool)> {
    let mut identities = Identities::default();
    let mut plain = Vec::new();
    let mut config = false;
    if let Some(f) = &a.token_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the token file `{}`", f.display()))?;
        match auth::parse_token_file(&text)
            .map_err(|e| anyhow::anyhow!("the token file `{}`: {e}", f.display()))?
        {
            TokenFile::Config(ids) => {
                config = true;
                for (id, hashes) in ids {
                    identities
                        .add(id, &hashes)
                        .map_err(|e| anyhow::anyhow!("the token file `{}`: {e}", f.display()))?;
                }
            }
            TokenFile::Plain(hashes) => plain.extend(hashes),
        }
    }
    // Keep only the hashes; the plaintext list is dropped here.
    if let Some(list) = a.tokens.take() {
        for t in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            plain.push(ServerConfig::hash_token(t));
        }
    }
    if !plain.is_empty() {
        identities
            .add_plain(&plain)
            .map_err(|e| anyhow::anyhow!(e))?;
        eprintln!(
            "xpm-registry: warning: plain tokens are one all-powerful identity `{}` (every \
             scope, every name, no expiry); a token config gives each person their own identity, \
             scopes and expiry (docs/registry-protocol.md §6.1)",
            auth::LEGACY_IDENTITY
        );
    }
    if identities.is_empty() && !a.no_auth {
        bail!(
            "no tokens configured: pass --token-file FILE or set XPM_REGISTRY_TOKENS \
             (or --no-auth to let anyone publish)"
        );
    }
    Ok((identities, config))
}

/// Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
