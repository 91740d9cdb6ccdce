//! `xpm registry serve …`: hands over to the `xpm-registry` server binary (the `registry/`
//! crate), found next to `xpm` or on `PATH`, with the same arguments.

use std::process::Command;

use anyhow::Context as _;

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
    let status = Command::new(&program)
        .args(&a.args)
        .status()
        .with_context(|| {
            format!(
                "cannot run `{}`; install the registry server with \
                 `cargo install --path registry` (or build it with `cargo build -p xpm-registry`)",
                program.display()
            )
        })?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}
