//! `xpm yank NAME@VERSION [--undo]`: hide a version from resolution (lockfiles that pin it
//! still install it), or bring it back.

use crate::error::{Error, Result};
use crate::home::XpmHome;
use crate::printer::Printer;
use crate::registry::{self, ClientOptions, IndexLine};

/// Split `name@version` (an exact version).
pub fn parse_exact(spec: &str) -> Result<(String, semver::Version)> {
    let hint = "write NAME@VERSION with an exact version, e.g. `sst2@1.2.0`";
    let (name, v) = spec
        .split_once('@')
        .ok_or_else(|| Error::input(format!("`{spec}` names no version"), Some(hint)))?;
    crate::format::manifest::validate_name(name).map_err(|e| {
        Error::input(
            format!("invalid expert name: {e}"),
            Some(registry::index::NAME_HINT),
        )
    })?;
    let v = semver::Version::parse(v.trim_start_matches('='))
        .map_err(|e| Error::input(format!("`{v}` is not an exact version: {e}"), Some(hint)))?;
    Ok((name.to_string(), v))
}

pub fn yank(
    home: &XpmHome,
    spec: &str,
    undo: bool,
    location: &str,
    opts: &ClientOptions,
    printer: &Printer,
) -> Result<IndexLine> {
    let (name, version) = parse_exact(spec)?;
    let reg = registry::open(location, home, opts, false)?;
    let verb = if undo { "Unyanking" } else { "Yanking" };
    printer.status(verb, format!("{name}@{version} in {}", reg.source()));
    reg.set_yanked(&name, &version, !undo)
}
