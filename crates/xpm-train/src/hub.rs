//! Base models from the Hugging Face Hub: `hf:ORG/NAME[@REV]`, downloaded with `hf-hub` into
//! its cache (`$HF_HOME/hub`, as Python's `huggingface_hub` does) and used from there.
//!
//! Where the hub is and who asks ([`HubConfig`]) is passed in: the command line reads
//! `HF_ENDPOINT` (the hub's address: mirrors, and the tests' local mock server), `HF_TOKEN` and
//! `HF_HOME` once ([`HubConfig::from_env`]). Large (LFS) files are served with their sha256 as
//! ETag: xpm checks each downloaded weight file against it before use.

use std::path::{Path, PathBuf};

use xpm_core::error::{Error, IoResultExt, Result};
use xpm_core::printer::Printer;

pub use xpm_core::hf::{DEFAULT_ENDPOINT, HubConfig};

/// The `hf-hub` client for `hub`.
fn api(hub: &HubConfig, progress: bool) -> hf_hub::api::sync::ApiBuilder {
    use hf_hub::Cache;
    use hf_hub::api::sync::ApiBuilder;
    let cache = match &hub.home {
        Some(home) => Cache::new(home.join("hub")),
        None => Cache::default(),
    };
    // `from_cache` reads the token file; an explicit token replaces it.
    let mut builder = ApiBuilder::from_cache(cache)
        .with_endpoint(hub.endpoint.clone())
        .with_progress(progress);
    if let Some(token) = &hub.token {
        builder = builder.with_token(Some(token.clone()));
    }
    builder
}

/// A parsed `hf:ORG/NAME[@REV]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSpec {
    pub repo: String,
    pub revision: String,
}

impl HubSpec {
    pub fn parse(s: &str) -> Option<Result<Self>> {
        let rest = s.strip_prefix("hf:")?;
        let (repo, revision) = match rest.split_once('@') {
            Some((r, v)) => (r, v),
            None => (rest, "main"),
        };
        let ok = !repo.is_empty()
            && !revision.is_empty()
            && repo.split('/').count() <= 2
            && repo
                .split('/')
                .all(|p| !p.is_empty() && p != "." && p != ".." && !p.contains('\\'));
        Some(if ok {
            Ok(HubSpec {
                repo: repo.to_string(),
                revision: revision.to_string(),
            })
        } else {
            Err(Error::input(
                format!("`{s}` is not a Hugging Face model reference"),
                Some("write `hf:ORG/NAME` or `hf:ORG/NAME@REVISION`"),
            ))
        })
    }
}

/// The local model directory for `--base`, and the id recorded in the manifest.
pub fn resolve_base_with(
    base: &str,
    hub: &HubConfig,
    printer: &Printer,
) -> Result<(PathBuf, String)> {
    match HubSpec::parse(base) {
        None => {
            let p = PathBuf::from(base);
            let id = p
                .canonicalize()
                .ok()
                .and_then(|c| c.file_name().map(|f| f.to_string_lossy().to_string()))
                .unwrap_or_else(|| base.to_string());
            Ok((p, id))
        }
        Some(spec) => {
            let spec = spec?;
            let dir = download(&spec, hub, printer)?;
            let id = if spec.revision == "main" {
                spec.repo.clone()
            } else {
                format!("{}@{}", spec.repo, spec.revision)
            };
            Ok((dir, id))
        }
    }
}

/// A Hub repository opened at a revision, with its file list.
struct OpenRepo {
    repo: hf_hub::api::sync::ApiRepo,
    files: Vec<String>,
    endpoint: String,
}

fn hub_error(endpoint: &str, what: String) -> impl Fn(hf_hub::api::sync::ApiError) -> Error {
    let endpoint = endpoint.to_string();
    move |e| {
        Error::input(
            format!("{what} from {endpoint}: {e}"),
            Some(
                "check the repository id and revision, your network, HF_TOKEN for gated \
                 repositories, or HF_ENDPOINT for a mirror; or pass a local directory",
            ),
        )
    }
}

fn open_repo(spec: &HubSpec, hub: &HubConfig, printer: &Printer) -> Result<OpenRepo> {
    use hf_hub::{Repo, RepoType};
    let endpoint = hub.endpoint.clone();
    let api = api(hub, printer.shows_progress())
        .build()
        .map_err(hub_error(
            &endpoint,
            "cannot set up the Hugging Face client".into(),
        ))?;
    let repo = api.repo(Repo::with_revision(
        spec.repo.clone(),
        RepoType::Model,
        spec.revision.clone(),
    ));
    printer.status("Resolving", format!("hf:{}@{}", spec.repo, spec.revision));
    let info = repo.info().map_err(hub_error(
        &endpoint,
        format!("cannot read hf:{}@{}", spec.repo, spec.revision),
    ))?;
    let files = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    Ok(OpenRepo {
        repo,
        files,
        endpoint,
    })
}

