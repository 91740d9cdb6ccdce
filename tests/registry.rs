//! Registry, resolver and install, end to end: the real `xpm` binary against the real
//! `xpm-registry` server on 127.0.0.1 (and against a local directory registry).

mod common;

use std::path::Path;

use common::registry::*;
use common::*;
use predicates::prelude::*;

/// Publish `file` to `url` with the test token.
fn publish(ctx: &TestContext, url: &str, file: &str) -> assert_cmd::assert::Assert {
    ctx.xpm()
        .args(["publish", file, "--registry", url, "--token", TOKEN])
        .assert()
}

fn expert(ctx: &TestContext, name: &str, version: &str, base: &str) -> String {
    let file = format!("{}-{version}.xpm", name.replace('/', "-"));
    make_expert(
        &ctx.path(&file),
        name,
        version,
        base,
        4096,
        seed_of(name, version),
    );
    file
}

fn seed_of(name: &str, version: &str) -> u64 {
    xpm::rng::splitmix64(name.len() as u64 * 1_000_003 + version.len() as u64)
        ^ name
            .bytes()
            .chain(version.bytes())
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64))
}

/// The store of `ctx`'s XPM_HOME: every file under cache/blobs-v1 and installed-v1.
fn store_files(ctx: &TestContext) -> Vec<std::path::PathBuf> {
    let mut v = files_under(&ctx.path("home/cache/blobs-v1"));
    v.extend(files_under(&ctx.path("home/installed-v1")));
    v
}

fn no_tmp_left(dir: &Path) {
    let left: Vec<_> = files_under(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".xpm-tmp-")
        })
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

#[test]
fn publish_search_install_lock_over_http() {
    let ctx = TestContext::new();
    let srv = Server::start(&ctx.path("srv"));
    for (n, v) in [
        ("sst2", "1.2.0"),
        ("sst2", "1.3.1"),
        ("sst2", "2.0.0"),
        ("team/news", "2.0.3"),
    ] {
        let f = expert(&ctx, n, v, "minilm");
        publish(&ctx, &srv.url, &f).success();
    }
    // The index is one JSON line per version, in the cargo-style layout.
    let lines = srv.index_lines("ss/t2/sst2");
    assert_eq!(lines.len(), 3);
    assert_eq!(srv.index_lines("@team/ne/ws/news").len(), 1);
    assert_eq!(lines[0]["base"]["id"], "minilm");
    assert_eq!(lines[0]["yanked"], false);

    ctx.xpm()
        .args(["search", "test", "expert", "--registry", &srv.url])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("sst2 = \"2.0.0\"").and(predicate::str::contains("team/news")),
        );

    ctx.xpm()
        .args([
            "install",
            "sst2@^1.2",
            "team/news@~2.0.1",
            "--registry",
            &srv.url,
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("sst2@1.3.1 (downloaded)"));
    let lock = std::fs::read_to_string(ctx.path("xpm.lock")).unwrap();
    assert!(
        lock.contains("version = \"1.3.1\"") && lock.contains("name = \"team/news\""),
        "{lock}"
    );
    // The installed artifact is byte-identical to what was published.
    let installed = ctx
        .xpm()
        .args([
            "install",
            "sst2@^1.2",
            "team/news@~2.0.1",
            "--registry",
            &srv.url,
            "--json",
        ])
        .output()
        .unwrap();
    assert!(installed.status.success());
    let report: serde_json::Value = serde_json::from_slice(&installed.stdout).unwrap();
    let path = report["experts"][0]["path"].as_str().unwrap();
    assert_eq!(
        std::fs::read(path).unwrap(),
        std::fs::read(ctx.path("sst2-1.3.1.xpm")).unwrap()
    );
    assert_eq!(report["experts"][0]["downloaded"], false);
    // The second run revalidated the index with its ETag.
    assert!(
        srv.access_log().contains("GET /index/ss/t2/sst2 304"),
        "{}",
        srv.access_log()
    );

    ctx.xpm()
        .arg("list")
        .assert()
        .success()
        .stdout(predicate::str::contains("sst2").and(predicate::str::contains("1.3.1")));
    // The installed expert can be inspected through the store path.
    ctx.xpm().args(["verify", path]).assert().success();
}

