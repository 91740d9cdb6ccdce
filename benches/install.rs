//! Registry benchmarks (docs/benchmarks.md, "Registry"):
//!
//! 1. Install N experts of ~S MB each from the real `xpm-registry` server on 127.0.0.1 into an
//!    empty store, against a plain parallel HTTP download of the same blobs (reqwest, same
//!    number of connections, no verification), in the same run.
//! 2. Resolve 20 requirements against an index of 10 000 versions: in memory, from a local
//!    directory registry, and over HTTP with a warm index cache (ETag revalidation).
//!
//! 3. With `--scale`: the cost curve of installing 50, 200 and 500 experts of 1 MB each
//!    (`--scale-mb M`: M MB each), by
//!    the release `xpm install` run as a child process (time, and peak RSS from GNU time),
//!    from the loopback server and from a directory registry, against a plain parallel
//!    download of the same blobs; time per expert at each size (goal: linear, ≤ 1.3× plain).
//!
//! 4. With `--s3`: publish 50 experts of 1 MB and 20 of 20 MB into moto (a real S3 server on
//!    127.0.0.1, `$XPM_MOTO` from scripts/moto-env.sh; skipped without it), then install them
//!    with the release `xpm install` from `s3://` and from the bucket's plain HTTP URL, against
//!    a plain parallel download of the same objects from moto (goal ≤ 1.3×, as over HTTP).
//!
//! Run: `cargo bench --bench install` (`-- --quick` for 10 × 4 MB; `-- --scale` for the curve
//! only; `-- --s3` for the S3 table only, `-- --s3 --quick` for a small one). Writes the table
//! to `target/bench-registry.md` (`target/bench-install-scale.md`, `target/bench-install-s3.md`).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use xpm::home::XpmHome;
use xpm::printer::Printer;
use xpm::registry::index::render_index;
use xpm::registry::{ClientOptions, IndexLine, LocalRegistry};
use xpm::resolve::{Constraints, Requirement, resolve};

#[path = "common/registry.rs"]
mod bench_registry;
mod common;

use bench_registry::{Moto, Server, manifest, write_expert};

const JOBS: usize = 8;

