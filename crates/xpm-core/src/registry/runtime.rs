//! The tokio runtime behind the blocking `Registry` trait of the async backends (S3, OCI).

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

/// A tokio runtime shut down without waiting, so that dropping it is allowed anywhere (even
/// where the last owner is dropped inside another runtime).
pub(crate) struct Runtime(Option<tokio::runtime::Runtime>);

impl Runtime {
    pub(crate) fn new(rt: tokio::runtime::Runtime) -> Self {
        Runtime(Some(rt))
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("runtime present until drop")
    }

    pub(crate) fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt().block_on(f)
    }

    pub(crate) fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.rt().spawn(f)
    }
}

impl Runtime {
    /// A blocking reader over `stream`, which a task on this runtime pumps ahead of the reader
    /// (up to [`PUMP_AHEAD`] chunks): the download proceeds while the reading thread hashes
    /// and writes, instead of only when the reader asks for the next chunk.
    pub(crate) fn reader<S>(&self, stream: S) -> PumpedReader
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::mpsc::channel(PUMP_AHEAD);
        self.spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    break; // the reader is gone, or the stream failed
                }
            }
        });
        PumpedReader {
            rx,
            buf: Bytes::new(),
        }
    }
}

/// Chunks a download runs ahead of its reader.
pub(crate) const PUMP_AHEAD: usize = 16;

/// The reading end of [`Runtime::reader`]. Call it from a thread that is not a runtime
/// worker (the `Registry` trait's callers are blocking threads).
pub(crate) struct PumpedReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    buf: Bytes,
}

impl std::io::Read for PumpedReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.buf.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(b)) => self.buf = b,
                Some(Err(e)) => return Err(e),
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf.split_to(n));
        Ok(n)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}
