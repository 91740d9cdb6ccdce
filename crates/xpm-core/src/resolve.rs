//! Resolution: pick one version per requirement such that every expert in the set applies to
//! the same base model (equal base digests).
//!
//! Per requirement the candidates are the versions that match it and are not yanked (a version
//! pinned by the lockfile stays a candidate even when yanked, and is preferred), newest first.
//! Base digests are tried in order of preference — the digest of the first requirement's best
//! candidate first — and for each, every requirement takes its newest candidate on that base.
//! The first digest that serves every requirement wins. When none does, the error lists every
//! version that was excluded and why.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use crate::error::{Error, Result};
use crate::registry::IndexLine;
use crate::registry::index::NAME_HINT;

/// `name@req` (or a bare `name`, meaning any version).
#[derive(Debug, Clone, PartialEq)]
pub struct Requirement {
    pub name: String,
    pub req: semver::VersionReq,
}

impl Requirement {
    /// Parse `name`, `name@1.2`, `name@^1.2`, `ns/name@~2.0.1`, `name@=1.0.0` …
    /// A bare version means a caret requirement, as in Cargo.
    pub fn parse(spec: &str) -> Result<Self> {
        let (name, req) = match spec.split_once('@') {
            Some((n, r)) => (n, r),
            None => (spec, "*"),
        };
        crate::format::manifest::validate_name(name).map_err(|e| {
            Error::input(
                format!("invalid requirement `{spec}`: {e}"),
                Some(NAME_HINT),
            )
        })?;
        Self::new(name, req).map_err(|e| match e {
            Error::Input { message, hint } => Error::Input {
                message: format!("invalid requirement `{spec}`: {message}"),
                hint,
            },
            e => e,
        })
    }

    /// A requirement from a name and a version requirement string.
    pub fn new(name: &str, req: &str) -> Result<Self> {
        let req = semver::VersionReq::parse(req.trim()).map_err(|e| {
            Error::input(
                format!("`{req}` is not a version requirement: {e}"),
                Some("write e.g. `1.2`, `^1.2`, `~2.0.1`, `=1.0.0` or `*`"),
            )
        })?;
        Ok(Requirement {
            name: name.to_string(),
            req,
        })
    }
}

impl std::fmt::Display for Requirement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.req)
    }
}

/// What constrains resolution besides the requirements.
#[derive(Debug, Clone, Default)]
pub struct Constraints {
    /// Only this base: a `sha256:` digest or a base id.
    pub base: Option<String>,
    /// Versions pinned by the lockfile: preferred, and allowed even when yanked.
    pub locked: HashMap<String, semver::Version>,
}

/// Pick one index line per requirement (in requirement order, one per distinct name).
/// `index` holds every name's published versions.
pub fn resolve(
    reqs: &[Requirement],
    index: &BTreeMap<String, Vec<IndexLine>>,
    c: &Constraints,
) -> Result<Vec<IndexLine>> {
    // Merge requirements on one name (all must hold).
    let mut names: Vec<&str> = Vec::new();
    let mut by_name: HashMap<&str, Vec<&semver::VersionReq>> = HashMap::new();
    for r in reqs {
        let e = by_name.entry(r.name.as_str()).or_default();
        if e.is_empty() {
            names.push(&r.name);
        }
        e.push(&r.req);
    }
    let base_ok = |l: &IndexLine| match &c.base {
        Some(b) => l.base.digest == *b || l.base.id == *b,
        None => true,
    };
    // Candidates per name, best first.
    let mut cands: Vec<Vec<&IndexLine>> = Vec::with_capacity(names.len());
    for name in &names {
        let lines = index.get(*name).map(Vec::as_slice).unwrap_or(&[]);
        let locked = c.locked.get(*name);
        let mut v: Vec<&IndexLine> = lines
            .iter()
            .filter(|l| {
                by_name[name].iter().all(|r| r.matches(&l.vers))
                    && (!l.yanked || locked == Some(&l.vers))
                    && base_ok(l)
            })
            .collect();
        v.sort_by(|a, b| {
            let la = locked == Some(&a.vers);
            let lb = locked == Some(&b.vers);
            lb.cmp(&la).then(b.vers.cmp(&a.vers))
        });
        cands.push(v);
    }
    // Base digests in order of preference.
    let mut digests: Vec<&str> = Vec::new();
    for v in &cands {
        for l in v {
            if !digests.contains(&l.base.digest.as_str()) {
                digests.push(&l.base.digest);
            }
        }
    }
    if cands.iter().all(|v| !v.is_empty()) {
        for d in &digests {
            let pick: Option<Vec<IndexLine>> = cands
                .iter()
                .map(|v| v.iter().find(|l| l.base.digest == *d).map(|l| (*l).clone()))
                .collect();
            if let Some(p) = pick {
                return Ok(p);
            }
        }
    }
    Err(explain(&names, &by_name, index, c, &cands))
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..12.min(hex.len())]
}

