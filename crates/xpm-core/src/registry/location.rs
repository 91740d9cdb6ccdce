//! Where a registry is: a typed location, parsed once from `--registry`, `$XPM_REGISTRY`,
//! `xpm.toml` or a lockfile's `source`.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The schemes `--registry` accepts.
pub const SCHEMES: &str = "`http://`, `https://`, `s3://BUCKET/PREFIX`, `oci://HOST/NAMESPACE`, \
     `hf://ORG/REPO`, `file://` or a directory path";

/// A registry location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// xpm's registry server (or any static HTTP front of a registry's files).
    Http(reqwest::Url),
    /// A registry directory (`file://…` or a plain path).
    Dir(PathBuf),
    /// A registry in an S3-compatible bucket (`s3://BUCKET/PREFIX`): the directory layout,
    /// written with conditional puts (docs/registry-protocol.md §13). `prefix` is empty or
    /// `/`-separated segments without a leading or trailing `/`.
    S3 { bucket: String, prefix: String },
    /// An OCI registry (`oci://HOST[:PORT]/NAMESPACE`): one repository per expert under
    /// `NAMESPACE/`, one tag per version (docs/registry-protocol.md §7.2). `namespace` is empty
    /// or `/`-separated OCI path components.
    Oci { host: String, namespace: String },
    /// A repository on the Hugging Face Hub (`hf://[datasets/]ORG/REPO[@REVISION]`) holding
    /// the directory layout, written one commit per publish (docs/registry-protocol.md §13.3).
    Hub {
        /// A dataset repository (`hf://datasets/…`) rather than a model repository.
        dataset: bool,
        /// `ORG/REPO`.
        repo: String,
        /// The branch written and read; `None` is `main`.
        revision: Option<String>,
    },
}

impl Location {
    /// Parse `s`. Unknown schemes, `host:port` without a scheme and URLs carrying credentials
    /// are refused with a hint, instead of being taken for a new local directory of that name
    /// (or printed and stored with the password in them).
    pub fn parse(s: &str) -> Result<Location> {
        let bad = |what: String, hint: &str| Error::input(what, Some(hint));
        if let Some((scheme, _)) = s.split_once("://") {
            return match scheme {
                "http" | "https" => {
                    let mut url = reqwest::Url::parse(s.trim_end_matches('/')).map_err(|e| {
                        bad(
                            format!("`{s}` is not a valid registry URL: {e}"),
                            "write it as http://HOST:PORT or https://HOST/PATH",
                        )
                    })?;
                    if !url.username().is_empty() || url.password().is_some() {
                        return Err(bad(
                            format!("the registry URL `{}` carries credentials", redact(&url)),
                            "xpm prints registry URLs and records them in xpm.lock; pass the \
                             token with `--token` or `$XPM_TOKEN` instead",
                        ));
                    }
                    if url.query().is_some() || url.fragment().is_some() {
                        return Err(bad(
                            format!(
                                "the registry URL `{}` has a query or fragment",
                                redact(&url)
                            ),
                            "a registry is addressed by scheme, host, port and path only",
                        ));
                    }
                    // Trailing slashes are not part of a registry's address, however written
                    // (`\` counts as `/` in http URLs): the location prints and reparses as
                    // itself, as the lockfile's `source` must.
                    let path = url.path().trim_end_matches('/').to_string();
                    url.set_path(&path);
                    Ok(Location::Http(url))
                }
                "file" => Ok(Location::Dir(PathBuf::from(&s["file://".len()..]))),
                "s3" => parse_s3(&s["s3://".len()..]),
                "oci" => parse_oci(&s["oci://".len()..]),
                "hf" => parse_hub(&s["hf://".len()..]),
                other => Err(bad(
                    format!("unsupported registry scheme `{other}://` in `{s}`"),
                    &format!("a registry is one of: {SCHEMES}"),
                )),
            };
        }
        // `host:port` (or `host:port/path`) without a scheme is a URL missing its `http://`,
        // not a directory whose name has a colon.
        let head = s.split('/').next().unwrap_or("");
        if let Some((host, port)) = head.rsplit_once(':')
            && !host.is_empty()
            && !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(bad(
                format!("`{s}` looks like a host and port without a scheme"),
                &format!("did you mean `http://{s}`? A registry is one of: {SCHEMES}"),
            ));
        }
        if s.is_empty() {
            return Err(bad(
                "the registry location is empty".into(),
                &format!("a registry is one of: {SCHEMES}"),
            ));
        }
        Ok(Location::Dir(PathBuf::from(s)))
    }

    /// A directory location made absolute against `base` (a project's directory, or the
    /// working directory).
    pub fn resolved_against(self, base: &Path) -> Location {
        match self {
            Location::Dir(p) if !p.is_absolute() => Location::Dir(base.join(p)),
            other => other,
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Http(u) => f.write_str(u.as_str().trim_end_matches('/')),
            Location::Dir(p) => write!(f, "file://{}", p.display()),
            Location::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Location::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            Location::Oci { host, namespace } if namespace.is_empty() => write!(f, "oci://{host}"),
            Location::Oci { host, namespace } => write!(f, "oci://{host}/{namespace}"),
            Location::Hub {
                dataset,
                repo,
                revision,
            } => {
                let kind = if *dataset { "datasets/" } else { "" };
                match revision {
                    Some(r) => write!(f, "hf://{kind}{repo}@{r}"),
                    None => write!(f, "hf://{kind}{repo}"),
                }
            }
        }
    }
}