fn main() {
    if std::env::args().any(|a| a == "--scale") {
        return scale();
    }
    if std::env::args().any(|a| a == "--s3") {
        return s3();
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let (n, mb) = if quick { (10, 4) } else { (50, 20) };
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut report = String::new();
    writeln!(report, "## Registry (`cargo bench --bench install`)\n").unwrap();

    // --- Install vs plain download -------------------------------------------------------
    let root = work.path().join("srv");
    eprintln!("preparing {n} experts of {mb} MB …");
    let names = populate(&root, n, mb << 20);
    let server = Server::start(&root);
    let (total, urls) = blob_urls(&root, &names, &server.url);

    let rounds = if quick { 2 } else { 5 };
    let mut plain = Vec::new();
    let mut inst = Vec::new();
    let mut hashed = Vec::new();
    plain_download(&urls, &work.path().join("warmup"), false); // warm the server's page cache
    for r in 0..rounds {
        let d = work.path().join(format!("plain{r}"));
        let t = Instant::now();
        plain_download(&urls, &d, false);
        plain.push(t.elapsed());
        std::fs::remove_dir_all(&d).unwrap();
        let t = Instant::now();
        plain_download(&urls, &d, true);
        hashed.push(t.elapsed());
        std::fs::remove_dir_all(&d).unwrap();

        let home_dir = work.path().join(format!("home{r}"));
        let proj = work.path().join(format!("proj{r}"));
        std::fs::create_dir_all(&proj).unwrap();
        let home = XpmHome {
            root: home_dir.clone(),
            cache: home_dir.join("cache"),
        };
        let opts = xpm::ops::install::InstallOptions {
            require_signatures: false,
            specs: names.iter().map(|n| format!("{n}@1")).collect(),
            registry: Some(server.url.clone()),
            locked: false,
            offline: false,
            base: None,
            jobs: JOBS,
            dir: proj.clone(),
        };
        let t = Instant::now();
        let rep =
            xpm::ops::install::install(&home, &opts, &ClientOptions::default(), &Printer::silent())
                .unwrap();
        inst.push(t.elapsed());
        assert_eq!(rep.experts.len(), n);
        assert_eq!(rep.downloaded_bytes, total);
        std::fs::remove_dir_all(&home_dir).unwrap();
        std::fs::remove_dir_all(&proj).unwrap();
    }
    let (p, h, i) = (median(&mut plain), median(&mut hashed), median(&mut inst));
    let mbs = |d: Duration| total as f64 / 1e6 / d.as_secs_f64();
    writeln!(
        report,
        "Install {n} experts of {:.1} MB each ({:.0} MB) from the loopback server, {JOBS} parallel \
         downloads, empty store, median of {rounds}:\n\n\
         | | time | throughput | ratio |\n|---|---:|---:|---:|\n\
         | plain parallel HTTP download (reqwest, no verification) | {:.2} s | {:.0} MB/s | 1.00× |\n\
         | plain download + sha256 of every byte (the verification floor) | {:.2} s | {:.0} MB/s | {:.2}× |\n\
         | `xpm install` (index, resolve, download, sha256 verify, commit, lock) | {:.2} s | {:.0} MB/s | {:.2}× |\n",
        total as f64 / 1e6 / n as f64,
        total as f64 / 1e6,
        p.as_secs_f64(),
        mbs(p),
        h.as_secs_f64(),
        mbs(h),
        h.as_secs_f64() / p.as_secs_f64(),
        i.as_secs_f64(),
        mbs(i),
        i.as_secs_f64() / p.as_secs_f64()
    )
    .unwrap();
    drop(server);

    // --- Resolution ----------------------------------------------------------------------
    let idx_root = work.path().join("big-index");
    let index = big_index(&idx_root, 20, 500);
    let reqs: Vec<Requirement> = (0..20)
        .map(|i| Requirement::parse(&format!("expert-{i:02}@^3")).unwrap())
        .collect();
    let c = Constraints::default();
    let mut mem = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let got = resolve(&reqs, &index, &c).unwrap();
        mem.push(t.elapsed());
        assert_eq!(got.len(), 20);
    }
    let home_dir = work.path().join("home-resolve");
    let home = XpmHome {
        root: home_dir.clone(),
        cache: home_dir.join("cache"),
    };
    let local = format!("file://{}", idx_root.display());
    let from_registry = |loc: &str| {
        let reg = xpm::registry::open(loc, &home, &ClientOptions::default(), false).unwrap();
        let t = Instant::now();
        let mut idx = BTreeMap::new();
        for r in &reqs {
            idx.insert(r.name.clone(), reg.index(&r.name).unwrap().unwrap());
        }
        let got = resolve(&reqs, &idx, &c).unwrap();
        assert_eq!(got.len(), 20);
        t.elapsed()
    };
    from_registry(&local);
    let mut disk: Vec<Duration> = (0..20).map(|_| from_registry(&local)).collect();
    let server = Server::start(&idx_root);
    from_registry(&server.url); // fills the index cache
    let mut http: Vec<Duration> = (0..20).map(|_| from_registry(&server.url)).collect();
    writeln!(
        report,
        "\nResolve 20 requirements against an index of 10 000 versions (20 experts × 500 \
         versions, two base models), median:\n\n\
         | | time |\n|---|---:|\n\
         | resolver only (index in memory) | {:.2} ms |\n\
         | local directory registry (read + parse 20 index files + resolve) | {:.2} ms |\n\
         | HTTP registry, warm cache (20 `If-None-Match` requests → 304, parse, resolve) | {:.2} ms |\n",
        median(&mut mem).as_secs_f64() * 1e3,
        median(&mut disk).as_secs_f64() * 1e3,
        median(&mut http).as_secs_f64() * 1e3,
    )
    .unwrap();

    println!("{report}");
    let out = common::target_dir().join("bench-registry.md");
    std::fs::write(&out, &report).unwrap();
    eprintln!("wrote {}", out.display());
}

