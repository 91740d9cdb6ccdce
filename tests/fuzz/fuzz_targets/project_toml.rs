//! `xpm.toml`: the input as a project's manifest, through `Project::discover` (which calls
//! `project::read_manifest`), `requirements`, the registry location, and `add_requirements`
//! (which edits the file in place): after adding, the file must still read, keep every expert
//! it had and hold the new one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xpm_core::project::Project;
use xpm_core::registry::Location;
use xpm_core::resolve::Requirement;

fuzz_target!(
    init: { xpm_fuzz::maybe_write_seeds(); },
    |data: &[u8]| {
        let dir = xpm_fuzz::fresh_dir("project");
        std::fs::write(dir.join("xpm.toml"), data).unwrap();
        let _ = xpm_core::project::read_manifest(&dir.join("xpm.toml"));
        let Ok(project) = Project::discover(&dir) else { return };
        let manifest = project.manifest.clone().expect("xpm.toml was found");
        if let Some(r) = &manifest.registry {
            let _ = Location::parse(r).map(|l| l.resolved_against(&dir));
        }
        let Ok(reqs) = project.requirements() else { return };
        for r in &reqs {
            Requirement::parse(&r.to_string()).expect("a shown requirement parses");
        }
        let added = Requirement::parse("fuzz-added@^1.2").unwrap();
        project
            .add_requirements(std::slice::from_ref(&added))
            .expect("add a requirement to a valid xpm.toml");
        let after = Project::discover(&dir)
            .unwrap_or_else(|e| panic!("xpm.toml no longer reads after add_requirements: {e}"));
        let experts = after.manifest.expect("xpm.toml is still there").experts;
        assert_eq!(experts.get("fuzz-added").map(String::as_str), Some("^1.2"));
        for name in manifest.experts.keys().filter(|n| *n != "fuzz-added") {
            assert!(
                experts.contains_key(name),
                "add_requirements dropped expert `{name}` from xpm.toml"
            );
        }
    }
);
