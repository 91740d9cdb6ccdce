//! The library's error type.
//!
//! Every error names what failed and on which file, tensor or version; [`Error::hint`] gives the
//! user something to try. The CLI prints `error: …`, the `Caused by:` chain, then `hint: …`.

use std::io;
use std::path::{Path, PathBuf};

/// `e` and its sources on one line (`a: b: c`); a source whose text the line already holds is
/// left out (many errors repeat their source's message).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in xpm's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system level failure on a named path.
    #[error("cannot {action} `{}`", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The artifact is damaged, truncated, or internally inconsistent.
    #[error("`{}` is not a valid xpm artifact: {detail}", path.display())]
    Corrupt { path: PathBuf, detail: String },
    /// The artifact was written by a newer xpm with an incompatible format.
    #[error(
        "`{}` uses xpm format {found}, but this xpm reads format {supported}.x only",
        path.display()
    )]
    UnsupportedFormat {
        path: PathBuf,
        found: String,
        supported: u16,
    },
    /// The user gave something xpm cannot work with (a flag, a file's content, a name): the one
    /// kind a server answers with 4xx.
    #[error("{message}")]
    Input {
        message: String,
        hint: Option<String>,
    },
    /// The request conflicts with what exists (e.g. publishing a version that exists).
    #[error("{message}")]
    Conflict {
        message: String,
        hint: Option<String>,
    },
    /// A computation failed in a backend (Candle, CUDA, zstd, a tokenizer): not the user's
    /// input. `what` says what was being done; the backend's own error is the source.
    #[error("{what}")]
    Compute {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A merge plugin failed, misbehaved or could not be loaded.
    #[error("plugin `{plugin}`: {message}")]
    Plugin {
        plugin: String,
        message: String,
        hint: Option<String>,
    },
    /// A broken invariant: a bug in xpm.
    #[error("internal error: {0}")]
    Internal(String),
    /// A registry refused a request, could not be reached, or sent something wrong.
    #[error("{message} ({url})")]
    Registry {
        url: String,
        message: String,
        hint: Option<String>,
        /// Worth retrying (connection refused or reset, timeout, 5xx, 429).
        transient: bool,
    },
}

impl Error {
    /// A suggestion for the user, printed after the error chain.
    pub fn hint(&self) -> Option<String> {
        match self {
            Error::Io { source, .. } => match source.kind() {
                io::ErrorKind::NotFound => Some("check that the path exists".into()),
                io::ErrorKind::PermissionDenied => {
                    Some("check the file permissions, or choose another location".into())
                }
                _ => None,
            },
            Error::Corrupt { path, .. } => Some(format!(
                "the file is damaged or truncated; fetch it again or re-create it with `xpm pack`, \
                 and run `xpm verify {}` to check it",
                path.display()
            )),
            Error::UnsupportedFormat { .. } => Some(
                "upgrade xpm (from a clone of its repository: `cargo install --locked --path .`) \
                     to read this artifact"
                    .to_string(),
            ),
            Error::Input { hint, .. }
            | Error::Conflict { hint, .. }
            | Error::Plugin { hint, .. }
            | Error::Registry { hint, .. } => hint.clone(),
            Error::Compute { .. } => None,
            Error::Internal(_) => Some(
                "this is a bug in xpm; please report it with the command that triggered it".into(),
            ),
        }
    }

    /// An I/O error on `path` while doing `action` (a verb: "open", "read", "write", …).
    pub fn io(action: &'static str, path: impl AsRef<Path>, source: io::Error) -> Self {
        Error::Io {
            action,
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A damaged or inconsistent artifact.
    pub fn corrupt(path: impl AsRef<Path>, detail: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.as_ref().to_path_buf(),
            detail: detail.into(),
        }
    }

    /// A backend failure while doing `what`, keeping the backend's error as the source.
    pub fn compute(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Compute {
            what: what.into(),
            source: source.into(),
        }
    }

    /// Whether the user's input caused this error (and a server should answer 4xx).
    pub fn is_input(&self) -> bool {
        matches!(
            self,
            Error::Input { .. }
                | Error::Conflict { .. }
                | Error::Corrupt { .. }
                | Error::UnsupportedFormat { .. }
        )
    }

    /// Bad user input, with an optional hint.
    pub fn input(message: impl Into<String>, hint: Option<&str>) -> Self {
        Error::Input {
            message: message.into(),
            hint: hint.map(str::to_string),
        }
    }
}

impl Error {
    /// A registry error that is not worth retrying.
    pub fn registry(
        url: impl Into<String>,
        message: impl Into<String>,
        hint: Option<&str>,
    ) -> Self {
        Error::Registry {
            url: url.into(),
            message: message.into(),
            hint: hint.map(str::to_string),
            transient: false,
        }
    }

    /// Whether retrying the same request may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Registry {
                transient: true,
                ..
            }
        )
    }
}

/// Adds the path to `std::io::Result`s.
pub trait IoResultExt<T> {
    /// Wrap an I/O error with the action and the path it concerned.
    fn at(self, action: &'static str, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoResultExt<T> for io::Result<T> {
    fn at(self, action: &'static str, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(action, path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn compute_errors_keep_their_source_and_are_not_input_errors() {
        let e = Error::compute(
            "forward pass of layer 3",
            std::io::Error::other("CUDA_ERROR_OUT_OF_MEMORY"),
        );
        assert_eq!(e.to_string(), "forward pass of layer 3");
        let source = std::error::Error::source(&e).expect("a source");
        assert_eq!(source.to_string(), "CUDA_ERROR_OUT_OF_MEMORY");
        assert!(!e.is_input());
        assert!(Error::input("bad flag", None).is_input());
        assert!(!Error::Internal("x".into()).is_input());
        assert!(Error::Internal("x".into()).hint().unwrap().contains("bug"));
    }
}
