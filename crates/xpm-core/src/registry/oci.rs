//! A registry in an OCI registry (`oci://HOST[:PORT]/NAMESPACE`), through `oci-client`:
//! experts are OCI artifacts (docs/registry-protocol.md §7.2).
//!
//! ```text
//! repository  NAMESPACE/<name>           (`team/news` → NAMESPACE/team/news)
//! tag         the version, `+` as `_`    (1.2.0, 2.0.0-rc.1, 1.0.0_build.5)
//! manifest    OCI image manifest, artifactType application/vnd.xpm.expert.v1
//!   config    the version's index line (JSON), application/vnd.xpm.index-line.v1+json
//!   layer     the .xpm file, application/vnd.xpm.artifact.v1, titled NAME-VERSION.xpm
//! ```
//!
//! An expert's index is its tag list, each version tag read as its manifest and config (configs
//! are content-addressed and cached under `$XPM_HOME/cache/oci-v1/`; the last index read is kept
//! there for `--offline`). Artifacts are downloaded by digest (the layer's digest is the line's
//! `cksum`), so a lockfile's pin fetches exactly the bytes it names even if a tag was moved.
//!
//! OCI tags are mutable and the distribution API has no conditional tag write: a publish
//! refuses a version whose tag (or any tag of the same version) exists, pushes, then reads the
//! tag back and fails if another publisher's manifest is there. Yank is refused (a manifest has
//! no mutable field). Search lists repositories with `_catalog`, where the registry allows it.
//!
//! `oci-client` is async; the [`Registry`] trait is blocking, so the backend owns a small tokio
//! runtime and blocks on it, as s3.rs does.

use super::runtime::Runtime;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::digest::sha256;
use crate::error::{Error, Result};
use crate::home::XpmHome;
use crate::printer::{Printer, Progress};

use super::index::{
    IndexLine, SearchHit, SearchResults, collect_search, now_rfc3339, parse_index_of, render_index,
};
use super::local::same_version;
use super::{ClientOptions, MISSING_BLOB_HINT, Registry};

/// The manifest's `artifactType`.
pub const ARTIFACT_TYPE: &str = "application/vnd.xpm.expert.v1";
/// The config blob's media type: the version's index line, as JSON.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.xpm.index-line.v1+json";
/// The layer's media type: the `.xpm` file.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.xpm.artifact.v1";
/// Basic auth user name (with [`PASSWORD_ENV`]).
pub const USERNAME_ENV: &str = "XPM_OCI_USERNAME";
/// Basic auth password (with [`USERNAME_ENV`]).
pub const PASSWORD_ENV: &str = "XPM_OCI_PASSWORD";
/// `1`: talk plain HTTP to the registry (loopback hosts always do).
pub const PLAIN_HTTP_ENV: &str = "XPM_OCI_PLAIN_HTTP";
/// Manifests and configs read at once while building an index.
const FETCHES: usize = 8;
/// Bytes read from the artifact per chunk while pushing.
const PUSH_CHUNK: usize = 4 << 20;
/// Largest config blob accepted (an index line is a few kB).
const MAX_CONFIG: i64 = 1 << 20;

const AUTH_HINT: &str = "give credentials with XPM_OCI_USERNAME and XPM_OCI_PASSWORD (Basic), \
    `--token` / XPM_TOKEN (Bearer) or `docker login` (~/.docker/config.json `auths`), and check \
    that they may read (and, to publish, push) the repository";

/// A registry of OCI artifacts.
pub struct OciRegistry {
    /// `oci://host/namespace`: the lockfile source and the `url` of errors.
    source: String,
    /// `host[:port]`.
    host: String,
    /// Repository prefix without a trailing `/` (possibly empty).
    namespace: String,
    client: Client,
    auth: RegistryAuth,
    /// Where the credentials came from, for messages (never the secret).
    auth_from: String,
    rt: Arc<Runtime>,
    printer: Printer,
    offline: bool,
    /// `$XPM_HOME/cache/oci-v1/<registry key>`.
    cache: PathBuf,
}

