//! Which experts `xpm serve` can serve, and how a request's expert set is resolved.
//!
//! The catalog is read once at start: the experts pinned by the project's `xpm.lock` (with
//! `--project`), else every version installed in `$XPM_HOME`, plus the artifacts given with
//! `--expert PATH`. Only experts made from the served base can be applied; a request for one of
//! another base gets a 400 that says so.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::ApiError;
use crate::error::Result;
use crate::format::ArtifactReader;
use crate::format::manifest::ExpertKind;
use crate::merge::recipe::{ParamValue, RECIPE_VERSION, Recipe, RecipeExpert};
use crate::resolve::Requirement;
use crate::store::Store;

/// One servable expert version.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub version: semver::Version,
    pub path: PathBuf,
    /// `sha256:` of the artifact.
    pub digest: String,
    pub kind: ExpertKind,
    /// `sha256:` of the base it was made from.
    pub base_digest: String,
    pub base_id: String,
}

impl Entry {
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

pub struct Catalog {
    /// Experts of the served base, by name, every version.
    entries: BTreeMap<String, Vec<Entry>>,
    /// Experts of other bases (named in errors).
    others: BTreeMap<String, Entry>,
}

/// The expert set a request asks for, as sent.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetSpec {
    #[serde(default)]
    pub expert: Option<String>,
    #[serde(default)]
    pub experts: Vec<String>,
    #[serde(default)]
    pub strategy: Option<String>,
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub weights: Vec<f64>,
    #[serde(default)]
    pub seed: Option<u64>,
    /// Classification: the expert whose head and labels are used [default: the first].
    #[serde(default)]
    pub head: Option<String>,
}

/// A resolved expert set: what is applied to the base while a request runs.
#[derive(Debug, Clone)]
pub struct ResolvedSet {
    /// Identifies the delta: the expert's digest, or the digest of the merge request.
    pub key: String,
    /// A readable name (`sst2@1.2.0`, `ties(a@1.0.0,b@1.0.0)`).
    pub label: String,
    pub members: Vec<Entry>,
    /// A merge's recipe (the experts named by path); `None` for one expert as is.
    pub recipe: Option<Recipe>,
    /// Where the classification head comes from.
    pub head: Option<Entry>,
}

impl Catalog {
    /// Read the catalog: `lock`'s pins (else everything installed), plus `paths`.
    pub fn load(
        store: &Store,
        lock: Option<&crate::project::Lockfile>,
        paths: &[PathBuf],
        base_digest: &str,
    ) -> Result<Catalog> {
        let mut all = Vec::new();
        match lock {
            Some(lock) => {
                for e in &lock.experts {
                    if !store.has_blob(&e.cksum, e.size) {
                        continue;
                    }
                    let path = store.blob_path(&e.cksum);
                    let r = ArtifactReader::open(&path)?;
                    all.push(entry(&r, path, e.cksum.clone()));
                }
            }
            None => {
                for i in store.installed()? {
                    if !store.has_blob(&i.cksum, i.size) {
                        continue;
                    }
                    all.push(Entry {
                        name: i.name,
                        version: i.version,
                        path: store.blob_path(&i.cksum),
                        digest: i.cksum,
                        kind: i.kind,
                        base_digest: i.base.digest,
                        base_id: i.base.id,
                    });
                }
            }
        }
        for p in paths {
            let r = ArtifactReader::open(p)?;
            let digest = r.verify_file_digest()?;
            all.push(entry(&r, p.clone(), digest));
        }
        let mut entries: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
        let mut others = BTreeMap::new();
        for e in all {
            if e.base_digest == base_digest {
                let v = entries.entry(e.name.clone()).or_default();
                if !v.iter().any(|x| x.version == e.version) {
                    v.push(e);
                }
            } else {
                others.insert(e.name.clone(), e);
            }
        }
        for v in entries.values_mut() {
            v.sort_by(|a, b| a.version.cmp(&b.version));
        }
        Ok(Catalog { entries, others })
    }

    /// Every servable expert version.
    pub fn all(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values().flatten()
    }

