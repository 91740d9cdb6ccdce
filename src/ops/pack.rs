//! `xpm pack DIR -o F.xpm`: an artifact from the unpacked layout.

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::manifest::{FORMAT_MAJOR, FORMAT_MINOR, validate_name};
use crate::format::unpacked::UnpackedDir;
use crate::format::{ArtifactWriter, Manifest, encode_tensor};
use crate::printer::Printer;

/// Pack the unpacked expert in `dir` into `out`. Returns the written manifest.
pub fn pack(dir: &Path, out: &Path, level: i32, printer: &Printer) -> Result<Manifest> {
    let inputs = crate::fsutil::files_of(dir);
    let inputs: Vec<&Path> = inputs.iter().map(|p| p.as_path()).collect();
    crate::fsutil::check_outputs(&[("-o", out)], &inputs)?;
    crate::fsutil::announce_new_parents(&[("-o", out)], printer);
    let src = UnpackedDir::open(dir)?;
    let m = src.manifest();
    validate_name(&m.name).map_err(|e| {
        Error::input(
            format!(
                "`{}`: invalid expert name: {e}",
                dir.join("manifest.json").display()
            ),
            Some("names use lowercase letters, digits, `-` and `_`, with an optional `namespace/`"),
        )
    })?;
    if let Some((major, _)) = m.format()
        && major > FORMAT_MAJOR
    {
        return Err(Error::input(
            format!(
                "`{}` is for xpm format {}, this xpm writes {FORMAT_MAJOR}.{FORMAT_MINOR}",
                dir.display(),
                m.format_version
            ),
            Some("upgrade xpm to pack it"),
        ));
    }
    printer.status(
        "Packing",
        format!("{}@{} from {}", m.name, m.version, dir.display()),
    );
    let pb = printer.progress(m.tensors.len() as u64, "Packing");
    let mut writer = ArtifactWriter::create(out, level)?;
    let idx: Vec<usize> = (0..m.tensors.len()).collect();
    crate::parallel::map_ordered(
        &idx,
        |&i| {
            let e = src
                .tensor(i)
                .and_then(|t| encode_tensor(&t, level))
                .and_then(|e| {
                    // Keep the "new tensor" mark (a task head) of the manifest entry.
                    if m.tensors[i].new {
                        e.mark_new()
                    } else {
                        Ok(e)
                    }
                });
            pb.inc(1);
            e
        },
        |e| writer.push(e),
    )?;
    pb.finish_and_clear();
    let manifest = writer.finish(m.clone())?;
    printer.status("Wrote", out.display());
    Ok(manifest)
}
