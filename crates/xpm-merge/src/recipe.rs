//! `merge.toml`: a whole merge as a file — experts with weights, strategy, parameters,
//! per-tensor overrides, seed — that `xpm merge --recipe` runs and every merged manifest embeds
//! (`provenance.recipe`), so a merge can be re-run from its result. Schema:
//! `schemas/recipe.schema.json`; format: docs/merging.md ("Recipes").
//!
//! ```toml
//! version = 1
//! strategy = "ties"
//! preset = "mergekit"          # optional
//! seed = 7
//!
//! [output]
//! name = "merged"
//! version = "0.1.0"
//!
//! [params]
//! density = 0.2
//!
//! [[experts]]
//! expert = "sst2@^1.2"         # an installed expert, or a path to a .xpm file
//! weight = 1.0
//!
//! [[experts]]
//! expert = "news.xpm"
//! weight = 0.5
//!
//! [[overrides]]                # first matching pattern wins
//! tensors = "*.attention.self.query.weight"
//! strategy = "mean"
//!
//! [[overrides]]
//! tensors = "*.layer.0.*"
//! params = { density = 0.5 }
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::params::{MergeParams, Preset, Strategy};
use xpm_core::error::{Error, IoResultExt, Result};

/// The recipe layout this build reads and writes.
pub const RECIPE_VERSION: u32 = 1;

/// A merge recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Recipe layout version (1).
    #[serde(default = "one")]
    pub version: u32,
    /// Strategy: sparse-mean, mean, linear, task-arithmetic, magnitude-prune, ties, dare-linear,
    /// dare-ties, breadcrumbs, breadcrumbs-ties, della; for LoRA experts cat, svd; or the name
    /// of a plugin strategy (docs/plugins.md).
    pub strategy: String,
    /// Start from another library's defaults: `peft` or `mergekit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
    /// Seed of the random strategies.
    #[serde(default)]
    pub seed: u64,
    /// Name and version of the merged expert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<RecipeOutput>,
    /// Strategy parameters (lambda, density, gamma, epsilon, sign, divisor, rescale, normalize,
    /// rank); the seed is `seed` above.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, ParamValue>,
    /// The experts, in order.
    pub experts: Vec<RecipeExpert>,
    /// Per-tensor overrides; the first whose pattern matches a tensor's name wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<RecipeOverride>,
    /// For a plugin strategy: the `sha256:` of the plugin library; another file is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_sha256: Option<String>,
}

fn one() -> u32 {
    1
}

fn one_f64() -> f64 {
    1.0
}

/// Name and version of the merged expert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecipeOutput {
    pub name: String,
    pub version: String,
}

/// One input expert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecipeExpert {
    /// An installed expert (`name`, `name@req`) or a path to a `.xpm` file.
    pub expert: String,
    /// Its weight (default 1).
    #[serde(default = "one_f64")]
    pub weight: f64,
    /// `sha256:` of the artifact (the whole file, as registries and lockfiles record it);
    /// checked when a recipe that has it is run, which costs a pass over the file. A merge
    /// fills it in when it embeds its recipe only where it hashed the whole file anyway (a
    /// format 1.0 input, or a pin it checked).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "xpm_core::digest::deserialize_opt"
    )]
    pub sha256: Option<String>,
    /// The artifact's content digest (format 1.1 and later; `xpm inspect` prints it), which
    /// names its bytes as surely as `sha256` and is checked without a pass over the file. A
    /// merge fills it in for every 1.1 input when it embeds its recipe.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "xpm_core::digest::deserialize_opt"
    )]
    pub content_digest: Option<String>,
}

/// Different settings for the tensors whose names match a glob.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecipeOverride {
    /// Glob over tensor names (`*` matches within and across dots).
    pub tensors: String,
    /// Another strategy for these tensors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// Parameters applied on top of the recipe's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, ParamValue>,
}

/// A parameter value as TOML writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ParamValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl std::fmt::Display for ParamValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParamValue::Bool(b) => write!(f, "{b}"),
            ParamValue::Int(i) => write!(f, "{i}"),
            ParamValue::Float(x) => write!(f, "{x}"),
            ParamValue::Str(s) => f.write_str(s),
        }
    }
}

/// A parameter value from a command-line `KEY=VALUE`.
pub fn param_from_str(v: &str) -> ParamValue {
    if let Ok(b) = v.parse::<bool>() {
        ParamValue::Bool(b)
    } else if let Ok(i) = v.parse::<i64>() {
        ParamValue::Int(i)
    } else if let Ok(x) = v.parse::<f64>()
        && x.is_finite()
    {
        ParamValue::Float(x)
    } else {
        ParamValue::Str(v.to_string())
    }
}

fn to_strings(p: &BTreeMap<String, ParamValue>) -> BTreeMap<String, String> {
    p.iter().map(|(k, v)| (k.clone(), v.to_string())).collect()
}

