//! Helpers shared by the bench binaries (`mod common;`); each bench uses some of them.
#![allow(dead_code)]

/// The value after `--name` on the command line, parsed, or `default`.
pub fn flag<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median (the mean of the middle two for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The workspace's target directory: `$CARGO_TARGET_DIR` (relative to the workspace root when
/// relative), else `target/` beside the workspace's Cargo.toml.
pub fn target_dir() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => root.join(d),
        None => root.join("target"),
    }
}

/// Build `package` with the release profile and return the path of `file` (a binary or a
/// library, named as on disk) in the release output directory.
pub fn build_release(package: &str, file: &str) -> std::path::PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = std::process::Command::new(cargo)
        .args(["build", "--release", "-q", "-p", package])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build");
    assert!(st.success(), "cargo build --release -p {package} failed");
    let path = target_dir().join("release").join(file);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Run `program` with `args` under GNU time: its wall time (s) and peak RSS (MB). Panics with
/// its stderr when it fails.
pub fn timed_peak_rss<S: AsRef<std::ffi::OsStr>>(
    program: &std::path::Path,
    args: &[S],
) -> (f64, f64) {
    let t = std::time::Instant::now();
    let o = std::process::Command::new("/usr/bin/time")
        .args(["-f", "%M"])
        .arg(program)
        .args(args)
        .output()
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let kib: f64 = String::from_utf8_lossy(&o.stderr)
        .lines()
        .last()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (secs, kib / 1024.0)
}

/// CPU seconds (user + system) this process has used so far, from `/proc/self/stat` (10 ms
/// resolution); 0 where that file cannot be read.
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which may hold spaces) start after its `)`.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<f64>() / 100.0
}

/// Where a bench writes its files: `$XPM_BENCH_DIR` (`/dev/shm` keeps the disk's write-back,
/// which throttles writers by up to 10× on this VM, out of the figures), else Cargo's
/// `target/tmp` (which Cargo names but, after a `cargo clean`, does not create for benches).
pub fn bench_dir() -> std::path::PathBuf {
    std::env::var_os("XPM_BENCH_DIR").map_or_else(
        || {
            let d = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
            std::fs::create_dir_all(&d).unwrap();
            d
        },
        Into::into,
    )
}

/// The CPUs this process may run on (its affinity mask, as `taskset` sets it).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