/// Whether `seg` is an OCI repository path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
pub fn is_path_component(seg: &str) -> bool {
    let b = seg.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: `.`, `_`, `__` or one or more `-`, between alphanumerics.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &seg[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// The tag of `v`: its text with `+` (not allowed in tags) written `_` (not allowed in
/// versions), as Helm does; at most 128 characters.
pub fn tag_of(v: &semver::Version) -> Result<String> {
    let t = v.to_string().replace('+', "_");
    if t.len() > 128 {
        return Err(Error::input(
            format!("version {v} is longer than an OCI tag may be (128 characters)"),
            Some("publish with a shorter pre-release or build metadata"),
        ));
    }
    Ok(t)
}

/// The version a tag names, if it is one written by [`tag_of`] (other tags, such as `latest`,
/// are not versions).
pub fn version_of_tag(tag: &str) -> Option<semver::Version> {
    let v = semver::Version::parse(&tag.replace('_', "+")).ok()?;
    (tag_of(&v).ok()? == tag).then_some(v)
}

/// The credentials for `host`: `$XPM_OCI_USERNAME` and `$XPM_OCI_PASSWORD` (Basic), else the
/// token (Bearer), else Docker's config (`$DOCKER_CONFIG/config.json` or
/// `~/.docker/config.json`: `auths.<host>.auth`, base64 `user:password`, or
/// `registrytoken`), else anonymous. Returns the auth and where it came from.
fn credentials(host: &str, token: Option<&str>) -> Result<(RegistryAuth, String)> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (env(USERNAME_ENV), env(PASSWORD_ENV)) {
        (Some(u), Some(p)) => {
            return Ok((
                RegistryAuth::Basic(u.clone(), p),
                format!("user `{u}` from ${USERNAME_ENV}"),
            ));
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(Error::input(
                format!("only one of ${USERNAME_ENV} and ${PASSWORD_ENV} is set"),
                Some("set both for Basic auth, or neither"),
            ));
        }
        (None, None) => {}
    }
    if let Some(t) = token.filter(|t| !t.is_empty()) {
        return Ok((
            RegistryAuth::Bearer(t.to_string()),
            "the token (--token or $XPM_TOKEN)".into(),
        ));
    }
    let path = match std::env::var_os("DOCKER_CONFIG") {
        Some(d) => PathBuf::from(d).join("config.json"),
        None => match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".docker/config.json"),
            None => return Ok((RegistryAuth::Anonymous, "no credentials".into())),
        },
    };
    let Ok(text) = std::fs::read(&path) else {
        return Ok((RegistryAuth::Anonymous, "no credentials".into()));
    };
    let bad = |why: &str| {
        Error::input(
            format!("cannot read the credentials in {}: {why}", path.display()),
            Some(
                "fix the file (`docker login` writes it) or set XPM_OCI_USERNAME and XPM_OCI_PASSWORD",
            ),
        )
    };
    let cfg: serde_json::Value = serde_json::from_slice(&text).map_err(|e| bad(&e.to_string()))?;
    let auths = cfg.get("auths").and_then(|a| a.as_object());
    let entry = auths.and_then(|a| {
        [
            host.to_string(),
            format!("https://{host}"),
            format!("http://{host}"),
            format!("https://{host}/v2/"),
        ]
        .iter()
        .find_map(|k| a.get(k))
    });
    let from = format!("{} (auths.{host})", path.display());
    let Some(entry) = entry else {
        return Ok((RegistryAuth::Anonymous, "no credentials".into()));
    };
    if let Some(t) = entry.get("registrytoken").and_then(|t| t.as_str()) {
        return Ok((RegistryAuth::Bearer(t.to_string()), from));
    }
    if let Some(a) = entry.get("auth").and_then(|t| t.as_str()) {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.trim())
            .map_err(|_| bad("`auth` is not base64"))?;
        let s = String::from_utf8(raw).map_err(|_| bad("`auth` is not UTF-8"))?;
        let (u, p) = s
            .split_once(':')
            .ok_or_else(|| bad("`auth` is not `user:password`"))?;
        return Ok((
            RegistryAuth::Basic(u.to_string(), p.to_string()),
            format!("user `{u}` from {from}"),
        ));
    }
    if let (Some(u), Some(p)) = (
        entry.get("username").and_then(|t| t.as_str()),
        entry.get("password").and_then(|t| t.as_str()),
    ) {
        return Ok((
            RegistryAuth::Basic(u.to_string(), p.to_string()),
            format!("user `{u}` from {from}"),
        ));
    }
    Ok((RegistryAuth::Anonymous, "no credentials".into()))
}

