//! `xpm verify F.xpm`: the full integrity check.
//!
//! Checks the prelude, the manifest digest and structure, the safetensors header, the whole-file
//! sha256, every frame's digest (BLAKE3 from format 1.2) and declared size, and decodes every
//! mask (sorted, in range, exactly `nnz` entries) and every value buffer.

use std::path::Path;

use serde::Serialize;

use crate::error::Result;
use crate::format::{ArtifactReader, Content};
use crate::printer::Printer;

/// What a successful verification saw.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub name: String,
    pub version: String,
    /// `sha256:<hex>` of the whole file (what registries and lockfiles record).
    pub sha256: String,
    /// Format 1.1 and later: the content digest (what a merge's provenance names it by).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_digest: Option<String>,
    pub tensors: usize,
    /// Stored entries: nnz for sparse, numel for dense, rank·(in+out) for LoRA.
    pub nnz: u64,
}

/// Verify `artifact`; any problem is an error naming the file and what is wrong.
pub fn verify(artifact: &Path, printer: &Printer) -> Result<VerifyReport> {
    let reader = ArtifactReader::open(artifact)?;
    let sha256 = reader.verify_file_digest()?;
    let m = reader.manifest().clone();
    let pb = printer.progress(m.tensors.len() as u64, "Verifying");
    let mut nnz = 0u64;
    for i in 0..m.tensors.len() {
        let t = reader.read_tensor(i)?;
        // Stored entries are bounded by the bytes read, but the sum saturates rather than trust
        // that.
        nnz = nnz.saturating_add(match &t.content {
            Content::Sparse { indices, .. } => indices.len() as u64,
            Content::Lora { rank, .. } => *rank as u64 * t.shape.iter().sum::<u64>(),
            Content::Dense { .. } => t.numel(),
        });
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(VerifyReport {
        name: m.name,
        version: m.version.to_string(),
        sha256,
        content_digest: reader.content_digest(),
        tensors: m.tensors.len(),
        nnz,
    })
}
