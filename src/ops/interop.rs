//! `xpm import` and `xpm export`: experts from PEFT adapters and mttl libraries, and any expert
//! out as a PEFT adapter directory (the formats: `xpm_interop`; docs/interop.md).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Serialize;
use xpm_interop::peft_export::{ExportOptions, ExportReport};
use xpm_interop::{Imported, PendingKind, Source};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::format::manifest::{
    BaseModel, ExpertKind, FORMAT_MAJOR, FORMAT_MINOR, Manifest, Provenance, ProvenanceInput,
};
use crate::format::{ArtifactReader, ArtifactWriter, Content, Delta, TensorData};
use crate::home::XpmHome;
use crate::printer::Printer;
use crate::train::hub::HubConfig;

/// What an import writes, besides the tensors.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub name: String,
    pub version: semver::Version,
    /// The artifact to write; default `NAME-VERSION.xpm` (the `/` of a namespace as `-`).
    pub out: Option<PathBuf>,
    /// `--base`: a model directory or `hf:ORG/NAME[@REV]`.
    pub base: String,
    pub description: Option<String>,
    pub level: i32,
}

impl ImportOptions {
    pub fn out_path(&self) -> PathBuf {
        self.out
            .clone()
            .unwrap_or_else(|| super::default_out(&self.name, &self.version))
    }
}

/// The name and output of each expert of an mttl import of `experts` (the library's expert
/// names): `name` names a single expert (refused with several), else each is named after
/// itself, lowercased; `out` is the artifact for one expert, or for several the directory that
/// receives each `NAME-VERSION.xpm` (`None`: the default path of each).
pub fn mttl_targets(
    experts: &[String],
    name: Option<&str>,
    out: Option<&Path>,
    version: &semver::Version,
) -> Result<Vec<(String, Option<PathBuf>)>> {
    if experts.len() > 1 && name.is_some() {
        return Err(Error::input(
            "`--name` names one expert, but several are imported",
            Some("import them one at a time to name each, or drop `--name`"),
        ));
    }
    Ok(experts
        .iter()
        .map(|e| {
            let name = name.map_or_else(|| e.to_ascii_lowercase(), str::to_string);
            let out = match (out, experts.len()) {
                (Some(o), 1) => Some(o.to_path_buf()),
                (Some(dir), _) => Some(dir.join(super::default_out(&name, version))),
                (None, _) => None,
            };
            (name, out)
        })
        .collect())
}

/// The result of an import, for `--json` and the summary line.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    pub name: String,
    pub version: String,
    pub kind: ExpertKind,
    pub out: PathBuf,
    pub base: BaseModel,
    pub source: Source,
    pub tensors: usize,
    pub new_tensors: usize,
    pub notes: Vec<String>,
}

/// Check the name before any work starts.
pub fn validate(opts: &ImportOptions) -> Result<()> {
    crate::format::manifest::validate_name(&opts.name).map_err(|e| {
        Error::input(
            format!("invalid expert name: {e}"),
            Some("e.g. `sst2-lora` or `team/sst2-lora`"),
        )
    })
}

/// Open the base model (`--base`), its directory and the id a manifest records.
pub fn open_base(
    base: &str,
    hub: &HubConfig,
    printer: &Printer,
) -> Result<(Checkpoint, PathBuf, String)> {
    let (dir, id) = crate::train::hub::resolve_base_with(base, hub, printer)?;
    let ck = Checkpoint::open(&dir)?;
    Ok((ck, dir, id))
}