/// Whether `host` (`name[:port]`) is a loopback address, where plain HTTP is the norm.
fn is_loopback(host: &str) -> bool {
    let name = host.rsplit_once(':').map_or(host, |(n, _)| n);
    name == "localhost"
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.is_loopback())
}

impl OciRegistry {
    /// Set up the client for `host` and `namespace`; nothing is sent yet.
    pub fn connect(
        host: &str,
        namespace: &str,
        home: &XpmHome,
        opts: &ClientOptions,
    ) -> Result<Self> {
        let source = super::Location::Oci {
            host: host.into(),
            namespace: namespace.into(),
        }
        .to_string();
        let plain = std::env::var(PLAIN_HTTP_ENV).is_ok_and(|v| v == "1" || v == "true");
        let protocol = if plain {
            ClientProtocol::Http
        } else if is_loopback(host) {
            ClientProtocol::HttpsExcept(vec![host.to_string()])
        } else {
            ClientProtocol::Https
        };
        let client = Client::new(ClientConfig {
            protocol,
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            user_agent: concat!("xpm/", env!("CARGO_PKG_VERSION")),
            platform_resolver: None,
            ..Default::default()
        });
        let (auth, auth_from) = credentials(host, opts.token.as_deref())?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("xpm-oci")
            .enable_all()
            .build()
            .map_err(|e| {
                Error::registry(&source, format!("cannot start the OCI client: {e}"), None)
            })?;
        let rt = Arc::new(Runtime::new(rt));
        rt.block_on(client.store_auth_if_needed(host, &auth));
        let key = &sha256(source.as_bytes())["sha256:".len()..][..16];
        Ok(OciRegistry {
            cache: home.cache.join("oci-v1").join(key),
            source,
            host: host.to_string(),
            namespace: namespace.to_string(),
            client,
            auth,
            auth_from,
            rt,
            printer: opts.printer,
            offline: opts.offline,
        })
    }

