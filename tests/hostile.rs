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
        .args(["install"])
        .assert()
        .success()
        .stderr(predicate::str::contains("is damaged; fetching it again"));
    assert_eq!(std::fs::read(&blob).unwrap(), good);
    ctx.xpm()
        .args(["merge", "alpha", "alpha", "-o", "m.xpm"])
        .assert()
        .success();
}