#[test]
fn tokens_are_required_and_checked() {
    let ctx = TestContext::new();
    let srv = Server::start(&ctx.path("srv"));
    let f = expert(&ctx, "alpha", "1.0.0", "minilm");
    ctx.xpm()
        .args(["publish", &f, "--registry", &srv.url])
        .env_remove("XPM_TOKEN")
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("requires a token").and(predicate::str::contains("--token")),
        );
    ctx.xpm()
        .args(["publish", &f, "--registry", &srv.url, "--token", "wrong"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("token is not valid"));
    ctx.xpm()
        .args([
            "yank",
            "alpha@1.0.0",
            "--registry",
            &srv.url,
            "--token",
            "wrong",
        ])
        .assert()
        .failure();
    assert!(srv.index_lines("al/ph/alpha").is_empty());
    assert!(srv.blobs().is_empty());
    // The token never reaches the log.
    publish(&ctx, &srv.url, &f).success();
    assert!(!srv.access_log().contains(TOKEN) && !srv.access_log().contains("wrong"));
}

#[test]
fn versions_are_immutable() {
    let ctx = TestContext::new();
    let srv = Server::start(&ctx.path("srv"));
    let f = expert(&ctx, "alpha", "1.0.0", "minilm");
    publish(&ctx, &srv.url, &f).success();
    let before = srv.blobs();
    // Same version, other bytes.
    make_expert(
        &ctx.path("other.xpm"),
        "alpha",
        "1.0.0",
        "minilm",
        4096,
        999,
    );
    publish(&ctx, &srv.url, "other.xpm").failure().stderr(
        predicate::str::contains("already exists").and(predicate::str::contains("immutable")),
    );
    // Build metadata does not make a new version.
    make_expert(
        &ctx.path("meta.xpm"),
        "alpha",
        "1.0.0+rebuild",
        "minilm",
        4096,
        998,
    );
    publish(&ctx, &srv.url, "meta.xpm")
        .failure()
        .stderr(predicate::str::contains("already exists"));
    assert_eq!(srv.index_lines("al/ph/alpha").len(), 1);
    assert_eq!(srv.blobs(), before);
    no_tmp_left(&srv.root);
}

#[test]
fn bad_names_are_refused() {
    let ctx = TestContext::new();
    let srv = Server::start(&ctx.path("srv"));
    let long = "x".repeat(300);
    for bad in ["../x", "A", long.as_str(), ""] {
        ctx.xpm()
            .args(["install", &format!("{bad}@1"), "--registry", &srv.url])
            .assert()
            .failure()
            .stderr(predicate::str::contains("invalid requirement"));
    }
    // Server side: an artifact whose manifest carries a bad name, uploaded directly.
    let f = expert(&ctx, "alpha", "1.0.0", "minilm");
    for bad in ["../x", "A", long.as_str(), "", "con"] {
        rewrite_manifest(&ctx.path(&f), |m| m["name"] = bad.into());
        let bytes = std::fs::read(ctx.path(&f)).unwrap();
        let resp = reqwest::blocking::Client::new()
            .put(format!("{}/api/v1/experts/new", srv.url))
            .bearer_auth(TOKEN)
            .header("X-Xpm-Sha256", sha256_hex(&bytes))
            .body(bytes)
            .send()
            .unwrap();
        assert_eq!(resp.status(), 400, "{bad}");
        assert!(
            resp.text().unwrap().contains("invalid expert name"),
            "{bad}"
        );
        // And the client refuses it before uploading.
        publish(&ctx, &srv.url, &f)
            .failure()
            .stderr(predicate::str::contains("cannot be published"));
    }
    assert!(srv.blobs().is_empty());
    assert!(files_under(&srv.root.join("index")).is_empty());
}

