//! Where xpm keeps its state: `$XPM_HOME` (default `~/.xpm`), each part overridable.

use std::path::PathBuf;

/// Resolved state directories.
#[derive(Debug, Clone)]
pub struct XpmHome {
    /// `$XPM_HOME`.
    pub root: PathBuf,
    /// Content caches (`$XPM_CACHE_DIR`, default `$XPM_HOME/cache`).
    pub cache: PathBuf,
}

impl XpmHome {
    /// Resolve from an explicit root (the `--home` flag), else `$XPM_HOME`, else `~/.xpm`.
    pub fn resolve(flag: Option<PathBuf>) -> Self {
        let root = flag
            .or_else(|| std::env::var_os("XPM_HOME").map(PathBuf::from))
            .unwrap_or_else(|| {
                std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("."))
                    .join(".xpm")
            });
        let cache = std::env::var_os("XPM_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("cache"));
        XpmHome { root, cache }
    }
}
