//! Files that someone else wrote must never turn xpm against its user: a cloned project's
//! `xpm.lock`, a registry's index, a cached artifact. Each test is named after the attack it
//! stops, and drives the real `xpm` binary on a local directory registry (no server needed).

mod common;

use common::registry::*;
use common::*;
use predicates::prelude::*;

/// Publish `alpha@1.0.0` (a sparse expert) to the default local registry and install it, so
/// that the project has an `xpm.toml` and a genuine `xpm.lock`.
fn installed_project(ctx: &TestContext) -> String {
    make_expert(&ctx.path("alpha.xpm"), "alpha", "1.0.0", "minilm", 4096, 7);
    ctx.xpm().args(["publish", "alpha.xpm"]).assert().success();
    ctx.xpm().args(["init"]).assert().success();
    ctx.xpm().args(["install", "alpha@1"]).assert().success();
    std::fs::read_to_string(ctx.path("xpm.lock")).unwrap()
}

/// Replace the lockfile with `edit(original)`, run `install --locked`, expect a failure whose
/// message contains `want`, and check that the store gained nothing.
fn locked_install_refuses(ctx: &TestContext, lock: String, want: &str) {
    std::fs::write(ctx.path("xpm.lock"), lock).unwrap();
    let before = files_under(&ctx.path("home"));
    ctx.xpm()
        .args(["install", "--locked"])
        .assert()
        .failure()
        .stderr(predicate::str::contains(want));
    assert_eq!(files_under(&ctx.path("home")), before, "the store changed");
}

#[test]
fn a_lockfile_name_that_climbs_out_of_xpm_home_is_refused() {
    let ctx = TestContext::new();
    let lock = installed_project(&ctx);
    // No requirements: `--locked` installs exactly what the lockfile lists.
    std::fs::write(ctx.path("xpm.toml"), "[experts]\n").unwrap();
    for bad in ["../../../x", "/tmp/x"] {
        locked_install_refuses(
            &ctx,
            lock.replace("name = \"alpha\"", &format!("name = \"{bad}\"")),
            "invalid expert name",
        );
    }
    assert!(!ctx.dir.path().parent().unwrap().join("x").exists());
}

#[test]
fn a_lockfile_digest_that_names_a_path_is_refused() {
    let ctx = TestContext::new();
    let lock = installed_project(&ctx);
    let real = lock
        .lines()
        .find(|l| l.starts_with("cksum"))
        .unwrap()
        .to_string();
    for bad in [
        "sha256:../../../etc/passwd",
        "sha256:ABCDEF",
        "md5:00112233445566778899aabbccddeeff",
    ] {
        locked_install_refuses(
            &ctx,
            lock.replace(&real, &format!("cksum = \"{bad}\"")),
            "is not a sha256 digest",
        );
    }
}

#[test]
fn a_lockfile_that_lies_about_kind_or_version_is_refused() {
    let ctx = TestContext::new();
    let lock = installed_project(&ctx);
    // The artifact is cached: the lie is caught against its manifest, not believed.
    locked_install_refuses(
        &ctx,
        lock.replace("kind = \"sparse\"", "kind = \"lora\""),
        "manifest says kind sparse",
    );
    std::fs::write(ctx.path("xpm.toml"), "[experts]\nalpha = \"9\"\n").unwrap();
    locked_install_refuses(
        &ctx,
        lock.replace("version = \"1.0.0\"", "version = \"9.9.9\""),
        "manifest says version 1.0.0",
    );
}

#[test]
fn a_damaged_cache_entry_is_fetched_again_not_reported_as_cached() {
    let ctx = TestContext::new();
    installed_project(&ctx);
    let blob = files_under(&ctx.path("home/cache/blobs-v1"))
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "xpm") || p.is_file())
        .unwrap();
    let good = std::fs::read(&blob).unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 10] ^= 0xff; // same size, other bytes
    std::fs::write(&blob, &bad).unwrap();
    ctx.xpm()
        .args(["verify", "--store"])
        .assert()
        .failure()
        .stdout(predicate::str::contains("damaged alpha@1.0.0"))
        .stderr(predicate::str::contains(
            "1 of 1 installed artifact(s) in the store are damaged",
        ));
    ctx.xpm()
        .args(["install"])
        .assert()
        .success()
        .stderr(predicate::str::contains("is damaged; fetching it again"));
    assert_eq!(std::fs::read(&blob).unwrap(), good);
    ctx.xpm()
        .args(["verify", "--store"])
        .assert()
        .success()
        .stdout(predicate::str::contains("ok alpha@1.0.0"));
    ctx.xpm()
        .args(["merge", "alpha", "alpha", "-o", "m.xpm"])
        .assert()
        .success();
}