/// `s3://` + `rest`: a bucket named by S3's rules, then an optional key prefix of plain segments.
/// Credentials, queries and fragments are refused: the location is printed and recorded in
/// xpm.lock, and the credentials come from the AWS environment.
fn parse_s3(rest: &str) -> Result<Location> {
    const FORM: &str = "write it as s3://BUCKET or s3://BUCKET/PREFIX; credentials and the \
                        endpoint come from the environment (AWS_ACCESS_KEY_ID, \
                        AWS_SECRET_ACCESS_KEY, AWS_REGION, XPM_S3_ENDPOINT or AWS_ENDPOINT_URL)";
    let whole = format!("s3://{rest}");
    let bad = |why: &str| {
        Error::input(
            format!(
                "`{}` is not a valid S3 registry location: {why}",
                shown(&whole)
            ),
            Some(FORM),
        )
    };
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.contains('@') {
        return Err(Error::input(
            format!(
                "the registry location `{}` carries credentials",
                shown(&whole)
            ),
            Some(
                "xpm prints registry locations and records them in xpm.lock; give S3 \
                 credentials in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a role) instead",
            ),
        ));
    }
    if rest.contains(['?', '#']) {
        return Err(bad("it has a query or fragment"));
    }
    // S3's bucket naming rules (general purpose buckets).
    let b = bucket.as_bytes();
    if !(3..=63).contains(&b.len()) {
        return Err(bad("a bucket name has 3 to 63 characters"));
    }
    if !b
        .iter()
        .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
    {
        return Err(bad(
            "a bucket name has only lowercase letters, digits, `-` and `.`",
        ));
    }
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) || bucket.contains("..") {
        return Err(bad(
            "a bucket name starts and ends with a letter or digit and has no `..`",
        ));
    }
    if bucket.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(bad("a bucket name is not an IP address"));
    }
    let prefix = prefix.trim_end_matches('/');
    if prefix.len() > 512 {
        return Err(bad("the prefix is longer than 512 characters"));
    }
    if !prefix.is_empty() {
        for seg in prefix.split('/') {
            if seg.is_empty() || seg == "." || seg == ".." {
                return Err(bad("the prefix has an empty, `.` or `..` segment"));
            }
            if !seg
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            {
                return Err(bad(
                    "prefix segments use ASCII letters, digits, `-`, `_` and `.`",
                ));
            }
        }
    }
    Ok(Location::S3 {
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
    })
}

/// `oci://` + `rest`: a host (name or IPv4 address, optional port) and an optional namespace of
/// OCI path components. Credentials, queries and fragments are refused: the location is printed
/// and recorded in xpm.lock, and the credentials come from the environment or Docker's config.
fn parse_oci(rest: &str) -> Result<Location> {
    const FORM: &str = "write it as oci://HOST[:PORT]/NAMESPACE (e.g. oci://ghcr.io/acme/experts); \
                        credentials come from XPM_OCI_USERNAME and XPM_OCI_PASSWORD, `--token` \
                        or ~/.docker/config.json";
    let whole = format!("oci://{rest}");
    let bad = |why: &str| {
        Error::input(
            format!(
                "`{}` is not a valid OCI registry location: {why}",
                shown(&whole)
            ),
            Some(FORM),
        )
    };
    let (host, namespace) = rest.split_once('/').unwrap_or((rest, ""));
    if host.contains('@') {
        return Err(Error::input(
            format!(
                "the registry location `{}` carries credentials",
                shown(&whole)
            ),
            Some(
                "xpm prints registry locations and records them in xpm.lock; give OCI \
                 credentials in XPM_OCI_USERNAME and XPM_OCI_PASSWORD (or `docker login`) instead",
            ),
        ));
    }
    if rest.contains(['?', '#']) {
        return Err(bad("it has a query or fragment"));
    }
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (host, None),
    };
    if name.is_empty()
        || name.len() > 253
        || !name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.')
        || name.starts_with(['-', '.'])
        || name.ends_with(['-', '.'])
    {
        return Err(bad("the host is a DNS name or an IPv4 address"));
    }
    if let Some(p) = port
        && (p.is_empty() || p.len() > 5 || !p.bytes().all(|c| c.is_ascii_digit()))
    {
        return Err(bad("the port is a number"));
    }
    let namespace = namespace.trim_end_matches('/');
    if !namespace.is_empty() {
        for seg in namespace.split('/') {
            if !crate::registry::oci::is_path_component(seg) {
                return Err(bad(
                    "namespace segments are lowercase letters and digits, separated by `.`, \
                     `_`, `__` or dashes",
                ));
            }
        }
    }
    Ok(Location::Oci {
        host: host.to_string(),
        namespace: namespace.to_string(),
    })
}

