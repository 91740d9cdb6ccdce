use super::Context;
use super::output::OutputArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Create a minisign signing key in $XPM_HOME/keys (NAME.key and NAME.pub)
    Generate {
        /// The key's name, e.g. `team-release`
        name: String,
        /// Store the secret key unencrypted (otherwise it is encrypted with $XPM_KEY_PASSWORD)
        #[arg(long)]
        no_password: bool,
        #[command(flatten)]
        output: OutputArgs,
    },
}

pub fn exec(a: Args, ctx: &Context) -> anyhow::Result<()> {
    match a.cmd {
        Cmd::Generate {
            name,
            no_password,
            output,
        } => {
            let password = match (std::env::var("XPM_KEY_PASSWORD").ok(), no_password) {
                (_, true) => None,
                (Some(p), false) if !p.is_empty() => Some(p),
                _ => {
                    return Err(crate::Error::input(
                        "set $XPM_KEY_PASSWORD to encrypt the new secret key",
                        Some("or pass --no-password to store it unencrypted (only where the file is protected otherwise)"),
                    )
                    .into());
                }
            };
            let k = crate::ops::trust::generate_key(&ctx.home, &name, password)?;
            output.format().print(&ctx.printer, &k, |k| {
                ctx.printer.out(&k.public_key);
                ctx.printer.status(
                    "Generated",
                    format!(
                        "key `{}` (ID {}): secret key {}{}, public key {}",
                        k.name,
                        k.key_id,
                        k.secret_key_file.display(),
                        if k.encrypted {
                            " (encrypted)"
                        } else {
                            " (unencrypted)"
                        },
                        k.public_key_file.display()
                    ),
                );
            })
        }
    }
}