#[test]
fn uploads_are_validated_by_the_server() {
    let ctx = TestContext::new();
    let srv = Server::start(&ctx.path("srv"));
    let client = reqwest::blocking::Client::new();
    let put = |body: Vec<u8>, digest: &str| {
        client
            .put(format!("{}/api/v1/experts/new", srv.url))
            .bearer_auth(TOKEN)
            .header("X-Xpm-Sha256", digest)
            .body(body)
            .send()
            .unwrap()
    };
    // Not an artifact at all.
    let junk = b"definitely not an xpm artifact".repeat(100);
    let r = put(junk.clone(), &sha256_hex(&junk));
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("not a valid xpm artifact"));
    // A real artifact whose bytes do not match the claimed digest.
    let f = expert(&ctx, "alpha", "1.0.0", "minilm");
    let bytes = std::fs::read(ctx.path(&f)).unwrap();
    let r = put(bytes.clone(), &format!("sha256:{}", "0".repeat(64)));
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("not the claimed"));
    // A damaged artifact (one payload byte flipped), digest recomputed so only the
    // server's verification can catch it.
    let mut bad = bytes.clone();
    bad[40] ^= 0xff;
    let r = put(bad.clone(), &sha256_hex(&bad));
    assert_eq!(r.status(), 400, "{:?}", r.text());
    // An artifact of a newer format than the server reads (its manifest from a future minor
    // that this build cannot parse): refused as such, with the way out.
    let (mut prelude, mut manifest, payload) = split_artifact(&bytes);
    prelude[10] = 9;
    manifest["format_version"] = "1.9".into();
    manifest["payload"]["header"]["blake3"] = serde_json::json!({"a": "future digest"});
    let future = assemble_artifact(&prelude, &manifest, &payload);
    let r = put(future.clone(), &sha256_hex(&future));
    assert_eq!(r.status(), 400);
    let text = r.text().unwrap();
    assert!(text.contains("uses xpm format 1.9"), "{text}");
    assert!(
        text.contains("this registry reads formats 1.0 to 1.2"),
        "{text}"
    );
    assert!(text.contains("upgrade xpm-registry"), "{text}");
    assert!(srv.blobs().is_empty());
    assert!(files_under(&srv.root.join("index")).is_empty());
    no_tmp_left(&srv.root);
}

#[test]
fn upload_size_limit() {
    let ctx = TestContext::new();
    let srv = Server::start_with(&ctx.path("srv"), &["--max-upload-size", "2KiB"]);
    let f = expert(&ctx, "alpha", "1.0.0", "minilm");
    publish(&ctx, &srv.url, &f)
        .failure()
        .stderr(predicate::str::contains("limit"));
    let bytes = std::fs::read(ctx.path(&f)).unwrap();
    let r = reqwest::blocking::Client::new()
        .put(format!("{}/api/v1/experts/new", srv.url))
        .bearer_auth(TOKEN)
        .header("X-Xpm-Sha256", sha256_hex(&bytes))
        .body(bytes)
        .send()
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(srv.blobs().is_empty());
}

#[test]
fn corrupted_blob_on_server_is_refused_and_nothing_kept() {
    let ctx = TestContext::new();
    let srv = Server::start(&ctx.path("srv"));
    let a = expert(&ctx, "alpha", "1.0.0", "minilm");
    let b = expert(&ctx, "beta", "1.0.0", "minilm");
    publish(&ctx, &srv.url, &a).success();
    publish(&ctx, &srv.url, &b).success();
    // Damage alpha's blob on the server after publication.
    let digest = sha256_hex(&std::fs::read(ctx.path(&a)).unwrap())["sha256:".len()..].to_string();
    let blob = srv
        .root
        .join(format!("blobs/sha256/{}/{digest}", &digest[..2]));
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    ctx.xpm()
        .args(["install", "alpha", "beta", "--registry", &srv.url])
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("does not match the registry's index")
                .and(predicate::str::contains("alpha@1.0.0")),
        );
    assert!(store_files(&ctx).is_empty(), "{:?}", store_files(&ctx));
    assert!(!ctx.path("xpm.lock").exists());
    no_tmp_left(&ctx.path("home"));
}

#[test]
fn dropped_connections_are_retried_then_reported() {
    let ctx = TestContext::new();
    let mut srv = Server::start(&ctx.path("srv"));
    let a = expert(&ctx, "alpha", "1.0.0", "minilm");
    make_expert(&ctx.path("big.xpm"), "big", "1.0.0", "minilm", 3 << 20, 5);
    publish(&ctx, &srv.url, &a).success();
    publish(&ctx, &srv.url, "big.xpm").success();

    // One cut: the retry completes the download.
    let relay1 = CuttingRelay::start(&srv.url, 1, 64 << 10);
    ctx.xpm()
        .args(["install", "big", "--registry", &relay1.url])
        .assert()
        .success();
    assert_eq!(
        relay1.cuts_left.load(std::sync::atomic::Ordering::SeqCst),
        0
    );

    // Every attempt cut mid-transfer (the server dies mid-download): a clear error, nothing kept.
    let ctx2 = TestContext::new();
    let relay = CuttingRelay::start(&srv.url, usize::MAX, 64 << 10);
    ctx2.xpm()
        .args(["install", "alpha", "big", "--registry", &relay.url])
        .assert()
        .failure()
        .stderr(predicate::str::contains("big@1.0.0").and(predicate::str::contains("hint")));
    assert!(store_files(&ctx2).is_empty());
    assert!(!ctx2.path("xpm.lock").exists());
    no_tmp_left(&ctx2.path("home"));

    // Server gone: a clear error about reaching it; --offline still installs what is cached.
    srv.stop();
    ctx.xpm()
        .args(["install", "big", "--registry", &srv.url])
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "check that the registry is running",
        ));
    ctx.xpm()
        .args(["install", "big", "--registry", &relay1.url, "--offline"])
        .assert()
        .success()
        .stdout(predicate::str::contains("big@1.0.0 (cached)"));
    ctx.xpm()
        .args(["install", "alpha", "--registry", &relay1.url, "--offline"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("--offline"));
}