/// `hf://` + `rest`: `[datasets/]ORG/REPO[@REVISION]`, each name by the Hub's rules (letters,
/// digits, `-`, `_`, `.`; no `--` or `..`; at most 96 characters), a revision of plain branch
/// characters. Tokens come from `HF_TOKEN`, the token file or `--token`, never the location.
fn parse_hub(rest: &str) -> Result<Location> {
    const FORM: &str = "write it as hf://ORG/REPO, hf://datasets/ORG/REPO, or either with \
                        @BRANCH; the token comes from HF_TOKEN, `hf auth login` or --token";
    let whole = format!("hf://{rest}");
    let bad = |why: &str| {
        Error::input(
            format!(
                "`{}` is not a valid Hugging Face registry location: {why}",
                shown(&whole)
            ),
            Some(FORM),
        )
    };
    if rest.contains(['?', '#', ':']) {
        return Err(bad("it has a query, fragment or credentials"));
    }
    let (path, revision) = match rest.split_once('@') {
        Some((p, r)) => (p, Some(r)),
        None => (rest, None),
    };
    let path = path.trim_end_matches('/');
    let (dataset, repo) = match path.strip_prefix("datasets/") {
        Some(r) => (true, r),
        None => (false, path),
    };
    let parts: Vec<&str> = repo.split('/').collect();
    if parts.len() != 2 {
        return Err(bad("a repository is ORG/REPO"));
    }
    for p in &parts {
        let ok = !p.is_empty()
            && p.len() <= 96
            && p.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..");
        if !ok {
            return Err(bad(
                "ORG and REPO use letters, digits, `-`, `_` and `.` (at most 96), not at either \
                 end, with no `--` or `..`",
            ));
        }
    }
    if let Some(r) = revision {
        let ok = !r.is_empty()
            && r.len() <= 200
            && r.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'/'))
            && !r.starts_with(['/', '.', '-'])
            && !r.ends_with('/')
            && !r.contains("..")
            && !r.contains("//");
        if !ok {
            return Err(bad(
                "a revision is a branch name of letters, digits, `-`, `_`, `.` and `/`",
            ));
        }
    }
    Ok(Location::Hub {
        dataset,
        repo: repo.to_string(),
        revision: revision.filter(|r| *r != "main").map(str::to_string),
    })
}

/// `s` with anything before an `@` in its authority masked, for messages.
fn shown(s: &str) -> String {
    match s.split_once("://") {
        Some((scheme, rest)) => {
            let (auth, path) = rest.split_once('/').unwrap_or((rest, ""));
            let auth = match auth.rsplit_once('@') {
                Some((_, host)) => format!("****@{host}"),
                None => auth.to_string(),
            };
            if path.is_empty() && !rest.contains('/') {
                format!("{scheme}://{auth}")
            } else {
                format!("{scheme}://{auth}/{path}")
            }
        }
        None => s.to_string(),
    }
}