/// Write an imported expert as an artifact.
pub fn write_imported(
    mut imported: Imported,
    base: &Checkpoint,
    base_id: String,
    opts: &ImportOptions,
    home: &XpmHome,
    printer: &Printer,
) -> Result<ImportReport> {
    let out = opts.out_path();
    crate::fsutil::check_outputs(&[("-o", &out)], &[])?;
    crate::fsutil::announce_new_parents(&[("-o", &out)], printer);
    if imported.tensors.is_empty() {
        return Err(Error::input(
            format!("`{}` holds no tensor to import", imported.source.location),
            None,
        ));
    }
    printer.status("Hashing", format!("base model `{}`", base.root().display()));
    let digest = base.digest(Some(&home.cache))?;
    let kind = if imported.tensors.iter().any(|t| t.kind == PendingKind::Lora) {
        ExpertKind::Lora
    } else if imported
        .tensors
        .iter()
        .any(|t| !t.new && t.kind == PendingKind::Sparse)
    {
        ExpertKind::Sparse
    } else {
        ExpertKind::Dense
    };
    let new_tensors = imported.tensors.iter().filter(|t| t.new).count();
    let n = imported.tensors.len();
    let mut writer = ArtifactWriter::create(&out, opts.level)?;
    let pb = printer.progress(n as u64, "Importing");
    // Copy out of the source and encode on every core (zstd dominates), but leave the source's
    // hash its own core; the artifact keeps the import's order, and only the tensors in
    // flight are in memory.
    crate::parallel::map_ordered_on(
        encoders(rayon::current_num_threads(), imported.hashing()),
        &imported.tensors,
        |p| {
            let e = p.encode(opts.level)?;
            pb.inc(1);
            Ok(e)
        },
        |e| writer.push(e),
    )?;
    pb.finish_and_clear();
    let base_model = BaseModel {
        id: base_id,
        digest: digest.clone(),
    };
    let source = imported.finish_source()?;
    let mut extra_prov = std::collections::BTreeMap::new();
    extra_prov.insert(
        "source".to_string(),
        serde_json::to_value(&source).expect("json"),
    );
    let manifest = Manifest {
        format_version: format!("{FORMAT_MAJOR}.{FORMAT_MINOR}"),
        name: opts.name.clone(),
        version: opts.version.clone(),
        description: opts.description.clone(),
        license: None,
        authors: Vec::new(),
        base: base_model.clone(),
        kind,
        tensors: Vec::new(),
        selection: None,
        training: None,
        provenance: Some(Provenance {
            tool: format!("xpm {}", env!("CARGO_PKG_VERSION")),
            inputs: vec![ProvenanceInput {
                role: "base".into(),
                name: base.root().display().to_string(),
                digest: Some(digest),
                content_digest: None,
            }],
            extra: extra_prov,
        }),
        payload: None,
        extra: imported.extra,
    };
    writer.finish(manifest)?;
    for note in &imported.notes {
        printer.warn(note);
    }
    printer.status(
        "Imported",
        format!(
            "{}@{} ({} expert, {n} tensors) from {} into {}",
            opts.name,
            opts.version,
            kind,
            imported.source.location,
            out.display()
        ),
    );
    Ok(ImportReport {
        name: opts.name.clone(),
        version: opts.version.to_string(),
        kind,
        out,
        base: base_model,
        source,
        tensors: n,
        new_tensors,
        notes: imported.notes,
    })
}

/// `xpm import peft SRC`: SRC is a directory, or `hf:ORG/NAME[@REV]`.
pub fn import_peft(
    src: &str,
    opts: &ImportOptions,
    home: &XpmHome,
    hub: &HubConfig,
    printer: &Printer,
) -> Result<ImportReport> {
    validate(opts)?;
    let SourceDir {
        dir,
        from_hub,
        verified,
    } = fetch_source(src, &xpm_interop::peft::HUB_FILES, hub, printer)?;
    let (base, _, base_id) = open_base(&opts.base, hub, printer)?;
    printer.status("Reading", format!("PEFT adapter `{}`", dir.display()));
    let mut imported = xpm_interop::peft::import_with(&dir, &base, &verified)?;
    if let Some((repo, rev)) = from_hub {
        imported.source.location = format!("hf:{repo}");
        imported.source.revision = Some(rev);
    } else {
        imported.source.location = src.to_string();
    }
    write_imported(imported, &base, base_id, opts, home, printer)
}

/// Encoder threads for an import on `cores` cores, given whether a source file is `hashing`
/// meanwhile (its SHA-256 for provenance: one sequential stream on a thread of its own, the
/// least time an import can take). The scheduler shares the cores alike among busy threads: on
/// 2 cores, beside 2 encoders and the writer, the hash got about 55 % of a core (1.13–1.31 s
/// where it takes 0.67 s alone). Where that would make the hash the import's critical path, the
/// encoders leave it a core, and the writer one: from 4 cores, 2 fewer encoders; on 3, one
/// fewer. On 1 or 2 cores the total CPU time binds, and every core encodes.
fn encoders(cores: usize, hashing: bool) -> usize {
    match (hashing, cores) {
        (true, 3) => 2,
        (true, n) if n >= 4 => n - 2,
        (_, n) => n.max(1),
    }
}