/// One tensor-name override, compiled.
#[derive(Debug, Clone)]
pub struct TensorOverride {
    pub pattern: String,
    pub matcher: globset::GlobMatcher,
    pub strategy: Strategy,
    pub params: MergeParams,
}

/// A recipe's strategy, parameters and overrides, parsed and validated.
#[derive(Debug, Clone)]
pub struct Plan {
    pub strategy: Strategy,
    pub params: MergeParams,
    pub weights: Vec<f64>,
    pub overrides: Vec<TensorOverride>,
}

impl Plan {
    /// The strategy and parameters for one tensor.
    pub fn for_tensor(&self, name: &str) -> (Strategy, &MergeParams) {
        match self.overrides.iter().find(|o| o.matcher.is_match(name)) {
            Some(o) => (o.strategy, &o.params),
            None => (self.strategy, &self.params),
        }
    }
}

impl Recipe {
    /// Read a recipe file.
    pub fn read(path: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(path).at("read", path)?;
        let r: Recipe = toml_edit::de::from_str(&text).map_err(|e| {
            Error::input(
                format!("`{}` is not a valid merge recipe: {e}", path.display()),
                Some("see docs/merging.md (\"Recipes\") and schemas/recipe.schema.json"),
            )
        })?;
        if r.version != RECIPE_VERSION {
            return Err(Error::input(
                format!(
                    "`{}` has recipe version {}; this xpm reads version {RECIPE_VERSION}",
                    path.display(),
                    r.version
                ),
                Some("upgrade xpm"),
            ));
        }
        if r.experts.is_empty() {
            return Err(Error::input(
                format!("`{}` lists no experts", path.display()),
                Some("add [[experts]] tables"),
            ));
        }
        Ok(r)
    }

    /// The recipe as TOML.
    pub fn to_toml(&self) -> String {
        toml_edit::ser::to_string_pretty(self).expect("recipe serializes")
    }

    /// The parameters as a JSON object (what a plugin strategy receives).
    pub fn params_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.params).expect("params serialize")
    }

    /// Parse the strategy, preset, parameters and overrides; check every value.
    pub fn plan(&self) -> Result<Plan> {
        let strategy: Strategy = self.strategy.parse()?;
        let preset = self.preset;
        // mergekit's `normalize` is a parameter of its TIES family too.
        let mergekit_normalize = |s: Strategy| preset == Some(Preset::Mergekit) && s.elects_sign();
        // A preset's defaults depend on the strategy, so each override starts from its own.
        let has_density = self.params.contains_key("density");
        let base = |s: Strategy| -> Result<MergeParams> {
            if let Some(pr) = preset {
                if !MergeParams::preset_supports(pr, s) {
                    return Err(Error::input(
                        format!(
                            "`{pr}` has no `{s}` method, so `--preset {pr}` cannot reproduce it"
                        ),
                        Some(
                            "drop the preset (xpm's own semantics), or pick a strategy the library has",
                        ),
                    ));
                }
                // peft has no default density: its trimming methods require one.
                if pr == Preset::Peft
                    && !has_density
                    && matches!(
                        s,
                        Strategy::MagnitudePrune
                            | Strategy::Ties
                            | Strategy::DareLinear
                            | Strategy::DareTies
                    )
                {
                    return Err(Error::input(
                        format!("peft's `{s}` needs a density"),
                        Some("pass `--param density=D` (peft requires it too)"),
                    ));
                }
            }
            let mut p = match preset {
                Some(pr) => MergeParams::preset(pr, s),
                None => MergeParams::default(),
            };
            p.seed = self.seed;
            p.apply(&to_strings(&self.params))?;
            // mergekit's `normalize` on its TIES-family methods divides by the agreeing weights
            // (true) or not at all (false): xpm's `divisor`.
            if mergekit_normalize(s) && self.params.contains_key("normalize") {
                p.divisor = if p.normalize {
                    crate::params::Divisor::Weights
                } else {
                    crate::params::Divisor::None
                };
            }
            Ok(p)
        };
        let params = base(strategy)?;
        strategy.check_params(
            self.params
                .keys()
                .map(String::as_str)
                .filter(|k| !(mergekit_normalize(strategy) && *k == "normalize")),
        )?;
        params.validate_for(strategy)?;
        let mut overrides = Vec::new();
        for o in &self.overrides {
            let glob = globset::GlobBuilder::new(&o.tensors)
                .literal_separator(false)
                .build()
                .map_err(|e| {
                    Error::input(
                        format!("override pattern `{}` is not a valid glob: {e}", o.tensors),
                        None,
                    )
                })?;
            let s: Strategy = match &o.strategy {
                Some(s) => s.parse()?,
                None => strategy,
            };
            s.check_params(
                o.params
                    .keys()
                    .map(String::as_str)
                    .filter(|k| !(mergekit_normalize(s) && *k == "normalize")),
            )
            .map_err(|e| {
                Error::input(
                    format!("override `{}`: {e}", o.tensors),
                    e.hint().as_deref(),
                )
            })?;
            let mut p = base(s)?;
            p.apply(&to_strings(&o.params))?;
            p.validate_for(s).map_err(|e| {
                Error::input(
                    format!("override `{}`: {e}", o.tensors),
                    e.hint().as_deref(),
                )
            })?;
            overrides.push(TensorOverride {
                pattern: o.tensors.clone(),
                matcher: glob.compile_matcher(),
                strategy: s,
                params: p,
            });
        }
        let weights: Vec<f64> = self.experts.iter().map(|e| e.weight).collect();
        if weights.iter().any(|w| !w.is_finite()) {
            return Err(Error::input("weights must be finite numbers", None));
        }
        Ok(Plan {
            strategy,
            params,
            weights,
            overrides,
        })
    }
}

