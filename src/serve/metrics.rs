//! `GET /metrics`: Prometheus text exposition (format 0.0.4) of what the server did.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Latency histogram bucket bounds, seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

#[derive(Default)]
pub struct Metrics {
    /// (endpoint, status) → requests.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    /// Weight swaps (a delta applied after another, or after the plain base).
    pub swaps: AtomicU64,
    /// A request's delta was applied already or was in the cache.
    pub cache_hits: AtomicU64,
    /// A request's delta had to be read (or merged).
    pub cache_misses: AtomicU64,
    /// Requests queued and not yet taken by the worker.
    pub queue_depth: AtomicI64,
    /// Requests refused because the queue was full.
    pub rejected: AtomicU64,
    /// Requests dropped unrun because their client had gone.
    pub cancelled: AtomicU64,
}

impl Metrics {
    pub fn observe(&self, endpoint: &str, status: u16, took: Duration) {
        *self
            .requests
            .lock()
            .expect("metrics")
            .entry((endpoint.to_string(), status))
            .or_default() += 1;
        let s = took.as_secs_f64();
        let mut l = self.latency.lock().expect("metrics");
        let h = l.entry(endpoint.to_string()).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += s;
        h.count += 1;
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP xpm_serve_requests_total Requests answered, by endpoint and status.\n# TYPE xpm_serve_requests_total counter"
        );
        for ((e, s), n) in self.requests.lock().expect("metrics").iter() {
            let _ = writeln!(
                o,
                "xpm_serve_requests_total{{endpoint=\"{e}\",status=\"{s}\"}} {n}"
            );
        }
        let _ = writeln!(
            o,
            "# HELP xpm_serve_request_duration_seconds Time from request to answer.\n# TYPE xpm_serve_request_duration_seconds histogram"
        );
        for (e, h) in self.latency.lock().expect("metrics").iter() {
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    o,
                    "xpm_serve_request_duration_seconds_bucket{{endpoint=\"{e}\",le=\"{b}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                o,
                "xpm_serve_request_duration_seconds_bucket{{endpoint=\"{e}\",le=\"+Inf\"}} {}\nxpm_serve_request_duration_seconds_sum{{endpoint=\"{e}\"}} {}\nxpm_serve_request_duration_seconds_count{{endpoint=\"{e}\"}} {}",
                h.count, h.sum, h.count
            );
        }
        let counters = [
            ("swaps_total", "Weight swaps.", &self.swaps),
            (
                "merge_cache_hits_total",
                "Requests whose delta was applied already or cached.",
                &self.cache_hits,
            ),
            (
                "merge_cache_misses_total",
                "Requests whose delta was read or merged.",
                &self.cache_misses,
            ),
            (
                "rejected_total",
                "Requests refused with 429 (queue full).",
                &self.rejected,
            ),
            (
                "cancelled_total",
                "Requests dropped because the client had gone.",
                &self.cancelled,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                o,
                "# HELP xpm_serve_{name} {help}\n# TYPE xpm_serve_{name} counter\nxpm_serve_{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            o,
            "# HELP xpm_serve_queue_depth Requests waiting for the model.\n# TYPE xpm_serve_queue_depth gauge\nxpm_serve_queue_depth {}",
            self.queue_depth.load(Ordering::Relaxed).max(0)
        );
        o
    }
}
