use std::path::PathBuf;

use super::Context;
use crate::ops::data_import::{ImportOptions, import};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// Turn a labelled table (Orange .tab, .tsv, .csv) into {"text", "label"} JSONL
    Import {
        /// The table
        input: PathBuf,
        /// Training JSONL to write
        #[arg(short, long, value_name = "FILE")]
        out: PathBuf,
        /// Also write an evaluation split here
        #[arg(long, value_name = "FILE")]
        eval_out: Option<PathBuf>,
        /// Share of rows for --eval-out
        #[arg(long, default_value_t = 0.2)]
        eval_ratio: f64,
        /// Text column [default: Orange's first string column, else `text`]
        #[arg(long, value_name = "COLUMN")]
        text: Option<String>,
        /// Label column [default: Orange's class column, else `label`]
        #[arg(long, value_name = "COLUMN")]
        label: Option<String>,
        /// Map numeric labels to names, e.g. `negative:1-4,neutral:5-6,positive:7-10`
        #[arg(long, value_name = "SPEC")]
        bins: Option<String>,
        /// Keep at most N rows (after shuffling)
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Shuffle rows with this seed before --limit and the split [default: file order]
        #[arg(long)]
        seed: Option<u64>,
    },
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    match a.command {
        Sub::Import {
            input,
            out,
            eval_out,
            eval_ratio,
            text,
            label,
            bins,
            limit,
            seed,
        } => {
            let r = import(&ImportOptions {
                input,
                out: out.clone(),
                eval_out: eval_out.clone(),
                eval_ratio,
                text,
                label,
                bins,
                limit,
                seed,
            })?;
            let labels: Vec<String> = r.labels.iter().map(|(l, n)| format!("{l} {n}")).collect();
            ctx.printer.out(format!(
                "wrote {} ({} rows{}); text `{}`, label `{}`; {} skipped; labels: {}",
                out.display(),
                r.train,
                eval_out
                    .map(|p| format!(", {} rows to {}", r.eval, p.display()))
                    .unwrap_or_default(),
                r.text_column,
                r.label_column,
                r.skipped,
                labels.join(", ")
            ));
            Ok(())
        }
    }
}
