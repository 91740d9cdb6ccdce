//! The expert manifest: what an expert is, what it was made from, and how its payload is stored.
//!
//! The same type is written as `manifest.json` in an unpacked directory (without the `stored`
//! and `payload` sections) and in the footer of every `.xpm` artifact (with them). Its JSON Schema
//! is `schemas/manifest.schema.json`, generated from these types (`tests/schemas.rs` keeps it in
//! sync).
//!
//! Unknown fields are ignored rather than refused: a minor format version may add fields, and a
//! reader of an older minor must still read the artifact (docs/format.md, "Versioning").

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::dtype::Dtype;
use super::mask::MaskEncoding;
pub use crate::digest::FrameDigest;

/// The artifact format major version this build writes and reads.
pub const FORMAT_MAJOR: u16 = 1;
/// The artifact format minor version this build writes (it reads 1.0 to 1.2). 1.1: the
/// trailer holds the content digest instead of the whole-file digest (docs/format.md §2.4), so
/// a writer hashes every byte once. 1.2: frames are named by their BLAKE3 digest instead of
/// their SHA-256 ([`FrameDigest`]).
pub const FORMAT_MINOR: u16 = 2;
/// The first minor whose frame digests are BLAKE3.
pub const BLAKE3_FRAMES_FROM: u16 = 2;

/// The manifest of one expert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Manifest {
    /// Artifact format version as `MAJOR.MINOR` (see docs/format.md, "Versioning").
    pub format_version: String,
    /// Expert name: lowercase ASCII letters, digits, `-`, `_`, with an optional `namespace/`.
    pub name: String,
    /// Semantic version of this expert.
    #[schemars(with = "String")]
    pub version: semver::Version,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// SPDX license expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authors: Vec<String>,
    /// The base model every delta applies to.
    pub base: BaseModel,
    /// The kind of the expert's target deltas.
    pub kind: ExpertKind,
    /// One entry per stored tensor; their payload frames follow this order.
    pub tensors: Vec<TensorEntry>,
    /// How the trained entries were chosen (sparse experts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection: Option<Selection>,
    /// How the expert was trained, and how well it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<Training>,
    /// Where the expert came from (tool, inputs, merge provenance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
    /// Payload layout and digests; present in artifacts, absent in unpacked directories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Payload>,
    /// Free-form metadata for tools; xpm preserves it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Manifest {
    /// A manifest with only the required fields; an [`crate::format::ArtifactWriter`] fills in
    /// `tensors` and `payload` when it finishes.
    pub fn new(name: &str, version: semver::Version, base: BaseModel, kind: ExpertKind) -> Self {
        Manifest {
            format_version: format!("{FORMAT_MAJOR}.{FORMAT_MINOR}"),
            name: name.to_string(),
            version,
            description: None,
            license: None,
            authors: Vec::new(),
            base,
            kind,
            tensors: Vec::new(),
            selection: None,
            training: None,
            provenance: None,
            payload: None,
            extra: BTreeMap::new(),
        }
    }
}

/// The base model an expert applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BaseModel {
    /// Human identifier, e.g. `sentence-transformers/all-MiniLM-L6-v2`.
    pub id: String,
    /// `sha256:<hex>` over the canonical tensor list (docs/format.md, "Base digest").
    #[serde(deserialize_with = "crate::digest::deserialize")]
    pub digest: String,
}

/// The kind of an expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExpertKind {
    /// A few entries of each target tensor: sorted flat indices and their values.
    Sparse,
    /// Low-rank factors `A` (rank × in) and `B` (out × rank) with scale `alpha / rank`.
    Lora,
    /// The full delta of each target tensor.
    Dense,
}

impl ExpertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExpertKind::Sparse => "sparse",
            ExpertKind::Lora => "lora",
            ExpertKind::Dense => "dense",
        }
    }
}

