//! `xpm publish F.xpm`: verify an artifact completely, then add it to a registry.

use std::path::Path;

use crate::error::{Error, IoResultExt, Result};
use crate::format::ArtifactReader;
use crate::home::XpmHome;
use crate::printer::Printer;
use crate::registry::{self, ClientOptions, IndexLine};

/// Publish `artifact` to the registry at `location`; returns the recorded index line.
pub fn publish(
    home: &XpmHome,
    artifact: &Path,
    location: &str,
    opts: &ClientOptions,
    sign: Option<&super::trust::SignRequest>,
    printer: &Printer,
) -> Result<IndexLine> {
    printer.status("Verifying", artifact.display());
    let report = super::verify::verify(artifact, printer)?;
    let manifest = ArtifactReader::open(artifact)?.manifest().clone();
    crate::format::manifest::validate_name(&manifest.name).map_err(|e| {
        Error::input(
            format!("`{}` cannot be published: {e}", artifact.display()),
            Some(registry::index::NAME_HINT),
        )
    })?;
    let size = std::fs::metadata(artifact).at("read", artifact)?.len();
    let mut line = IndexLine::for_artifact(&manifest, &report.sha256, size);
    let reg = registry::open(location, home, opts, true)?;
    if let Some(req) = sign {
        let id = super::trust::sign_line(req, artifact, reg.source(), &mut line)?;
        printer.status("Signed", format!("{} with key {id}", line.id()));
    }
    printer.status("Publishing", format!("{} to {}", line.id(), reg.source()));
    let pb = printer.progress_bytes(size, "Uploading");
    let out = reg.publish(artifact, &line, &pb);
    pb.finish_and_clear();
    out
}
