//! One operation per verb. Each takes validated options and a [`Printer`](crate::printer::Printer)
//! and returns a typed result; the CLI layer only parses flags and renders results.

pub mod data_import;
pub mod demo;
pub mod extract;
pub mod init;
pub mod inspect;
pub mod install;
pub mod interop;
pub mod list;
pub mod merge;
pub mod overlap;
pub mod owner;
pub mod pack;
pub mod plugin;
pub mod publish;
pub mod search;
pub mod trust;
pub mod unpack;
pub use crate::format::verify;
pub mod yank;

/// `xpm apply` is the merge crate's [`apply`](crate::merge::apply::apply).
pub use crate::merge::apply;

/// The artifact an operation writes when `-o` is not given: `NAME-VERSION.xpm`, the `/` of a
/// namespace as `-`.
pub fn default_out(name: &str, version: &semver::Version) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("{}-{version}.xpm", name.replace('/', "-")))
}

/// Paths of merge inputs: `.xpm` files as given, installed experts (`name`, `name@req`) from the
/// store, at the version the lockfile of the project around `cwd` pins (else the highest
/// installed).
pub fn locate_experts(
    inputs: &[String],
    cwd: &std::path::Path,
    home: &crate::home::XpmHome,
) -> crate::Result<Vec<std::path::PathBuf>> {
    let project = crate::project::Project::discover(cwd)?;
    let lock = project.read_lock()?;
    let store = crate::store::Store::new(home);
    inputs
        .iter()
        .map(|e| store.locate(e, lock.as_ref()))
        .collect()
}
