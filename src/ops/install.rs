//! `xpm install [SPEC…]`: resolve a set of experts on one base model, download what the store
//! lacks in parallel (verifying every digest while streaming), commit everything at once, and
//! write `xpm.lock`.
//!
//! A failure while resolving or downloading leaves the store, the install records, `xpm.toml`
//! and `xpm.lock` as they were: downloads go to temporary files and are renamed into the store
//! only when all of them are verified. Then the store is committed (under its lock), then
//! `xpm.lock` and `xpm.toml` are written, each atomically; a crash between those steps leaves
//! verified artifacts in the store and the old lockfile, which the next `xpm install` fixes.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::home::XpmHome;
use crate::printer::Printer;
use crate::project::{LOCK_VERSION, LockedExpert, Lockfile, Project};
use crate::registry::{self, ClientOptions, IndexLine, Registry};
use crate::resolve::{Constraints, Requirement, resolve};
use crate::store::{Installed, Staged, Store};
use crate::units::human_bytes;

/// Parallel downloads by default.
pub const DEFAULT_JOBS: usize = 8;

#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// Refuse unsigned experts (`--require-signatures`; also `[trust] require-signatures`).
    pub require_signatures: bool,
    /// Requirements from the command line (added to `xpm.toml` when there is one).
    pub specs: Vec<String>,
    /// `--registry` / `$XPM_REGISTRY`.
    pub registry: Option<String>,
    /// Install exactly what `xpm.lock` says; fail if it would change.
    pub locked: bool,
    /// Never touch the network.
    pub offline: bool,
    /// Pin the base model (digest or id).
    pub base: Option<String>,
    /// Parallel downloads.
    pub jobs: usize,
    /// The project directory to start from (its nearest `xpm.toml` upwards).
    pub dir: PathBuf,
}