#[test]
fn resolution_errors_explain_what_was_excluded() {
    let ctx = TestContext::new();
    let srv = Server::start(&ctx.path("srv"));
    for (n, v, base) in [
        ("alpha", "1.0.0", "minilm"),
        ("alpha", "1.1.0", "bert"),
        ("beta", "1.0.0", "minilm"),
        ("gamma", "1.0.0", "bert"),
    ] {
        publish(&ctx, &srv.url, &expert(&ctx, n, v, base)).success();
    }
    ctx.xpm()
        .args(["install", "nosuch", "--registry", &srv.url])
        .assert()
        .failure()
        .stderr(predicate::str::contains("nosuch@*: no such expert"));
    ctx.xpm()
        .args(["install", "alpha@^3", "--registry", &srv.url])
        .assert()
        .failure()
        .stderr(predicate::str::contains("1.1.0  does not match ^3"));
    ctx.xpm()
        .args(["install", "beta", "gamma", "--registry", &srv.url])
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("different base")
                .and(predicate::str::contains("candidate on base bert")),
        );
    // alpha's newest is on bert; with beta (minilm only) the set falls back to alpha 1.0.0.
    ctx.xpm()
        .args(["install", "alpha", "beta", "--registry", &srv.url])
        .assert()
        .success()
        .stdout(predicate::str::contains("alpha@1.0.0"));
    // A pinned base excludes the rest.
    ctx.xpm()
        .args(["install", "alpha", "--registry", &srv.url, "--base", "bert"])
        .assert()
        .success()
        .stdout(predicate::str::contains("alpha@1.1.0"));
    ctx.xpm()
        .args([
            "install",
            "beta",
            "--registry",
            &srv.url,
            "--base",
            &base_digest("bert"),
        ])
        .assert()
        .failure()
        .stderr(predicate::str::contains("is not the pinned base"));
    // Failed resolutions installed nothing: only the two successful installs are recorded.
    let records = files_under(&ctx.path("home/installed-v1"));
    assert_eq!(records.len(), 3, "{records:?}");
}

