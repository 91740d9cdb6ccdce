use std::path::PathBuf;

use super::Context;
use crate::experiment::{self, RunOptions};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// Run an experiment file: import the data, train every method on every task and seed,
    /// publish, install, merge and evaluate, all through xpm's own commands; resumes where an
    /// earlier run stopped
    Run {
        /// The experiment file, e.g. experiments/merge-six.toml
        file: PathBuf,
        /// Work directory: data splits, experts, registry, logs, state [default: $XPM_HOME/experiments/NAME]
        #[arg(long, value_name = "DIR")]
        work: Option<PathBuf>,
        /// Where the results go (NAME.json, NAME.md, NAME.png) [default: the file's `out`, else WORK/results]
        #[arg(short, long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Resolve the file's relative data paths here instead of its `data_dir`
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Delete the work directory's earlier steps and start over
        #[arg(long)]
        fresh: bool,
    },
    /// Write the tables (NAME.md) and the plot (NAME.png) again from a run's NAME.json
    Report {
        /// NAME.json written by `xpm experiment run`
        results: PathBuf,
        /// Output directory [default: the JSON file's folder]
        #[arg(short, long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    match a.command {
        Sub::Run {
            file,
            work,
            out,
            data_dir,
            fresh,
        } => {
            let r = experiment::run(
                &RunOptions {
                    file,
                    work,
                    out,
                    data_dir,
                    fresh,
                    exe: None,
                },
                &ctx.home,
                &ctx.printer,
            )?;
            ctx.printer.out(format!(
                "experiment {} done: {} records over {} seed(s)",
                r.experiment,
                r.records.len(),
                r.seeds_done.len()
            ));
        }
        Sub::Report { results, out } => {
            let r = experiment::report::load(&results)?;
            let dir = out.unwrap_or_else(|| {
                results
                    .parent()
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("."))
            });
            let [_, md, png] = experiment::report::write_all(&r, &dir, &ctx.printer)?;
            ctx.printer
                .out(format!("wrote {} and {}", md.display(), png.display()));
        }
    }
    Ok(())
}
