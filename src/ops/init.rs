//! `xpm init`: write a commented `xpm.toml` in a directory.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fsutil::write_atomic;
use crate::project::{MANIFEST, template};

pub fn init(dir: &Path, registry: Option<&str>, base: Option<&str>) -> Result<PathBuf> {
    let path = dir.join(MANIFEST);
    if path.exists() {
        return Err(Error::input(
            format!("`{}` already exists", path.display()),
            Some("edit it, or add experts with `xpm install NAME@REQ`"),
        ));
    }
    write_atomic(&path, template(registry, base).as_bytes())?;
    Ok(path)
}