    pub fn len(&self) -> usize {
        self.entries.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The highest servable version matching `spec` (`name`, `name@1.2`, `name@^1.2`).
    pub fn resolve(&self, spec: &str) -> Result<&Entry, ApiError> {
        let req = Requirement::parse(spec).map_err(|e| {
            ApiError::bad_request(
                format!("`{spec}` is not an expert requirement: {e}"),
                "name an expert as NAME or NAME@VERSION-REQ, e.g. `sst2@^1.2`",
            )
        })?;
        if let Some(versions) = self.entries.get(&req.name) {
            return versions
                .iter()
                .rev()
                .find(|e| req.req.matches(&e.version))
                .ok_or_else(|| {
                    ApiError::not_found(
                        format!("no served version of `{}` matches `{}`", req.name, req.req),
                        &format!(
                            "served versions: {}",
                            versions
                                .iter()
                                .map(|e| e.version.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                });
        }
        if let Some(o) = self.others.get(&req.name) {
            return Err(ApiError::bad_request(
                format!(
                    "{} was made from base `{}` ({}), not from the base this server holds",
                    o.id(),
                    o.base_id,
                    o.base_digest
                ),
                "serve it from a server started with its own base (`xpm serve --base …`)",
            ));
        }
        let hint = crate::suggest::hint_prefix(&req.name, self.entries.keys().map(String::as_str));
        Err(ApiError::not_found(
            format!("unknown expert `{}`", req.name),
            &format!(
                "{hint}GET /v1/models lists the {} served expert version(s); install more with `xpm install` and restart",
                self.len()
            ),
        ))
    }

    /// Resolve a request's expert set. One expert without a strategy is applied as is; several
    /// (or a strategy) are merged with the recipe the request describes, checked here so that a
    /// bad parameter is a 400 before the request is queued.
    pub fn resolve_set(
        &self,
        spec: &SetSpec,
        plugin_search: &[PathBuf],
    ) -> Result<ResolvedSet, ApiError> {
        let mut names: Vec<&str> = spec.experts.iter().map(String::as_str).collect();
        if let Some(e) = &spec.expert {
            if !names.is_empty() {
                return Err(ApiError::bad_request(
                    "give `expert` or `experts`, not both",
                    "`expert` names one expert; `experts` a list to merge",
                ));
            }
            names.push(e);
        }
        let members: Vec<Entry> = names
            .iter()
            .map(|n| self.resolve(n).cloned())
            .collect::<Result<_, _>>()?;
        let head = match &spec.head {
            Some(h) => Some(self.resolve(h)?.clone()),
            None => members.first().cloned(),
        };
        if members.len() <= 1 && spec.strategy.is_none() {
            if !spec.params.is_empty() || !spec.weights.is_empty() || spec.seed.is_some() {
                return Err(ApiError::bad_request(
                    "`params`, `weights` and `seed` need a `strategy`",
                    "name a merge strategy (e.g. `\"strategy\": \"ties\"`) or drop them",
                ));
            }
            return Ok(match members.first() {
                Some(e) => ResolvedSet {
                    key: e.digest.clone(),
                    label: e.id(),
                    members: members.clone(),
                    recipe: None,
                    head,
                },
                None => ResolvedSet {
                    key: "base".into(),
                    label: "base".into(),
                    members,
                    recipe: None,
                    head,
                },
            });
        }
        if members.is_empty() {
            return Err(ApiError::bad_request(
                "a merge needs `experts`",
                "list the experts to merge, e.g. `\"experts\": [\"a@1\", \"b@1\"]`",
            ));
        }
        if !spec.weights.is_empty() && spec.weights.len() != members.len() {
            return Err(ApiError::bad_request(
                format!(
                    "{} weights for {} experts",
                    spec.weights.len(),
                    members.len()
                ),
                "give one weight per expert, in the same order",
            ));
        }
        let strategy = spec.strategy.clone().unwrap_or_else(|| "ties".into());
        let params: BTreeMap<String, ParamValue> = serde_json::from_value(
            serde_json::to_value(&spec.params).expect("json"),
        )
        .map_err(|e| ApiError::bad_request(format!("`params`: {e}"), "see docs/merging.md"))?;
        let recipe = Recipe {
            version: RECIPE_VERSION,
            strategy: strategy.clone(),
            preset: None,
            seed: spec.seed.unwrap_or(0),
            output: None,
            params,
            experts: members
                .iter()
                .enumerate()
                .map(|(i, e)| RecipeExpert {
                    expert: e.path.display().to_string(),
                    weight: spec.weights.get(i).copied().unwrap_or(1.0),
                    sha256: Some(e.digest.clone()),
                    content_digest: None,
                })
                .collect(),
            overrides: Vec::new(),
            plugin_sha256: None,
        };
        // Checks the strategy and every parameter's range.
        crate::ops::merge::method_from_recipe(&recipe, &[], plugin_search)
            .map_err(|e| ApiError::from_error(&e))?;
        let canonical = serde_json::json!({
            "experts": members.iter().map(|e| &e.digest).collect::<Vec<_>>(),
            "strategy": strategy,
            "params": recipe.params,
            "weights": recipe.experts.iter().map(|e| e.weight).collect::<Vec<_>>(),
            "seed": recipe.seed,
        });
        let key = crate::digest::format_digest(&Sha256::digest(canonical.to_string().as_bytes()));
        let label = format!(
            "{strategy}({})",
            members.iter().map(Entry::id).collect::<Vec<_>>().join(",")
        );
        Ok(ResolvedSet {
            key,
            label,
            members,
            recipe: Some(recipe),
            head,
        })
    }
}

fn entry(r: &ArtifactReader, path: PathBuf, digest: String) -> Entry {
    let m = r.manifest();
    Entry {
        name: m.name.clone(),
        version: m.version.clone(),
        path,
        digest,
        kind: m.kind,
        base_digest: m.base.digest.clone(),
        base_id: m.base.id.clone(),
    }
}