/// Parse a command-line override: `GLOB:KEY=VALUE[,KEY=VALUE…]` where KEY is `strategy` or a
/// parameter name.
pub fn parse_override(s: &str) -> Result<RecipeOverride> {
    let hint = "write e.g. `--override '*.query.weight:strategy=mean,density=0.5'`";
    let (glob, kvs) = s
        .rsplit_once(':')
        .ok_or_else(|| Error::input(format!("`{s}` is not GLOB:KEY=VALUE,…"), Some(hint)))?;
    let mut o = RecipeOverride {
        tensors: glob.to_string(),
        strategy: None,
        params: BTreeMap::new(),
    };
    for kv in kvs.split(',').filter(|x| !x.trim().is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| Error::input(format!("`{kv}` in `{s}` is not KEY=VALUE"), Some(hint)))?;
        if k.trim() == "strategy" {
            o.strategy = Some(v.trim().to_string());
        } else {
            o.params
                .insert(k.trim().to_string(), param_from_str(v.trim()));
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
strategy = "ties"
preset = "mergekit"
seed = 7
[params]
density = 0.3
[[experts]]
expert = "a.xpm"
[[experts]]
expert = "b@^1"
weight = 0.5
[[overrides]]
tensors = "*.query.weight"
strategy = "mean"
[[overrides]]
tensors = "layer.0.*"
params = { density = 0.5 }
"#;

    #[test]
    fn parse_plan_and_first_match_wins() {
        let r: Recipe = toml_edit::de::from_str(TOML).unwrap();
        let plan = r.plan().unwrap();
        assert_eq!(plan.weights, vec![1.0, 0.5]);
        assert_eq!(plan.params.seed, 7);
        assert_eq!(plan.params.density, 0.3);
        // layer.0.attn.query.weight matches both overrides: the first (mean) wins.
        assert_eq!(
            plan.for_tensor("layer.0.attn.query.weight").0,
            Strategy::Mean
        );
        let (s, p) = plan.for_tensor("layer.0.attn.key.weight");
        assert_eq!((s, p.density), (Strategy::Ties, 0.5));
        let (s, p) = plan.for_tensor("layer.1.attn.key.weight");
        assert_eq!((s, p.density), (Strategy::Ties, 0.3));
        // Round trip through TOML.
        let again: Recipe = toml_edit::de::from_str(&r.to_toml()).unwrap();
        assert_eq!(again, r);
    }

    #[test]
    fn bad_recipes_are_refused() {
        let bad = TOML.replace("density = 0.3", "density = 3.0");
        let r: Recipe = toml_edit::de::from_str(&bad).unwrap();
        assert!(r.plan().is_err());
        let bad = TOML.replace("strategy = \"mean\"", "strategy = \"nope\"");
        let r: Recipe = toml_edit::de::from_str(&bad).unwrap();
        assert!(r.plan().is_err());
        assert!(toml_edit::de::from_str::<Recipe>(&TOML.replace("seed = 7", "seeds = 7")).is_err());
        // A preset cannot reproduce a method its library lacks, and peft needs a density.
        let peft = TOML.replace("preset = \"mergekit\"", "preset = \"peft\"");
        let r: Recipe = toml_edit::de::from_str(
            &peft.replace("strategy = \"ties\"", "strategy = \"sparse-mean\""),
        )
        .unwrap();
        assert!(
            r.plan()
                .unwrap_err()
                .to_string()
                .contains("has no `sparse-mean` method")
        );
        let r: Recipe =
            toml_edit::de::from_str(&peft.replace("density = 0.3", "lambda = 1.0")).unwrap();
        assert!(
            r.plan()
                .unwrap_err()
                .to_string()
                .contains("needs a density")
        );
        let o = parse_override("*.q.weight:strategy=mean,density=0.5").unwrap();
        assert_eq!(o.strategy.as_deref(), Some("mean"));
        assert_eq!(o.params["density"], ParamValue::Float(0.5));
        assert!(parse_override("nocolon").is_err());
    }
}
