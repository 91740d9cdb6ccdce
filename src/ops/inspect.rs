//! `xpm inspect F.xpm [--json]`: the manifest and a per-tensor storage table.
//!
//! Reads only the prelude, manifest and safetensors header: no tensor frame is decompressed.
//! The `--json` output is [`InspectReport`], a versioned wire format with the schema
//! `schemas/inspect.schema.json`.

use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::format::manifest::Delta;
use crate::format::{ArtifactReader, Manifest};

/// Version of the `--json` structure; bumped on any incompatible change.
pub const INSPECT_SCHEMA_VERSION: u32 = 1;

/// `xpm inspect --json` output.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct InspectReport {
    /// Always 1 for this layout.
    pub schema_version: u32,
    /// The path as given.
    pub file: String,
    /// File size in bytes.
    pub file_size: u64,
    /// Format 1.1 and later: the content digest (docs/format.md §2.4), checked on open; a
    /// merged expert's provenance names its inputs by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_digest: Option<String>,
    /// The artifact's manifest, verbatim.
    pub manifest: Manifest,
    pub tensors: Vec<InspectTensor>,
    pub totals: InspectTotals,
}

/// One row of the table.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct InspectTensor {
    pub name: String,
    /// `sparse`, `lora` or `dense`.
    pub kind: String,
    pub shape: Vec<u64>,
    pub dtype: String,
    pub numel: u64,
    /// Stored entries: nnz for sparse, numel for dense, rank·(in+out) for LoRA.
    pub nnz: u64,
    /// nnz / numel (1 for dense; the parameter fraction for LoRA).
    pub density: f64,
    /// Mask encoding (sparse only).
    pub encoding: Option<String>,
    /// LoRA rank (LoRA only).
    pub rank: Option<u32>,
    /// Compressed bytes in the payload.
    pub stored_bytes: u64,
    /// Decompressed bytes of the stored parts.
    pub raw_bytes: u64,
    /// Bytes of the dense delta in its dtype (numel × element size).
    pub dense_bytes: u64,
}

/// Totals over all tensors.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct InspectTotals {
    pub tensors: u64,
    pub numel: u64,
    pub nnz: u64,
    pub density: f64,
    pub stored_bytes: u64,
    pub raw_bytes: u64,
    pub dense_bytes: u64,
    /// dense_bytes / file_size: how much smaller the artifact is than the dense deltas.
    pub compression_ratio: f64,
}

/// Build the report for `artifact`.
pub fn inspect(artifact: &Path) -> Result<InspectReport> {
    let reader = ArtifactReader::open(artifact)?;
    let m = reader.manifest().clone();
    let tensors: Vec<InspectTensor> = m
        .tensors
        .iter()
        .map(|t| {
            let numel = t.numel();
            let (kind, nnz, encoding, rank) = match &t.delta {
                Delta::Sparse { nnz, encoding, .. } => {
                    ("sparse", *nnz, encoding.map(|e| e.to_string()), None)
                }
                Delta::Lora { rank, .. } => {
                    let params = *rank as u64 * t.shape.iter().sum::<u64>();
                    ("lora", params, None, Some(*rank))
                }
                Delta::Dense => ("dense", numel, None, None),
            };
            InspectTensor {
                name: t.name.clone(),
                kind: kind.into(),
                shape: t.shape.clone(),
                dtype: t.dtype.to_string(),
                numel,
                nnz,
                density: crate::format::tensor::density(nnz, numel),
                encoding,
                rank,
                stored_bytes: t.stored.iter().map(|p| p.size).sum(),
                raw_bytes: t.stored.iter().map(|p| p.raw_size).sum(),
                dense_bytes: numel * t.dtype.size() as u64,
            }
        })
        .collect();
    let sum = |f: fn(&InspectTensor) -> u64| tensors.iter().map(f).sum::<u64>();
    let (numel, nnz, dense) = (sum(|t| t.numel), sum(|t| t.nnz), sum(|t| t.dense_bytes));
    let totals = InspectTotals {
        tensors: tensors.len() as u64,
        numel,
        nnz,
        density: crate::format::tensor::density(nnz, numel),
        stored_bytes: sum(|t| t.stored_bytes),
        raw_bytes: sum(|t| t.raw_bytes),
        dense_bytes: dense,
        compression_ratio: dense as f64 / reader.file_len().max(1) as f64,
    };
    Ok(InspectReport {
        schema_version: INSPECT_SCHEMA_VERSION,
        file: artifact.display().to_string(),
        file_size: reader.file_len(),
        content_digest: reader.content_digest(),
        manifest: m,
        tensors,
        totals,
    })
}

/// Human-readable bytes (KiB, MiB, GiB).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The text rendering of a report.
pub fn render(r: &InspectReport) -> String {
    use std::fmt::Write;
    let m = &r.manifest;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}@{}  ({} expert, format {})",
        m.name, m.version, m.kind, m.format_version
    );
    if let Some(d) = &m.description {
        let _ = writeln!(s, "  {d}");
    }
    let _ = writeln!(s, "  base     {}  {}", m.base.id, m.base.digest);
    if let Some(c) = &r.content_digest {
        let _ = writeln!(s, "  content  {c}");
    }
    if let Some(l) = &m.license {
        let _ = writeln!(s, "  license  {l}");
    }
    if !m.authors.is_empty() {
        let _ = writeln!(s, "  authors  {}", m.authors.join(", "));
    }
    if let Some(sel) = &m.selection {
        let mut parts = vec![format!("method {}", sel.method)];
        if let Some(r) = &sel.score_rule {
            parts.push(format!("score {r}"));
        }
        if let Some(k) = sel.keep_ratio {
            parts.push(format!("keep ratio {k}"));
        }
        if let Some(b) = sel.block_size {
            parts.push(format!("blocks {b}×{b}"));
        }
        let _ = writeln!(s, "  selection {}", parts.join(", "));
    }
    let _ = writeln!(s);
    let name_w = r
        .tensors
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(6)
        .clamp(6, 60);
    let _ = writeln!(
        s,
        "{:<name_w$}  {:<14} {:<5} {:<6} {:>12} {:>8} {:<10} {:>10}",
        "tensor", "shape", "dtype", "kind", "nnz", "density", "encoding", "stored"
    );
    for t in &r.tensors {
        let shape = format!("{:?}", t.shape);
        let enc = match (&t.encoding, t.rank) {
            (Some(e), _) => e.clone(),
            (None, Some(r)) => format!("rank {r}"),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "{:<name_w$}  {:<14} {:<5} {:<6} {:>12} {:>7.3}% {:<10} {:>10}",
            t.name,
            shape,
            t.dtype,
            t.kind,
            t.nnz,
            t.density * 100.0,
            enc,
            human_bytes(t.stored_bytes)
        );
    }
    let tt = &r.totals;
    let _ = writeln!(
        s,
        "{:<name_w$}  {:<14} {:<5} {:<6} {:>12} {:>7.3}% {:<10} {:>10}",
        format!("total ({} tensors)", tt.tensors),
        "",
        "",
        "",
        tt.nnz,
        tt.density * 100.0,
        "",
        human_bytes(tt.stored_bytes)
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "file {} ({} bytes); dense deltas would be {}: {:.1}× smaller",
        human_bytes(r.file_size),
        r.file_size,
        human_bytes(tt.dense_bytes),
        tt.compression_ratio
    );
    s
}