    /// The repository of expert `name`, validated against OCI's naming rules.
    pub fn repository(&self, name: &str) -> Result<String> {
        crate::format::manifest::validate_name(name)
            .map_err(|e| Error::input(format!("invalid expert name: {e}"), None))?;
        if let Some(seg) = name.split('/').find(|s| !is_path_component(s)) {
            return Err(Error::input(
                format!(
                    "`{name}` cannot be an OCI repository name: `{seg}` ends with `-` or `_`, \
                     or has `___`, `_-` or `-_`"
                ),
                Some(
                    "OCI repository names join lowercase letters and digits with `.`, `_`, `__` or dashes; rename the expert to publish it to an OCI registry",
                ),
            ));
        }
        let repo = if self.namespace.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.namespace)
        };
        if self.host.len() + 1 + repo.len() > 255 {
            return Err(Error::input(
                format!("`{}/{repo}` is longer than OCI's 255 characters", self.host),
                Some("use a shorter namespace or expert name"),
            ));
        }
        Ok(repo)
    }

    fn reference(&self, name: &str, tag: &str) -> Result<Reference> {
        Ok(Reference::with_tag(
            self.host.clone(),
            self.repository(name)?,
            tag.to_string(),
        ))
    }

    fn by_digest(&self, name: &str, digest: &str) -> Result<Reference> {
        Ok(Reference::with_digest(
            self.host.clone(),
            self.repository(name)?,
            digest.to_string(),
        ))
    }

    fn require_online(&self, what: &str) -> Result<()> {
        super::require_online(self.offline, &self.source, what)
    }

    /// An xpm error for a failed OCI request.
    fn err(&self, what: &str, e: OciDistributionError) -> Error {
        use OciDistributionError as E;
        let status = match &e {
            E::ServerError { code, .. } => Some(*code),
            E::UnauthorizedError { .. } => Some(401),
            E::RegistryError { envelope, .. } => {
                envelope.errors.iter().find_map(|x| match x.code {
                    OciErrorCode::Unauthorized => Some(401),
                    OciErrorCode::Denied => Some(403),
                    OciErrorCode::Toomanyrequests => Some(429),
                    _ => None,
                })
            }
            E::RequestError(r) => r.status().map(|s| s.as_u16()),
            E::AuthenticationFailure(_) => Some(401),
            _ => None,
        };
        let transient = match &e {
            E::RequestError(r) => r.is_connect() || r.is_timeout() || r.is_body(),
            E::IoError(_) => true,
            _ => status.is_some_and(|s| s >= 500 || s == 429),
        };
        let (message, hint) = match status {
            Some(401) => (
                format!(
                    "{what}: the registry refused the credentials ({}; 401 Unauthorized)",
                    self.auth_from
                ),
                AUTH_HINT.to_string(),
            ),
            Some(403) => (
                format!(
                    "{what}: the registry denied access ({}; 403 Forbidden)",
                    self.auth_from
                ),
                AUTH_HINT.to_string(),
            ),
            _ if transient => (
                format!("{what}: {}", crate::error::chain(&e)),
                "check that the registry is running and reachable; then retry".to_string(),
            ),
            _ => (
                format!("{what}: {}", crate::error::chain(&e)),
                format!(
                    "check the location (oci://HOST/NAMESPACE); a registry on another host than \
                     127.0.0.1 or localhost is reached over HTTPS unless ${PLAIN_HTTP_ENV}=1"
                ),
            ),
        };
        Error::Registry {
            url: self.source.clone(),
            message,
            hint: Some(hint),
            transient,
        }
    }

    /// Every tag of `name`'s repository, or `None` if the repository does not exist.
    async fn tags(&self, name: &str) -> Result<Option<Vec<String>>> {
        let r = self.reference(name, "latest")?;
        let what = format!("listing the versions of `{name}`");
        let mut out: Vec<String> = Vec::new();
        loop {
            let page = match self
                .client
                .list_tags(&r, &self.auth, Some(1000), out.last().map(String::as_str))
                .await
            {
                Ok(p) => p,
                Err(e) if is_not_found(&e) && out.is_empty() => return Ok(None),
                Err(e) => return Err(self.err(&what, e)),
            };
            let n = page.tags.len();
            // A registry that ignores `last` would repeat its first page forever.
            let fresh: Vec<String> = page.tags.into_iter().filter(|t| !out.contains(t)).collect();
            let grew = !fresh.is_empty();
            out.extend(fresh);
            if n < 1000 || !grew {
                break;
            }
        }
        Ok(Some(out))
    }

    /// The config blob `desc` of `name`, from the cache or the registry, checked against its
    /// digest.
    async fn config(&self, name: &str, desc: &OciDescriptor) -> Result<Vec<u8>> {
        let hex = desc
            .digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|c| c.is_ascii_hexdigit()))
            .ok_or_else(|| {
                Error::registry(
                    &self.source,
                    format!(
                        "`{name}` has a config digest xpm cannot check: {}",
                        desc.digest
                    ),
                    None,
                )
            })?;
        let cached = self.cache.join("configs").join(hex);
        if let Ok(b) = std::fs::read(&cached)
            && sha256(&b) == desc.digest
        {
            return Ok(b);
        }
        if desc.size > MAX_CONFIG {
            return Err(Error::registry(
                &self.source,
                format!(
                    "the config of a version of `{name}` is {} bytes, over the {MAX_CONFIG} an index line may have",
                    desc.size
                ),
                None,
            ));
        }
        let r = self.by_digest(name, &desc.digest)?;
        let mut out = Vec::new();
        self.client
            .pull_blob(&r, desc, &mut out)
            .await
            .map_err(|e| self.err(&format!("reading a version of `{name}`"), e))?;
        if sha256(&out) != desc.digest {
            return Err(Error::registry(
                &self.source,
                format!(
                    "a config blob of `{name}` does not match its digest {}",
                    desc.digest
                ),
                Some("the registry's copy is damaged; tell its operator"),
            ));
        }
        // Best effort: the cache only saves a request.
        if std::fs::create_dir_all(cached.parent().expect("has a parent")).is_ok() {
            let _ = crate::fsutil::write_atomic_nosync(&cached, &out);
        }
        Ok(out)
    }

    /// The index line that tag `tag` of `name` holds, or `None` (with a warning) when the tag
    /// names something other than an xpm artifact.
    async fn line_of_tag(&self, name: &str, tag: &str) -> Result<Option<IndexLine>> {
        let r = self.reference(name, tag)?;
        let what = format!("reading {name}@{tag}");
        let (m, _digest) = match self.client.pull_image_manifest(&r, &self.auth).await {
            Ok(x) => x,
            // Deleted between the tag list and now.
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(self.err(&what, e)),
        };
        if m.config.media_type != CONFIG_MEDIA_TYPE || m.layers.len() != 1 {
            self.printer.warn(format!(
                "{}: skipping tag `{tag}` of `{name}`: not an xpm artifact (config {})",
                self.source, m.config.media_type
            ));
            return Ok(None);
        }
        let bytes = self.config(name, &m.config).await?;
        let src = format!("{}/{}:{tag}", self.source, name);
        let mut lines = parse_index_of(&bytes, &src, name)?;
        let layer = &m.layers[0];
        let line = match lines.pop() {
            Some(l) if lines.is_empty() => l,
            _ => {
                return Err(Error::registry(
                    &src,
                    "the config is not one index line",
                    None,
                ));
            }
        };
        if tag_of(&line.vers)? != tag
            || layer.digest != line.cksum
            || u64::try_from(layer.size).ok() != Some(line.size)
            || layer.media_type != LAYER_MEDIA_TYPE
        {
            return Err(Error::registry(
                &src,
                format!(
                    "the tag does not hold the version its index line names ({} with {}, {} bytes; the layer is {} with {} bytes)",
                    line.id(),
                    line.cksum,
                    line.size,
                    layer.digest,
                    layer.size
                ),
                Some("a tag was moved to another version's manifest; tell the registry's operator"),
            ));
        }
        Ok(Some(line))
    }

    fn index_cache(&self, name: &str) -> PathBuf {
        self.cache.join("index").join(name.replace('/', "@"))
    }

    /// Every version of `name` (from the tag list), oldest first, or `None` when there is none.
    pub fn read_index(&self, name: &str) -> Result<Option<Vec<IndexLine>>> {
        self.repository(name)?;
        let cached = self.index_cache(name);
        if self.offline {
            return match std::fs::read(&cached) {
                Ok(b) => Ok(Some(parse_index_of(&b, &self.source, name)?)),
                Err(_) => Err(Error::registry(
                    &self.source,
                    format!(
                        "the versions of `{name}` are not in the cache and --offline forbids the network"
                    ),
                    Some("run the command once without --offline"),
                )),
            };
        }
        let lines = self.rt.block_on(async {
            let Some(tags) = self.tags(name).await? else {
                return Ok(None);
            };
            let got: Vec<Result<Option<IndexLine>>> =
                futures_util::stream::iter(tags.iter().filter(|t| version_of_tag(t).is_some()))
                    .map(|t| self.line_of_tag(name, t))
                    .buffer_unordered(FETCHES)
                    .collect()
                    .await;
            let mut lines = Vec::new();
            for l in got {
                lines.extend(l?);
            }
            Ok::<_, Error>(Some(lines))
        })?;
        let Some(mut lines) = lines else {
            return Ok(None);
        };
        if lines.is_empty() {
            return Ok(None);
        }
        lines.sort_by(|a, b| a.vers.cmp(&b.vers));
        if let Some(w) = lines
            .windows(2)
            .find(|w| same_version(&w[0].vers, &w[1].vers))
        {
            return Err(Error::registry(
                &self.source,
                format!(
                    "`{name}` has two tags of one version ({} and {})",
                    w[0].vers, w[1].vers
                ),
                Some(
                    "versions that differ only in build metadata are one version; tell the registry's operator",
                ),
            ));
        }
        if std::fs::create_dir_all(cached.parent().expect("has a parent")).is_ok() {
            let _ = crate::fsutil::write_atomic_nosync(&cached, &render_index(&lines));
        }
        Ok(Some(lines))
    }

    /// Push `artifact` as version `line` of its expert: refuse an existing version, upload the
    /// layer (streamed from the file) and the config, tag the manifest, then read the tag back.
    pub fn publish(
        &self,
        artifact: &Path,
        line: &IndexLine,
        progress: &dyn Progress,
    ) -> Result<IndexLine> {
        self.require_online("publishing")?;
        let tag = tag_of(&line.vers)?;
        let r = self.reference(&line.name, &tag)?;
        // Versions are immutable; OCI tags are not: check before pushing.
        let existing = self.rt.block_on(self.tags(&line.name))?.unwrap_or_default();
        if let Some(t) = existing
            .iter()
            .find(|t| version_of_tag(t).is_some_and(|v| same_version(&v, &line.vers)) || **t == tag)
        {
            let old = self
                .read_index(&line.name)?
                .unwrap_or_default()
                .into_iter()
                .find(|l| same_version(&l.vers, &line.vers));
            return Err(exists(line, old.as_ref(), t));
        }
        let what = format!("publishing {}", line.id());
        let exists = self
            .rt
            .block_on(self.client.blob_exists(&r, &line.cksum))
            .map_err(|e| self.err(&what, e))?;
        if exists {
            progress.inc(line.size);
        } else {
            self.push_layer(&r, artifact, line, progress)?;
        }
        let config = serde_json::to_vec(line).expect("index lines serialize");
        let config_digest = sha256(&config);
        let config_size = config.len() as i64;
        self.rt
            .block_on(self.client.push_blob(&r, config, &config_digest))
            .map_err(|e| self.err(&what, e))?;
        let title = format!("{}-{}.xpm", line.name.replace('/', "-"), tag);
        let manifest = OciImageManifest {
            schema_version: 2,
            media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_string()),
            config: OciDescriptor {
                media_type: CONFIG_MEDIA_TYPE.into(),
                digest: config_digest,
                size: config_size,
                ..Default::default()
            },
            layers: vec![OciDescriptor {
                media_type: LAYER_MEDIA_TYPE.into(),
                digest: line.cksum.clone(),
                size: i64::try_from(line.size).expect("artifact sizes fit in i64"),
                annotations: Some(
                    [(
                        oci_client::annotations::ORG_OPENCONTAINERS_IMAGE_TITLE.to_string(),
                        title,
                    )]
                    .into(),
                ),
                ..Default::default()
            }],
            subject: None,
            artifact_type: Some(ARTIFACT_TYPE.into()),
            annotations: Some(
                [
                    (
                        oci_client::annotations::ORG_OPENCONTAINERS_IMAGE_CREATED.to_string(),
                        line.pubtime.clone(),
                    ),
                    (
                        oci_client::annotations::ORG_OPENCONTAINERS_IMAGE_VERSION.to_string(),
                        line.vers.to_string(),
                    ),
                ]
                .into(),
            ),
        };
        let ours = OciManifest::Image(manifest);
        self.rt
            .block_on(self.client.push_manifest(&r, &ours))
            .map_err(|e| self.err(&what, e))?;
        // A publisher that raced us past the tag check overwrote our tag, or we overwrote
        // theirs: the tag must now hold our manifest, else one of us failed.
        let (got, _) = self
            .rt
            .block_on(self.client.pull_image_manifest(&r, &self.auth))
            .map_err(|e| self.err(&what, e))?;
        let OciManifest::Image(mine) = ours else {
            unreachable!("built as an image manifest")
        };
        if got.config.digest != mine.config.digest {
            return Err(Error::Conflict {
                message: format!(
                    "{} was published by someone else at the same time; the tag holds their \
                     manifest (config {}), not this one",
                    line.id(),
                    got.config.digest
                ),
                hint: Some(
                    "check with `xpm install` which bytes the version has; publish a new version if yours are different"
                        .into(),
                ),
            });
        }
        Ok(line.clone())
    }

    /// Upload the artifact as a blob, read in chunks on this thread and streamed to the
    /// registry (the registry checks the digest when the upload is committed).
    fn push_layer(
        &self,
        r: &Reference,
        artifact: &Path,
        line: &IndexLine,
        progress: &dyn Progress,
    ) -> Result<()> {
        let what = format!("uploading {}", line.id());
        let (tx, rx) = tokio::sync::mpsc::channel::<oci_client::errors::Result<Bytes>>(2);
        let stream =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|b| (b, rx)) },
            );
        let client = self.client.clone();
        let (r2, cksum) = (r.clone(), line.cksum.clone());
        let size = line.size;
        let task = self.rt.spawn(async move {
            client
                .push_blob_stream(&r2, stream, &cksum, Some(size))
                .await
        });
        let mut f = std::fs::File::open(artifact).map_err(|e| Error::io("open", artifact, e))?;
        let mut sent = 0u64;
        let mut read_err = None;
        loop {
            let mut buf = vec![0u8; PUSH_CHUNK];
            let n = match read_full(&mut f, &mut buf) {
                Ok(n) => n,
                Err(e) => {
                    read_err = Some(Error::io("read", artifact, e));
                    break;
                }
            };
            if n == 0 {
                break;
            }
            buf.truncate(n);
            if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                break; // the upload failed: its error is below
            }
            sent += n as u64;
            progress.inc(n as u64);
        }
        if let Some(e) = read_err {
            let _ = tx.blocking_send(Err(OciDistributionError::GenericError(Some(
                "the artifact could not be read".into(),
            ))));
            drop(tx);
            let _ = self.rt.block_on(task);
            return Err(e);
        }
        drop(tx);
        let res = self
            .rt
            .block_on(task)
            .map_err(|e| Error::registry(&self.source, format!("{what}: {e}"), None))?;
        match res {
            Ok(_) => Ok(()),
            Err(e) if sent != line.size || is_digest_invalid(&e) => Err(Error::input(
                format!(
                    "{} changed while it was being published (the registry refused its digest \
                     {}: {})",
                    artifact.display(),
                    line.cksum,
                    crate::error::chain(&e)
                ),
                Some("publish it again once nothing is writing to it"),
            )),
            Err(e) => Err(self.err(&what, e)),
        }
    }

    /// Every expert under the namespace whose name or description contains all words of
    /// `query` (repositories listed with `_catalog`), and the errors of experts skipped.
    pub fn search_skipping(&self, query: &str) -> Result<(Vec<SearchHit>, Vec<Error>)> {
        let probe = Reference::with_tag(self.host.clone(), "xpm".into(), "latest".into());
        let prefix = if self.namespace.is_empty() {
            String::new()
        } else {
            format!("{}/", self.namespace)
        };
        let mut repos: Vec<String> = Vec::new();
        loop {
            let page = self.rt.block_on(self.client.catalog(
                &probe,
                &self.auth,
                Some(1000),
                repos.last().map(String::as_str),
            ));
            let page = match page {
                Ok(p) => p,
                Err(e) => {
                    let mut err = self.err("listing the registry's repositories (/v2/_catalog)", e);
                    if let Error::Registry { hint, .. } = &mut err {
                        *hint = Some(
                            "this registry does not list its repositories to these credentials; \
                             search is not available on it: install experts by name"
                                .into(),
                        );
                    }
                    return Err(err);
                }
            };
            let n = page.repositories.len();
            let fresh: Vec<String> = page
                .repositories
                .into_iter()
                .filter(|t| !repos.contains(t))
                .collect();
            let grew = !fresh.is_empty();
            repos.extend(fresh);
            if n < 1000 || !grew {
                break;
            }
        }
        let names: Vec<String> = repos
            .iter()
            .filter_map(|r| r.strip_prefix(&prefix))
            .filter(|n| crate::format::manifest::validate_name(n).is_ok())
            .map(str::to_string)
            .collect();
        Ok(collect_search(
            query,
            names.iter().map(|n| self.read_index(n)),
        ))
    }
}

