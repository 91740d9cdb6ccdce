//! Merge strategies and their parameters (semantics: docs/merging.md).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use xpm_core::error::{Error, Result};

/// A built-in merge strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The paper's method: per entry, the weighted mean over the experts whose mask holds it.
    SparseMean,
    /// Σ w τ / Σ w.
    Mean,
    /// λ Σ w τ (divided by Σ w with `normalize=true`).
    Linear,
    /// λ Σ w τ.
    TaskArithmetic,
    /// λ Σ w top_k(τ).
    MagnitudePrune,
    /// Trim (top-k), elect signs, disjoint merge.
    Ties,
    /// DARE drop and rescale, then λ Σ w δ.
    DareLinear,
    /// DARE drop and rescale, then the TIES elect and disjoint merge.
    DareTies,
    /// Drop the largest γ·n and keep the next d·n magnitudes, then task arithmetic.
    Breadcrumbs,
    /// Breadcrumbs sparsification, then the TIES elect and disjoint merge.
    BreadcrumbsTies,
    /// Magnitude-ranked random drop per row (DELLA), rescale, then TIES elect and merge.
    Della,
    /// LoRA experts: concatenate the weighted factors (rank Σ r_i), exactly Σ w s B A.
    Cat,
    /// LoRA experts: the best rank-k LoRA of Σ w s B A, by QR + SVD of the small core.
    Svd,
}

impl Strategy {
    pub const ALL: [Strategy; 11] = [
        Strategy::SparseMean,
        Strategy::Mean,
        Strategy::Linear,
        Strategy::TaskArithmetic,
        Strategy::MagnitudePrune,
        Strategy::Ties,
        Strategy::DareLinear,
        Strategy::DareTies,
        Strategy::Breadcrumbs,
        Strategy::BreadcrumbsTies,
        Strategy::Della,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::SparseMean => "sparse-mean",
            Strategy::Mean => "mean",
            Strategy::Linear => "linear",
            Strategy::TaskArithmetic => "task-arithmetic",
            Strategy::MagnitudePrune => "magnitude-prune",
            Strategy::Ties => "ties",
            Strategy::DareLinear => "dare-linear",
            Strategy::DareTies => "dare-ties",
            Strategy::Breadcrumbs => "breadcrumbs",
            Strategy::BreadcrumbsTies => "breadcrumbs-ties",
            Strategy::Della => "della",
            Strategy::Cat => "cat",
            Strategy::Svd => "svd",
        }
    }

    /// Whether the strategy draws random numbers (and so depends on the seed).
    pub fn is_random(self) -> bool {
        matches!(
            self,
            Strategy::DareLinear | Strategy::DareTies | Strategy::Della
        )
    }

    /// Whether each expert's delta is sparsified on its own before the merge (top-k, DARE,
    /// breadcrumbs, DELLA).
    pub fn trims(self) -> bool {
        matches!(
            self,
            Strategy::MagnitudePrune
                | Strategy::Ties
                | Strategy::DareLinear
                | Strategy::DareTies
                | Strategy::Breadcrumbs
                | Strategy::BreadcrumbsTies
                | Strategy::Della
        )
    }

    /// The TIES family: a sign is elected per position and only the agreeing values are merged.
    pub fn elects_sign(self) -> bool {
        matches!(
            self,
            Strategy::Ties | Strategy::DareTies | Strategy::BreadcrumbsTies | Strategy::Della
        )
    }

    /// Whether the result keeps the whole union of the inputs' masks as its mask (the averaging
    /// strategies), rather than only the entries the strategy kept.
    pub fn keeps_union(self) -> bool {
        matches!(
            self,
            Strategy::SparseMean | Strategy::Mean | Strategy::Linear | Strategy::TaskArithmetic
        )
    }
}

/// Every merge parameter (`scale` is an alias of `lambda`).
pub const PARAMS: [&str; 10] = [
    "lambda",
    "density",
    "gamma",
    "epsilon",
    "sign",
    "divisor",
    "rescale",
    "normalize",
    "seed",
    "rank",
];

