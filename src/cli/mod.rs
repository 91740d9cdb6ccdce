//! Command-line interface: clap types (one file per verb) over [`crate::ops`].
//!
//! Exit codes: 0 success, 1 failure (the error is printed), 2 invalid command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::home::XpmHome;
use crate::printer::Printer;

mod apply;
mod data;
mod demo;
mod eval;
mod experiment;
mod export;
mod extract;
mod import;
mod init;
mod inspect;
mod install;
mod key;
mod list;
mod merge;
mod output;
mod overlap;
mod owner;
mod pack;
mod plugin;
mod publish;
mod registry;
mod registry_args;
mod search;
mod serve;
mod train;
mod unpack;
mod verify;
mod yank;

/// Train, ship, find and merge parameter-efficient experts.
#[derive(Debug, Parser)]
#[command(name = "xpm", version, about, long_about = None, max_term_width = 100)]
pub struct Cli {
    /// xpm's state directory [default: ~/.xpm]
    #[arg(long, global = true, env = "XPM_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Print only results and errors: no status lines, no progress bars
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train an expert (sparse, LoRA or full fine-tuning) with Candle
    Train(Box<train::Args>),
    /// Evaluate a base model, with an expert or a merge applied, on a test set
    Eval(eval::Args),
    /// Prepare training data
    Data(data::Args),
    /// Run a merging experiment end to end and report it (tables, plot, raw JSON)
    Experiment(experiment::Args),
    /// Build a sparse (or dense) expert from a base and a fine-tuned checkpoint
    Extract(Box<extract::Args>),
    /// Signing keys for releases (`xpm publish --sign`)
    Key(key::Args),
    /// Import a PEFT adapter or mttl experts as xpm experts
    Import(import::Args),
    /// Export an expert as a PEFT adapter directory (exact when merged)
    Export(Box<export::Args>),
    /// Pack an unpacked expert directory into a `.xpm` artifact
    Pack(pack::Args),
    /// Unpack a `.xpm` artifact into `manifest.json` + `tensors.safetensors`
    Unpack(unpack::Args),
    /// Show an artifact's manifest and per-tensor storage
    Inspect(inspect::Args),
    /// Merge experts with a built-in strategy into a new expert
    Merge(Box<merge::Args>),
    /// Write base + an expert's delta as a model directory
    Apply(apply::Args),
    /// Compare experts' masks: overlap, sign agreement, how much merging disturbs them
    Overlap(overlap::Args),
    /// Check an artifact's integrity completely
    Verify(verify::Args),
    /// Publish an artifact to a registry (verified completely first)
    Publish(publish::Args),
    /// Yank a published version (or un-yank it with --undo)
    Yank(yank::Args),
    /// List, add or remove the owners of a name on a registry server
    Owner(owner::Args),
    /// Search a registry by name and description
    Search(search::Args),
    /// Write an xpm.toml for a project
    Init(init::Args),
    /// Resolve, download, verify and lock experts
    Install(install::Args),
    /// List installed experts
    List(list::Args),
    /// List and check merge plugins
    Plugin(plugin::Args),
    /// Run the registry server (the `xpm-registry` binary)
    Registry(registry::Args),
    /// Serve a base model with experts and merges swapped in per request (HTTP)
    Serve(Box<serve::Args>),
    /// Run xpm's main job end to end on a small model it prepares itself
    Demo(demo::Args),
}

/// A size flag (`5GB`, `500MiB`, `1048576`), parsed when the command line is.
pub(crate) fn size_arg(s: &str) -> Result<u64, String> {
    crate::units::parse_size(s).map_err(|e| e.to_string())
}

/// An exit status to leave with, and nothing to print (the program that failed spoke for itself).
#[derive(Debug)]
pub struct ExitWith(pub u8);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

