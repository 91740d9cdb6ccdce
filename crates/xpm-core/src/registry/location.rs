//! Where a registry is: a typed location, parsed once from `--registry`, `$XPM_REGISTRY`,
//! `xpm.toml` or a lockfile's `source`.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The schemes `--registry` accepts.
pub const SCHEMES: &str = "`http://`, `https://`, `file://` or a directory path";

/// A registry location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// xpm's registry server (or any static HTTP front of a registry's files).
    Http(reqwest::Url),
    /// A registry directory (`file://…` or a plain path).
    Dir(PathBuf),
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
                    let url = reqwest::Url::parse(s.trim_end_matches('/')).map_err(|e| {
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
                    Ok(Location::Http(url))
                }
                "file" => Ok(Location::Dir(PathBuf::from(&s["file://".len()..]))),
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
        }
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
        for (bad, want) in [
            ("htp://host/x", "unsupported registry scheme `htp://`"),
            ("ftp://host/x", "unsupported registry scheme `ftp://`"),
            ("localhost:8417", "looks like a host and port"),
            ("http://user:secret@host", "carries credentials"),
            ("", "is empty"),
        ] {
            let e = Location::parse(bad).unwrap_err();
            assert!(e.to_string().contains(want), "{bad}: {e}");
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }
}