#[test]
fn yank_project_lock_and_locked_installs() {
    let ctx = TestContext::new();
    let srv = Server::start(&ctx.path("srv"));
    for v in ["1.0.0", "1.1.0"] {
        publish(&ctx, &srv.url, &expert(&ctx, "alpha", v, "minilm")).success();
    }
    ctx.xpm()
        .args(["init", "--registry", &srv.url])
        .assert()
        .success();
    ctx.xpm()
        .args(["init"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("already exists"));
    ctx.xpm()
        .args(["install", "alpha@^1"])
        .assert()
        .success()
        .stdout(predicate::str::contains("alpha@1.1.0"));
    let toml = std::fs::read_to_string(ctx.path("xpm.toml")).unwrap();
    assert!(
        toml.contains("alpha = \"^1\"") && toml.contains("# xpm project"),
        "{toml}"
    );

    // Yank 1.1.0: the lockfile pins it, so a plain install keeps it.
    ctx.xpm()
        .args(["yank", "alpha@1.1.0", "--token", TOKEN])
        .assert()
        .success();
    assert_eq!(srv.index_lines("al/ph/alpha")[1]["yanked"], true);
    ctx.xpm()
        .arg("install")
        .assert()
        .success()
        .stdout(predicate::str::contains("alpha@1.1.0 (cached, yanked)"));
    ctx.xpm().args(["install", "--locked"]).assert().success();
    // A fresh project resolves past the yanked version.
    let ctx2 = TestContext::new();
    ctx2.xpm()
        .args(["install", "alpha", "--registry", &srv.url])
        .assert()
        .success()
        .stdout(predicate::str::contains("alpha@1.0.0"));
    // A requirement on the command line replaces xpm.toml's for that name.
    ctx.xpm()
        .args(["install", "alpha@=1.0.0"])
        .assert()
        .success()
        .stdout(predicate::str::contains("alpha@1.0.0"));
    let toml = std::fs::read_to_string(ctx.path("xpm.toml")).unwrap();
    assert!(
        toml.contains("alpha = \"=1.0.0\"") && !toml.contains("\"^1\""),
        "{toml}"
    );
    ctx.xpm().args(["install", "alpha@^1"]).assert().success();
    // --locked refuses a lockfile that no longer covers xpm.toml.
    let toml = std::fs::read_to_string(ctx.path("xpm.toml")).unwrap();
    std::fs::write(
        ctx.path("xpm.toml"),
        toml.replace("alpha = \"^1\"", "alpha = \"^1\"\nbeta = \"1\""),
    )
    .unwrap();
    let lock_before = std::fs::read(ctx.path("xpm.lock")).unwrap();
    ctx.xpm()
        .args(["install", "--locked"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("out of date").and(predicate::str::contains("beta")));
    assert_eq!(std::fs::read(ctx.path("xpm.lock")).unwrap(), lock_before);
    // Un-yank; `--json` prints the recorded index line.
    let o = ctx
        .xpm()
        .args(["yank", "alpha@1.1.0", "--undo", "--token", TOKEN, "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(srv.index_lines("al/ph/alpha")[1]["yanked"], false);
    assert_eq!(printed, srv.index_lines("al/ph/alpha")[1]);
    ctx.xpm()
        .args(["yank", "alpha@9.9.9", "--token", TOKEN])
        .assert()
        .failure()
        .stderr(predicate::str::contains("never published"));
}

#[test]
fn local_directory_registry_needs_no_server() {
    let ctx = TestContext::new();
    let a = expert(&ctx, "alpha", "1.0.0", "minilm");
    // Default registry: $XPM_HOME/registry, created on first publish.
    ctx.xpm().args(["publish", &a]).assert().success();
    ctx.xpm()
        .args(["publish", &a])
        .assert()
        .failure()
        .stderr(predicate::str::contains("already exists"));
    ctx.xpm()
        .args(["search", "alpha"])
        .assert()
        .success()
        .stdout(predicate::str::contains("alpha = \"1.0.0\""));
    ctx.xpm().args(["install", "alpha@1"]).assert().success();
    ctx.xpm().args(["yank", "alpha@1.0.0"]).assert().success();
    let other = TestContext::new();
    let reg = ctx.path("home/registry");
    other
        .xpm()
        .args(["install", "alpha", "--registry"])
        .arg(format!("file://{}", reg.display()))
        .assert()
        .failure()
        .stderr(predicate::str::contains("yanked"));
}

/// 8 processes publish different versions of one expert and install at once, into one
/// registry and one XPM_HOME: no version lost, no torn file, index valid.
fn concurrent_publish_install(ctx: &TestContext, url: &str) {
    let files: Vec<String> = (0..8)
        .map(|i| expert(ctx, "crowd", &format!("1.{i}.0"), "minilm"))
        .collect();
    // A first version so installs have something to resolve from the start.
    make_expert(
        &ctx.path("crowd-0.1.0.xpm"),
        "crowd",
        "0.1.0",
        "minilm",
        4096,
        77,
    );
    publish(ctx, url, "crowd-0.1.0.xpm").success();
    let children: Vec<_> = files
        .iter()
        .enumerate()
        .flat_map(|(i, f)| {
            let mut p = std::process::Command::new(assert_cmd::cargo::cargo_bin("xpm"));
            p.current_dir(ctx.path(""))
                .env("XPM_HOME", ctx.path("home"))
                .args(["publish", f, "--registry", url, "--token", TOKEN, "-q"]);
            let dir = ctx.path(&format!("proj{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let mut q = std::process::Command::new(assert_cmd::cargo::cargo_bin("xpm"));
            q.current_dir(&dir).env("XPM_HOME", ctx.path("home")).args([
                "install",
                "crowd",
                "--registry",
                url,
                "-q",
            ]);
            [p.spawn().unwrap(), q.spawn().unwrap()]
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    ctx.xpm()
        .args(["install", "crowd@=1.7.0", "--registry", url])
        .assert()
        .success();
    ctx.xpm()
        .args(["list", "--json"])
        .assert()
        .success()
        .stdout(predicate::str::contains("1.7.0"));
    for p in files_under(&ctx.path("home/cache/blobs-v1")) {
        ctx.xpm().arg("verify").arg(&p).assert().success();
    }
}

#[test]
fn concurrent_publishers_and_installers_over_http() {
    let ctx = TestContext::new();
    let srv = Server::start(&ctx.path("srv"));
    concurrent_publish_install(&ctx, &srv.url);
    let lines = srv.index_lines("cr/ow/crowd");
    let mut versions: Vec<String> = lines
        .iter()
        .map(|l| l["vers"].as_str().unwrap().to_string())
        .collect();
    versions.sort();
    assert_eq!(versions.len(), 9, "{versions:?}");
    assert_eq!(srv.blobs().len(), 9);
    no_tmp_left(&srv.root);
}

#[test]
fn concurrent_publishers_and_installers_on_a_local_registry() {
    let ctx = TestContext::new();
    let reg = format!("file://{}", ctx.path("reg").display());
    // publish creates the local registry.
    concurrent_publish_install(&ctx, &reg);
    let idx = std::fs::read_to_string(ctx.path("reg/index/cr/ow/crowd")).unwrap();
    assert_eq!(idx.lines().count(), 9);
    for l in idx.lines() {
        serde_json::from_str::<serde_json::Value>(l).unwrap();
    }
}

fn check_schema(file: &str, doc: &serde_json::Value) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schemas")
        .join(file);
    let schema: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let v = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = v.iter_errors(doc).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{file}: {errors:?}\n{doc:#}");
}

#[test]
fn documents_validate_against_their_schemas() {
    let ctx = TestContext::new();
    let srv = Server::start(&ctx.path("srv"));
    publish(
        &ctx,
        &srv.url,
        &expert(&ctx, "team/alpha", "1.0.0", "minilm"),
    )
    .success();
    for l in srv.index_lines("@team/al/ph/alpha") {
        check_schema("index-line.schema.json", &l);
    }
    let cfg: serde_json::Value = reqwest::blocking::get(format!("{}/config.json", srv.url))
        .unwrap()
        .json()
        .unwrap();
    check_schema("registry-config.schema.json", &cfg);
    let out = ctx
        .xpm()
        .args(["search", "alpha", "--json", "--registry", &srv.url])
        .output()
        .unwrap();
    check_schema(
        "search.schema.json",
        &serde_json::from_slice(&out.stdout).unwrap(),
    );
    ctx.xpm()
        .args(["install", "team/alpha@1", "--registry", &srv.url])
        .assert()
        .success();
    let lock: serde_json::Value =
        toml_edit::de::from_str(&std::fs::read_to_string(ctx.path("xpm.lock")).unwrap()).unwrap();
    check_schema("lockfile.schema.json", &lock);
    let out = ctx.xpm().args(["list", "--json"]).output().unwrap();
    check_schema(
        "installed.schema.json",
        &serde_json::from_slice(&out.stdout).unwrap(),
    );
}

#[test]
fn merge_takes_installed_experts_by_name() {
    let ctx = TestContext::new();
    for (n, v) in [("alpha", "1.0.0"), ("alpha", "1.1.0"), ("beta", "2.0.0")] {
        let f = expert(&ctx, n, v, "minilm");
        ctx.xpm().args(["publish", &f]).assert().success();
    }
    ctx.xpm()
        .args(["merge", "alpha", "-o", "m0.xpm"])
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("no installed version of `alpha`")
                .and(predicate::str::contains("xpm install alpha")),
        );
    ctx.xpm().args(["init"]).assert().success();
    ctx.xpm()
        .args(["install", "alpha@=1.0.0", "beta"])
        .assert()
        .success();
    ctx.xpm()
        .args(["install", "alpha@1.1.0", "--json"])
        .assert()
        .success();
    // The lockfile now pins alpha 1.1.0, and xpm.toml says ^1.1.0.
    ctx.xpm()
        .args([
            "merge",
            "alpha",
            "beta@2",
            "--strategy",
            "ties",
            "-o",
            "m.xpm",
        ])
        .assert()
        .success();
    let out = ctx
        .xpm()
        .args(["inspect", "m.xpm", "--json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = report.to_string();
    assert!(
        text.contains("alpha@1.1.0") && text.contains("beta@2.0.0"),
        "{text}"
    );
    // An explicit requirement picks among installed versions.
    ctx.xpm()
        .args(["merge", "alpha@=1.0.0", "beta", "-o", "m1.xpm"])
        .assert()
        .success();
    let out = ctx
        .xpm()
        .args(["inspect", "m1.xpm", "--json"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("alpha@1.0.0"));
}
