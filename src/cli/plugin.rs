use std::path::PathBuf;

use super::Context;
use crate::merge::plugin::{Plugin, candidates};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// List the plugins found ($XPM_PLUGIN_PATH, $XPM_HOME/plugins, --plugin)
    List {
        /// Also load this library
        #[arg(long = "plugin", value_name = "PATH")]
        plugins: Vec<PathBuf>,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Load a plugin, validate it and run a tiny self-test merge
    Check {
        /// The plugin library
        path: PathBuf,
        /// Parameters for the self-test (JSON object)
        #[arg(long, default_value = "{}", value_name = "JSON")]
        params: String,
    },
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    match a.command {
        Sub::List { plugins, json } => {
            let mut rows = Vec::new();
            for (path, _) in candidates(&plugins, &ctx.home) {
                match Plugin::load(&path) {
                    Ok(p) => {
                        let shadowed = p.name.parse::<crate::merge::Strategy>().is_ok();
                        rows.push(serde_json::json!({
                            "name": p.name, "version": p.version,
                            "abi": format!("{}.{}", p.abi_major, p.abi_minor),
                            "path": p.path, "sha256": p.sha256,
                            "shadowed_by_builtin": shadowed,
                        }));
                    }
                    Err(e) => {
                        rows.push(serde_json::json!({ "path": path, "error": e.to_string() }))
                    }
                }
            }
            if json {
                ctx.printer.out(serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                ctx.printer.out(format!(
                    "no plugins found (looked in $XPM_PLUGIN_PATH and {})",
                    ctx.home.root.join("plugins").display()
                ));
            } else {
                for r in rows {
                    if let Some(e) = r.get("error") {
                        ctx.printer
                            .out(format!("error    {}", e.as_str().unwrap_or("")));
                        continue;
                    }
                    let note = if r["shadowed_by_builtin"] == true {
                        "  (name clashes with a built-in strategy, which wins)"
                    } else {
                        ""
                    };
                    ctx.printer.out(format!(
                        "{} {}  ABI {}  {}  {}{note}",
                        r["name"].as_str().unwrap_or(""),
                        r["version"].as_str().unwrap_or(""),
                        r["abi"].as_str().unwrap_or(""),
                        r["path"].as_str().unwrap_or(""),
                        r["sha256"].as_str().unwrap_or("")
                    ));
                }
            }
            Ok(())
        }
        Sub::Check { path, params } => {
            let p = Plugin::load(&path)?;
            let params: serde_json::Value = serde_json::from_str(&params)
                .map_err(|e| crate::Error::input(format!("--params is not JSON: {e}"), None))?;
            p.check_params(&params)?;
            // Self-test: two experts on a 4×4 tensor with overlapping masks.
            let inputs = vec![
                crate::merge::Input::Sparse {
                    indices: vec![0, 3, 5, 9],
                    values: vec![1.0, -2.0, 0.5, 0.25],
                },
                crate::merge::Input::Sparse {
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
                crate::merge::Output::Sparse { indices, .. } => indices.len(),
                crate::merge::Output::Dense { values } => values.len(),
            };
            ctx.printer.out(format!(
                "ok {} {} (ABI {}.{}) {}: self-test merge kept {kept} of 5 union entries, all finite",
                p.name, p.version, p.abi_major, p.abi_minor, p.sha256
            ));
            Ok(())
        }
    }
}