/// Where an import reads its source (see [`fetch_source`]).
pub struct SourceDir {
    pub dir: PathBuf,
    /// For a Hub source: the repository and revision.
    pub from_hub: Option<(String, String)>,
    /// For a Hub source: the digests its download was checked against, by file name
    /// (recorded as provenance without hashing the files again: for a 1 GB adapter, a second
    /// sha256 pass over a gigabyte).
    pub verified: BTreeMap<String, String>,
}

/// A local directory as it is, or the files of a Hub repository (downloaded, checked and
/// cached like a base model).
pub fn fetch_source(
    src: &str,
    files: &[&str],
    hub: &HubConfig,
    printer: &Printer,
) -> Result<SourceDir> {
    match crate::train::hub::HubSpec::parse(src) {
        None => {
            let dir = PathBuf::from(src);
            if !dir.is_dir() {
                return Err(Error::input(
                    format!("`{src}` is not a directory"),
                    Some("give the adapter's directory, or `hf:ORG/NAME[@REVISION]`"),
                ));
            }
            Ok(SourceDir {
                dir,
                from_hub: None,
                verified: BTreeMap::new(),
            })
        }
        Some(spec) => {
            let spec = spec?;
            let fetched = crate::train::hub::download_files(&spec, hub, files, printer)?;
            Ok(SourceDir {
                dir: fetched.dir,
                from_hub: Some((spec.repo, spec.revision)),
                verified: fetched.verified,
            })
        }
    }
}

/// What `xpm export` needs besides the expert.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// A `.xpm` file or an installed expert (`name`, `name@req`).
    pub expert: String,
    pub out: PathBuf,
    /// `--base`; default: the expert's base id, when it is a local directory or a Hub id.
    pub base: Option<String>,
    pub options: ExportOptions,
}

/// The result of an export.
#[derive(Debug, Clone, Serialize)]
pub struct ExportResult {
    pub expert: String,
    pub out: PathBuf,
    #[serde(flatten)]
    pub report: ExportReport,
}

/// `xpm export E --format peft -o DIR`.
pub fn export_peft(
    req: &ExportRequest,
    cwd: &Path,
    home: &XpmHome,
    hub: &HubConfig,
    printer: &Printer,
) -> Result<ExportResult> {
    let path = super::locate_experts(std::slice::from_ref(&req.expert), cwd, home)?
        .pop()
        .expect("one input, one path");
    // The output is a new (or empty) directory: `build_dir_atomic` refuses anything else, the
    // expert's own file included.
    let reader = ArtifactReader::open(&path)?;
    crate::fsutil::announce_new_parents(&[("-o", &req.out)], printer);
    let m = reader.manifest().clone();
    let base_arg = req.base.clone().unwrap_or_else(|| m.base.id.clone());
    let (base, base_dir, _) = open_base(&base_arg, hub, printer).map_err(|e| {
        if req.base.is_none() {
            Error::input(
                format!("cannot open the expert's base `{}`: {e}", m.base.id),
                Some("pass the base model with `--base DIR` or `--base hf:ORG/NAME`"),
            )
        } else {
            e
        }
    })?;
    printer.status("Hashing", format!("base model `{}`", base.root().display()));
    let digest = base.digest(Some(&home.cache))?;
    if digest != m.base.digest {
        return Err(Error::input(
            format!(
                "`{}` is not the base of {}@{}: its digest is {digest}, the expert's base is {} ({})",
                base.root().display(),
                m.name,
                m.version,
                m.base.digest,
                m.base.id
            ),
            Some("pass the model the expert was made from with `--base`"),
        ));
    }
    let (model_type, architectures) = model_config(&base_dir);
    // LoRA factors that go to the adapter file as they are (most of a LoRA expert's bytes)
    // are read while the file is written, a few at a time; the rest is decoded here, on every
    // core (zstd and the frame digests dominate).
    let streamed = xpm_interop::peft_export::adapter_tensors(&m, &architectures, &req.options);
    let indices: Vec<usize> = (0..m.tensors.len()).collect();
    let tensors = crate::parallel::collect_ordered(rayon::current_num_threads(), &indices, |&i| {
        let t = &m.tensors[i];
        let data = match t.delta {
            Delta::Lora { rank, alpha } if streamed.contains(&t.name) => TensorData {
                name: t.name.clone(),
                shape: t.shape.clone(),
                dtype: t.dtype,
                content: Content::Lora {
                    rank,
                    alpha,
                    a: Vec::new(),
                    b: Vec::new(),
                },
            },
            _ => reader.read_tensor(i)?,
        };
        Ok((data, t.new))
    })?;
    let index: HashMap<&str, usize> = m
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let fetch = |name: &str, role| reader.read_values_part(index[name], role);
    printer.status(
        "Exporting",
        format!(
            "{}@{} as a PEFT adapter to {}",
            m.name,
            m.version,
            req.out.display()
        ),
    );
    let report = crate::fsutil::build_dir_atomic(&req.out, |dir| {
        xpm_interop::peft_export::export(
            &m,
            &tensors,
            &fetch,
            &base,
            model_type.as_deref(),
            &architectures,
            &req.options,
            dir,
        )
    })?;
    printer.status(
        "Wrote",
        format!(
            "{} ({} adapter, {} target modules, {} modules saved whole)",
            req.out.display(),
            report.peft_type,
            report.target_modules.len(),
            report.modules_to_save.len()
        ),
    );
    Ok(ExportResult {
        expert: format!("{}@{}", m.name, m.version),
        out: req.out.clone(),
        report,
    })
}

