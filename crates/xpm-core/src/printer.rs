//! All user-facing output goes through a [`Printer`]; library code never prints on its own.
//!
//! Status lines go to stderr (cargo style: a right-aligned verb, then the message), results to
//! stdout. Progress bars are drawn only on a terminal and never with `--quiet`; library code
//! reports progress through the [`Progress`] trait, whatever draws it.

use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where output goes, and how much of it.
#[derive(Debug, Clone, Copy)]
pub struct Printer {
    quiet: bool,
    color: bool,
    progress: bool,
}

impl Default for Printer {
    /// [`Printer::silent`]: library types that may report (a lock wait, a retry) stay quiet
    /// unless the command gives them its printer.
    fn default() -> Self {
        Printer::silent()
    }
}

impl Printer {
    /// A printer; `quiet` silences status lines and progress bars (results still print).
    pub fn new(quiet: bool) -> Self {
        let tty = std::io::stderr().is_terminal();
        let color = tty && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        Printer {
            quiet,
            color,
            progress: tty && !quiet,
        }
    }

    /// A printer that prints nothing but results (for library callers and tests).
    pub fn silent() -> Self {
        Printer {
            quiet: true,
            color: false,
            progress: false,
        }
    }

    /// A cargo-style status line on stderr: `   Verb message`.
    pub fn status(&self, verb: &str, message: impl std::fmt::Display) {
        if self.quiet {
            return;
        }
        let line = if self.color {
            format!("\x1b[1;32m{verb:>12}\x1b[0m {message}")
        } else {
            format!("{verb:>12} {message}")
        };
        let _ = writeln!(std::io::stderr(), "{line}");
    }

    /// A warning on stderr (shown even with `--quiet`).
    pub fn warn(&self, message: impl std::fmt::Display) {
        let prefix = if self.color {
            "\x1b[1;33mwarning\x1b[0m"
        } else {
            "warning"
        };
        let _ = writeln!(std::io::stderr(), "{prefix}: {message}");
    }

    /// Whether progress bars are drawn.
    pub fn shows_progress(&self) -> bool {
        self.progress
    }

    /// A result line on stdout.
    pub fn out(&self, text: impl std::fmt::Display) {
        let _ = writeln!(std::io::stdout(), "{text}");
    }

    /// A progress bar over `len` steps (hidden when not on a terminal or quiet).
    pub fn progress(&self, len: u64, message: &str) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix:>12.cyan.bold} [{bar:30}] {pos}/{len} {wide_msg:.dim} ({eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        pb.set_prefix(message.to_string());
        pb.enable_steady_tick(Duration::from_millis(200));
        pb
    }

    /// A progress bar over `total` bytes (hidden when not on a terminal or quiet).
    pub fn progress_bytes(&self, total: u64, message: &str) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix:>12.cyan.bold} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {wide_msg:.dim} ({eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        pb.set_prefix(message.to_string());
        pb.enable_steady_tick(Duration::from_millis(200));
        pb
    }
}

/// How library code reports the progress of a long operation (tensors written, bytes sent or
/// received): implemented by the bars [`Printer::progress`] and [`Printer::progress_bytes`]
/// make, and by [`NoProgress`]. Shared across worker threads.
pub trait Progress: Send + Sync {
    /// Advance by `n` steps (or bytes).
    fn inc(&self, n: u64);
    /// Go back `n` steps (a retried download starts over).
    fn dec(&self, n: u64);
    /// Start over from 0 (a retried upload).
    fn reset(&self);
    /// `reader`, advancing this progress by every byte read through it.
    fn wrap_read(&self, reader: Box<dyn Read + Send>) -> Box<dyn Read + Send>;
}

impl Progress for ProgressBar {
    fn inc(&self, n: u64) {
        ProgressBar::inc(self, n)
    }
    fn dec(&self, n: u64) {
        ProgressBar::dec(self, n)
    }
    fn reset(&self) {
        self.set_position(0)
    }
    fn wrap_read(&self, reader: Box<dyn Read + Send>) -> Box<dyn Read + Send> {
        Box::new(ProgressBar::wrap_read(self, reader))
    }
}

/// No progress report (library callers and tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn inc(&self, _: u64) {}
    fn dec(&self, _: u64) {}
    fn reset(&self) {}
    fn wrap_read(&self, reader: Box<dyn Read + Send>) -> Box<dyn Read + Send> {
        reader
    }
}
