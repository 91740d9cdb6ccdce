//! `xpm registry serve …`: hands over to the `xpm-registry` server binary (the `registry/`
//! crate), found next to `xpm` or on `PATH`, with the same arguments.
//!
//! On Unix the server replaces this process (`exec`), so signals sent to `xpm registry serve`
//! (`kill -TERM`, Ctrl-C) reach the server itself and nothing is left running on the port.

use std::process::Command;

use super::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Arguments for `xpm-registry` (e.g. `serve --root DIR --addr 127.0.0.1:8417`)
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<String>,
}

pub fn exec(a: Args, _ctx: &Context) -> anyhow::Result<()> {
    let exe_name = format!("xpm-registry{}", std::env::consts::EXE_SUFFIX);
    let beside = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(&exe_name)))
        .filter(|p| p.is_file());
    let program = beside.unwrap_or_else(|| exe_name.clone().into());
    let mut cmd = Command::new(&program);
    cmd.args(&a.args);
    let cannot_run = |e: std::io::Error| {
        anyhow::Error::new(e).context(format!(
            "cannot run `{}`; install the registry server with \
             `cargo install --locked --path registry` beside `xpm` (or build both with \
             `cargo build --release -p xpm-cli -p xpm-registry`)",
            program.display()
        ))
    };
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt as _;
        // `exec` returns only when it failed.
        Err(cannot_run(cmd.exec()))
    }
    #[cfg(not(unix))]
    {
        let status = cmd.status().map_err(cannot_run)?;
        match status.code() {
            Some(0) => Ok(()),
            code => Err(super::ExitWith(code.unwrap_or(1).clamp(1, 255) as u8).into()),
        }
    }
}
