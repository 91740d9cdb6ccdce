//! Registries: where experts are published and found. One trait, [`Registry`], with five
//! backends: a local directory ([`local::LocalRegistry`], `file://…`, the embedded default at
//! `$XPM_HOME/registry`), the HTTP registry server ([`http::HttpRegistry`], the `registry/`
//! crate, or any static HTTP front of a registry's files), an S3-compatible bucket
//! ([`s3::S3Registry`], `s3://BUCKET/PREFIX`, the directory layout written with conditional
//! puts), and an OCI registry ([`oci::OciRegistry`], `oci://HOST/NAMESPACE`, experts as OCI
//! artifacts), and a Hugging Face Hub repository ([`hub::HubRegistry`], `hf://ORG/REPO`, the
//! directory layout written one commit per publish). The wire and on-disk protocol is docs/registry-protocol.md.

pub mod http;
pub mod hub;
pub mod index;
pub mod local;
pub mod location;
pub mod oci;
mod runtime;
pub mod s3;

use std::io::Read;
use std::path::Path;

use crate::error::{Error, IoResultExt, Result};
use crate::home::XpmHome;
use crate::printer::Progress;

pub use hub::HubRegistry;
pub use index::{IndexLine, RegistryConfig, SearchHit, SearchResults};
pub use local::LocalRegistry;
pub use location::Location;
pub use oci::OciRegistry;
pub use s3::S3Registry;

/// What every registry backend does.
pub trait Registry: Send + Sync {
    /// The canonical source string recorded in lockfiles (`file:///abs/path` or the base URL).
    fn source(&self) -> &str;
    /// Every published version of `name`, or `None` if the registry has no such expert.
    fn index(&self, name: &str) -> Result<Option<Vec<IndexLine>>>;
    /// A reader over the artifact's bytes. The caller verifies the digest while reading.
    fn open_blob(&self, line: &IndexLine) -> Result<Box<dyn Read + Send>>;
    /// Publish a verified artifact whose index line is `line`; returns the line the registry
    /// recorded (with its publish time). `progress` advances by the bytes sent.
    fn publish(
        &self,
        artifact: &Path,
        line: &IndexLine,
        progress: &dyn Progress,
    ) -> Result<IndexLine>;
    /// Yank (or un-yank) a version; returns the updated line.
    fn set_yanked(&self, name: &str, version: &semver::Version, yanked: bool) -> Result<IndexLine>;
    /// Experts whose name or description contains every word of `query`.
    fn search(&self, query: &str, limit: usize) -> Result<SearchResults>;
}

/// The hint for an artifact a registry does not have: the digest came from the index or from a
/// lockfile, and either may be the one that is wrong.
pub const MISSING_BLOB_HINT: &str = "if xpm.lock was edited or comes from another registry, \
     delete it and run `xpm install`; otherwise the registry is damaged: ask its operator to \
     publish the version again";

/// A search's results from every hit (`skipped`: the index files that could not be read,
/// each reported as a warning naming `what` was skipped), cut to `limit`.
pub(crate) fn search_results(
    printer: &crate::printer::Printer,
    what: &str,
    (mut hits, skipped): (Vec<SearchHit>, Vec<Error>),
    limit: usize,
) -> SearchResults {
    for e in skipped {
        printer.warn(format!("skipping {what}: {e}"));
    }
    let total = hits.len();
    hits.truncate(limit);
    SearchResults {
        experts: hits,
        total,
    }
}

/// The error of a backend that needs the network while `--offline` is set.
pub(crate) fn require_online(offline: bool, source: &str, what: &str) -> Result<()> {
    if offline {
        return Err(Error::registry(
            source,
            format!("{what} needs the network, and --offline is set"),
            Some("run the command once without --offline"),
        ));
    }
    Ok(())
}

