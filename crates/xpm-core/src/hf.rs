//! Where the Hugging Face Hub is and who asks: `HF_ENDPOINT`, `HF_TOKEN` and `HF_HOME`, read as
//! Python's `huggingface_hub` reads them. Shared by base-model downloads (`hf:ORG/NAME`) and the
//! `hf://` registry backend.

use std::path::PathBuf;

/// The hub's default address.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How to reach the Hugging Face Hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// The hub's address (`HF_ENDPOINT`), default [`DEFAULT_ENDPOINT`].
    pub endpoint: String,
    /// A token for gated or private repositories and for writes (`HF_TOKEN`, when not empty).
    /// Without it, the token file `hf auth login` writes (`$HF_HOME/token`) is used if there
    /// is one.
    pub token: Option<String>,
    /// The Hugging Face directory (`HF_HOME`): the cache is its `hub/`, the token file its
    /// `token`. Default: `~/.cache/huggingface`.
    pub home: Option<PathBuf>,
}

impl Default for HubConfig {
    /// The public hub, no token but the token file, the default cache.
    fn default() -> Self {
        HubConfig {
            endpoint: DEFAULT_ENDPOINT.to_string(),
            token: None,
            home: None,
        }
    }
}

impl HubConfig {
    /// From `HF_ENDPOINT`, `HF_TOKEN` and `HF_HOME`. Called once, at the command edge; library
    /// code takes a `HubConfig`.
    pub fn from_env() -> Self {
        HubConfig {
            endpoint: std::env::var("HF_ENDPOINT")
                .ok()
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.into())
                .trim_end_matches('/')
                .to_string(),
            token: std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()),
            home: std::env::var("HF_HOME").ok().map(PathBuf::from),
        }
    }

    /// The Hugging Face directory: `HF_HOME`, else `~/.cache/huggingface`.
    pub fn home_dir(&self) -> Option<PathBuf> {
        self.home.clone().or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("huggingface"))
        })
    }

    /// The token to send: `HF_TOKEN`, else the token file's first line, else none.
    pub fn effective_token(&self) -> Option<String> {
        if let Some(t) = &self.token {
            return Some(t.clone());
        }
        let file = self.home_dir()?.join("token");
        let text = std::fs::read_to_string(file).ok()?;
        let t = text.lines().next().unwrap_or("").trim();
        // A token is printable ASCII; anything else in the file is not one (and must not
        // reach a header).
        (!t.is_empty() && t.len() <= 512 && t.bytes().all(|b| b.is_ascii_graphic()))
            .then(|| t.to_string())
    }
}
