//! `xpm unpack F.xpm -o DIR`: `manifest.json` plus a plain `tensors.safetensors`.

use std::path::Path;

use crate::error::Result;
use crate::format::ArtifactReader;
use crate::format::unpacked;
use crate::printer::Printer;

/// Unpack `artifact` into `out` (which must not exist or be empty), atomically.
///
/// Every byte is checked before use without a separate pass over the file: the prelude and
/// trailer fields structurally, the manifest against its sha256, and each frame against its own
/// digest as it is read (frames are contiguous and cover the payload, so together these cover
/// the whole file but the trailer's own file digest, which `xpm verify` checks).
pub fn unpack(artifact: &Path, out: &Path, printer: &Printer) -> Result<()> {
    let reader = ArtifactReader::open(artifact)?;
    let m = reader.manifest();
    printer.status(
        "Unpacking",
        format!("{}@{} to {}", m.name, m.version, out.display()),
    );
    let pb = printer.progress(unpacked::unpacked_tensor_count(m) as u64, "Unpacking");
    unpacked::unpack(&reader, out, &pb)?;
    pb.finish_and_clear();
    printer.status("Wrote", out.display());
    Ok(())
}