/// `url` with any password replaced, for messages.
fn redact(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    if u.password().is_some() {
        let _ = u.set_password(Some("****"));
    }
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::Location;

    #[test]
    fn locations_parse_into_their_kind_or_are_refused_with_a_hint() {
        assert!(matches!(
            Location::parse("http://127.0.0.1:8417").unwrap(),
            Location::Http(_)
        ));
        assert_eq!(
            Location::parse("file:///srv/reg").unwrap(),
            Location::Dir("/srv/reg".into())
        );
        assert_eq!(
            Location::parse("regs/team").unwrap(),
            Location::Dir("regs/team".into())
        );
        for (s, bucket, prefix, shown) in [
            ("s3://xpm-reg", "xpm-reg", "", "s3://xpm-reg"),
            ("s3://xpm-reg/", "xpm-reg", "", "s3://xpm-reg"),
            (
                "s3://xpm.reg-1/team/v1/",
                "xpm.reg-1",
                "team/v1",
                "s3://xpm.reg-1/team/v1",
            ),
        ] {
            let loc = Location::parse(s).unwrap();
            assert_eq!(
                loc,
                Location::S3 {
                    bucket: bucket.into(),
                    prefix: prefix.into()
                }
            );
            assert_eq!(loc.to_string(), shown);
        }
        for (s, host, namespace, shown) in [
            ("oci://ghcr.io", "ghcr.io", "", "oci://ghcr.io"),
            (
                "oci://127.0.0.1:5000/team/xpm/",
                "127.0.0.1:5000",
                "team/xpm",
                "oci://127.0.0.1:5000/team/xpm",
            ),
            (
                "oci://reg.example/a__b.c-d",
                "reg.example",
                "a__b.c-d",
                "oci://reg.example/a__b.c-d",
            ),
        ] {
            let loc = Location::parse(s).unwrap();
            assert_eq!(
                loc,
                Location::Oci {
                    host: host.into(),
                    namespace: namespace.into()
                }
            );
            assert_eq!(loc.to_string(), shown);
        }
        for (s, dataset, repo, revision, shown) in [
            (
                "hf://acme/experts",
                false,
                "acme/experts",
                None,
                "hf://acme/experts",
            ),
            (
                "hf://acme/experts@main",
                false,
                "acme/experts",
                None,
                "hf://acme/experts",
            ),
            (
                "hf://datasets/acme/x.y_z-1@release/v2",
                true,
                "acme/x.y_z-1",
                Some("release/v2"),
                "hf://datasets/acme/x.y_z-1@release/v2",
            ),
        ] {
            let loc = Location::parse(s).unwrap();
            assert_eq!(
                loc,
                Location::Hub {
                    dataset,
                    repo: repo.into(),
                    revision: revision.map(Into::into)
                }
            );
            assert_eq!(loc.to_string(), shown);
        }
        // Backslashes are slashes in http URLs; trailing ones are dropped either way.
        for s in ["https://xn--tenje\\\\", "http://h:1/a//", "http://h/a\\"] {
            let loc = Location::parse(s).unwrap();
            assert_eq!(Location::parse(&loc.to_string()).unwrap(), loc, "{s}");
        }
        for (bad, want) in [
            ("htp://host/x", "unsupported registry scheme `htp://`"),
            ("ftp://host/x", "unsupported registry scheme `ftp://`"),
            ("localhost:8417", "looks like a host and port"),
            ("http://user:secret@host", "carries credentials"),
            ("", "is empty"),
            ("s3://AKIA:secret@bucket/p", "carries credentials"),
            ("s3://secret@bucket", "carries credentials"),
            ("s3://ab/p", "3 to 63 characters"),
            ("s3://My_Bucket/p", "only lowercase letters"),
            ("s3://-bucket/p", "starts and ends"),
            ("s3://buc..ket/p", "starts and ends"),
            ("s3://192.168.1.1/p", "not an IP address"),
            ("s3://bucket/a//b", "empty, `.` or `..` segment"),
            ("s3://bucket/a/../b", "empty, `.` or `..` segment"),
            ("s3://bucket/a b", "prefix segments use"),
            ("s3://bucket/p?versionId=1", "query or fragment"),
            ("oci://user:secret@ghcr.io/acme", "carries credentials"),
            ("oci://ghcr.io/Acme", "namespace segments"),
            ("oci://ghcr.io/a//b", "namespace segments"),
            ("oci://ghcr.io/a-/b", "namespace segments"),
            ("oci://:5000/a", "the host"),
            ("oci://host:50x/a", "the port"),
            ("oci://ghcr.io/a?x=1", "query or fragment"),
            ("hf://org", "ORG/REPO"),
            ("hf://org/repo/extra", "ORG/REPO"),
            ("hf://org/re po", "ORG and REPO use"),
            ("hf://org/re--po", "ORG and REPO use"),
            ("hf://../repo", "ORG and REPO use"),
            ("hf://user:secret@org/repo", "credentials"),
            ("hf://org/repo@", "a revision"),
            ("hf://org/repo@a..b", "a revision"),
            ("hf://org/repo@/x", "a revision"),
            ("hf://org/repo?rev=1", "query"),
            ("https://reg.example/x?token=1", "query or fragment"),
            ("https://reg.example/#/x", "query or fragment"),
        ] {
            let e = Location::parse(bad).unwrap_err();
            assert!(e.to_string().contains(want), "{bad}: {e}");
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }
}