/// Run `args`, expect a failure mentioning `want`, and check that `keep` is byte-identical.
fn refused_and_kept(ctx: &TestContext, args: &[&str], want: &str, keep: &str) {
    let before = std::fs::read(ctx.path(keep)).unwrap();
    ctx.xpm()
        .args(args)
        .assert()
        .failure()
        .stderr(predicate::str::contains(want));
    assert_eq!(
        std::fs::read(ctx.path(keep)).unwrap(),
        before,
        "{keep} changed"
    );
}

#[test]
fn an_output_that_is_an_input_is_refused_and_the_input_kept() {
    let ctx = TestContext::new();
    make_expert(&ctx.path("a.xpm"), "a", "1.0.0", "minilm", 4096, 1);
    make_expert(&ctx.path("b.xpm"), "b", "1.0.0", "minilm", 4096, 2);
    refused_and_kept(
        &ctx,
        &["merge", "a.xpm", "b.xpm", "-o", "a.xpm"],
        "is also an input",
        "a.xpm",
    );
    // The same file under another name: a hard link.
    std::fs::hard_link(ctx.path("b.xpm"), ctx.path("b-link.xpm")).unwrap();
    refused_and_kept(
        &ctx,
        &["merge", "a.xpm", "b.xpm", "-o", "b-link.xpm"],
        "is also an input",
        "b.xpm",
    );
    ctx.xpm()
        .args(["unpack", "a.xpm", "-o", "d"])
        .assert()
        .success();
    refused_and_kept(
        &ctx,
        &["pack", "d", "-o", "d/tensors.safetensors"],
        "is also an input",
        "d/tensors.safetensors",
    );
    std::fs::write(ctx.path("x.csv"), "text,label\nhello,a\nworld,b\n").unwrap();
    refused_and_kept(
        &ctx,
        &["data", "import", "x.csv", "-o", "x.csv"],
        "is also an input",
        "x.csv",
    );
    ctx.xpm()
        .args([
            "data",
            "import",
            "x.csv",
            "-o",
            "t.jsonl",
            "--eval-out",
            "t.jsonl",
        ])
        .assert()
        .failure()
        .stderr(predicate::str::contains("both name"));
    assert!(!ctx.path("t.jsonl").exists());
}

#[test]
fn a_device_or_fifo_output_is_refused_not_replaced() {
    let ctx = TestContext::new();
    make_expert(&ctx.path("a.xpm"), "a", "1.0.0", "minilm", 4096, 1);
    let fifo = ctx.path("pipe");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    for out in ["/dev/null", "/dev/full", fifo.to_str().unwrap()] {
        ctx.xpm()
            .args(["merge", "a.xpm", "-o", out])
            .assert()
            .failure()
            .stderr(predicate::str::contains("is not a regular file"));
        let ft = std::fs::metadata(out).unwrap().file_type();
        use std::os::unix::fs::FileTypeExt as _;
        assert!(ft.is_char_device() || ft.is_fifo(), "{out} was replaced");
    }
    // A missing parent directory is created, and said.
    ctx.xpm()
        .args(["merge", "a.xpm", "-o", "new/dir/m.xpm"])
        .assert()
        .success()
        .stderr(predicate::str::contains(
            "Creating directory `new/dir` for -o",
        ));
}

