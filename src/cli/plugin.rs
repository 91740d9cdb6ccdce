use std::path::PathBuf;

use super::Context;
use super::output::{self, OutputArgs};
use crate::ops::plugin::{self, PluginRow};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// List the plugins found ($XPM_PLUGIN_PATH, $XPM_HOME/plugins, --plugin)
    #[command(mut_arg("json", output::help("Print JSON")))]
    List {
        /// Also load this library
        #[arg(long = "plugin", value_name = "PATH")]
        plugins: Vec<PathBuf>,
        #[command(flatten)]
        output: OutputArgs,
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
        Sub::List { plugins, output } => {
            ctx.printer.status(
                "Scanning",
                "the plugin directories (every library there is loaded to read its descriptor)",
            );
            let rows = plugin::list(&plugins, &ctx.plugin_search);
            output.format().print(&ctx.printer, &rows, |rows| {
                if rows.is_empty() {
                    ctx.printer.out(format!(
                        "no plugins found (looked in $XPM_PLUGIN_PATH and {})",
                        ctx.home.root.join("plugins").display()
                    ));
                }
                for r in rows {
                    ctx.printer.out(match r {
                        PluginRow::Failed { error, .. } => format!("error    {error}"),
                        PluginRow::Loaded {
                            abi,
                            name,
                            path,
                            sha256,
                            shadowed_by_builtin,
                            version,
                        } => {
                            let note = if *shadowed_by_builtin {
                                "  (name clashes with a built-in strategy, which wins)"
                            } else {
                                ""
                            };
                            format!(
                                "{name} {version}  ABI {abi}  {}  {sha256}{note}",
                                path.display()
                            )
                        }
                    });
                }
            })
        }
        Sub::Check { path, params } => {
            let r = plugin::check(&path, &params)?;
            ctx.printer.out(format!(
                "ok {} {} (ABI {}.{}) {}: self-test merge kept {} of 5 union entries, all finite",
                r.name, r.version, r.abi.0, r.abi.1, r.sha256, r.kept
            ));
            Ok(())
        }
    }
}