impl std::fmt::Display for ExpertKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One stored tensor: the delta for the base tensor of the same name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TensorEntry {
    /// The base model's tensor name.
    pub name: String,
    /// Shape of the (dense) delta, outermost first.
    pub shape: Vec<u64>,
    /// Element type of the stored values.
    pub dtype: Dtype,
    /// Kind-specific description.
    pub delta: Delta,
    /// Where the parts live in the payload; present in artifacts only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stored: Vec<StoredPart>,
    /// The base has no tensor of this name: the stored (dense) tensor is the whole tensor, not
    /// a delta — a task head such as `classifier.weight`. `apply` adds it to the model; `merge`
    /// leaves it out, since heads belong to one task.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub new: bool,
}

impl TensorEntry {
    /// Number of elements of the dense delta.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// Kind-specific data of one tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Delta {
    /// Sparse delta: `nnz` sorted flat indices and their values.
    Sparse {
        nnz: u64,
        /// `nnz / numel`.
        density: f64,
        /// Mask encoding chosen by the packer; absent in unpacked directories.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        encoding: Option<MaskEncoding>,
        /// Side of the square blocks the mask was selected in (e.g. 16), if block-structured.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        block_size: Option<u32>,
    },
    /// LoRA factors: ΔW = (alpha / rank) · B · A.
    Lora { rank: u32, alpha: f64 },
    /// The full delta.
    Dense,
}

/// What one part of a stored tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PartRole {
    /// Encoded mask bytes (`u8`).
    Mask,
    /// Sparse values in index order.
    Values,
    /// LoRA `A` (rank × in).
    LoraA,
    /// LoRA `B` (out × rank).
    LoraB,
    /// Dense delta.
    Delta,
}

impl PartRole {
    /// The suffix of the part's tensor name in the payload (`<tensor>.<suffix>`).
    pub fn suffix(self) -> &'static str {
        match self {
            PartRole::Mask => "mask",
            PartRole::Values => "values",
            PartRole::LoraA => "lora_A",
            PartRole::LoraB => "lora_B",
            PartRole::Delta => "delta",
        }
    }
}

/// One zstd frame of the payload holding one part of a tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StoredPart {
    pub role: PartRole,
    /// Byte offset of the frame from the start of the payload.
    pub offset: u64,
    /// Compressed length of the frame.
    pub size: u64,
    /// Decompressed length.
    pub raw_size: u64,
    /// Digest of the compressed frame: `"sha256": "sha256:<hex>"` up to format 1.1,
    /// `"blake3": "blake3:<hex>"` from 1.2.
    #[serde(flatten)]
    pub digest: FrameDigest,
}

/// Layout of the compressed payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Payload {
    /// Always `zstd`.
    pub compression: String,
    /// Total compressed length of the payload in bytes.
    pub size: u64,
    /// Total decompressed length (the size of the safetensors image).
    pub raw_size: u64,
    /// The frame holding the safetensors header (writers put it last).
    pub header: Frame,
}

/// A zstd frame in the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Frame {
    pub offset: u64,
    pub size: u64,
    pub raw_size: u64,
    /// As [`StoredPart::digest`].
    #[serde(flatten)]
    pub digest: FrameDigest,
}

/// How trained entries were selected.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct Selection {
    /// `extract` (top-k of |tuned − base|) or `train` (selected while training).
    pub method: String,
    /// Score rule: `magnitude`, `snip`, `grad-delta`, `gradient`, `random`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_rule: Option<String>,
    /// Fraction of entries kept per target tensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    /// `one-shot`, or `periodic:<examples>` re-selection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Target tensor name patterns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    /// How ties in the score were broken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_break: Option<String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// How an expert was trained.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct Training {
    /// `sparse`, `lora`, `full`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// `sha256:<hex>` of the training data file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Hyper-parameters (epochs, lr, batch size, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hyperparameters: BTreeMap<String, serde_json::Value>,
    /// Final metrics (eval loss, accuracy, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    /// The classification head of a classifier (its keys sit in `training` itself: `labels`,
    /// `pooling`, `head`). Declared before `extra`, which keeps the other keys.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub head: Option<ClassificationHead>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// How a classification expert maps the base's hidden states to labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ClassificationHead {
    /// The label set, in the order of the head's output rows.
    pub labels: Vec<String>,
    /// How token states are pooled into one vector (`mean`).
    pub pooling: String,
    /// The head's tensors (new tensors of the expert), weight first.
    #[serde(rename = "head")]
    pub tensors: Vec<String>,
}