use std::fmt::Write as _;

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The total size of the experts `names` (version 1.0.0 each) of the registry at `root`, and
/// the URLs of their blobs on the server at `url`.
fn blob_urls(root: &Path, names: &[String], url: &str) -> (u64, Vec<String>) {
    let reg = LocalRegistry::open(root).unwrap();
    let lines: Vec<IndexLine> = names
        .iter()
        .map(|nm| reg.read_index(nm).unwrap().unwrap().remove(0))
        .collect();
    let urls = lines
        .iter()
        .map(|l| format!("{url}/blobs/sha256/{}/{}", &l.sha_hex()[..2], l.sha_hex()))
        .collect();
    (lines.iter().map(|l| l.size).sum(), urls)
}

/// N experts of about `bytes` each, published straight into the registry directory.
fn populate(root: &Path, n: usize, bytes: usize) -> Vec<String> {
    populate_from(root, 0, n, bytes)
}

/// `names × versions` index lines written as a directory registry (no blobs needed to
/// resolve); every other version sits on a second base.
fn big_index(root: &Path, names: usize, versions: usize) -> BTreeMap<String, Vec<IndexLine>> {
    let reg = LocalRegistry::open_or_init(root).unwrap();
    let mut all = BTreeMap::new();
    for i in 0..names {
        let name = format!("expert-{i:02}");
        let lines: Vec<IndexLine> = (0..versions)
            .map(|v| {
                let base = if v % 2 == 0 { "base-a" } else { "base-b" };
                let m = manifest(
                    &name,
                    &format!("{}.{}.{}", v / 100, (v / 10) % 10, v % 10),
                    base,
                );
                let mut l = IndexLine::for_artifact(
                    &m,
                    &xpm::digest::sha256(format!("{name}{v}").as_bytes()),
                    1000,
                );
                l.targets = (0..6)
                    .map(|k| format!("encoder.layer.{k}.attention.self.query.weight"))
                    .collect();
                l.yanked = v % 17 == 0;
                l
            })
            .collect();
        let p = reg.index_path(&name).unwrap();
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, render_index(&lines)).unwrap();
        all.insert(name, lines);
    }
    all
}

fn plain_download(urls: &[String], dir: &Path, hash: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let client = reqwest::blocking::Client::builder()
        .timeout(None)
        .build()
        .unwrap();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..JOBS {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(url) = urls.get(i) else { break };
                    let mut resp = client.get(url).send().unwrap();
                    assert!(resp.status().is_success());
                    let f = std::fs::File::create(dir.join(format!("{i}.bin"))).unwrap();
                    if hash {
                        let mut w = xpm::digest::HashingWriter::new(f);
                        std::io::copy(&mut resp, &mut w).unwrap();
                        std::hint::black_box(w.finish());
                    } else {
                        let mut f = f;
                        std::io::copy(&mut resp, &mut f).unwrap();
                    }
                }
            });
        }
    });
}

