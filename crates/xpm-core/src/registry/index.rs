//! The sparse index: one file per expert, one JSON line per published version, plus the
//! registry's `config.json`. Spec: docs/registry-protocol.md; schemas:
//! `schemas/index-line.schema.json` and `schemas/registry-config.schema.json`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::manifest::validate_name;
use crate::format::{BaseModel, ExpertKind, Manifest};

/// Version of the index line layout this build writes (`v` in every line).
pub const INDEX_LINE_VERSION: u32 = 1;

/// One published version of an expert. Immutable once published, except `yanked`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct IndexLine {
    /// Expert name (`namespace/name` or `name`).
    #[serde(deserialize_with = "crate::format::manifest::deserialize_name")]
    pub name: String,
    /// Semantic version.
    #[schemars(with = "String")]
    pub vers: semver::Version,
    /// `sha256:<hex>` of the whole `.xpm` file; the blob's address.
    #[serde(deserialize_with = "crate::digest::deserialize")]
    pub cksum: String,
    /// Size of the `.xpm` file in bytes.
    pub size: u64,
    /// The base model the expert applies to; experts merge only with equal base digests.
    pub base: BaseModel,
    /// Kind of the expert's deltas.
    pub kind: ExpertKind,
    /// Stored entries over target elements: nnz / numel for sparse, 1 for dense, the LoRA
    /// factors' size over the dense size for LoRA.
    pub density: f64,
    /// The base tensors the expert changes.
    pub targets: Vec<String>,
    /// Yanked versions are skipped by resolution unless a lockfile pins them.
    #[serde(default)]
    pub yanked: bool,
    /// When the registry accepted the version (RFC 3339, UTC).
    pub pubtime: String,
    /// Artifact format version (`MAJOR.MINOR`).
    pub format: String,
    /// The manifest's description, for search.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Index line layout version.
    #[serde(default = "one")]
    pub v: u32,
    /// The publisher's minisign signature of the artifact, with the signing key (and a key
    /// rotation statement after a key change); absent for unsigned releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<crate::signing::ReleaseSignature>,
}

fn one() -> u32 {
    1
}

impl IndexLine {
    /// The line for an artifact with this manifest, file digest and size, published now.
    pub fn for_artifact(m: &Manifest, cksum: &str, size: u64) -> IndexLine {
        // Sums over tensors in u128: each tensor has at most 2^56 elements, but an artifact may
        // hold many such tensors (found by fuzzing: tests/fuzz/regressions/upload).
        let (stored, numel) = m.tensors.iter().fold((0u128, 0u128), |(s, n), t| {
            let numel = u128::from(crate::format::mask::numel(&t.shape));
            let stored = match &t.delta {
                crate::format::Delta::Sparse { nnz, .. } => u128::from(*nnz),
                crate::format::Delta::Lora { rank, .. } => {
                    u128::from(*rank) * t.shape.iter().take(2).map(|&d| u128::from(d)).sum::<u128>()
                }
                crate::format::Delta::Dense => numel,
            };
            (s + stored, n + numel)
        });
        IndexLine {
            name: m.name.clone(),
            vers: m.version.clone(),
            cksum: cksum.to_string(),
            size,
            base: m.base.clone(),
            kind: m.kind,
            density: if numel == 0 {
                0.0
            } else {
                stored as f64 / numel as f64
            },
            targets: m.tensors.iter().map(|t| t.name.clone()).collect(),
            yanked: false,
            pubtime: now_rfc3339(),
            format: m.format_version.clone(),
            description: m.description.clone(),
            v: INDEX_LINE_VERSION,
            sig: None,
        }
    }

    /// `name@version`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.vers)
    }

    /// The hex part of `cksum`.
    pub fn sha_hex(&self) -> &str {
        self.cksum.strip_prefix("sha256:").unwrap_or(&self.cksum)
    }
}

/// The current time as RFC 3339 (UTC, seconds).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// The registry's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RegistryConfig {
    /// Blob download template; `{sha256}` is replaced by the hex digest, `{prefix}` by its
    /// first two hex digits. Relative templates resolve against the registry root.
    pub dl: String,
    /// Base URL of the HTTP API (publish, yank, search); absent for a read-only mirror or a
    /// local directory registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// Whether publish and yank need a token.
    #[serde(default, rename = "auth-required")]
    pub auth_required: bool,
    /// Largest artifact the registry accepts, in bytes.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "max-upload-size"
    )]
    pub max_upload_size: Option<u64>,
}