/// Where an expert came from.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct Provenance {
    /// The xpm version that wrote it, e.g. `xpm 0.1.0`.
    pub tool: String,
    /// Inputs (checkpoints, experts) by name and digest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<ProvenanceInput>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// One input an expert was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ProvenanceInput {
    /// `base`, `tuned`, `expert`, …
    pub role: String,
    /// A name, `name@version` or a file name.
    pub name: String,
    /// `sha256:<hex>` of the input (for an artifact: of the whole file, as registries and
    /// lockfiles record it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// For an artifact of format 1.1 or later: its content digest (docs/format.md §2.4), which
    /// `xpm inspect` prints. A merge records this one, which it gets without a pass over the
    /// input, unless it hashed the whole file anyway (a format 1.0 input, or a recipe that
    /// pins `sha256`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::digest::deserialize_opt"
    )]
    pub content_digest: Option<String>,
}

impl Manifest {
    /// The manifest without storage details, as written in unpacked directories.
    pub fn without_storage(&self) -> Manifest {
        let mut m = self.clone();
        m.payload = None;
        for t in &mut m.tensors {
            t.stored.clear();
            if let Delta::Sparse { encoding, .. } = &mut t.delta {
                *encoding = None;
            }
        }
        m
    }

    /// `(major, minor)` parsed from `format_version`.
    pub fn format(&self) -> Option<(u16, u16)> {
        let (a, b) = self.format_version.split_once('.')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    }
}

/// Check an expert name: lowercase ASCII letters, digits, `-` and `_`, optionally one
/// `namespace/` prefix of the same alphabet; 1–64 characters per segment.
/// Name segments that are refused: Windows device names (a file by that name cannot be created
/// there) and the top-level paths of a registry.
pub const RESERVED_NAMES: &[&str] = &[
    "con", "prn", "aux", "nul", "com1", "com2", "com3", "com4", "com5", "com6", "com7", "com8",
    "com9", "lpt1", "lpt2", "lpt3", "lpt4", "lpt5", "lpt6", "lpt7", "lpt8", "lpt9", "api", "blobs",
    "index", "config",
];

/// Serde: an expert name field of a file someone else wrote (a lockfile, an index line, an
/// install record), checked by [`validate_name`] at read, before it can name a path.
pub fn deserialize_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    validate_name(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid expert name {}: {e}",
            crate::digest::quoted(&s)
        ))
    })?;
    Ok(s)
}

pub fn validate_name(name: &str) -> Result<(), String> {
    let segs: Vec<&str> = name.split('/').collect();
    if segs.len() > 2 {
        return Err(format!("`{name}` has more than one `/`"));
    }
    for seg in &segs {
        if seg.is_empty() {
            return Err(format!("`{name}` has an empty name segment"));
        }
        if seg.len() > 64 {
            return Err(format!("`{name}` is longer than 64 characters"));
        }
        if let Some(c) = seg
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
        {
            return Err(format!(
                "`{name}` contains `{c}`; names use lowercase letters, digits, `-` and `_`"
            ));
        }
        if !seg
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        {
            return Err(format!("`{name}` must start with a letter or digit"));
        }
        if RESERVED_NAMES.contains(seg) {
            return Err(format!(
                "`{name}` is reserved (it names a device on some systems or a registry path)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("sst2-expert").is_ok());
        assert!(validate_name("team/sst2_expert").is_ok());
        for bad in [
            "",
            "A",
            "../x",
            "a/b/c",
            "a b",
            "-x",
            "nul",
            "team/con",
            &"x".repeat(65),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
