//! `xpm train`: the flags are [`TrainOptions`] itself (one declaration of each option and its
//! default, in `xpm-train`), plus `--json`.

use super::Context;
use super::output::{self, OutputArgs};
use crate::train::{TrainOptions, train};

#[derive(Debug, clap::Args)]
#[command(mut_arg("json", output::help("Print the report as JSON")))]
pub struct Args {
    #[command(flatten)]
    options: TrainOptions,
    #[command(flatten)]
    output: OutputArgs,
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    crate::alloc::configure();
    // SAFETY: the first thing the command does; `main` started no thread before it.
    unsafe { super::configure_training_threads() };
    let o = TrainOptions {
        hub: ctx.hub.clone(),
        ..a.options
    };
    let r = train(&o, &ctx.home, &ctx.printer)?;
    a.output.format().print(&ctx.printer, &r, |r| {
        let mut line = format!(
            "trained {} ({}): {} steps, loss {:.4} → {:.4}, {} trainable parameters, {:.2} s/step",
            r.out.display(),
            r.method,
            r.steps,
            r.train_loss_first,
            r.train_loss_last,
            r.trainable_params,
            r.seconds_per_step
        );
        if let Some(m) = &r.eval {
            line.push_str(&format!("; eval loss {:.4}", m.loss));
            if let Some(acc) = m.accuracy {
                line.push_str(&format!(", accuracy {:.2} %", acc * 100.0));
            }
            if let Some(f1) = m.macro_f1 {
                line.push_str(&format!(", macro-F1 {:.4}", f1));
            }
            if let Some(em) = m.exact_match {
                line.push_str(&format!(", exact match {:.2} %", em * 100.0));
            }
            line.push_str(&format!(" (saved step {})", r.saved_step));
        }
        ctx.printer.out(line);
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use clap::Parser as _;

    use super::super::{Cli, Command};
    use crate::train::{Method, TrainOptions};

    fn parse(args: &[&str]) -> TrainOptions {
        let cli = Cli::try_parse_from(["xpm", "train"].iter().chain(args)).unwrap();
        match cli.command {
            Command::Train(a) => a.options,
            other => panic!("parsed {other:?}"),
        }
    }

    /// `TrainOptions::new` (what library callers get) and the command line's defaults agree.
    #[test]
    fn defaults_agree_with_the_command_line() {
        let required = ["--base", "m", "--data", "d.jsonl", "--name", "team/n"];
        let parsed = parse(&[&required[..], &["-o", "x.xpm"]].concat());
        let new = TrainOptions::new(
            "m".into(),
            PathBuf::from("d.jsonl"),
            Method::Sparse,
            "team/n",
            PathBuf::from("x.xpm"),
        );
        assert_eq!(parsed, new);
        // Without -o: NAME-VERSION.xpm, `/` replaced.
        let parsed = parse(&required);
        assert_eq!(parsed.out, None);
        assert_eq!(parsed.out_path(), PathBuf::from("team-n-0.1.0.xpm"));
        assert_eq!(new.out_path(), PathBuf::from("x.xpm"));
    }
}
