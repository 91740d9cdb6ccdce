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

/// Refuse to replace `path` when it exists and is not a regular file (or a link to one): a
/// device, a FIFO, a socket or a directory. Writes replace their target by renaming a temporary
/// file onto it, which would destroy a device node (as root) or a pipe someone reads.
pub fn check_replaceable(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => Err(Error::input(
            format!(
                "`{}` is not a regular file ({}); xpm writes outputs by replacing the file and \
                 will not replace it",
                path.display(),
                if m.is_dir() {
                    "a directory"
                } else {
                    "a device, FIFO or socket"
                }
            ),
            Some("choose a path for a new or regular file, e.g. `-o out.xpm`"),
        )),
        _ => Ok(()),
    }
}

/// Check a command's outputs before it starts: no output is a special file
/// ([`check_replaceable`]), no two outputs are the same file, and no output is one of the
/// `inputs` (by path or by inode: a hard link or a symlink counts). A command that would
/// overwrite what it reads is refused, instead of destroying its input.
pub fn check_outputs(outputs: &[(&str, &Path)], inputs: &[&Path]) -> Result<()> {
    for (i, (flag, out)) in outputs.iter().enumerate() {
        check_replaceable(out)?;
        for (other_flag, other) in &outputs[..i] {
            if same_file(out, other) {
                return Err(Error::input(
                    format!(
                        "{other_flag} and {flag} both name `{}`; one would overwrite the other",
                        out.display()
                    ),
                    Some("give each output its own path"),
                ));
            }
        }
        if let Some(input) = inputs.iter().find(|i| same_file(out, i)) {
            return Err(Error::input(
                format!(
                    "{flag} `{}` is also an input (`{}`); writing it would destroy the input",
                    out.display(),
                    input.display()
                ),
                Some("write the output to another path"),
            ));
        }
    }
    Ok(())
}

/// Say which output directories do not exist yet (the write creates them), so that a typo in
/// `-o` does not silently make a new directory tree.
pub fn announce_new_parents(outputs: &[(&str, &Path)], printer: &crate::printer::Printer) {
    for (flag, out) in outputs {
        let dir = parent_dir(out);
        if !dir.exists() {
            printer.status(
                "Creating",
                format!("directory `{}` for {flag}", dir.display()),
            );
        }
    }
}

/// The files a command reads at `path`: the files directly in it when it is a directory (a
/// model or an unpacked expert), else `path` itself.
pub fn files_of(path: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(path) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(_) => vec![path.to_path_buf()],
    }
}

/// Whether `a` and `b` are the same file: the same inode when both exist, else the same
/// absolute path (a file that does not exist yet).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(ma), Ok(mb)) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::MetadataExt as _;
                ma.dev() == mb.dev() && ma.ino() == mb.ino()
            }
            #[cfg(not(unix))]
            {
                let _ = (ma, mb);
                std::fs::canonicalize(a).ok() == std::fs::canonicalize(b).ok()
            }
        }
        (Err(_), Err(_)) => absolute(a) == absolute(b),
        _ => false,
    }
}

/// `path` made absolute against the working directory, with `.` and `..` resolved lexically
/// and the existing part of it canonicalized.
fn absolute(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (abs.parent(), abs.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir)
            .map(|d| d.join(name))
            .unwrap_or(abs.clone()),
        _ => abs,
    }
}

/// A builder for xpm's temporary files and directories (`.xpm-tmp-*`), created with the modes
/// an ordinary file gets (`0666` and `0777` less the umask) instead of tempfile's private
/// `0600`/`0700`: what xpm writes by renaming a temporary file (artifacts, `xpm.toml`,
/// `xpm.lock`, registry indexes and blobs, applied models) must be readable by whoever the
/// user's umask allows, e.g. a team sharing a registry directory.
pub fn temp_builder(dir: bool) -> tempfile::Builder<'static, 'static> {
    let mut b = tempfile::Builder::new();
    b.prefix(".xpm-tmp-");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        b.permissions(std::fs::Permissions::from_mode(if dir {
            0o777
        } else {
            0o666
        }));
    }
    #[cfg(not(unix))]
    let _ = dir;
    b
}

/// A temporary file in the directory of `path` (so a rename onto `path` is atomic), and a
/// buffered writer on it. The file is removed if dropped before being persisted. Refuses a
/// `path` that is a special file ([`check_replaceable`]).
pub fn temp_file_beside(
    path: &Path,
) -> Result<(tempfile::NamedTempFile, std::io::BufWriter<std::fs::File>)> {
    check_replaceable(path)?;
    let dir = parent_dir(path);
    std::fs::create_dir_all(&dir).at("create directory", &dir)?;
    let tmp = temp_builder(false)
        .tempfile_in(&dir)
        .at("create a temporary file in", &dir)?;
    // Replacing a file keeps its mode (a 0644 `xpm.toml` stays 0644).
    if let Ok(m) = std::fs::metadata(path) {
        std::fs::set_permissions(tmp.path(), m.permissions()).at("set the mode of", tmp.path())?;
    }
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
    let tmp = temp_builder(true)
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
/// holds it (and saying so through `printer`); released when the file is dropped (or the
/// process dies).
pub fn lock_file(path: &Path, printer: &crate::printer::Printer) -> Result<std::fs::File> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(&dir).at("create directory", &dir)?;
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .at("open", path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            printer.status(
                "Waiting",
                format!(
                    "for the lock on `{}` (another xpm process is using it)",
                    path.display()
                ),
            );
            file.lock().at("lock", path)?;
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io("lock", path, e)),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_that_are_inputs_special_files_or_each_other_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let input = d.path().join("in.xpm");
        std::fs::write(&input, b"x").unwrap();
        let link = d.path().join("link.xpm");
        std::fs::hard_link(&input, &link).unwrap();
        let out = d.path().join("out.xpm");
        assert!(check_outputs(&[("-o", &out)], &[&input]).is_ok());
        for same in [input.clone(), link, d.path().join("sub/../in.xpm")] {
            std::fs::create_dir_all(d.path().join("sub")).unwrap();
            let e = check_outputs(&[("-o", &same)], &[&input]).unwrap_err();
            assert!(e.to_string().contains("is also an input"), "{e}");
        }
        let e = check_outputs(&[("-o", &out), ("--eval-out", &out)], &[]).unwrap_err();
        assert!(e.to_string().contains("both name"), "{e}");
        let e = check_outputs(&[("-o", Path::new("/dev/null"))], &[]).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = check_outputs(&[("-o", d.path())], &[]).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        assert!(temp_file_beside(Path::new("/dev/full")).is_err());
    }
}