/// What every command gets besides its own flags.
pub struct Context {
    pub home: XpmHome,
    pub printer: Printer,
    /// Where merge plugins are searched: `$XPM_PLUGIN_PATH`, then `$XPM_HOME/plugins` (the
    /// environment is read here, once).
    pub plugin_search: Vec<std::path::PathBuf>,
    /// Where `hf:` base models come from: `HF_ENDPOINT`, `HF_TOKEN`, `HF_HOME` (read here, once).
    pub hub: crate::train::hub::HubConfig,
}

/// Thread settings for commands that train or evaluate, applied at the command edge before any
/// tensor operation: Candle's element-wise thread count
/// ([`element_wise_threads`](crate::train::element_wise_threads)) unless the user set
/// `CANDLE_NUM_THREADS`.
///
/// # Safety
/// Call it before the process has started any thread that may read or write the environment
/// (the start of a command is such a point: `main` starts none).
pub unsafe fn configure_training_threads() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if std::env::var_os("CANDLE_NUM_THREADS").is_none()
        && let Some(n) = crate::train::element_wise_threads(cores)
    {
        // SAFETY: the caller guarantees that no other thread exists yet, so nothing reads or
        // writes the environment concurrently.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", n.to_string()) };
    }
}

/// Parse the command line, run the command, print errors; the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let home = XpmHome::resolve(cli.home.clone());
    let plugin_search =
        crate::merge::plugin::search_path(std::env::var_os("XPM_PLUGIN_PATH").as_deref(), &home);
    let ctx = Context {
        home,
        printer: Printer::new(cli.quiet),
        plugin_search,
        hub: crate::train::hub::HubConfig::from_env(),
    };
    let result = match cli.command {
        Command::Train(a) => train::exec(*a, &ctx),
        Command::Eval(a) => eval::exec(a, &ctx),
        Command::Data(a) => data::exec(a, &ctx),
        Command::Experiment(a) => experiment::exec(a, &ctx),
        Command::Extract(a) => extract::exec(*a, &ctx),
        Command::Key(a) => key::exec(a, &ctx),
        Command::Import(a) => import::exec(a, &ctx),
        Command::Export(a) => export::exec(*a, &ctx),
        Command::Pack(a) => pack::exec(a, &ctx),
        Command::Unpack(a) => unpack::exec(a, &ctx),
        Command::Inspect(a) => inspect::exec(a, &ctx),
        Command::Merge(a) => merge::exec(*a, &ctx),
        Command::Verify(a) => verify::exec(a, &ctx),
        Command::Overlap(a) => overlap::exec(a, &ctx),
        Command::Apply(a) => apply::exec(a, &ctx),
        Command::Demo(a) => demo::exec(a, &ctx),
        Command::Publish(a) => publish::exec(a, &ctx),
        Command::Yank(a) => yank::exec(a, &ctx),
        Command::Owner(a) => owner::exec(a, &ctx),
        Command::Search(a) => search::exec(a, &ctx),
        Command::Init(a) => init::exec(a, &ctx),
        Command::Install(a) => install::exec(a, &ctx),
        Command::List(a) => list::exec(a, &ctx),
        Command::Registry(a) => registry::exec(a, &ctx),
        Command::Serve(a) => serve::exec(*a, &ctx),
        Command::Plugin(a) => plugin::exec(a, &ctx),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A command that ran another program exits with its status; that program spoke.
            if let Some(ExitWith(code)) = e.downcast_ref::<ExitWith>() {
                return ExitCode::from(*code);
            }
            eprint!("{}", render_error(&e));
            ExitCode::from(1)
        }
    }
}

/// `error: …`, each cause as `  Caused by: …`, then the first hint found in the chain.
pub fn render_error(e: &anyhow::Error) -> String {
    let mut s = format!("error: {e}\n");
    for cause in e.chain().skip(1) {
        s.push_str(&format!("  Caused by: {cause}\n"));
    }
    if let Some(hint) = e.chain().find_map(|c| {
        c.downcast_ref::<crate::Error>()
            .and_then(crate::Error::hint)
    }) {
        s.push_str(&format!("  hint: {hint}\n"));
    }
    s
}
