//! Who may write: identities, each with tokens (kept as sha256 only), scopes, name patterns and
//! an optional expiry, read from the server's token file (docs/registry-protocol.md §6.1).
//!
//! The token file is either a small TOML config of `[[identity]]` tables, or — the older form —
//! one plain token per line. Plain tokens (and `--tokens` / `$XPM_REGISTRY_TOKENS`) all belong
//! to one identity, [`LEGACY_IDENTITY`], that may do everything to every name.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The identity of plain tokens: every scope, every name, an admin.
pub const LEGACY_IDENTITY: &str = "default";
/// The identity of every request on a server started with `--no-auth`.
pub const ANONYMOUS_IDENTITY: &str = "anonymous";

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Publish new versions.
    Publish,
    /// Yank and unyank versions.
    Yank,
    /// Add and remove owners.
    Owners,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Publish, Scope::Yank, Scope::Owners];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Publish => "publish",
            Scope::Yank => "yank",
            Scope::Owners => "owners",
        }
    }
}

/// One identity of the token file.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub scopes: HashSet<Scope>,
    /// Name patterns (`*` matches any run of characters, `/` included); empty means none.
    pub names: Vec<String>,
    /// The tokens stop working at this time.
    pub expires: Option<SystemTime>,
    /// May write names it does not own, and set the owners of any name.
    pub admin: bool,
}

impl Identity {
    /// Every scope on every name, an admin, never expiring.
    pub fn all_powerful(name: &str) -> Self {
        Identity {
            name: name.to_string(),
            scopes: Scope::ALL.into_iter().collect(),
            names: vec!["*".into()],
            expires: None,
            admin: true,
        }
    }

    /// Whether one of the identity's name patterns matches `name`.
    pub fn covers(&self, name: &str) -> bool {
        self.names.iter().any(|p| glob_match(p, name))
    }

    /// Whether the identity's tokens have expired at `now`.
    pub fn expired_at(&self, now: SystemTime) -> bool {
        self.expires.is_some_and(|t| now >= t)
    }
}

/// `*` matches any run of characters (`/` included); everything else matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if name.len() < first.len() + last.len() || !name.starts_with(first) || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// The sha256 of a token (trimmed), as the server keeps it (the config's `token_sha256` is its
/// 64 hex digits, optionally prefixed `sha256:`).
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.trim().as_bytes()).into()
}

/// The accepted tokens and whom they belong to.
#[derive(Debug, Clone, Default)]
pub struct Identities {
    list: Vec<Identity>,
    by_token: HashMap<[u8; 32], usize>,
}

impl Identities {
    /// No identity at all.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The identity a token belongs to.
    pub fn by_token(&self, token: &str) -> Option<&Identity> {
        self.by_token
            .get(&hash_token(token))
            .map(|&i| &self.list[i])
    }

    /// The identity with this name.
    pub fn get(&self, name: &str) -> Option<&Identity> {
        self.list.iter().find(|i| i.name == name)
    }

    /// Add an identity with its token hashes; refuses a second identity of the same name or a
    /// token that already belongs to someone.
    pub fn add(&mut self, id: Identity, hashes: &[[u8; 32]]) -> Result<(), String> {
        if self.get(&id.name).is_some() {
            return Err(format!("identity `{}` is defined twice", id.name));
        }
        for h in hashes {
            if let Some(&other) = self.by_token.get(h) {
                return Err(format!(
                    "identity `{}` has a token that identity `{}` has too",
                    id.name, self.list[other].name
                ));
            }
        }
        let i = self.list.len();
        self.list.push(id);
        for h in hashes {
            self.by_token.insert(*h, i);
        }
        Ok(())
    }

    /// Add plain tokens to the all-powerful [`LEGACY_IDENTITY`] (created on first use).
    pub fn add_plain(&mut self, tokens: &[[u8; 32]]) -> Result<(), String> {
        let i = match self.list.iter().position(|i| i.name == LEGACY_IDENTITY) {
            Some(i) if self.list[i].admin && self.list[i].names == ["*"] => i,
            Some(_) => {
                return Err(format!(
                    "plain tokens belong to the identity `{LEGACY_IDENTITY}`, which the token \
                     config defines too; rename that identity or move the plain tokens into it"
                ));
            }
            None => {
                self.list.push(Identity::all_powerful(LEGACY_IDENTITY));
                self.list.len() - 1
            }
        };
        for h in tokens {
            match self.by_token.get(h) {
                Some(&j) if j != i => {
                    return Err(format!(
                        "a plain token is also a token of identity `{}`",
                        self.list[j].name
                    ));
                }
                _ => {
                    self.by_token.insert(*h, i);
                }
            }
        }
        Ok(())
    }
}