impl RegistryConfig {
    /// The config of a registry in the directory layout (a directory, a bucket, a Hub
    /// repository): blobs under `blobs/`, no API, no auth.
    pub fn directory_layout() -> RegistryConfig {
        RegistryConfig {
            dl: "blobs/sha256/{prefix}/{sha256}".into(),
            api: None,
            auth_required: false,
            max_upload_size: None,
        }
    }

    /// The blob URL (or relative path) for a `sha256:` digest.
    pub fn blob_location(&self, cksum: &str) -> String {
        let hex = cksum.strip_prefix("sha256:").unwrap_or(cksum);
        self.dl
            .replace("{sha256}", hex)
            .replace("{prefix}", &hex[..2.min(hex.len())])
    }
}

/// The blob path below a registry root (and below the cache): `blobs/sha256/ab/<hex>`.
pub fn blob_rel_path(cksum: &str) -> String {
    let hex = cksum.strip_prefix("sha256:").unwrap_or(cksum);
    format!("blobs/sha256/{}/{hex}", &hex[..2.min(hex.len())])
}

/// The index file of `name` relative to the index root, cargo-style: names of one, two and three
/// characters go to `1/`, `2/` and `3/<first>/`, longer ones to `<first two>/<next two>/`. A
/// namespaced name `ns/x` goes to `@ns/<path of x>` (`@` cannot start a name, so the two trees
/// never collide). The name must be valid ([`validate_name`]).
pub fn index_rel_path(name: &str) -> Result<String> {
    validate_name(name)
        .map_err(|e| Error::input(format!("invalid expert name: {e}"), Some(NAME_HINT)))?;
    let (ns, base) = match name.split_once('/') {
        Some((ns, b)) => (Some(ns), b),
        None => (None, name),
    };
    let p = match base.len() {
        1 => format!("1/{base}"),
        2 => format!("2/{base}"),
        3 => format!("3/{}/{base}", &base[..1]),
        _ => format!("{}/{}/{base}", &base[..2], &base[2..4]),
    };
    Ok(match ns {
        Some(ns) => format!("@{ns}/{p}"),
        None => p,
    })
}

/// What a valid name looks like.
pub const NAME_HINT: &str = "names use lowercase ASCII letters, digits, `-` and `_` (at most 64 \
    characters), start with a letter or digit, and may have one `namespace/` prefix";

/// Parse an index file: one JSON line per version; blank lines are skipped, and so are lines
/// of a newer layout (`v` above [`INDEX_LINE_VERSION`]), which this build cannot interpret —
/// as Cargo does with its index.
pub fn parse_index(bytes: &[u8], source: &str) -> Result<Vec<IndexLine>> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| Error::registry(source, "the index file is not UTF-8", None))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if let Ok(probe) = serde_json::from_str::<VersionProbe>(line)
            && probe.v > INDEX_LINE_VERSION
        {
            continue;
        }
        let l: IndexLine = serde_json::from_str(line).map_err(|e| {
            Error::registry(
                source,
                format!("index line {} is not a valid index entry: {e}", i + 1),
                Some("the registry's index is damaged; tell its operator"),
            )
        })?;
        out.push(l);
    }
    Ok(out)
}

/// [`parse_index`] for the index file of `name`: every line must name `name`, and no version
/// may appear twice. A line that names another expert (or a second copy of a version) would let
/// a registry's index serve one expert's artifact under another's name.
pub fn parse_index_of(bytes: &[u8], source: &str, name: &str) -> Result<Vec<IndexLine>> {
    let lines = parse_index(bytes, source)?;
    let mut seen = std::collections::HashSet::new();
    for l in &lines {
        if l.name != name {
            return Err(Error::registry(
                source,
                format!(
                    "the index of `{name}` holds a line for `{}@{}`",
                    l.name, l.vers
                ),
                Some("the registry's index is damaged or tampered with; tell its operator"),
            ));
        }
        if !seen.insert(l.vers.clone()) {
            return Err(Error::registry(
                source,
                format!("the index of `{name}` lists version {} twice", l.vers),
                Some("the registry's index is damaged or tampered with; tell its operator"),
            ));
        }
    }
    Ok(lines)
}