/// The process umask, from /proc (Linux).
fn umask() -> u32 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("Umask:")).unwrap();
    u32::from_str_radix(line.split_whitespace().nth(1).unwrap(), 8).unwrap()
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn written_files_follow_the_umask_and_replaced_files_keep_their_mode() {
    use std::os::unix::fs::PermissionsExt as _;
    let ctx = TestContext::new();
    installed_project(&ctx);
    let want = 0o666 & !umask();
    for f in [
        ctx.path("xpm.lock"),
        ctx.path("xpm.toml"),
        files_under(&ctx.path("home/cache/blobs-v1")).remove(0),
    ] {
        assert_eq!(mode(&f), want, "{}", f.display());
    }
    let registry_files = files_under(&ctx.path("home/registry"));
    assert!(!registry_files.is_empty());
    for f in registry_files {
        assert_eq!(mode(&f), want, "{}", f.display());
    }
    ctx.xpm()
        .args(["merge", "alpha", "-o", "m.xpm"])
        .assert()
        .success();
    assert_eq!(mode(&ctx.path("m.xpm")), want);
    // An existing file keeps its own mode when xpm replaces it.
    std::fs::set_permissions(ctx.path("xpm.toml"), std::fs::Permissions::from_mode(0o640)).unwrap();
    make_expert(&ctx.path("beta.xpm"), "beta", "1.0.0", "minilm", 4096, 8);
    ctx.xpm().args(["publish", "beta.xpm"]).assert().success();
    ctx.xpm().args(["install", "beta@1"]).assert().success();
    assert!(
        std::fs::read_to_string(ctx.path("xpm.toml"))
            .unwrap()
            .contains("beta")
    );
    assert_eq!(mode(&ctx.path("xpm.toml")), 0o640);
}

#[test]
fn an_unknown_registry_scheme_or_credentials_in_a_url_are_refused() {
    let ctx = TestContext::new();
    make_expert(&ctx.path("a.xpm"), "a", "1.0.0", "minilm", 4096, 1);
    for (reg, want) in [
        (
            "htp://127.0.0.1:9/x",
            "unsupported registry scheme `htp://`",
        ),
        ("ftp://127.0.0.1/x", "unsupported registry scheme `ftp://`"),
        ("127.0.0.1:8417", "did you mean `http://127.0.0.1:8417`"),
        ("http://user:hunter2@127.0.0.1:9", "carries credentials"),
    ] {
        ctx.xpm()
            .args(["publish", "a.xpm", "--registry", reg])
            .assert()
            .failure()
            .stderr(predicate::str::contains(want).and(predicate::str::contains("hunter2").not()));
    }
    // Nothing was created under a directory named after the bad location.
    assert!(!ctx.path("htp:").exists() && !ctx.path("127.0.0.1:8417").exists());
}

#[test]
fn non_finite_values_are_never_written() {
    let ctx = TestContext::new();
    // pack: an unpacked expert whose values were edited to hold NaN.
    make_expert(&ctx.path("a.xpm"), "a", "1.0.0", "minilm", 4096, 1);
    ctx.xpm()
        .args(["unpack", "a.xpm", "-o", "d"])
        .assert()
        .success();
    let st = ctx.path("d/tensors.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    let (n, hdr) = {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let hdr: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        (n, hdr)
    };
    let (name, info) = hdr
        .as_object()
        .unwrap()
        .iter()
        .find(|(k, v)| k.ends_with("values") && v["dtype"] == "F32")
        .expect("an f32 values tensor");
    let start = 8 + n + info["data_offsets"][0].as_u64().unwrap() as usize;
    let mut bad = bytes.clone();
    bad[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&st, bad).unwrap();
    ctx.xpm()
        .args(["pack", "d", "-o", "nan.xpm"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("holds NaN").and(predicate::str::contains("non-finite")));
    assert!(!ctx.path("nan.xpm").exists(), "{name}");
    // extract: a delta that overflows f16 (65504 − (−65504)) is refused, not stored as ∞.
    let base: Tensors = vec![("w".into(), vec![2, 2], vec![-65504.0, 0.0, 0.0, 0.0])];
    let tuned: Tensors = vec![("w".into(), vec![2, 2], vec![65504.0, 0.0, 0.0, 0.5])];
    write_st(
        &ctx.path("base/model.safetensors"),
        &base,
        safetensors::Dtype::F16,
    );
    write_st(
        &ctx.path("tuned/model.safetensors"),
        &tuned,
        safetensors::Dtype::F16,
    );
    ctx.xpm()
        .args([
            "extract",
            "--base",
            "base",
            "--tuned",
            "tuned",
            "--density",
            "0.5",
        ])
        .args(["--name", "ov", "--version", "1.0.0", "-o", "ov.xpm"])
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("holds inf")
                .and(predicate::str::contains("--values-dtype f32")),
        );
    assert!(!ctx.path("ov.xpm").exists());
    ctx.xpm()
        .args([
            "extract",
            "--base",
            "base",
            "--tuned",
            "tuned",
            "--density",
            "0.5",
        ])
        .args([
            "--name",
            "ov",
            "--version",
            "1.0.0",
            "-o",
            "ov.xpm",
            "--values-dtype",
            "f32",
        ])
        .assert()
        .success();
}