impl Registry for OciRegistry {
    fn source(&self) -> &str {
        &self.source
    }

    fn index(&self, name: &str) -> Result<Option<Vec<IndexLine>>> {
        self.read_index(name)
    }

    fn open_blob(&self, line: &IndexLine) -> Result<Box<dyn Read + Send>> {
        self.require_online(&format!("downloading {}", line.id()))?;
        let r = self.by_digest(&line.name, &line.cksum)?;
        let what = format!("downloading {}", line.id());
        match self
            .rt
            .block_on(self.client.pull_blob_stream(&r, line.cksum.as_str()))
        {
            // oci-client checks the layer's digest at the end of the stream; its verdict is
            // dropped here (the reader ends), because the store checks size and digest itself
            // and reports a mismatch as a damaged artifact rather than a broken connection
            // (which it would retry).
            Ok(s) => Ok(Box::new(self.rt.reader(s.stream.scan((), |_, r| {
                std::future::ready(match r {
                    Err(e)
                        if e.get_ref()
                            .is_some_and(|i| i.is::<oci_client::errors::DigestError>()) =>
                    {
                        None
                    }
                    Err(e) => Some(Err(std::io::Error::other(crate::error::chain(&e)))),
                    Ok(b) => Some(Ok(b)),
                })
            })))),
            Err(e) if is_not_found(&e) => Err(Error::registry(
                &self.source,
                format!(
                    "the artifact of {} is missing from the registry ({} not found in {})",
                    line.id(),
                    line.cksum,
                    self.repository(&line.name)?
                ),
                Some(MISSING_BLOB_HINT),
            )),
            Err(e) => Err(self.err(&what, e)),
        }
    }