#[derive(Deserialize)]
struct VersionProbe {
    #[serde(default = "one")]
    v: u32,
}

/// Render index lines back into a file (one compact JSON object per line).
pub fn render_index(lines: &[IndexLine]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        serde_json::to_writer(&mut out, l).expect("index lines serialize");
        out.push(b'\n');
    }
    out
}

/// What an edit of an index file decided (the compare-and-swap writers: S3, the Hub).
#[derive(Debug)]
pub enum Edit {
    /// Write these bytes; the operation's result is this line.
    Write(Vec<u8>, IndexLine),
    /// Nothing to write (already so); the result is this line.
    Done(IndexLine),
}

/// The error for publishing a version that is there already.
pub fn exists(line: &IndexLine, old: &IndexLine) -> Error {
    Error::Conflict {
        message: format!(
            "{} already exists in the registry (published {}{}); versions are immutable",
            line.id(),
            old.pubtime,
            if old.yanked { ", yanked" } else { "" }
        ),
        hint: Some("bump the version (e.g. with `--version`) and publish again".into()),
    }
}

/// Publish `line` into the index file `cur` (`None`: no file yet) read from `src`: append it,
/// keeping every existing line byte for byte. `ambiguous`: an earlier write of this operation
/// may have landed unseen (its answer was lost), so finding `line` itself means done.
pub fn edit_publish(
    cur: Option<&[u8]>,
    src: &str,
    line: &IndexLine,
    ambiguous: bool,
) -> Result<Edit> {
    let lines = match cur {
        Some(b) => parse_index_of(b, src, &line.name)?,
        None => Vec::new(),
    };
    if let Some(old) = lines
        .iter()
        .find(|l| super::local::same_version(&l.vers, &line.vers))
    {
        if ambiguous && old == line {
            return Ok(Edit::Done(old.clone()));
        }
        return Err(exists(line, old));
    }
    let mut out = cur.map(<[u8]>::to_vec).unwrap_or_default();
    if !out.is_empty() && !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    out.extend(render_index(std::slice::from_ref(line)));
    Ok(Edit::Write(out, line.clone()))
}

/// Set `yanked` on `name@version` in the index file `cur` read from `src`. Only that line is
/// rewritten, every other field (known or not) kept as it is; the other lines byte for byte.
pub fn edit_yank(
    cur: Option<&[u8]>,
    src: &str,
    name: &str,
    version: &semver::Version,
    yanked: bool,
) -> Result<Edit> {
    let Some(bytes) = cur else {
        return Err(super::local::unknown_expert(name));
    };
    let lines = parse_index_of(bytes, src, name)?;
    let Some(old) = lines.iter().find(|l| &l.vers == version) else {
        let known: Vec<String> = lines.iter().map(|l| l.vers.to_string()).collect();
        return Err(Error::input(
            format!("{name}@{version} is not in the registry"),
            Some(&format!("published versions: {}", known.join(", "))),
        ));
    };
    if old.yanked == yanked {
        return Ok(Edit::Done(old.clone()));
    }
    let mut updated = old.clone();
    updated.yanked = yanked;
    let text = std::str::from_utf8(bytes).expect("parse_index checked UTF-8");
    let mut out = Vec::with_capacity(bytes.len() + 8);
    for raw in text.split_inclusive('\n') {
        let body = raw.trim_end_matches(['\n', '\r']);
        let is_it = serde_json::from_str::<IndexLine>(body)
            .is_ok_and(|l| l.v <= INDEX_LINE_VERSION && &l.vers == version);
        if is_it {
            let mut v: serde_json::Value = serde_json::from_str(body).expect("parsed above");
            v["yanked"] = serde_json::Value::Bool(yanked);
            serde_json::to_writer(&mut out, &v).expect("JSON value serializes");
            out.push(b'\n');
        } else {
            out.extend_from_slice(raw.as_bytes());
        }
    }
    Ok(Edit::Write(out, updated))
}

/// One search result: an expert and its newest non-yanked version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SearchHit {
    pub name: String,
    #[schemars(with = "String")]
    pub max_version: semver::Version,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub base: BaseModel,
    pub kind: ExpertKind,
}

/// A search response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SearchResults {
    pub experts: Vec<SearchHit>,
    /// Matches in all (the list may be cut to the requested limit).
    pub total: usize,
}