/// `model_type` and `architectures` of the base's `config.json`, when it has one.
fn model_config(dir: &Path) -> (Option<String>, Vec<String>) {
    let dir = if dir.is_file() {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    let Ok(bytes) = std::fs::read(dir.join("config.json")) else {
        return (None, Vec::new());
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return (None, Vec::new());
    };
    let mt = v
        .get("model_type")
        .and_then(|x| x.as_str())
        .map(str::to_string);
    let arch = v
        .get("architectures")
        .and_then(|x| x.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    (mt, arch)
}

/// `xpm import mttl LIBRARY EXPERT`: one expert of an mttl library (a directory or `hf:`).
pub fn import_mttl(
    library: &str,
    expert: &str,
    opts: &ImportOptions,
    home: &XpmHome,
    hub: &HubConfig,
    printer: &Printer,
) -> Result<ImportReport> {
    validate(opts)?;
    let files = [format!("{expert}.ckpt"), format!("{expert}.meta")];
    let names: Vec<&str> = files.iter().map(String::as_str).collect();
    let SourceDir {
        dir,
        from_hub,
        verified,
    } = fetch_source(library, &names, hub, printer)?;
    let (base, _, base_id) = open_base(&opts.base, hub, printer)?;
    printer.status(
        "Reading",
        format!("mttl expert `{expert}` of `{}`", dir.display()),
    );
    let mut imported = xpm_interop::mttl::import_with(&dir, expert, &base, &verified)?;
    if let Some((repo, rev)) = from_hub {
        imported.source.location = format!("hf:{repo}");
        imported.source.revision = Some(rev);
    } else {
        imported.source.location = library.to_string();
    }
    write_imported(imported, &base, base_id, opts, home, printer)
}

#[cfg(test)]
mod tests {
    use super::encoders;

    #[test]
    fn encoders_leave_the_source_hash_a_core_from_three_cores() {
        // No hash in flight (a Hub source, whose digests the download checked): every core.
        for n in 1..=16 {
            assert_eq!(encoders(n, false), n);
        }
        // A hash in flight: on 1 or 2 cores every core still encodes (the CPU time binds);
        // on 3, one core is left to it; from 4, one to it and one to the writer.
        let hashing: Vec<usize> = (1..=8).map(|n| encoders(n, true)).collect();
        assert_eq!(hashing, [1, 2, 2, 2, 3, 4, 5, 6]);
        assert_eq!(encoders(0, true), 1);
    }
}