impl Strategy {
    /// The parameters this strategy reads (`scale` is an alias of `lambda`). A parameter given
    /// for a strategy that does not read it is refused, never ignored (docs/merging.md).
    pub fn params(self) -> &'static [&'static str] {
        match self {
            Strategy::SparseMean => &["lambda"],
            Strategy::Mean | Strategy::Cat => &[],
            Strategy::Linear | Strategy::TaskArithmetic => &["lambda", "normalize"],
            Strategy::MagnitudePrune => &["lambda", "normalize", "density", "rescale"],
            Strategy::Ties => &["lambda", "density", "sign", "divisor", "rescale"],
            Strategy::DareLinear => &["lambda", "normalize", "density", "rescale", "seed"],
            Strategy::DareTies => &["lambda", "density", "sign", "divisor", "rescale", "seed"],
            Strategy::Breadcrumbs => &["lambda", "normalize", "density", "gamma", "rescale"],
            Strategy::BreadcrumbsTies => {
                &["lambda", "density", "gamma", "sign", "divisor", "rescale"]
            }
            Strategy::Della => &[
                "lambda", "density", "epsilon", "sign", "divisor", "rescale", "seed",
            ],
            Strategy::Svd => &["rank"],
        }
    }

    /// Refuse a parameter in `keys` that this strategy does not read (names that are no
    /// parameter at all are left to [`MergeParams::apply`], which suggests the nearest).
    pub fn check_params<'a>(self, keys: impl IntoIterator<Item = &'a str>) -> Result<()> {
        let used = self.params();
        for k in keys {
            let k_used = if k == "scale" { "lambda" } else { k };
            if !PARAMS.contains(&k_used) {
                continue;
            }
            if !used.contains(&k_used) {
                return Err(Error::input(
                    format!("`{self}` does not use the parameter `{k}`"),
                    Some(&if used.is_empty() {
                        format!("`{self}` takes no parameters; remove `{k}`")
                    } else {
                        format!(
                            "`{self}` takes: {}; remove `{k}`, or pick a strategy that uses it",
                            used.join(", ")
                        )
                    }),
                ));
            }
        }
        Ok(())
    }

    /// The strategies that merge LoRA experts in LoRA space.
    pub const LORA: [Strategy; 2] = [Strategy::Cat, Strategy::Svd];

    /// Whether the strategy merges LoRA factors (not deltas).
    pub fn is_lora_space(self) -> bool {
        Strategy::LORA.contains(&self)
    }
}

impl std::str::FromStr for Strategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Strategy::ALL
            .into_iter()
            .chain(Strategy::LORA)
            .find(|x| x.as_str() == s)
            .ok_or_else(|| {
                Error::input(
                    format!("unknown merge strategy `{s}`"),
                    Some(&format!(
                        "{}built-in strategies: {}",
                        xpm_core::suggest::hint_prefix(
                            s,
                            Strategy::ALL
                                .into_iter()
                                .chain(Strategy::LORA)
                                .map(|x| x.as_str())
                        ),
                        Strategy::ALL
                            .into_iter()
                            .chain(Strategy::LORA)
                            .map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                )
            })
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which values vote in the TIES sign election.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignRule {
    /// s = sgn⁺(Σ δ_i) (peft `total`).
    Total,
    /// s = sgn⁺(Σ w_i δ_i) (mergekit).
    Weighted,
    /// s = sgn⁺(Σ sgn δ_i) (peft `frequency`).
    Frequency,
}

/// What the TIES disjoint merge divides by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Divisor {
    /// max(1, number of agreeing experts) (peft).
    Count,
    /// Σ of the agreeing experts' weights, 1 when that is 0 (mergekit `normalize=true`).
    Weights,
    /// No division: λ Σ of the agreeing weighted values (mergekit `normalize=false`).
    None,
}

/// How DARE rescales the kept entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rescale {
    /// Divide by the keep probability d (peft).
    Bernoulli,
    /// Scale so the L1 norm equals the undropped one (mergekit).
    L1,
}

/// Every knob of the built-in strategies, with xpm's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeParams {
    /// λ: scale of the merged delta.
    pub lambda: f64,
    /// d: kept fraction for top-k, DARE, breadcrumbs and DELLA.
    pub density: f64,
    /// γ: fraction of the largest magnitudes breadcrumbs drops.
    pub gamma: f64,
    /// ε: DELLA's spread of keep probabilities around d.
    pub epsilon: f64,
    pub sign: SignRule,
    pub divisor: Divisor,
    pub rescale: Rescale,
    /// `linear` only: divide by Σ w.
    pub normalize: bool,
    pub seed: u64,
    /// `svd` only: the merged rank (default: the largest input rank).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
    /// Count kept entries as upstream does, `int(d · n)` in binary floating point, instead of
    /// xpm's exact-decimal count (set by both presets).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncate_k: bool,
    /// The preset these parameters started from, for the checks that only hold under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
}

