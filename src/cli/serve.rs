//! `xpm serve`: flags only; the server is [`crate::serve`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::Context;
use crate::serve::{ServeOptions, run};
use crate::train::model::DeviceChoice;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Base model: a model directory or `hf:ORG/NAME[@REV]`
    #[arg(long, value_name = "MODEL")]
    base: String,
    /// Serve the experts pinned by this project's xpm.lock [default: every installed version]
    #[arg(long, value_name = "DIR")]
    project: Option<PathBuf>,
    /// Also serve this artifact (repeatable)
    #[arg(long = "expert", value_name = "FILE.xpm")]
    experts: Vec<PathBuf>,
    /// Address to listen on (port 0 picks a free one; the address is printed on stdout)
    #[arg(long, default_value = "127.0.0.1:8420")]
    addr: SocketAddr,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceChoice,
    /// Requests waiting for the model before new ones are refused with 429
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Per-request time limit (504 after it), e.g. `30s`, `2m`
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Memory for loaded expert and merge deltas (least recently used go first)
    #[arg(long, default_value = "1GiB", value_parser = super::size_arg)]
    cache: u64,
    /// Classification inputs per forward pass
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Largest request body
    #[arg(long, default_value = "1MiB", value_parser = super::size_arg)]
    max_body: u64,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    crate::alloc::configure();
    // SAFETY: the first thing the command does; `main` started no thread before it.
    unsafe { super::configure_training_threads() };
    let opts = ServeOptions {
        base: a.base,
        project: a.project,
        experts: a.experts,
        addr: a.addr,
        device: a.device,
        queue: a.queue,
        timeout: a.timeout,
        cache_bytes: usize::try_from(a.cache).unwrap_or(usize::MAX),
        batch_size: a.batch_size.max(1),
        max_body: usize::try_from(a.max_body).unwrap_or(usize::MAX),
        plugin_search: ctx.plugin_search.clone(),
        hub: ctx.hub.clone(),
    };
    run(opts, &ctx.home, &ctx.printer)?;
    Ok(())
}
