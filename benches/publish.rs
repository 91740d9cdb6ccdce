//! Publish throughput under 8-way concurrency, per registry backend (docs/benchmarks.md,
//! "Registry and install"): 8 release `xpm publish` processes at once, each publishing its
//! share of 32 artifacts of ~1 MB one after the other, into
//!
//! - a directory registry (`file://`),
//! - the `xpm-registry` server on 127.0.0.1 (filesystem storage, a token),
//! - moto, a real S3 server on 127.0.0.1 (`s3://`; `$XPM_MOTO` from scripts/moto-env.sh,
//!   skipped without it),
//! - Debian's `docker-registry` on 127.0.0.1 with htpasswd auth (`oci://`; skipped when it is
//!   not installed),
//! - the tests' local stand-in for the Hugging Face Hub (`hf://`, tests/hub_mock: commits and
//!   LFS objects in memory; the real Hub cannot be reached from here),
//!
//! twice per backend: 32 distinct experts (8 × 4), then 32 versions of one expert (every
//! publish rewrites the same index: the contended case). Each registry gets one publish
//! first (not timed), so the timed ones go to an existing registry. Afterwards every published
//! version must be in the index (nothing lost); the bench panics otherwise.
//!
//! Run: `cargo bench --bench publish` (`-- --quick`: 8 publishes per scenario). Writes the
//! table to `target/bench-publish.md`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use xpm::home::XpmHome;
use xpm::registry::ClientOptions;

#[path = "common/registry.rs"]
mod bench_registry;
mod common;
#[path = "../tests/hub_mock/mod.rs"]
mod hub_mock;

use bench_registry::{Moto, Oci, Server, TOKEN, publish_all, write_expert};

const JOBS: usize = 8;
const CROWD: &str = "bench-crowd";

/// One scenario's artifacts: (name, version, file).
type Batch = Vec<(String, String, PathBuf)>;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let per_worker = if quick { 1 } else { 4 };
    let n = JOBS * per_worker;
    let bytes = 1 << 20;
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let files = work.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    eprintln!("preparing {} experts of 1 MB …", 2 * n + 1);
    let make = |name: &str, version: &str, seed: u64| {
        let path = files.join(format!("{name}-{version}.xpm"));
        write_expert(&path, name, version, bytes, seed);
        (name.to_string(), version.to_string(), path)
    };
    let seed = make("bench-seed", "1.0.0", 999);
    let distinct: Batch = (0..n)
        .map(|i| make(&format!("bench-pub-{i:02}"), "1.0.0", i as u64))
        .collect();
    let crowd: Batch = (0..n)
        .map(|i| make(CROWD, &format!("1.{i}.0"), 100 + i as u64))
        .collect();
    let size = std::fs::metadata(&distinct[0].2).unwrap().len();
    let _ = &*bench_registry::XPM_BIN; // build before timing anything
    let _ = &*bench_registry::SERVER_BIN;

    let mut report = format!(
        "{JOBS} release `xpm publish` processes at once, {n} publishes of {:.2} MB each per \
         scenario (each process publishes {per_worker} one after the other), to a registry \
         that already holds one expert; server and clients on 127.0.0.1:\n\n\
         | backend | scenario | wall | publishes/s | median latency | max latency | in the index |\n\
         |---|---|---:|---:|---:|---:|---|\n",
        size as f64 / 1e6
    );
    let mut skipped = String::new();

    // --- Directory registry ----------------------------------------------------------------
    {
        let root = work.path().join("dir-reg");
        let loc = format!("file://{}", root.display());
        let none = |_: &mut Command| {};
        bench(
            &mut report,
            "directory (`file://`)",
            &loc,
            &loc,
            work.path(),
            &none,
            &seed,
            &distinct,
            &crowd,
            None,
        );
    }

    // --- xpm-registry server -----------------------------------------------------------------
    {
        let root = work.path().join("srv-reg");
        let server = Server::start_with_token(&root);
        let token = |c: &mut Command| {
            c.env("XPM_TOKEN", TOKEN);
        };
        bench(
            &mut report,
            "`xpm-registry` (HTTP, filesystem storage)",
            &server.url,
            &server.url,
            work.path(),
            &token,
            &seed,
            &distinct,
            &crowd,
            None,
        );
    }

    // --- S3 (moto) -----------------------------------------------------------------------------
    match Moto::start() {
        Some(moto) => {
            let env = |c: &mut Command| moto.env(c);
            bench(
                &mut report,
                "S3 (`s3://`, moto)",
                &moto.location("pub"),
                &moto.http_url("pub"),
                work.path(),
                &env,
                &seed,
                &distinct,
                &crowd,
                None,
            );
        }
        None => {
            let m = "S3 skipped: XPM_MOTO is not set \
                     (export XPM_MOTO=$(scripts/moto-env.sh | tail -n1))";
            eprintln!("{m}");
            writeln!(skipped, "\n{m}.").unwrap();
        }
    }

    // --- OCI (docker-registry) ---------------------------------------------------------------
    match Oci::start(work.path()) {
        Some(oci) => {
            let home = work.path().join("oci-home");
            let env = |c: &mut Command| oci.env(c, &home);
            bench(
                &mut report,
                "OCI (`oci://`, docker-registry)",
                &oci.location(),
                "",
                work.path(),
                &env,
                &seed,
                &distinct,
                &crowd,
                Some(&oci),
            );
        }
        None => {
            let m = "OCI skipped: docker-registry is not installed \
                     (apt-get install docker-registry)";
            eprintln!("{m}");
            writeln!(skipped, "\n{m}.").unwrap();
        }
    }

    // --- Hugging Face Hub (the tests' local stand-in) -----------------------------------------
    {
        // The Hub itself cannot be reached from here: tests/hub_mock keeps commits and LFS
        // objects in memory and answers a stale parent commit with 412, as the Hub does. The
        // figures are xpm's side of the protocol (a commit per publish, re-read on 412), not
        // the Hub's own latency.
        let hub = hub_mock::HubMock::start("hf_bench_token");
        hub.create_repo("models/acme/bench", false);
        let hf_home = work.path().join("hf-home");
        let env = |c: &mut Command| {
            c.env("HF_ENDPOINT", &hub.url)
                .env("HF_TOKEN", "hf_bench_token")
                .env("HF_HOME", &hf_home)
                .env_remove("XPM_TOKEN");
        };
        bench(
            &mut report,
            "Hugging Face Hub (`hf://`, local stand-in)",
            "hf://acme/bench",
            &format!("{}/acme/bench/resolve/main", hub.url),
            work.path(),
            &env,
            &seed,
            &distinct,
            &crowd,
            None,
        );
        let st = hub.state.lock().unwrap();
        writeln!(
            report,
            "
Hub stand-in: {} commits for {} publishes ({} answered 412 and retried).",
            st.commits,
            2 * n + 1,
            st.log
                .iter()
                .filter(|l| l.starts_with("POST /api/models/acme/bench/commit/"))
                .count()
                .saturating_sub(st.commits)
        )
        .unwrap();
    }

    report.push_str(&skipped);
    println!("{report}");
    let out = common::target_dir().join("bench-publish.md");
    std::fs::write(&out, &report).unwrap();
    eprintln!("wrote {}", out.display());
}