impl OpenRepo {
    /// Download (or find in the cache) `wanted`, checking each LFS file's sha256; the snapshot
    /// directory.
    /// The snapshot directory, and the `sha256:` digest of each file that was checked against
    /// the Hub's (the LFS files, by name).
    fn fetch(&self, spec: &HubSpec, wanted: &[String], printer: &Printer) -> Result<Fetched> {
        let (mut dir, mut verified) = (None, std::collections::BTreeMap::new());
        for f in wanted {
            printer.status("Fetching", format!("{}/{f}", spec.repo));
            let path = self.repo.get(f).map_err(hub_error(
                &self.endpoint,
                format!("cannot download `{f}` of hf:{}", spec.repo),
            ))?;
            if let Some(digest) = verify_lfs(&path)? {
                verified.insert(f.clone(), digest);
            }
            dir = path.parent().map(Path::to_path_buf);
        }
        let dir = dir.ok_or_else(|| Error::input("nothing to download", None))?;
        Ok(Fetched { dir, verified })
    }
}

/// Download (or find in the cache) the files a model directory needs; returns the snapshot
/// directory.
pub fn download(spec: &HubSpec, hub: &HubConfig, printer: &Printer) -> Result<PathBuf> {
    let open = open_repo(spec, hub, printer)?;
    let files = &open.files;
    let mut wanted: Vec<String> = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ]
    .iter()
    .filter(|f| files.iter().any(|x| x == *f))
    .map(|s| s.to_string())
    .collect();
    if files.iter().any(|f| f == "model.safetensors") {
        wanted.push("model.safetensors".into());
    } else if files.iter().any(|f| f == "model.safetensors.index.json") {
        wanted.push("model.safetensors.index.json".into());
        wanted.extend(
            files
                .iter()
                .filter(|f| f.ends_with(".safetensors") && !f.contains('/'))
                .cloned(),
        );
    } else {
        return Err(Error::input(
            format!(
                "hf:{}@{} has no safetensors weights (files: {})",
                spec.repo,
                spec.revision,
                files.join(", ")
            ),
            Some("xpm loads safetensors only (no pickle); pick a repository that has them"),
        ));
    }
    Ok(open.fetch(spec, &wanted, printer)?.dir)
}

/// Files fetched from the Hub: the snapshot directory, and the `sha256:` digest of each file
/// that was checked against the digest the Hub announced (its LFS files), by file name; an
/// importer records these as provenance instead of hashing the files a second time.
#[derive(Debug)]
pub struct Fetched {
    pub dir: PathBuf,
    pub verified: std::collections::BTreeMap<String, String>,
}

/// Download (or find in the cache) those of `files` that the repository has (an adapter's
/// config and weights, say). Names are top-level file names: anything else is refused.
pub fn download_files(
    spec: &HubSpec,
    hub: &HubConfig,
    files: &[&str],
    printer: &Printer,
) -> Result<Fetched> {
    let open = open_repo(spec, hub, printer)?;
    let wanted: Vec<String> = files
        .iter()
        .filter(|f| !f.contains('/') && !f.contains('\\') && !f.starts_with('.'))
        .filter(|f| open.files.iter().any(|x| x == *f))
        .map(|s| s.to_string())
        .collect();
    if wanted.is_empty() {
        return Err(Error::input(
            format!(
                "hf:{}@{} has none of {} (files: {})",
                spec.repo,
                spec.revision,
                files.join(", "),
                open.files.join(", ")
            ),
            Some("is this the right repository?"),
        ));
    }
    open.fetch(spec, &wanted, printer)
}

/// Weight files are stored under their ETag, which for LFS files is the sha256 of the
/// content: check it (the download is not trusted until it matches). The checked digest, for
/// an LFS file.
fn verify_lfs(pointer: &Path) -> Result<Option<String>> {
    let blob = std::fs::canonicalize(pointer).at("read", pointer)?;
    let Some(etag) = blob.file_name().map(|f| f.to_string_lossy().to_string()) else {
        return Ok(None);
    };
    if etag.len() != 64 || !etag.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None); // a git blob id (small text file), not a content sha256
    }
    let file = std::fs::File::open(&blob).at("open", &blob)?;
    let (digest, _) =
        xpm_core::digest::sha256_reader(std::io::BufReader::new(file)).at("read", &blob)?;
    if digest != format!("sha256:{etag}") {
        // Remove the damaged blob so the next run downloads it again.
        let _ = std::fs::remove_file(&blob);
        return Err(Error::corrupt(
            pointer,
            format!("downloaded content has {digest}, but the hub announced sha256:{etag}"),
        ));
    }
    Ok(Some(digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        assert_eq!(
            HubSpec::parse("hf:sentence-transformers/all-MiniLM-L6-v2")
                .unwrap()
                .unwrap(),
            HubSpec {
                repo: "sentence-transformers/all-MiniLM-L6-v2".into(),
                revision: "main".into()
            }
        );
        assert_eq!(
            HubSpec::parse("hf:gpt2@abc").unwrap().unwrap().revision,
            "abc"
        );
        assert!(HubSpec::parse("./model").is_none());
        assert!(HubSpec::parse("hf:a/../b").unwrap().is_err());
        assert!(HubSpec::parse("hf:").unwrap().is_err());
    }
}
