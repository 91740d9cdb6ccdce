//! The experiment file (`experiments/*.toml`): tasks, methods, strategies, sizes and seeds.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoResultExt, Result};

/// One experiment: train every method on every task for every seed, publish, install, merge,
/// evaluate. See docs/results.md for the file this is read from.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names the work directory and the result files.
    pub name: String,
    /// Base model: a model directory (relative paths resolve against `data_dir`) or
    /// `hf:ORG/NAME[@REV]`.
    pub base: String,
    /// Where relative table and model paths resolve [default: the experiment file's folder].
    /// `~` and `$VAR` are expanded.
    #[serde(default)]
    pub data_dir: Option<String>,
    /// Results (JSON, Markdown tables, PNG plot), relative to the experiment file's folder
    /// [default: WORK/results].
    #[serde(default)]
    pub out: Option<String>,
    /// Training seeds; every seed trains every (task, method) again.
    pub seeds: Vec<u64>,
    /// Seed of the data shuffle before the train/eval/test split (the same for every seed).
    #[serde(default)]
    pub data_seed: u64,
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    #[serde(default = "default_eval_batch_size")]
    pub eval_batch_size: usize,
    /// Merge the first k tasks for each k (the scaling curve); the largest must be the number
    /// of tasks [default: just all tasks].
    #[serde(default)]
    pub merge_counts: Vec<usize>,
    /// Strategies merged at every k of `merge_counts` (where the method lists them); the
    /// others are merged over all tasks only.
    #[serde(default)]
    pub scaling_strategies: Vec<String>,
    /// Strategies whose `lambda` is chosen for every merge (method, seed, k) on the eval
    /// splits of the merged tasks: each value of `lambda_grid` is merged and evaluated there,
    /// and the one with the highest mean eval accuracy (ties: the earlier in the grid) is the
    /// merge measured on the test splits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tune_lambda: Vec<String>,
    /// The λ values tried for the `tune_lambda` strategies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lambda_grid: Vec<f64>,
    /// Extra `xpm train` arguments for the head-only runs (the "base + head" baseline and the
    /// held-out task's head).
    #[serde(default)]
    pub head_args: Vec<String>,
    #[serde(rename = "task")]
    pub tasks: Vec<TaskConfig>,
    /// A task left out of every merge: merged encoders are evaluated on it with a head trained
    /// on the base.
    #[serde(default)]
    pub heldout: Option<TaskConfig>,
    #[serde(rename = "method")]
    pub methods: Vec<MethodConfig>,
}

fn default_max_seq_len() -> usize {
    64
}
fn default_batch_size() -> usize {
    32
}
fn default_epochs() -> usize {
    1
}
fn default_eval_batch_size() -> usize {
    64
}

/// A labelled text task, made with `xpm data import`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// Short name (lowercase letters, digits, `-`): part of the expert names.
    pub name: String,
    /// The table (Orange `.tab`, TSV, CSV) the train and eval (and test) rows come from.
    pub table: String,
    /// A separate table for the test rows [default: split from `table`].
    #[serde(default)]
    pub test_table: Option<String>,
    pub train: usize,
    pub eval: usize,
    pub test: usize,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub bins: Option<String>,
    /// Keep only these labels.
    #[serde(default)]
    pub labels: Vec<String>,
    /// A sentence for the report.
    #[serde(default)]
    pub description: Option<String>,
}

/// A training method: `xpm train` arguments and the strategies its experts are merged with.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MethodConfig {
    /// Short name, e.g. `sparse-5`.
    pub name: String,
    /// `xpm train` arguments, e.g. `["--method", "sparse", "--keep-ratio", "0.05"]`.
    pub args: Vec<String>,
    /// `xpm merge --strategy` values.
    pub strategies: Vec<String>,
    /// Extra `xpm merge` arguments per strategy, e.g. `{ ties = ["--param", "density=0.2"] }`.
    #[serde(default)]
    pub merge_args: std::collections::BTreeMap<String, Vec<String>>,
}

