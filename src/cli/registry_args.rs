//! Flags shared by the commands that talk to a registry.

use crate::home::XpmHome;
use crate::project::Project;
use crate::registry::ClientOptions;

#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// Registry: an http(s):// URL, an s3://BUCKET/PREFIX bucket (credentials from AWS_*, the
    /// endpoint from $XPM_S3_ENDPOINT), an oci://HOST/NAMESPACE registry (credentials from
    /// $XPM_OCI_USERNAME and $XPM_OCI_PASSWORD, --token or ~/.docker/config.json), an
    /// hf://ORG/REPO Hugging Face repository (token from --token, $HF_TOKEN or `hf auth login`;
    /// $HF_ENDPOINT for a mirror), a file:// URL or a directory [default: xpm.toml's `registry`, else the local registry at
    /// $XPM_HOME/registry]
    #[arg(long, env = "XPM_REGISTRY", value_name = "URL")]
    pub registry: Option<String>,
    /// Token for publish and yank; the Bearer token of an oci:// registry, the token of an hf://
    /// one (never printed)
    #[arg(long, env = "XPM_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub token: Option<String>,
}

impl RegistryArgs {
    pub fn client(&self, printer: &crate::printer::Printer) -> ClientOptions {
        ClientOptions {
            token: self.token.clone(),
            offline: false,
            printer: *printer,
            hub: crate::hf::HubConfig::from_env(),
        }
    }

    /// The registry to talk to, with `xpm.toml` found from the working directory.
    pub fn location(&self, home: &XpmHome) -> anyhow::Result<String> {
        let cwd = std::env::current_dir()?;
        let project = Project::discover(&cwd)?;
        Ok(crate::ops::install::registry_location(
            self.registry.as_deref(),
            &project,
            home,
        ))
    }
}