/// What a token file holds.
#[derive(Debug)]
pub enum TokenFile {
    /// The TOML config: identities with their token hashes.
    Config(Vec<(Identity, Vec<[u8; 32]>)>),
    /// The older form: one token per line (their hashes).
    Plain(Vec<[u8; 32]>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    identity: Vec<IdentityEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityEntry {
    name: String,
    token_sha256: OneOrMany,
    scopes: Vec<Scope>,
    #[serde(default)]
    names: Option<Vec<String>>,
    #[serde(default, deserialize_with = "time_text")]
    expires: Option<String>,
    #[serde(default)]
    admin: bool,
}

/// A time written as a string (`"2027-01-01T00:00:00Z"`) or as a TOML datetime (unquoted).
fn time_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an RFC 3339 time")
        }
        fn visit_str<E>(self, s: &str) -> Result<String, E> {
            Ok(s.to_string())
        }
        // toml_edit hands a datetime over as a one-entry map holding its text.
        fn visit_map<M: serde::de::MapAccess<'de>>(self, mut m: M) -> Result<String, M::Error> {
            match m.next_entry::<String, String>()? {
                Some((_, v)) => Ok(v),
                None => Err(serde::de::Error::custom("expected an RFC 3339 time")),
            }
        }
    }
    d.deserialize_any(V).map(Some)
}

/// Whether `text` is a TOML token config rather than plain tokens: some line (not a comment)
/// starts with `[`.
pub fn is_config(text: &str) -> bool {
    text.lines().any(|l| l.trim_start().starts_with('['))
}

/// Parse a token file (either form).
pub fn parse_token_file(text: &str) -> Result<TokenFile, String> {
    if !is_config(text) {
        let hashes = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|t| !t.is_empty())
            .map(hash_token)
            .collect();
        return Ok(TokenFile::Plain(hashes));
    }
    let cfg: ConfigFile = toml_edit::de::from_str(text).map_err(|e| e.to_string())?;
    if cfg.identity.is_empty() {
        return Err("the token config defines no `[[identity]]`".into());
    }
    cfg.identity
        .into_iter()
        .map(parse_identity)
        .collect::<Result<_, _>>()
        .map(TokenFile::Config)
}

fn parse_identity(e: IdentityEntry) -> Result<(Identity, Vec<[u8; 32]>), String> {
    let name = e.name;
    validate_identity_name(&name)?;
    if name == ANONYMOUS_IDENTITY {
        return Err(format!(
            "`{ANONYMOUS_IDENTITY}` is reserved for --no-auth servers"
        ));
    }
    let hexes = match e.token_sha256 {
        OneOrMany::One(h) => vec![h],
        OneOrMany::Many(v) => v,
    };
    if hexes.is_empty() {
        return Err(format!("identity `{name}` has no token_sha256"));
    }
    let mut hashes = Vec::new();
    for h in &hexes {
        let hex_part = h.trim().trim_start_matches("sha256:").to_ascii_lowercase();
        let bytes = hex::decode(hex_part)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| {
                format!(
                    "identity `{name}`: token_sha256 `{h}` is not 64 hex digits (the sha256 of \
                     the token, e.g. `printf %s TOKEN | sha256sum`)"
                )
            })?;
        hashes.push(bytes);
    }
    if e.scopes.is_empty() {
        return Err(format!(
            "identity `{name}` has no scopes (use some of \"publish\", \"yank\", \"owners\")"
        ));
    }
    let names = e.names.unwrap_or_else(|| vec!["*".into()]);
    for p in &names {
        let ok = !p.is_empty()
            && p.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '/' | '*')
            });
        if !ok {
            return Err(format!(
                "identity `{name}`: `{p}` is not a name pattern (lowercase letters, digits, `-`, \
                 `_`, `/` and `*` for any run of characters)"
            ));
        }
    }
    let expires = match e.expires {
        None => None,
        Some(t) => Some(parse_time(&t).map_err(|err| {
            format!("identity `{name}`: expires `{t}` is not an RFC 3339 time: {err}")
        })?),
    };
    let id = Identity {
        name,
        scopes: e.scopes.into_iter().collect(),
        names,
        expires,
        admin: e.admin,
    };
    Ok((id, hashes))
}