    fn publish(
        &self,
        artifact: &Path,
        line: &IndexLine,
        progress: &dyn Progress,
    ) -> Result<IndexLine> {
        let mut line = line.clone();
        line.pubtime = now_rfc3339();
        line.yanked = false;
        OciRegistry::publish(self, artifact, &line, progress)
    }

    fn set_yanked(
        &self,
        name: &str,
        version: &semver::Version,
        _yanked: bool,
    ) -> Result<IndexLine> {
        Err(Error::input(
            format!(
                "cannot yank {name}@{version}: an OCI registry has no mutable field to record it \
                 in ({})",
                self.source
            ),
            Some(
                "yank is not supported on oci:// registries (docs/registry-protocol.md §7.2); \
                 publish a fixed version, and pin versions in xpm.lock",
            ),
        ))
    }

    fn search(&self, query: &str, limit: usize) -> Result<SearchResults> {
        self.require_online("searching")?;
        Ok(super::search_results(
            &self.printer,
            "an expert",
            self.search_skipping(query)?,
            limit,
        ))
    }
}

/// The "already exists" error (the words of the other backends').
fn exists(line: &IndexLine, old: Option<&IndexLine>, tag: &str) -> Error {
    let when = match old {
        Some(o) => format!("published {}", o.pubtime),
        None => format!("tag `{tag}` exists"),
    };
    Error::Conflict {
        message: format!(
            "{} already exists in the registry ({when}); versions are immutable",
            line.id()
        ),
        hint: Some("bump the version (e.g. with `--version`) and publish again".into()),
    }
}