impl Default for MergeParams {
    fn default() -> Self {
        MergeParams {
            lambda: 1.0,
            density: 0.2,
            gamma: 0.01,
            epsilon: 0.15,
            sign: SignRule::Total,
            divisor: Divisor::Count,
            rescale: Rescale::Bernoulli,
            normalize: false,
            seed: 0,
            rank: None,
            truncate_k: false,
            preset: None,
        }
    }
}

/// A set of defaults that reproduces another library's choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    Peft,
    Mergekit,
}

impl std::str::FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "peft" => Ok(Preset::Peft),
            "mergekit" => Ok(Preset::Mergekit),
            other => Err(Error::input(
                format!("unknown preset `{other}`"),
                Some(&format!(
                    "{}presets: `peft`, `mergekit`",
                    xpm_core::suggest::hint_prefix(other, ["peft", "mergekit"])
                )),
            )),
        }
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Preset::Peft => "peft",
            Preset::Mergekit => "mergekit",
        })
    }
}

impl MergeParams {
    /// Whether the preset's library has `strategy` (a preset cannot reproduce a method its
    /// library lacks).
    pub fn preset_supports(p: Preset, strategy: Strategy) -> bool {
        match p {
            Preset::Peft => matches!(
                strategy,
                Strategy::Linear
                    | Strategy::TaskArithmetic
                    | Strategy::MagnitudePrune
                    | Strategy::Ties
                    | Strategy::DareLinear
                    | Strategy::DareTies
                    | Strategy::Cat
                    | Strategy::Svd
            ),
            Preset::Mergekit => !matches!(
                strategy,
                Strategy::SparseMean | Strategy::MagnitudePrune | Strategy::Cat | Strategy::Svd
            ),
        }
    }

    /// The defaults of a preset, for a strategy: what that library does when asked for it
    /// (docs/merging.md, "Presets"; docs/merging-presets-review.md has the upstream sources).
    pub fn preset(p: Preset, strategy: Strategy) -> Self {
        match p {
            // peft's merge_utils: unweighted sign vote, divide by the agreeing count, DARE
            // rescales by 1/d.
            Preset::Peft => MergeParams {
                truncate_k: true,
                preset: Some(p),
                ..MergeParams::default()
            },
            // mergekit's generalized task arithmetic with its per-method defaults.
            Preset::Mergekit => {
                let mut m = MergeParams {
                    sign: SignRule::Weighted,
                    truncate_k: true,
                    preset: Some(p),
                    // mergekit's density defaults to 1 (keep everything).
                    density: 1.0,
                    ..MergeParams::default()
                };
                match strategy {
                    Strategy::Ties | Strategy::Della => m.divisor = Divisor::Weights,
                    Strategy::DareTies | Strategy::BreadcrumbsTies => m.divisor = Divisor::None,
                    Strategy::Linear => m.normalize = true,
                    _ => {}
                }
                if matches!(
                    strategy,
                    Strategy::DareLinear | Strategy::DareTies | Strategy::Della
                ) {
                    m.rescale = Rescale::L1;
                }
                m
            }
        }
    }

