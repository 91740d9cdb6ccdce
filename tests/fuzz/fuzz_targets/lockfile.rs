//! `xpm.lock`: the input as the lockfile of a project with a minimal `xpm.toml`, read with
//! `Project::read_lock`. A lockfile that reads must write back (`write_lock`) and read again
//! to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xpm_core::project::Project;

fuzz_target!(
    init: { xpm_fuzz::maybe_write_seeds(); },
    |data: &[u8]| {
        let dir = xpm_fuzz::fresh_dir("lock");
        std::fs::write(dir.join("xpm.toml"), "[experts]\n").unwrap();
        std::fs::write(dir.join("xpm.lock"), data).unwrap();
        let project = Project::discover(&dir).expect("the minimal xpm.toml reads");
        let Ok(Some(lock)) = project.read_lock() else { return };
        for e in &lock.experts {
            assert!(lock.get(&e.name).is_some());
            xpm_core::registry::index::index_rel_path(&e.name)
                .expect("a validated name has an index path");
        }
        project.write_lock(&lock).expect("write the lockfile");
        let again = project
            .read_lock()
            .unwrap_or_else(|e| panic!("xpm cannot read the lockfile it wrote: {e}"))
            .expect("the lockfile exists");
        assert_eq!(again, lock, "the lockfile does not round-trip");
    }
);
