//! `--json`: one flag and one way of printing a result, shared by every command that has a
//! machine-readable result.

use serde::Serialize;

use crate::printer::Printer;

/// How a command prints its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Text for people (`ops::*::render`, one-line summaries).
    Human,
    /// JSON on stdout, and nothing else there (status lines go to stderr as always).
    Json,
}

/// The `--json` flag, flattened into a command's arguments.
///
/// Its help says "Print the result as JSON"; a command whose JSON is more specific (a schema, one
/// object per line) replaces it with `#[command(mut_arg("json", output::help("…")))]`.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct OutputArgs {
    /// Print the result as JSON
    #[arg(long)]
    json: bool,
}

impl OutputArgs {
    pub fn format(&self) -> OutputFormat {
        if self.json {
            OutputFormat::Json
        } else {
            OutputFormat::Human
        }
    }
}

/// Replace the help of `--json` (for `mut_arg`).
pub fn help(text: &'static str) -> impl FnOnce(clap::Arg) -> clap::Arg {
    move |a| a.help(text)
}

impl OutputFormat {
    pub fn is_json(self) -> bool {
        self == OutputFormat::Json
    }

    /// Print a command's result: one pretty-printed JSON document, or what `human` prints.
    pub fn print<T: Serialize + ?Sized>(
        self,
        printer: &Printer,
        value: &T,
        human: impl FnOnce(&T),
    ) -> anyhow::Result<()> {
        match self {
            OutputFormat::Json => printer.out(serde_json::to_string_pretty(value)?),
            OutputFormat::Human => human(value),
        }
        Ok(())
    }

    /// Print one record of a stream (a line per artifact, an index line): compact JSON on one
    /// line (JSON Lines), or what `human` prints.
    pub fn print_line<T: Serialize + ?Sized>(
        self,
        printer: &Printer,
        value: &T,
        human: impl FnOnce(&T),
    ) -> anyhow::Result<()> {
        match self {
            OutputFormat::Json => printer.out(serde_json::to_string(value)?),
            OutputFormat::Human => human(value),
        }
        Ok(())
    }
}
