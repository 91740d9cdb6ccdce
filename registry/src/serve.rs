//! The connection loop: HTTP/1.1 over a TCP listener with the limits a server on an open port
//! needs. `axum::serve` has no header timeout and no connection cap, so a few hundred clients
//! that send a byte a second would hold the server's sockets forever; here:
//!
//! - a request's headers must arrive within [`Limits::header_timeout`] (also the longest a
//!   keep-alive connection may sit idle between requests), and may not exceed
//!   [`Limits::max_header_bytes`];
//! - at most [`Limits::max_connections`] connections are served at once; further clients wait in
//!   the listen backlog until one closes;
//! - an upload body must keep arriving ([`crate::ServerConfig::body_idle_timeout`], enforced by
//!   the publish handler).
//!
//! On shutdown the listener closes and requests in flight get up to 30 s to finish.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Per-connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(10),
            max_connections: 512,
            max_header_bytes: 64 << 10,
        }
    }
}

/// Serve `app` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // hyper's minimum buffer is 8 KiB; the headers must fit in it.
        .max_buf_size(limits.max_header_bytes.max(8192));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    eprintln!("xpm-registry: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let conn =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // A client that times out or goes away ends its connection; nothing to report.
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!("xpm-registry: requests still running after 30 s; stopping anyway");
    }
    Ok(())
}
