use std::path::PathBuf;

use super::Context;
use super::output::OutputArgs;
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
        /// Also write a test split here (taken before the eval split)
        #[arg(long, value_name = "FILE")]
        test_out: Option<PathBuf>,
        /// Share of rows for --test-out
        #[arg(long, default_value_t = 0.2)]
        test_ratio: f64,
        /// Keep only rows with these labels, comma-separated (after --bins)
        #[arg(long, value_delimiter = ',', value_name = "LABEL,…")]
        labels: Vec<String>,
        #[command(flatten)]
        output: OutputArgs,
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
            test_out,
            test_ratio,
            labels,
            output,
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
                test_out: test_out.clone(),
                test_ratio,
                labels,
                text,
                label,
                bins,
                limit,
                seed,
            })?;
            output.format().print(&ctx.printer, &r, |r| {
                let labels: Vec<String> =
                    r.labels.iter().map(|(l, n)| format!("{l} {n}")).collect();
                ctx.printer.out(format!(
                    "wrote {} ({} rows{}); text `{}`, label `{}`; {} skipped, {} filtered out; labels: {}",
                    out.display(),
                    r.train,
                    eval_out
                        .map(|p| format!(", {} rows to {}", r.eval, p.display()))
                        .unwrap_or_default()
                        + &test_out
                            .map(|p| format!(", {} rows to {}", r.test, p.display()))
                            .unwrap_or_default(),
                    r.text_column,
                    r.label_column,
                    r.skipped,
                    r.filtered,
                    labels.join(", ")
                ));
            })
        }
    }
}