/// Whether every word of `query` occurs in the name or description (case-insensitive).
pub fn search_matches(query: &str, name: &str, description: Option<&str>) -> bool {
    let hay = format!("{} {}", name, description.unwrap_or("")).to_lowercase();
    query
        .split_whitespace()
        .all(|w| hay.contains(&w.to_lowercase()))
}

/// The hits for `query` among index files, sorted by name: each item is a file's lines
/// (`None`: no such file), or the error that kept it from being read, returned beside the hits
/// (a search skips a damaged index file rather than failing).
pub fn collect_search(
    query: &str,
    indexes: impl IntoIterator<Item = Result<Option<Vec<IndexLine>>>>,
) -> (Vec<SearchHit>, Vec<Error>) {
    let mut hits = Vec::new();
    let mut skipped = Vec::new();
    for r in indexes {
        match r {
            Ok(Some(lines)) => {
                if let Some(hit) = search_hit(&lines)
                    && search_matches(query, &hit.name, hit.description.as_deref())
                {
                    hits.push(hit);
                }
            }
            Ok(None) => {}
            Err(e) => skipped.push(e),
        }
    }
    hits.sort_by(|a, b| a.name.cmp(&b.name));
    (hits, skipped)
}

/// The search hit for an index file's lines (newest non-yanked version), if any.
pub fn search_hit(lines: &[IndexLine]) -> Option<SearchHit> {
    let best = lines
        .iter()
        .filter(|l| !l.yanked)
        .max_by(|a, b| a.vers.cmp(&b.vers))?;
    Some(SearchHit {
        name: best.name.clone(),
        max_version: best.vers.clone(),
        description: best.description.clone(),
        base: best.base.clone(),
        kind: best.kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_paths() {
        assert_eq!(index_rel_path("a").unwrap(), "1/a");
        assert_eq!(index_rel_path("ab").unwrap(), "2/ab");
        assert_eq!(index_rel_path("abc").unwrap(), "3/a/abc");
        assert_eq!(index_rel_path("sst2-expert").unwrap(), "ss/t2/sst2-expert");
        assert_eq!(index_rel_path("team/sst2").unwrap(), "@team/ss/t2/sst2");
        for bad in ["../x", "A", "", "a/b/c", "x/../y", &"x".repeat(300)] {
            assert!(index_rel_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn newer_line_layouts_are_skipped() {
        let line = r#"{"name":"a","vers":"1.0.0","cksum":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":1,"base":{"id":"m","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111"},"kind":"sparse","density":0.1,"targets":[],"pubtime":"t","format":"1.0"}"#;
        let future = r#"{"name":"a","vers":"2.0.0","v":2,"something":"new"}"#;
        let text = format!("{line}\n\n{future}\n");
        let lines = parse_index(text.as_bytes(), "test").unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].v, 1);
        assert!(parse_index(b"{not json}\n", "test").is_err());
    }

    #[test]
    fn search_words() {
        assert!(search_matches(
            "Sentiment movie",
            "sst2",
            Some("Movie review sentiment")
        ));
        assert!(!search_matches(
            "news",
            "sst2",
            Some("Movie review sentiment")
        ));
    }

    /// Found by fuzzing (tests/fuzz/regressions/upload/many-huge-empty-sparse): the density of
    /// an artifact whose tensors' element counts sum past u64 is computed without overflow.
    #[test]
    fn density_of_many_huge_tensors_does_not_overflow() {
        use crate::format::manifest::{BaseModel, Delta, ExpertKind, Manifest, TensorEntry};
        let base = BaseModel {
            id: "b".into(),
            digest: crate::digest::sha256(b"b"),
        };
        let mut m = Manifest::new("x", "1.0.0".parse().unwrap(), base, ExpertKind::Sparse);
        for i in 0..300 {
            m.tensors.push(TensorEntry {
                name: format!("t{i}"),
                shape: vec![(1 << 56) - 1],
                dtype: crate::format::Dtype::F32,
                delta: Delta::Sparse {
                    nnz: 1,
                    density: 0.0,
                    encoding: None,
                    block_size: None,
                },
                stored: Vec::new(),
                new: false,
            });
        }
        let l = IndexLine::for_artifact(&m, &crate::digest::sha256(b"x"), 1);
        let want = 300.0 / (300.0 * ((1u64 << 56) - 1) as f64);
        assert!((l.density - want).abs() < 1e-25, "{}", l.density);
    }
}
