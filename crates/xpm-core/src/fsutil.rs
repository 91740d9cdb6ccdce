//! File-system helpers: atomic writes of files and directories.

use std::path::{Path, PathBuf};

use crate::error::{Error, IoResultExt, Result};

/// The directory a path lives in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A temporary file in the directory of `path` (so a rename onto `path` is atomic), and a
/// buffered writer on it. The file is removed if dropped before being persisted.
pub fn temp_file_beside(
    path: &Path,
) -> Result<(tempfile::NamedTempFile, std::io::BufWriter<std::fs::File>)> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(&dir).at("create directory", &dir)?;
    let tmp = tempfile::Builder::new()
        .prefix(".xpm-tmp-")
        .tempfile_in(&dir)
        .at("create a temporary file in", &dir)?;
    let file = tmp.as_file().try_clone().at("open", tmp.path())?;
    Ok((tmp, std::io::BufWriter::with_capacity(1 << 20, file)))
}

/// Write `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_impl(path, bytes, true)
}

/// [`write_atomic`] without the fsync: readers still see the old or the new file, never a torn
/// one, but a power loss may lose the new content. For caches that are checked on use.
pub fn write_atomic_nosync(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_impl(path, bytes, false)
}

fn write_atomic_impl(path: &Path, bytes: &[u8], sync: bool) -> Result<()> {
    let (tmp, mut w) = temp_file_beside(path)?;
    std::io::Write::write_all(&mut w, bytes).at("write", path)?;
    let file = w
        .into_inner()
        .map_err(|e| Error::io("write", path, e.into_error()))?;
    if sync {
        file.sync_all().at("write", path)?;
    }
    tmp.persist(path)
        .map_err(|e| Error::io("write", path, e.error))?;
    Ok(())
}

/// Build a directory atomically: `fill` populates a temporary sibling directory, which is then
/// renamed to `dest`. `dest` must not exist, or be an empty directory. On error nothing is left.
pub fn build_dir_atomic<T>(dest: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    if dest.exists() {
        let empty = dest.is_dir()
            && std::fs::read_dir(dest)
                .at("read directory", dest)?
                .next()
                .is_none();
        if !empty {
            return Err(Error::input(
                format!("`{}` already exists and is not empty", dest.display()),
                Some("choose another output directory, or remove this one first"),
            ));
        }
    }
    let parent = parent_dir(dest);
    std::fs::create_dir_all(&parent).at("create directory", &parent)?;
    let tmp = tempfile::Builder::new()
        .prefix(".xpm-tmp-")
        .tempdir_in(&parent)
        .at("create a temporary directory in", &parent)?;
    let out = fill(tmp.path())?;
    if dest.exists() {
        std::fs::remove_dir(dest).at("replace", dest)?;
    }
    let tmp_path = tmp.keep();
    std::fs::rename(&tmp_path, dest).map_err(|e| {
        let _ = std::fs::remove_dir_all(&tmp_path);
        Error::io("create", dest, e)
    })?;
    Ok(out)
}

/// Open (creating) `path` and take an exclusive OS lock on it, blocking while another process
/// holds it; released when the file is dropped (or the process dies).
pub fn lock_file(path: &Path) -> Result<std::fs::File> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(&dir).at("create directory", &dir)?;
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .at("open", path)?;
    file.lock().at("lock", path)?;
    Ok(file)
}

/// Positional read of exactly `buf.len()` bytes at `offset`.
pub fn read_exact_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(not(unix))]
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = file;
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(buf)
    }
}
