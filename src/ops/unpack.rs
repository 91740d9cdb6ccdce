//! `xpm unpack F.xpm -o DIR`: `manifest.json` plus a plain `tensors.safetensors`.

use std::path::Path;

use crate::error::Result;
use crate::format::ArtifactReader;
use crate::format::unpacked;
use crate::printer::Printer;

/// Verify `artifact` completely, then unpack it into `out` (which must not exist or be empty).
pub fn unpack(artifact: &Path, out: &Path, printer: &Printer) -> Result<()> {
    let reader = ArtifactReader::open(artifact)?;
    reader.verify_file_digest()?;
    let m = reader.manifest();
    printer.status(
        "Unpacking",
        format!("{}@{} to {}", m.name, m.version, out.display()),
    );
    let pb = printer.progress(unpacked::unpacked_tensor_count(m) as u64, "Unpacking");
    unpacked::unpack(&reader, out, |done| pb.set_position(done as u64))?;
    pb.finish_and_clear();
    printer.status("Wrote", out.display());
    Ok(())
}