/// How to reach a registry.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Token for publish and yank (`--token`, `$XPM_TOKEN`). Never printed.
    pub token: Option<String>,
    /// Use only what is cached; never touch the network.
    pub offline: bool,
    /// Where waits (a held lock) and retries are reported.
    pub printer: crate::printer::Printer,
    /// Where the Hugging Face Hub is, and its token (`HF_ENDPOINT`, `HF_TOKEN`, the token
    /// file), for `hf://` registries.
    pub hub: crate::hf::HubConfig,
}

/// The registry to use: `--registry`, else `$XPM_REGISTRY`, else `xpm.toml`'s `registry`, else
/// the embedded local registry at `$XPM_HOME/registry`.
pub fn default_location(home: &XpmHome) -> String {
    format!("file://{}", home.root.join("registry").display())
}

/// Open the registry at `location`: `http(s)://…`, `s3://…`, `oci://…`, `file://…` or a plain directory
/// path. A local registry (or an S3 registry's layout in an existing bucket) is created on first
/// use when `create` is set (publish).
pub fn open(
    location: &str,
    home: &XpmHome,
    opts: &ClientOptions,
    create: bool,
) -> Result<Box<dyn Registry>> {
    let path = match Location::parse(location)? {
        Location::Http(url) => {
            return Ok(Box::new(http::HttpRegistry::new(url.as_str(), home, opts)?));
        }
        Location::S3 { bucket, prefix } => {
            let reg = S3Registry::connect(&bucket, &prefix, opts)?;
            if !create {
                reg.require_registry()?;
            }
            return Ok(Box::new(reg));
        }
        Location::Oci { host, namespace } => {
            return Ok(Box::new(OciRegistry::connect(
                &host, &namespace, home, opts,
            )?));
        }
        Location::Hub {
            dataset,
            repo,
            revision,
        } => {
            let reg = HubRegistry::connect(dataset, &repo, revision.as_deref(), home, opts)?;
            if !create {
                reg.require_registry()?;
            }
            return Ok(Box::new(reg));
        }
        Location::Dir(path) if path.is_absolute() => path,
        Location::Dir(path) => std::env::current_dir().at("read", ".")?.join(path),
    };
    let reg = if create {
        LocalRegistry::open_or_init(&path)?
    } else {
        LocalRegistry::open(&path)?
    }
    .with_printer(opts.printer);
    Ok(Box::new(LocalBackend {
        source: format!("file://{}", path.display()),
        reg,
    }))
}

/// [`LocalRegistry`] as a [`Registry`].
struct LocalBackend {
    source: String,
    reg: LocalRegistry,
}

impl Registry for LocalBackend {
    fn source(&self) -> &str {
        &self.source
    }

    fn index(&self, name: &str) -> Result<Option<Vec<IndexLine>>> {
        self.reg.read_index(name)
    }

    fn open_blob(&self, line: &IndexLine) -> Result<Box<dyn Read + Send>> {
        let p = self.reg.blob_path(&line.cksum);
        let f = std::fs::File::open(&p).map_err(|e| {
            Error::registry(
                &self.source,
                format!(
                    "the artifact of {} is missing from the registry: {e}",
                    line.id()
                ),
                Some(MISSING_BLOB_HINT),
            )
        })?;
        Ok(Box::new(f))
    }

    fn publish(
        &self,
        artifact: &Path,
        line: &IndexLine,
        progress: &dyn Progress,
    ) -> Result<IndexLine> {
        let mut line = line.clone();
        line.pubtime = index::now_rfc3339();
        self.reg.publish(artifact, &line, false)?;
        progress.inc(line.size);
        Ok(line)
    }

    fn set_yanked(&self, name: &str, version: &semver::Version, yanked: bool) -> Result<IndexLine> {
        self.reg.set_yanked(name, version, yanked)
    }

    fn search(&self, query: &str, limit: usize) -> Result<SearchResults> {
        let mut hits = self.reg.search(query)?;
        let total = hits.len();
        hits.truncate(limit);
        Ok(SearchResults {
            experts: hits,
            total,
        })
    }
}