/// An RFC 3339 time (`2027-01-01T00:00:00Z`; a bare date means its midnight UTC).
fn parse_time(t: &str) -> Result<SystemTime, humantime::TimestampError> {
    let t = t.trim();
    if t.len() == 10 {
        humantime::parse_rfc3339(&format!("{t}T00:00:00Z"))
    } else {
        humantime::parse_rfc3339_weak(t)
    }
}

/// Identity names: 1–64 ASCII letters, digits, `-`, `_`, `.` and `@`.
pub fn validate_identity_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not an identity name (1-64 ASCII letters, digits, `-`, `_`, `.`, `@`)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", "sst2"));
        assert!(glob_match("team/*", "team/sst2"));
        assert!(!glob_match("team/*", "other/sst2"));
        assert!(!glob_match("team/*", "team"));
        assert!(glob_match("sst2", "sst2"));
        assert!(!glob_match("sst2", "sst22"));
        assert!(glob_match("*-lora", "a/b-lora"));
        assert!(glob_match("a*b*c", "abc"));
        assert!(!glob_match("a*b*c", "acb"));
    }

    #[test]
    fn config_and_plain() {
        let h = hex::encode(hash_token("secret"));
        let text = format!(
            "# team registry\n[[identity]]\nname = \"alice\"\ntoken_sha256 = \"{h}\"\n\
             scopes = [\"publish\", \"yank\"]\nnames = [\"team/*\"]\nexpires = \"2027-01-01\"\n"
        );
        let TokenFile::Config(ids) = parse_token_file(&text).unwrap() else {
            panic!("not a config")
        };
        assert_eq!(ids.len(), 1);
        let (id, hashes) = &ids[0];
        assert_eq!(id.name, "alice");
        assert!(id.covers("team/x") && !id.covers("x"));
        assert!(!id.scopes.contains(&Scope::Owners));
        assert_eq!(hashes[0], hash_token("secret"));
        assert!(id.expires.is_some() && !id.admin);
        for unquoted in ["2027-01-01T00:00:00Z", "2027-01-01"] {
            let t = text.replace("\"2027-01-01\"", unquoted);
            let TokenFile::Config(ids) = parse_token_file(&t).unwrap() else {
                panic!("not a config")
            };
            assert_eq!(ids[0].0.expires, id.expires, "{unquoted}");
        }
        let TokenFile::Plain(p) = parse_token_file("a # c\n\n b\n").unwrap() else {
            panic!("not plain")
        };
        assert_eq!(p, vec![hash_token("a"), hash_token("b")]);
        for bad in [
            "[[identity]]\nname = \"x\"\ntoken_sha256 = \"ab\"\nscopes = [\"publish\"]\n",
            &format!("[[identity]]\nname = \"x\"\ntoken_sha256 = \"{h}\"\nscopes = [\"pub\"]\n"),
            &format!("[[identity]]\nname = \"x y\"\ntoken_sha256 = \"{h}\"\nscopes = []\n"),
            &format!(
                "[[identity]]\nname = \"x\"\ntoken_sha256 = \"{h}\"\nscopes = [\"yank\"]\n\
                 expires = \"soon\"\n"
            ),
            "[[identity]]\n",
        ] {
            assert!(parse_token_file(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plain_tokens_join_the_legacy_identity() {
        let mut ids = Identities::default();
        ids.add_plain(&[hash_token("a")]).unwrap();
        ids.add_plain(&[hash_token("b"), hash_token("a")]).unwrap();
        assert_eq!(ids.by_token("b").unwrap().name, LEGACY_IDENTITY);
        let mut id = Identity::all_powerful("bob");
        id.admin = false;
        assert!(ids.add(id, &[hash_token("a")]).is_err());
    }
}