#[test]
fn shapes_the_reader_would_refuse_are_refused_by_the_writer() {
    let ctx = TestContext::new();
    make_expert(&ctx.path("a.xpm"), "a", "1.0.0", "minilm", 4096, 1);
    ctx.xpm()
        .args(["unpack", "a.xpm", "-o", "d"])
        .assert()
        .success();
    let manifest = ctx.path("d/manifest.json");
    let good = std::fs::read_to_string(&manifest).unwrap();
    for shape in [
        serde_json::json!([1u64 << 57]),
        serde_json::json!([(1u64 << 32) + 1, 1u64 << 32]),
        serde_json::json!([1u64 << 32, 1u64 << 32]),
    ] {
        let mut m: serde_json::Value = serde_json::from_str(&good).unwrap();
        m["tensors"][0]["shape"] = shape.clone();
        std::fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
        ctx.xpm()
            .args(["pack", "d", "-o", "big.xpm"])
            .assert()
            .failure()
            .stderr(
                predicate::str::contains("has more than")
                    .and(predicate::str::contains("panicked").not()),
            );
        assert!(!ctx.path("big.xpm").exists(), "{shape}");
    }
}

#[test]
fn mistyped_names_get_a_did_you_mean() {
    let ctx = TestContext::new();
    make_expert(&ctx.path("sst2.xpm"), "sst2", "1.0.0", "minilm", 4096, 3);
    ctx.xpm().args(["publish", "sst2.xpm"]).assert().success();
    ctx.xpm()
        .args(["install", "sst"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("did you mean `sst2` for `sst`?"));
    for (args, want) in [
        (vec!["--strategy", "tie"], "did you mean `ties`?"),
        (
            vec!["--strategy", "sparse_mean"],
            "did you mean `sparse-mean`?",
        ),
        (
            vec!["--strategy", "ties", "--param", "densty=0.5"],
            "did you mean `density`?",
        ),
        (
            vec!["--strategy", "ties", "--preset", "mergekt"],
            "a similar value exists: 'mergekit'",
        ),
    ] {
        ctx.xpm()
            .args(["merge", "sst2.xpm", "sst2.xpm", "-o", "m.xpm"])
            .args(&args)
            .assert()
            .failure()
            .stderr(predicate::str::contains(want));
    }
}

#[test]
fn degenerate_merges_are_refused_or_warned_about() {
    let ctx = TestContext::new();
    make_expert(&ctx.path("a.xpm"), "a", "1.0.0", "minilm", 4096, 1);
    make_expert(&ctx.path("b.xpm"), "b", "1.0.0", "minilm", 4096, 2);
    let merge = |extra: &[&str]| {
        let mut c = ctx.xpm();
        c.args(["merge", "-o", "m.xpm"]).args(extra);
        c.assert()
    };
    for (args, want) in [
        (vec!["a.xpm", "b.xpm", "--weights=0,0"], "every weight is 0"),
        (
            vec!["a.xpm", "b.xpm", "--strategy", "mean", "--weights", "-1,1"],
            "sum to 0",
        ),
        (
            vec![
                "a.xpm",
                "b.xpm",
                "--strategy",
                "task-arithmetic",
                "--weights",
                "1e308,1e308",
            ],
            "their sum overflows",
        ),
        (
            vec!["a.xpm", "b.xpm", "--param", "density=0.5"],
            "`sparse-mean` does not use the parameter `density`",
        ),
        (
            vec![
                "a.xpm",
                "b.xpm",
                "--strategy",
                "ties",
                "--param",
                "normalize=false",
            ],
            "`ties` does not use the parameter `normalize`",
        ),
        (
            vec![
                "a.xpm",
                "b.xpm",
                "--strategy",
                "mean",
                "--param",
                "lambda=2",
            ],
            "`mean` takes no parameters",
        ),
    ] {
        merge(&args)
            .failure()
            .stderr(predicate::str::contains(want));
        assert!(!ctx.path("m.xpm").exists(), "{want}");
    }
    // 1e308,1e308 is 1,1 for a mean: the same bytes.
    merge(&["a.xpm", "b.xpm", "--strategy", "mean"]).success();
    let want = std::fs::read(ctx.path("m.xpm")).unwrap();
    std::fs::remove_file(ctx.path("m.xpm")).unwrap();
    merge(&[
        "a.xpm",
        "b.xpm",
        "--strategy",
        "mean",
        "--weights",
        "1e308,1e308",
    ])
    .success();
    let got = std::fs::read(ctx.path("m.xpm")).unwrap();
    assert_eq!(
        common::split_artifact(&got).2,
        common::split_artifact(&want).2,
        "the payloads differ"
    );
    std::fs::remove_file(ctx.path("m.xpm")).unwrap();
    // Under mergekit's preset, `normalize` on ties means what it means in mergekit.
    merge(&[
        "a.xpm",
        "b.xpm",
        "--strategy",
        "ties",
        "--preset",
        "mergekit",
        "--param",
        "normalize=false",
    ])
    .success();
    std::fs::remove_file(ctx.path("m.xpm")).unwrap();
    for (args, want) in [
        (vec!["a.xpm"], "merging a single expert"),
        (vec!["a.xpm", "a.xpm"], "are the same artifact"),
        (
            vec!["a.xpm", "b.xpm", "--override", "nothing.*:strategy=mean"],
            "matches no tensor",
        ),
    ] {
        merge(&args)
            .success()
            .stderr(predicate::str::contains(want));
        std::fs::remove_file(ctx.path("m.xpm")).unwrap();
    }
}

#[test]
fn a_command_waiting_for_a_lock_says_so() {
    let ctx = TestContext::new();
    make_expert(&ctx.path("alpha.xpm"), "alpha", "1.0.0", "minilm", 4096, 7);
    ctx.xpm().args(["publish", "alpha.xpm"]).assert().success();
    // Another process holds the registry's lock for a moment.
    let lock = std::fs::File::options()
        .write(true)
        .open(ctx.path("home/registry/.lock"))
        .unwrap();
    lock.lock().unwrap();
    make_expert(&ctx.path("beta.xpm"), "beta", "1.0.0", "minilm", 4096, 8);
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("xpm"))
        .current_dir(ctx.dir.path())
        .env("XPM_HOME", ctx.path("home"))
        .env("NO_COLOR", "1")
        .args(["publish", "beta.xpm"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    drop(lock);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("Waiting for the lock on"), "{err}");
}

#[test]
fn registry_serve_hands_over_to_the_server_so_signals_reach_it() {
    use std::io::BufRead;
    let ctx = TestContext::new();
    server_bin(); // built beside `xpm`
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("xpm"))
        .args([
            "registry",
            "serve",
            "--no-auth",
            "--quiet",
            "--addr",
            "127.0.0.1:0",
            "--root",
        ])
        .arg(ctx.path("srv"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http://"))
        .unwrap()
        .to_string();
    assert!(std::net::TcpStream::connect(&addr).is_ok());
    let st = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    child.wait().unwrap();
    // Nothing is left serving the port (a child server would have kept it).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::net::TcpStream::connect(&addr).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the server outlived `xpm registry serve`"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn stale_download_leftovers_are_removed_and_fresh_ones_kept() {
    let ctx = TestContext::new();
    make_expert(&ctx.path("alpha.xpm"), "alpha", "1.0.0", "minilm", 4096, 7);
    ctx.xpm().args(["publish", "alpha.xpm"]).assert().success();
    let tmp = ctx.path("home/cache/tmp-v1");
    std::fs::create_dir_all(&tmp).unwrap();
    let (old, fresh) = (tmp.join(".xpm-tmp-old"), tmp.join(".xpm-tmp-fresh"));
    for p in [&old, &fresh] {
        std::fs::write(p, b"partial").unwrap();
    }
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200))
        .unwrap();
    ctx.xpm().args(["install", "alpha@1"]).assert().success();
    assert!(!old.exists(), "a two-hour-old leftover stayed");
    assert!(
        fresh.exists(),
        "a fresh temporary file (maybe another download's) was removed"
    );
}