/// Whether `e` says the repository, manifest or blob does not exist.
fn is_not_found(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|x| {
            matches!(
                x.code,
                OciErrorCode::NameUnknown
                    | OciErrorCode::ManifestUnknown
                    | OciErrorCode::BlobUnknown
                    | OciErrorCode::NotFound
            )
        }),
        OciDistributionError::ServerError { code, .. } => *code == 404,
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        _ => false,
    }
}

/// Whether the registry refused an upload's digest.
fn is_digest_invalid(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|x| {
            matches!(
                x.code,
                OciErrorCode::DigestInvalid | OciErrorCode::SizeInvalid
            )
        }),
        OciDistributionError::ServerError { message, .. } => message.contains("DIGEST_INVALID"),
        _ => false,
    }
}

/// Read until `buf` is full or the file ends.
fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_components_follow_the_oci_grammar() {
        for ok in ["a", "sst2", "a.b", "a_b", "a__b", "a-b", "a---b", "news-v2"] {
            assert!(is_path_component(ok), "{ok}");
        }
        for bad in [
            "", "A", "a-", "_a", "a___b", "a_-b", "a-_b", "a..b", "a/b", "-",
        ] {
            assert!(!is_path_component(bad), "{bad}");
        }
    }

    #[test]
    fn tags_map_build_metadata_and_read_back() {
        for (v, t) in [
            ("1.2.0", "1.2.0"),
            ("2.0.0-rc.1", "2.0.0-rc.1"),
            ("1.0.0+build.5", "1.0.0_build.5"),
            ("1.0.0-a-b+c", "1.0.0-a-b_c"),
        ] {
            let v = semver::Version::parse(v).unwrap();
            assert_eq!(tag_of(&v).unwrap(), t);
            assert_eq!(version_of_tag(t).unwrap(), v);
        }
        for not in ["latest", "v1.0.0", "1.0", "sha256-abc", "1.0.0_a_b"] {
            assert!(version_of_tag(not).is_none(), "{not}");
        }
    }
}