fn explain(
    names: &[&str],
    by_name: &HashMap<&str, Vec<&semver::VersionReq>>,
    index: &BTreeMap<String, Vec<IndexLine>>,
    c: &Constraints,
    cands: &[Vec<&IndexLine>],
) -> Error {
    let mut msg = String::from("no set of versions satisfies every requirement on one base model:");
    let missing: Vec<&str> = names
        .iter()
        .zip(cands)
        .filter(|(_, v)| v.is_empty())
        .map(|(n, _)| *n)
        .collect();
    for (name, v) in names.iter().zip(cands) {
        let reqs: Vec<String> = by_name[name].iter().map(|r| r.to_string()).collect();
        let _ = write!(msg, "\n  {name}@{}:", reqs.join(","));
        let lines = index.get(*name).map(Vec::as_slice).unwrap_or(&[]);
        if lines.is_empty() {
            msg.push_str(" no such expert in the registry");
            continue;
        }
        let mut sorted: Vec<&IndexLine> = lines.iter().collect();
        sorted.sort_by(|a, b| b.vers.cmp(&a.vers));
        for l in sorted.iter().take(12) {
            let why = if !by_name[name].iter().all(|r| r.matches(&l.vers)) {
                format!("does not match {}", reqs.join(","))
            } else if l.yanked && c.locked.get(*name) != Some(&l.vers) {
                "yanked".to_string()
            } else if let Some(b) = &c.base
                && l.base.digest != *b
                && l.base.id != *b
            {
                format!(
                    "base {} ({}) is not the pinned base {b}",
                    l.base.id,
                    short(&l.base.digest)
                )
            } else {
                debug_assert!(v.iter().any(|x| x.vers == l.vers));
                format!(
                    "candidate on base {} ({})",
                    l.base.id,
                    short(&l.base.digest)
                )
            };
            let _ = write!(msg, "\n    {}  {why}", l.vers);
        }
        if sorted.len() > 12 {
            let _ = write!(msg, "\n    … and {} older versions", sorted.len() - 12);
        }
    }
    let hint = if !missing.is_empty() {
        format!(
            "no usable version of {}; relax the requirement or publish a matching version",
            missing.join(", ")
        )
    } else {
        "the candidates target different base models (different base digests); pick versions \
         trained on one base, or pin one with --base DIGEST|ID"
            .to_string()
    };
    Error::Input {
        message: msg,
        hint: Some(hint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{BaseModel, ExpertKind};

    fn line(name: &str, v: &str, base: &str, yanked: bool) -> IndexLine {
        IndexLine {
            name: name.into(),
            vers: v.parse().unwrap(),
            cksum: format!("sha256:{:064}", 0),
            size: 1,
            base: BaseModel {
                id: format!("model-{base}"),
                digest: format!("sha256:{base}"),
            },
            kind: ExpertKind::Sparse,
            density: 0.05,
            targets: vec![],
            yanked,
            pubtime: String::new(),
            format: "1.0".into(),
            description: None,
            v: 1,
            sig: None,
        }
    }

    fn idx(lines: Vec<IndexLine>) -> BTreeMap<String, Vec<IndexLine>> {
        let mut m: BTreeMap<String, Vec<IndexLine>> = BTreeMap::new();
        for l in lines {
            m.entry(l.name.clone()).or_default().push(l);
        }
        m
    }

    fn reqs(specs: &[&str]) -> Vec<Requirement> {
        specs
            .iter()
            .map(|s| Requirement::parse(s).unwrap())
            .collect()
    }

    #[test]
    fn highest_matching_on_shared_base() {
        let index = idx(vec![
            line("a", "1.2.0", "x", false),
            line("a", "1.3.0", "y", false),
            line("a", "2.0.0", "x", false),
            line("b", "0.1.0", "x", false),
        ]);
        let got = resolve(&reqs(&["a@^1.2", "b"]), &index, &Constraints::default()).unwrap();
        // a@1.3.0 is on base y, which b lacks: the set falls back to a@1.2.0 on x.
        assert_eq!(got[0].vers.to_string(), "1.2.0");
        assert_eq!(got[1].vers.to_string(), "0.1.0");
    }

    #[test]
    fn yanked_only_when_locked() {
        let index = idx(vec![
            line("a", "1.0.0", "x", false),
            line("a", "1.1.0", "x", true),
        ]);
        let got = resolve(&reqs(&["a"]), &index, &Constraints::default()).unwrap();
        assert_eq!(got[0].vers.to_string(), "1.0.0");
        let mut c = Constraints::default();
        c.locked.insert("a".into(), "1.1.0".parse().unwrap());
        let got = resolve(&reqs(&["a"]), &index, &c).unwrap();
        assert_eq!(got[0].vers.to_string(), "1.1.0");
    }

    #[test]
    fn conflicts_are_explained() {
        let index = idx(vec![
            line("a", "1.0.0", "x", false),
            line("b", "1.0.0", "y", false),
            line("b", "0.9.0", "x", true),
        ]);
        let e = resolve(&reqs(&["a", "b"]), &index, &Constraints::default()).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("0.9.0  yanked"), "{s}");
        assert!(s.contains("candidate on base model-y"), "{s}");
        assert!(e.hint().unwrap().contains("different base"));
        let e = resolve(&reqs(&["a@^2", "zz"]), &index, &Constraints::default()).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("1.0.0  does not match ^2"), "{s}");
        assert!(s.contains("zz@*: no such expert"), "{s}");
        let c = Constraints {
            base: Some("model-y".into()),
            ..Default::default()
        };
        let e = resolve(&reqs(&["a"]), &index, &c).unwrap_err();
        assert!(
            e.to_string().contains("is not the pinned base model-y"),
            "{e}"
        );
        let got = resolve(&reqs(&["b"]), &index, &c).unwrap();
        assert_eq!(got[0].base.id, "model-y");
    }

    #[test]
    fn specs() {
        assert_eq!(Requirement::parse("a@1.2").unwrap().req.to_string(), "^1.2");
        assert_eq!(Requirement::parse("ns/a@~2.0.1").unwrap().name, "ns/a");
        assert!(Requirement::parse("A@1").is_err());
        assert!(Requirement::parse("a@x.y").is_err());
        assert!(Requirement::parse("../a").is_err());
    }
}