    /// Apply `key=value` overrides (`lambda`, `density`, `gamma`, `epsilon`, `sign`, `divisor`,
    /// `rescale`, `normalize`, `seed`).
    pub fn apply(&mut self, overrides: &BTreeMap<String, String>) -> Result<()> {
        for (k, v) in overrides {
            let bad = |what: &str| {
                Error::input(
                    format!("invalid value `{v}` for merge parameter `{k}`: expected {what}"),
                    None,
                )
            };
            let num = || {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| bad("a number"))
            };
            match k.as_str() {
                "lambda" | "scale" => self.lambda = num()?,
                "density" => self.density = num()?,
                "gamma" => self.gamma = num()?,
                "epsilon" => self.epsilon = num()?,
                "seed" => self.seed = v.parse().map_err(|_| bad("an unsigned integer"))?,
                "rank" => {
                    self.rank = Some(
                        v.parse()
                            .ok()
                            .filter(|r| *r > 0)
                            .ok_or_else(|| bad("a positive integer"))?,
                    )
                }
                "normalize" => self.normalize = v.parse().map_err(|_| bad("true or false"))?,
                "sign" => {
                    self.sign = match v.as_str() {
                        "total" => SignRule::Total,
                        "weighted" => SignRule::Weighted,
                        "frequency" => SignRule::Frequency,
                        _ => return Err(bad("total, weighted or frequency")),
                    }
                }
                "divisor" => {
                    self.divisor = match v.as_str() {
                        "count" => Divisor::Count,
                        "weights" => Divisor::Weights,
                        "none" => Divisor::None,
                        _ => return Err(bad("count, weights or none")),
                    }
                }
                "rescale" => {
                    self.rescale = match v.as_str() {
                        "bernoulli" => Rescale::Bernoulli,
                        "l1" => Rescale::L1,
                        _ => return Err(bad("bernoulli or l1")),
                    }
                }
                _ => {
                    return Err(Error::input(
                        format!("unknown merge parameter `{k}`"),
                        Some(&format!(
                            "{}parameters: {}",
                            xpm_core::suggest::hint_prefix(k, PARAMS),
                            PARAMS.join(", ")
                        )),
                    ));
                }
            }
        }
        self.validate()
    }

    /// Range checks for the parameters `strategy` uses.
    pub fn validate_for(&self, strategy: Strategy) -> Result<()> {
        self.validate()?;
        // mergekit's bounds, strict: 0 < d − ε and d + ε < 1; at d = 1 DELLA keeps everything.
        if strategy == Strategy::Della
            && self.density < 1.0
            && !(self.density - self.epsilon > 0.0 && self.density + self.epsilon < 1.0)
        {
            return Err(Error::input(
                format!(
                    "epsilon {} must keep every DELLA probability d ± ε strictly inside (0, 1) (d = {})",
                    self.epsilon, self.density
                ),
                Some("lower `--param epsilon`"),
            ));
        }
        Ok(())
    }

    /// Checks that depend on the tensor: under `mergekit`, breadcrumbs on a tensor where it
    /// drops no outlier (⌊γ·n⌋ = 0 after its `n_bot < 0` cut) is refused, because mergekit's
    /// slice `[n_bot:-0]` then keeps nothing at all there.
    pub fn check_tensor(&self, strategy: Strategy, tensor: &str, numel: u64) -> Result<()> {
        if self.preset == Some(Preset::Mergekit)
            && matches!(strategy, Strategy::Breadcrumbs | Strategy::BreadcrumbsTies)
        {
            let n = numel as f64;
            let target = (self.density * n) as i64;
            let mut top = (self.gamma * n) as i64;
            let bot = numel as i64 - target - top;
            if bot < 0 {
                top += bot;
            }
            if top <= 0 {
                return Err(Error::input(
                    format!(
                        "breadcrumbs under the mergekit preset drops ⌊γ·n⌋ = 0 outliers of `{tensor}` (n = {numel}, gamma = {}, density = {}), where mergekit would keep nothing",
                        self.gamma, self.density
                    ),
                    Some(
                        "raise `--param gamma` so that γ·n ≥ 1, leave --preset out (xpm then drops no outlier there), or exclude the tensor with --override",
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Range checks.
    pub fn validate(&self) -> Result<()> {
        if !(self.density > 0.0 && self.density <= 1.0) {
            return Err(Error::input(
                format!("merge density {} is outside (0, 1]", self.density),
                Some("e.g. `--param density=0.2`"),
            ));
        }
        if !(0.0..1.0).contains(&self.gamma) {
            return Err(Error::input(
                format!("gamma {} must be in [0, 1)", self.gamma),
                None,
            ));
        }
        if !(0.0..1.0).contains(&self.epsilon) {
            return Err(Error::input(
                format!("epsilon {} must be in [0, 1)", self.epsilon),
                None,
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mergekit_breadcrumbs_without_outliers_is_refused_per_tensor() {
        let mut p = MergeParams::preset(Preset::Mergekit, Strategy::Breadcrumbs);
        p.density = 0.5;
        p.gamma = 0.01;
        // 50 entries: ⌊0.01·50⌋ = 0 → refused, naming the tensor; 1000 entries: 10 → fine.
        let e = p
            .check_tensor(Strategy::Breadcrumbs, "layer.0.q.weight", 50)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("layer.0.q.weight") && e.contains("n = 50"),
            "{e}"
        );
        p.check_tensor(Strategy::Breadcrumbs, "w", 1000).unwrap();
        // d = 1 cuts every outlier (n_bot < 0): refused too.
        p.density = 1.0;
        assert!(
            p.check_tensor(Strategy::BreadcrumbsTies, "w", 1000)
                .is_err()
        );
        // Without the preset, or for another strategy, nothing to refuse.
        MergeParams {
            preset: None,
            ..p.clone()
        }
        .check_tensor(Strategy::Breadcrumbs, "w", 50)
        .unwrap();
        p.check_tensor(Strategy::Ties, "w", 50).unwrap();
    }
}