#[test]
fn an_f64_model_is_refused_by_extract_as_apply_would_refuse_it() {
    let ctx = TestContext::new();
    for (dir, v) in [("base", 0.0f64), ("tuned", 0.5f64)] {
        let bytes: Vec<u8> = (0..16).flat_map(|i| (v * i as f64).to_le_bytes()).collect();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![4, 4], &bytes)
                .unwrap();
        std::fs::create_dir_all(ctx.path(dir)).unwrap();
        safetensors::serialize_to_file(
            [("w".to_string(), view)],
            None,
            &ctx.path(&format!("{dir}/model.safetensors")),
        )
        .unwrap();
    }
    ctx.xpm()
        .args([
            "extract",
            "--base",
            "base",
            "--tuned",
            "tuned",
            "--name",
            "f",
            "--version",
            "1.0.0",
        ])
        .args(["-o", "f.xpm"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("is f64").and(predicate::str::contains("convert")));
    assert!(!ctx.path("f.xpm").exists());
}

#[test]
fn negative_numbers_are_values_and_a_zero_limit_is_refused() {
    let ctx = TestContext::new();
    make_expert(&ctx.path("a.xpm"), "a", "1.0.0", "minilm", 4096, 1);
    make_expert(&ctx.path("b.xpm"), "b", "1.0.0", "minilm", 4096, 2);
    ctx.xpm()
        .args([
            "merge",
            "a.xpm",
            "b.xpm",
            "--strategy",
            "task-arithmetic",
            "--weights",
            "-1,2",
        ])
        .args(["-o", "m.xpm"])
        .assert()
        .success();
    ctx.xpm()
        .args([
            "extract",
            "--base",
            "x",
            "--tuned",
            "y",
            "--density",
            "-1",
            "--name",
            "n",
        ])
        .args(["--version", "1.0.0", "-o", "n.xpm"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("density -1 is outside (0, 1]"));
    ctx.xpm()
        .args(["search", "a", "--limit", "0"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("invalid value '0' for '--limit"));
}

#[test]
fn a_lockfile_digest_the_registry_does_not_have_blames_the_lockfile_too() {
    let ctx = TestContext::new();
    let lock = installed_project(&ctx);
    std::fs::remove_dir_all(ctx.path("home/cache")).unwrap();
    let real = lock
        .lines()
        .find(|l| l.starts_with("cksum"))
        .unwrap()
        .to_string();
    locked_install_refuses(
        &ctx,
        lock.replace(&real, &format!("cksum = \"sha256:{}\"", "ab".repeat(32))),
        "if xpm.lock was edited",
    );
}

#[test]
fn one_damaged_index_file_does_not_break_search() {
    let ctx = TestContext::new();
    let srv = Server::start(&ctx.path("srv"));
    for name in ["alpha", "beta"] {
        make_expert(
            &ctx.path(&format!("{name}.xpm")),
            name,
            "1.0.0",
            "minilm",
            4096,
            9,
        );
        ctx.xpm()
            .args([
                "publish",
                &format!("{name}.xpm"),
                "--registry",
                &srv.url,
                "--token",
                TOKEN,
            ])
            .assert()
            .success();
    }
    std::fs::write(
        ctx.path("srv/index/be/ta/beta"),
        "this is not an index line\n",
    )
    .unwrap();
    ctx.xpm()
        .args(["search", "a", "--registry", &srv.url])
        .assert()
        .success()
        .stdout(predicate::str::contains("alpha"));
}