impl Config {
    /// Read and check an experiment file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).at("read", path)?;
        let c: Config = toml_edit::de::from_str(&text).map_err(|e| {
            Error::input(
                format!("`{}` is not a valid experiment file: {e}", path.display()),
                Some("see experiments/merge-six.toml and docs/results.md for the keys"),
            )
        })?;
        c.check(path)?;
        Ok(c)
    }

    fn check(&self, path: &Path) -> Result<()> {
        let bad = |m: String| {
            Err(Error::input(
                format!("`{}`: {m}", path.display()),
                Some("see experiments/merge-six.toml for a complete example"),
            ))
        };
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        };
        if !name_ok(&self.name) {
            return bad(format!(
                "name `{}` must be lowercase letters, digits and `-`",
                self.name
            ));
        }
        if self.seeds.is_empty() || self.tasks.is_empty() || self.methods.is_empty() {
            return bad("needs at least one seed, one [[task]] and one [[method]]".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for t in self.tasks.iter().chain(self.heldout.iter()) {
            if !name_ok(&t.name) || !seen.insert(t.name.clone()) {
                return bad(format!(
                    "task name `{}` is repeated or not lowercase letters, digits and `-`",
                    t.name
                ));
            }
            if t.train == 0 || t.test == 0 {
                return bad(format!("task `{}` needs train > 0 and test > 0", t.name));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for m in &self.methods {
            if !name_ok(&m.name) || !seen.insert(m.name.clone()) {
                return bad(format!(
                    "method name `{}` is repeated or not lowercase letters, digits and `-`",
                    m.name
                ));
            }
            if m.strategies.is_empty() {
                return bad(format!("method `{}` lists no strategies", m.name));
            }
        }
        if !self.tune_lambda.is_empty()
            && (self.lambda_grid.is_empty()
                || self.lambda_grid.iter().any(|l| !l.is_finite() || *l <= 0.0))
        {
            return bad("tune_lambda needs a lambda_grid of positive numbers".into());
        }
        let n = self.tasks.len();
        if let Some(&k) = self.merge_counts.iter().find(|&&k| k < 2 || k > n) {
            return bad(format!(
                "merge_counts has {k}; each must be between 2 and the {n} tasks"
            ));
        }
        Ok(())
    }

    /// The task counts `strategy` is merged at: every k for the scaling strategies, else all
    /// tasks only.
    pub fn counts_for(&self, strategy: &str) -> Vec<usize> {
        if self.scaling_strategies.iter().any(|s| s == strategy) {
            self.counts()
        } else {
            vec![self.tasks.len()]
        }
    }

    /// Every k to merge, ascending, ending with all tasks.
    pub fn counts(&self) -> Vec<usize> {
        let mut c = self.merge_counts.clone();
        c.push(self.tasks.len());
        c.sort_unstable();
        c.dedup();
        c
    }
}

/// Expand `~/` and `$VAR` / `${VAR}` (unset variables are an error).
pub fn expand(s: &str) -> Result<String> {
    let mut s = s.to_string();
    if let Some(rest) = s.strip_prefix("~/") {
        let home = std::env::var("HOME").unwrap_or_default();
        s = format!("{home}/{rest}");
    }
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let braced = chars.peek() == Some(&'{');
        if braced {
            chars.next();
        }
        let mut var = String::new();
        while let Some(&c) = chars.peek() {
            if c.is_ascii_alphanumeric() || c == '_' {
                var.push(c);
                chars.next();
            } else {
                break;
            }
        }
        if braced && chars.next() != Some('}') {
            return Err(Error::input(format!("unclosed `${{` in `{s}`"), None));
        }
        out.push_str(&std::env::var(&var).map_err(|_| {
            Error::input(
                format!("`{s}` uses ${var}, which is not set"),
                Some(&format!("set {var} or write the path out")),
            )
        })?);
    }
    Ok(out)
}

/// `p` expanded, and resolved against `dir` when relative.
pub fn resolve(dir: &Path, p: &str) -> Result<PathBuf> {
    let e = PathBuf::from(expand(p)?);
    Ok(if e.is_absolute() { e } else { dir.join(e) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_home_and_variables() {
        // SAFETY: tests in this module do not read this variable concurrently.
        unsafe { std::env::set_var("XPM_EXPERIMENT_TEST_DIR", "/data") };
        assert_eq!(
            expand("${XPM_EXPERIMENT_TEST_DIR}/x/$XPM_EXPERIMENT_TEST_DIR").unwrap(),
            "/data/x//data"
        );
        assert!(
            expand("$XPM_SURELY_UNSET_VARIABLE/x")
                .unwrap_err()
                .to_string()
                .contains("not set")
        );
        assert_eq!(
            resolve(Path::new("/a"), "b/c").unwrap(),
            PathBuf::from("/a/b/c")
        );
    }
}
