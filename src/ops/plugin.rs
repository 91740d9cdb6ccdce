//! `xpm plugin list` and `xpm plugin check`: what the plugin directories hold, and a self-test
//! of one plugin.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::merge::plugin::{Plugin, candidates};
use crate::merge::{Input, Output, Strategy};

/// One library found by `xpm plugin list` (`--json`: an array of these; fields in this order).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum PluginRow {
    /// A library that loaded as a plugin.
    Loaded {
        /// ABI `major.minor`.
        abi: String,
        name: String,
        path: PathBuf,
        /// `sha256:<hex>` of the library file (what recipes pin).
        sha256: String,
        /// A built-in strategy has this name and wins over the plugin.
        shadowed_by_builtin: bool,
        version: String,
    },
    /// A library that could not be loaded, and why.
    Failed { error: String, path: PathBuf },
}

/// Every library in the plugin search path (`explicit` first), loaded to read its descriptor.
pub fn list(explicit: &[PathBuf], search: &[PathBuf]) -> Vec<PluginRow> {
    candidates(explicit, search)
        .into_iter()
        .map(|(path, _)| match Plugin::load(&path) {
            Ok(p) => PluginRow::Loaded {
                abi: format!("{}.{}", p.abi_major, p.abi_minor),
                shadowed_by_builtin: p.name.parse::<Strategy>().is_ok(),
                name: p.name,
                path: p.path,
                sha256: p.sha256,
                version: p.version,
            },
            Err(e) => PluginRow::Failed {
                error: e.to_string(),
                path,
            },
        })
        .collect()
}

/// What `xpm plugin check` saw.
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub name: String,
    pub version: String,
    pub abi: (u32, u32),
    pub sha256: String,
    /// Entries the self-test merge kept, of the 5 in the union of its two inputs.
    pub kept: usize,
}

/// Load the plugin at `path`, check `params` (JSON text) against its schema, and run a self-test
/// merge of two overlapping sparse experts on a 4×4 tensor.
pub fn check(path: &Path, params: &str) -> Result<CheckReport> {
    let p = Plugin::load(path)?;
    let params: serde_json::Value = serde_json::from_str(params).map_err(|e| {
        Error::input(
            format!("--params is not JSON: {e}"),
            Some("give a JSON object, e.g. `--params '{\"density\": 0.5}'`"),
        )
    })?;
    p.check_params(&params)?;
    let inputs = vec![
        Input::Sparse {
            indices: vec![0, 3, 5, 9],
            values: vec![1.0, -2.0, 0.5, 0.25],
        },
        Input::Sparse {
            indices: vec![3, 5, 12],
            values: vec![1.0, 1.5, -1.0],
        },
    ];
    let out = p.instance(&params)?.merge(
        "self-test.weight",
        &[4, 4],
        crate::format::Dtype::F32,
        &inputs,
        &[1.0, 0.5],
        0,
    )?;
    let kept = match &out {
        Output::Sparse { indices, .. } => indices.len(),
        Output::Dense { values } => values.len(),
    };
    Ok(CheckReport {
        name: p.name.clone(),
        version: p.version.clone(),
        abi: (p.abi_major, p.abi_minor),
        sha256: p.sha256.clone(),
        kept,
    })
}