/// `--scale`: install 50, 200 and 500 experts with the release binary.
fn scale() {
    let bin = common::build_release("xpm-cli", &format!("xpm{}", std::env::consts::EXE_SUFFIX));
    // `--scale-mb M`: experts of M MB instead of 1 (under `XPM_BENCH_DIR=/dev/shm` the
    // 500-expert registry then takes 500 × M MB of memory, and a store or plain copy as much
    // again).
    let args: Vec<String> = std::env::args().collect();
    let mb: usize = common::flag(&args, "--scale-mb", 1).max(1);
    let work = tempfile::tempdir_in(common::bench_dir()).unwrap();
    let mut report = String::from(
        "| experts | bytes | plain download | plain download + sha256 | `xpm install`, HTTP | ratio | per expert | peak RSS | `xpm install`, directory | per expert | peak RSS |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let root = work.path().join("srv");
    let mut names = Vec::new();
    let mut have = 0;
    for n in [50usize, 200, 500] {
        eprintln!("preparing {n} experts of {mb} MB …");
        // Grow the same registry: the first `have` are already there.
        let more = populate_from(&root, have, n, mb << 20);
        names.extend(more);
        have = n;
        let server = Server::start(&root);
        let (total, urls) = blob_urls(&root, &names, &server.url);
        plain_download(&urls, &work.path().join("warm"), false);
        let mut plain = Vec::new();
        let mut hashed = Vec::new();
        let mut http = Vec::new();
        let mut dir = Vec::new();
        let (mut rss_http, mut rss_dir) = (0u64, 0u64);
        for r in 0..3 {
            let d = work.path().join(format!("plain{r}"));
            let t = Instant::now();
            plain_download(&urls, &d, false);
            plain.push(t.elapsed());
            std::fs::remove_dir_all(&d).unwrap();
            // The verification floor: the same download, every byte hashed as it arrives.
            let t = Instant::now();
            plain_download(&urls, &d, true);
            hashed.push(t.elapsed());
            std::fs::remove_dir_all(&d).unwrap();
            for (registry, times, rss) in [
                (server.url.clone(), &mut http, &mut rss_http),
                (format!("file://{}", root.display()), &mut dir, &mut rss_dir),
            ] {
                let proj = work.path().join(format!("proj{r}"));
                std::fs::create_dir_all(&proj).unwrap();
                let t = Instant::now();
                let o = Command::new("/usr/bin/time")
                    .args(["-f", "%M"])
                    .arg(&bin)
                    .args(["install", "--registry", &registry, "-j", &JOBS.to_string()])
                    .args(names.iter().map(|n| format!("{n}@1")))
                    .current_dir(&proj)
                    .env("XPM_HOME", proj.join("home"))
                    .env("NO_COLOR", "1")
                    .output()
                    .unwrap();
                times.push(t.elapsed());
                let err = String::from_utf8_lossy(&o.stderr);
                assert!(o.status.success(), "{err}");
                let kb: u64 = err.lines().last().unwrap().trim().parse().unwrap();
                *rss = (*rss).max(kb);
                std::fs::remove_dir_all(&proj).unwrap();
            }
        }
        drop(server);
        let (p, f, h, d) = (
            median(&mut plain),
            median(&mut hashed),
            median(&mut http),
            median(&mut dir),
        );
        writeln!(
            report,
            "| {n} | {:.0} MB | {:.2} s | {:.2} s ({:.2}×) | {:.2} s | {:.2}× | {:.1} ms | {:.0} MB | {:.2} s | {:.1} ms | {:.0} MB |",
            total as f64 / 1e6,
            p.as_secs_f64(),
            f.as_secs_f64(),
            f.as_secs_f64() / p.as_secs_f64(),
            h.as_secs_f64(),
            h.as_secs_f64() / p.as_secs_f64(),
            h.as_secs_f64() * 1e3 / n as f64,
            rss_http as f64 / 1024.0,
            d.as_secs_f64(),
            d.as_secs_f64() * 1e3 / n as f64,
            rss_dir as f64 / 1024.0,
        )
        .unwrap();
        eprintln!("{report}");
    }
    println!("{report}");
    std::fs::write(common::target_dir().join("bench-install-scale.md"), &report).unwrap();
}

/// Experts `from..to` of [`populate`]'s series.
fn populate_from(root: &Path, from: usize, to: usize, bytes: usize) -> Vec<String> {
    let reg = LocalRegistry::open_or_init(root).unwrap();
    let tmp = root.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    (from..to)
        .map(|i| {
            let name = format!("bench-expert-{i:03}");
            let path = tmp.join(format!("{name}.xpm"));
            write_expert(&path, &name, "1.0.0", bytes, i as u64);
            let (cksum, size) =
                xpm::digest::sha256_reader(std::fs::File::open(&path).unwrap()).unwrap();
            let m = xpm::format::ArtifactReader::open(&path)
                .unwrap()
                .manifest()
                .clone();
            reg.publish(&path, &IndexLine::for_artifact(&m, &cksum, size), true)
                .unwrap();
            let _ = std::fs::remove_file(&path); // publish may have moved it
            name
        })
        .collect()
}

/// `xpm install NAME@1 … --registry REGISTRY -j 8` by the release binary in an empty project
/// and `$XPM_HOME` under `proj` (removed afterwards), with `env` applied; its wall time.
fn timed_install(
    registry: &str,
    names: &[String],
    proj: &Path,
    env: &dyn Fn(&mut Command),
) -> Duration {
    std::fs::create_dir_all(proj).unwrap();
    let mut c = Command::new(&*bench_registry::XPM_BIN);
    c.args([
        "install",
        "-q",
        "--registry",
        registry,
        "-j",
        &JOBS.to_string(),
    ])
    .args(names.iter().map(|n| format!("{n}@1")))
    .current_dir(proj)
    .env("XPM_HOME", proj.join("home"))
    .env("NO_COLOR", "1");
    env(&mut c);
    let t = Instant::now();
    let o = c.output().unwrap();
    let d = t.elapsed();
    assert!(
        o.status.success(),
        "install from {registry}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::remove_dir_all(proj).unwrap();
    d
}

/// `--s3`: install from moto (a real S3 server, `$XPM_MOTO`) through `s3://` and through the
/// bucket's plain HTTP URL, against a plain parallel download of the same objects.
fn s3() {
    let quick = std::env::args().any(|a| a == "--quick");
    let Some(moto) = Moto::start() else {
        eprintln!(
            "skipping: XPM_MOTO is not set (export XPM_MOTO=$(scripts/moto-env.sh | tail -n1))"
        );
        return;
    };
    let bin = &*bench_registry::XPM_BIN; // built before anything is timed
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let sizes: &[(usize, usize)] = if quick {
        &[(10, 1), (4, 8)]
    } else {
        &[(50, 1), (20, 20)]
    };
    let rounds = if quick { 2 } else { 3 };
    let s3_env = |c: &mut Command| moto.env(c);
    let http_env = |c: &mut Command| {
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("AWS_") {
                c.env_remove(k);
            }
        }
        c.env_remove("XPM_S3_ENDPOINT");
    };
    let mut report = format!(
        "Install from moto (S3) on 127.0.0.1, release `xpm install -j {JOBS}` into an empty \
         store, against a plain parallel download of the same blob objects ({JOBS} connections, \
         unsigned GETs, no verification), median of {rounds} rounds:\n\n\
         | experts | bytes | publish, {JOBS} at once | plain download | plain + sha256 | \
         `xpm install`, `s3://` | ratio | extra per expert | `xpm install`, bucket HTTP URL | \
         ratio | extra per expert |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    let mut notes = String::new();
    for &(n, mb) in sizes {
        let prefix = format!("reg-{n}x{mb}");
        let dir = work.path().join(&prefix);
        std::fs::create_dir_all(&dir).unwrap();
        eprintln!("preparing {n} experts of {mb} MB …");
        let (mut files, mut names, mut urls, mut total) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for i in 0..n {
            let name = format!("bench-expert-{i:03}");
            let path = dir.join(format!("{name}.xpm"));
            write_expert(&path, &name, "1.0.0", mb << 20, i as u64);
            let (hex, size) = bench_registry::file_sha(&path);
            urls.push(format!(
                "{}/blobs/sha256/{}/{hex}",
                moto.http_url(&prefix),
                &hex[..2]
            ));
            total += size;
            files.push(path);
            names.push(name);
        }
        let loc = moto.location(&prefix);
        let http = moto.http_url(&prefix);
        // The first publish creates the registry (config.json); the rest go 8 at a time.
        let t = Instant::now();
        bench_registry::publish_all(&files[..1], &loc, 1, &dir, &s3_env);
        bench_registry::publish_all(&files[1..], &loc, JOBS, &dir, &s3_env);
        let publish = t.elapsed();
        plain_download(&urls, &work.path().join("warm"), false);
        std::fs::remove_dir_all(work.path().join("warm")).unwrap();
        let (mut plain, mut hashed) = (Vec::new(), Vec::new());
        let (mut via_s3, mut via_http) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            let d = work.path().join(format!("plain{r}"));
            let t = Instant::now();
            plain_download(&urls, &d, false);
            plain.push(t.elapsed());
            std::fs::remove_dir_all(&d).unwrap();
            let t = Instant::now();
            plain_download(&urls, &d, true);
            hashed.push(t.elapsed());
            std::fs::remove_dir_all(&d).unwrap();
            let proj = work.path().join(format!("proj{r}"));
            via_s3.push(timed_install(&loc, &names, &proj, &s3_env));
            via_http.push(timed_install(&http, &names, &proj, &http_env));
        }
        let (p, ph) = (median(&mut plain), median(&mut hashed));
        let (s, h) = (median(&mut via_s3), median(&mut via_http));
        let extra = |d: Duration| (d.as_secs_f64() - p.as_secs_f64()) * 1e3 / n as f64;
        writeln!(
            report,
            "| {n} | {:.0} MB | {:.2} s | {:.2} s | {:.2} s ({:.2}×) | {:.2} s | {:.2}× | {:.1} ms | {:.2} s | {:.2}× | {:.1} ms |",
            total as f64 / 1e6,
            publish.as_secs_f64(),
            p.as_secs_f64(),
            ph.as_secs_f64(),
            ph.as_secs_f64() / p.as_secs_f64(),
            s.as_secs_f64(),
            s.as_secs_f64() / p.as_secs_f64(),
            extra(s),
            h.as_secs_f64(),
            h.as_secs_f64() / p.as_secs_f64(),
            extra(h),
        )
        .unwrap();
        eprintln!("{report}");
        if notes.is_empty() {
            // moto's fixed cost per request: one small object (an index file), sequentially.
            let client = reqwest::blocking::Client::new();
            let key = xpm::registry::index::index_rel_path(&names[0]).unwrap();
            let url = format!("{http}/index/{key}");
            let mut t_get = Vec::new();
            for _ in 0..50 {
                let t = Instant::now();
                let r = client.get(&url).send().unwrap();
                assert!(r.status().is_success(), "{url}: {}", r.status());
                std::hint::black_box(r.bytes().unwrap());
                t_get.push(t.elapsed());
            }
            writeln!(
                notes,
                "\nOne GET of a small object (an index file) from moto, one after the other, \
                 median of 50: {:.2} ms.",
                median(&mut t_get).as_secs_f64() * 1e3
            )
            .unwrap();
        }
    }
    // The floor of any child process: starting the release `xpm` and exiting.
    let mut t_start = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let st = Command::new(bin).arg("--version").output().unwrap().status;
        t_start.push(t.elapsed());
        assert!(st.success());
    }
    writeln!(
        notes,
        "\nStarting the release `xpm` (`xpm --version`), median of 20: {:.1} ms.",
        median(&mut t_start).as_secs_f64() * 1e3
    )
    .unwrap();
    report.push_str(&notes);
    println!("{report}");
    let out = common::target_dir().join("bench-install-s3.md");
    std::fs::write(&out, &report).unwrap();
    eprintln!("wrote {}", out.display());
}