/// What `install` did.
#[derive(Debug, Clone, Serialize)]
pub struct InstallReport {
    pub registry: String,
    pub base: crate::format::BaseModel,
    pub experts: Vec<InstalledExpert>,
    /// Where the lockfile was written.
    pub lockfile: PathBuf,
    /// Bytes downloaded.
    pub downloaded_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstalledExpert {
    pub name: String,
    pub version: String,
    pub cksum: String,
    pub path: PathBuf,
    /// Whether this run downloaded it (false: it was in the store already).
    pub downloaded: bool,
    pub yanked: bool,
}

/// Where a command talks to: the flag (or `$XPM_REGISTRY`), else `xpm.toml`, else the default.
pub fn registry_location(flag: Option<&str>, project: &Project, home: &XpmHome) -> String {
    if let Some(f) = flag {
        return f.to_string();
    }
    if let Some(r) = project.manifest.as_ref().and_then(|m| m.registry.clone()) {
        // A relative path (plain or file://) in xpm.toml is relative to the project directory;
        // a location that does not parse is reported when the registry is opened.
        return match registry::Location::parse(&r) {
            Ok(loc) => loc.resolved_against(&project.dir).to_string(),
            Err(_) => r,
        };
    }
    registry::default_location(home)
}

pub fn install(
    home: &XpmHome,
    opts: &InstallOptions,
    client: &ClientOptions,
    printer: &Printer,
) -> Result<InstallReport> {
    let project = Project::discover(&opts.dir)?;
    let cli_reqs: Vec<Requirement> = opts
        .specs
        .iter()
        .map(|s| Requirement::parse(s))
        .collect::<Result<_>>()?;
    // A command-line requirement replaces xpm.toml's for the same name (as `cargo add` does).
    let mut reqs: Vec<Requirement> = project
        .requirements()?
        .into_iter()
        .filter(|r| !cli_reqs.iter().any(|c| c.name == r.name))
        .collect();
    reqs.extend(cli_reqs.iter().cloned());
    let lock = project.read_lock()?;
    let location = registry_location(opts.registry.as_deref(), &project, home);
    let client = ClientOptions {
        offline: opts.offline,
        ..client.clone()
    };
    let reg = registry::open(&location, home, &client, false)?;
    let store = Store::new(home).with_printer(*printer);

    let pinned_base = opts
        .base
        .clone()
        .or_else(|| project.manifest.as_ref().and_then(|m| m.base.clone()));
    let lines = lines_to_install(
        opts,
        &project,
        lock.as_ref(),
        &reqs,
        reg.as_ref(),
        pinned_base,
        printer,
    )?;

    let missing = missing_or_damaged(&store, &lines, printer)?;
    let total: u64 = missing.iter().map(|l| l.size).sum();
    let staged = download_all(&store, reg.as_ref(), &missing, opts.jobs, printer)?;
    let signers = check_signatures(
        opts,
        &project,
        lock.as_ref(),
        &lines,
        &staged,
        &store,
        reg.source(),
        printer,
    )?;
    let now = registry::index::now_rfc3339();
    let records: Vec<Installed> = lines
        .iter()
        .map(|l| Installed {
            name: l.name.clone(),
            version: l.vers.clone(),
            cksum: l.cksum.clone(),
            size: l.size,
            base: l.base.clone(),
            kind: l.kind,
            source: reg.source().to_string(),
            installed_at: now.clone(),
        })
        .collect();
    store.commit(staged, &records)?;

    let base = lines[0].base.clone();
    let mut experts: Vec<LockedExpert> = lines
        .iter()
        .zip(signers)
        .map(|(l, signer)| LockedExpert {
            name: l.name.clone(),
            version: l.vers.clone(),
            source: reg.source().to_string(),
            cksum: l.cksum.clone(),
            size: l.size,
            kind: l.kind,
            signer,
        })
        .collect();
    experts.sort_by(|a, b| a.name.cmp(&b.name));
    let new_lock = Lockfile {
        version: LOCK_VERSION,
        base: base.clone(),
        experts,
    };
    if !opts.locked && lock.as_ref() != Some(&new_lock) {
        project.write_lock(&new_lock)?;
    }
    if project.manifest.is_some() && !cli_reqs.is_empty() && !opts.locked {
        project.add_requirements(&cli_reqs)?;
    }
    let missing_ids: Vec<String> = missing.iter().map(|l| l.id()).collect();
    Ok(InstallReport {
        registry: reg.source().to_string(),
        base,
        experts: lines
            .iter()
            .map(|l| InstalledExpert {
                name: l.name.clone(),
                version: l.vers.to_string(),
                cksum: l.cksum.clone(),
                path: store.blob_path(&l.cksum),
                downloaded: missing_ids.contains(&l.id()),
                yanked: l.yanked,
            })
            .collect(),
        lockfile: project.lock_path(),
        downloaded_bytes: total,
    })
}

/// The index lines to install: exactly the lockfile's with `--locked` (checked against the
/// pinned base), else the resolution of `reqs` against the registry's index.
fn lines_to_install(
    opts: &InstallOptions,
    project: &Project,
    lock: Option<&Lockfile>,
    reqs: &[Requirement],
    reg: &dyn Registry,
    pinned_base: Option<String>,
    printer: &Printer,
) -> Result<Vec<IndexLine>> {
    if opts.locked {
        let lines = from_lock(project, lock, reqs, reg.source())?;
        if let Some(b) = &pinned_base
            && lines[0].base.digest != *b
            && lines[0].base.id != *b
        {
            return Err(Error::input(
                format!(
                    "{} locks base {} ({}), not the pinned base {b}",
                    project.lock_path().display(),
                    lines[0].base.id,
                    lines[0].base.digest
                ),
                Some("run `xpm install` without --locked to re-resolve on the pinned base"),
            ));
        }
        Ok(lines)
    } else {
        if reqs.is_empty() {
            return Err(Error::input(
                "nothing to install: no requirements given and no [experts] in xpm.toml",
                Some(
                    "pass requirements like `xpm install sst2@^1.2`, or run `xpm init` and list them in xpm.toml",
                ),
            ));
        }
        printer.status(
            "Resolving",
            format!("{} requirement(s) against {}", reqs.len(), reg.source()),
        );
        let mut names: Vec<&str> = reqs.iter().map(|r| r.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let fetched = crate::parallel::collect_ordered(opts.jobs, &names, |n| reg.index(n))?;
        let mut index = BTreeMap::new();
        for (name, lines) in names.iter().zip(fetched) {
            if let Some(lines) = lines {
                index.insert(name.to_string(), lines);
            }
        }
        let pinned: HashMap<String, semver::Version> = lock
            .map(|l| {
                l.experts
                    .iter()
                    .filter(|e| e.source == reg.source())
                    .map(|e| (e.name.clone(), e.version.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let c = Constraints {
            base: pinned_base.clone(),
            locked: pinned,
        };
        resolve(reqs, &index, &c).map_err(|e| suggest_names(e, &names, &index, reg))
    }
}

/// The lines whose artifact the store lacks, or holds damaged (checked, not trusted).
fn missing_or_damaged<'l>(
    store: &Store,
    lines: &'l [IndexLine],
    printer: &Printer,
) -> Result<Vec<&'l IndexLine>> {
    let mut missing: Vec<&IndexLine> = Vec::new();
    for l in lines {
        if !store.has_blob(&l.cksum, l.size) {
            missing.push(l);
        } else if !store.cached_intact(l)? {
            printer.warn(format!(
                "the cached artifact of {} is damaged; fetching it again",
                l.id()
            ));
            missing.push(l);
        }
    }
    let total: u64 = missing.iter().map(|l| l.size).sum();
    if !missing.is_empty() {
        printer.status(
            "Downloading",
            format!("{} artifact(s), {}", missing.len(), human_bytes(total)),
        );
    }
    Ok(missing)
}

/// The lines `--locked` installs: exactly the lockfile's, which must cover the requirements.
fn from_lock(
    project: &Project,
    lock: Option<&Lockfile>,
    reqs: &[Requirement],
    source: &str,
) -> Result<Vec<IndexLine>> {
    let lock = lock.ok_or_else(|| {
        Error::input(
            format!(
                "--locked needs {}, which does not exist",
                project.lock_path().display()
            ),
            Some("run `xpm install` without --locked once to write it"),
        )
    })?;
    let stale = |why: String| {
        Error::input(
            format!("{} is out of date: {why}", project.lock_path().display()),
            Some("run `xpm install` without --locked to update it"),
        )
    };
    for r in reqs {
        match lock.get(&r.name) {
            None => return Err(stale(format!("it has no entry for `{}`", r.name))),
            Some(e) if !r.req.matches(&e.version) => {
                return Err(stale(format!(
                    "it pins {}@{}, which does not match {r}",
                    e.name, e.version
                )));
            }
            Some(_) => {}
        }
    }
    if !reqs.is_empty() {
        for e in &lock.experts {
            if !reqs.iter().any(|r| r.name == e.name) {
                return Err(stale(format!(
                    "it pins `{}`, which is no longer required",
                    e.name
                )));
            }
        }
    }
    if lock.experts.is_empty() {
        return Err(stale("it locks no experts".into()));
    }
    lock.experts
        .iter()
        .map(|e| {
            if e.source != source {
                return Err(stale(format!(
                    "`{}` is locked to registry {}, not {source}",
                    e.name, e.source
                )));
            }
            Ok(IndexLine {
                name: e.name.clone(),
                vers: e.version.clone(),
                cksum: e.cksum.clone(),
                size: e.size,
                base: lock.base.clone(),
                kind: e.kind,
                density: 0.0,
                targets: Vec::new(),
                yanked: false,
                pubtime: String::new(),
                format: String::new(),
                description: None,
                v: registry::index::INDEX_LINE_VERSION,
                sig: None,
            })
        })
        .collect()
}

/// The signer of each line (in order) under the project's trust policy, checked on the
/// downloaded (not yet committed) or cached file. With `--locked` the lockfile's pins (digest
/// and signer) stand: they were checked when it was written.
#[allow(clippy::too_many_arguments)]
fn check_signatures(
    opts: &InstallOptions,
    project: &Project,
    lock: Option<&Lockfile>,
    lines: &[IndexLine],
    staged: &[Staged],
    store: &Store,
    source: &str,
    printer: &Printer,
) -> Result<Vec<Option<String>>> {
    let policy = project
        .manifest
        .as_ref()
        .map(|m| m.trust.clone())
        .unwrap_or_default();
    let require = opts.require_signatures || policy.require_signatures;
    if opts.locked {
        return lines
            .iter()
            .map(|l| {
                let signer = lock
                    .and_then(|k| k.get(&l.name))
                    .and_then(|e| e.signer.clone());
                if require && signer.is_none() {
                    return Err(Error::input(
                        format!(
                            "{} is locked without a signature, and signatures are required",
                            l.id()
                        ),
                        Some(
                            "run `xpm install` without --locked to check the registry's signatures",
                        ),
                    ));
                }
                Ok(signer)
            })
            .collect();
    }
    let check = super::trust::TrustCheck {
        policy: &policy,
        lock,
        require: opts.require_signatures,
        source,
        printer,
    };
    lines
        .iter()
        .map(|l| {
            let file = staged
                .iter()
                .find(|s| s.cksum() == l.cksum)
                .map(|s| s.path().to_path_buf())
                .unwrap_or_else(|| store.blob_path(&l.cksum));
            check.check(l, &file)
        })
        .collect()
}

/// Fetch every line with up to `jobs` downloads at once; all or nothing.
fn download_all(
    store: &Store,
    reg: &dyn Registry,
    lines: &[&IndexLine],
    jobs: usize,
    printer: &Printer,
) -> Result<Vec<Staged>> {
    if lines.is_empty() {
        return Ok(Vec::new());
    }
    let total: u64 = lines.iter().map(|l| l.size).sum();
    let pb = printer.progress_bytes(total, "Downloading");
    let results = crate::parallel::collect_ordered(jobs, lines, |line| store.fetch(reg, line, &pb));
    pb.finish_and_clear();
    results
}

/// Add "did you mean" to a resolution error for the requested names the registry does not
/// have, from the names it does have (its search listing).
fn suggest_names(
    e: Error,
    names: &[&str],
    index: &BTreeMap<String, Vec<IndexLine>>,
    reg: &dyn Registry,
) -> Error {
    let Error::Input { message, hint } = e else {
        return e;
    };
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !index.contains_key(*n))
        .collect();
    let known: Vec<String> = match missing.is_empty() {
        true => Vec::new(),
        false => reg
            .search("", 10_000)
            .map(|r| r.experts.into_iter().map(|h| h.name).collect())
            .unwrap_or_default(),
    };
    let tips: Vec<String> = missing
        .iter()
        .filter_map(|m| {
            crate::suggest::did_you_mean(m, known.iter().map(String::as_str))
                .map(|k| format!("did you mean `{k}` for `{m}`?"))
        })
        .collect();
    let hint = match (tips.is_empty(), hint) {
        (true, h) => h,
        (false, Some(h)) => Some(format!("{} {h}", tips.join(" "))),
        (false, None) => Some(tips.join(" ")),
    };
    Error::Input { message, hint }
}