/// Publish `seed` alone, then each batch with [`JOBS`] processes; append a row per batch to
/// `report`, after checking that every version of the batch is in the index: read through
/// `read` (a registry location xpm opens without credentials) or, for OCI, the tag lists.
#[allow(clippy::too_many_arguments)]
fn bench(
    report: &mut String,
    backend: &str,
    loc: &str,
    read: &str,
    work: &Path,
    env: &(dyn Fn(&mut Command) + Sync),
    seed: &(String, String, PathBuf),
    distinct: &Batch,
    crowd: &Batch,
    oci: Option<&Oci>,
) {
    eprintln!("publishing to {backend} …");
    let home = tempfile::tempdir_in(work).unwrap();
    publish_all(std::slice::from_ref(&seed.2), loc, 1, home.path(), env);
    for (scenario, batch) in [
        ("distinct experts", distinct),
        ("versions of one expert", crowd),
    ] {
        let files: Vec<PathBuf> = batch.iter().map(|(_, _, f)| f.clone()).collect();
        let t = Instant::now();
        let mut lat = publish_all(&files, loc, JOBS, home.path(), env);
        let wall = t.elapsed();
        lat.sort();
        let lost = missing(batch, read, home.path(), oci);
        assert!(lost.is_empty(), "{backend}: lost {lost:?}");
        let row = format!(
            "| {backend} | {} × {scenario} | {:.2} s | {:.1} | {:.0} ms | {:.0} ms | all {} |",
            batch.len(),
            wall.as_secs_f64(),
            batch.len() as f64 / wall.as_secs_f64(),
            ms(lat[lat.len() / 2]),
            ms(*lat.last().unwrap()),
            batch.len(),
        );
        eprintln!("{row}");
        writeln!(report, "{row}").unwrap();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `name@version`s of `batch` that the registry's index does not list.
fn missing(batch: &Batch, read: &str, home: &Path, oci: Option<&Oci>) -> Vec<String> {
    let mut names: Vec<&str> = batch.iter().map(|(n, _, _)| n.as_str()).collect();
    names.dedup();
    let mut listed = std::collections::BTreeSet::new();
    match oci {
        Some(oci) => {
            for name in names {
                for tag in oci.tags(name) {
                    listed.insert(format!("{name}@{tag}"));
                }
            }
        }
        None => {
            let dir = home.join("check");
            let home = XpmHome {
                root: dir.clone(),
                cache: dir.join("cache"),
            };
            let reg = xpm::registry::open(read, &home, &ClientOptions::default(), false).unwrap();
            for name in names {
                for l in reg.index(name).unwrap().unwrap_or_default() {
                    listed.insert(format!("{}@{}", l.name, l.vers));
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    batch
        .iter()
        .map(|(n, v, _)| format!("{n}@{v}"))
        .filter(|k| !listed.contains(k))
        .collect()
}
