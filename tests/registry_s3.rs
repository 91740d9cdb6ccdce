//! The `s3://` registry, end to end: the real `xpm` binary against moto (a real S3 server that
//! enforces `If-None-Match: *` and `If-Match`) on 127.0.0.1, one server and one port per test;
//! installs through the bucket's plain HTTP URL with no credentials and no xpm server; and the
//! probe against a fake engine that answers 200 to everything.
//!
//! moto comes from scripts/moto-env.sh (scripts/test.sh exports `XPM_MOTO`); without it the
//! moto tests are skipped, unless `XPM_REQUIRE_PYTHON=1`, where that is a failure.

mod common;
#[path = "support/service.rs"]
mod service;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use common::registry::*;
use common::*;
use predicates::prelude::*;

const BUCKET: &str = "xpm-test";

/// A moto S3 server on 127.0.0.1; killed on drop.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    /// Start moto, or `None` (test skipped) when `$XPM_MOTO` is unset and not required.
    fn start() -> Option<Moto> {
        let bin = match std::env::var_os("XPM_MOTO") {
            Some(b) => PathBuf::from(b),
            None => {
                assert!(
                    std::env::var_os("XPM_REQUIRE_PYTHON").is_none(),
                    "XPM_MOTO is not set; run scripts/moto-env.sh and set XPM_MOTO to the path \
                     it prints (scripts/test.sh does both)"
                );
                eprintln!("skipping: XPM_MOTO is not set (scripts/moto-env.sh)");
                return None;
            }
        };
        let (child, endpoint) = service::start_moto(&bin);
        let moto = Moto { child, endpoint };
        // moto checks no signatures: an unsigned PUT creates the bucket.
        let r = reqwest::blocking::Client::new()
            .put(format!("{}/{BUCKET}", moto.endpoint))
            .send()
            .unwrap();
        assert!(r.status().is_success(), "create bucket: {}", r.status());
        Some(moto)
    }

    /// Let anyone read the bucket's objects (a bucket policy), as a public bucket or a CDN
    /// origin is set up: the plain HTTP front of the registry.
    fn make_public(&self) {
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Sid": "PublicRead", "Effect": "Allow", "Principal": "*",
                "Action": "s3:GetObject", "Resource": format!("arn:aws:s3:::{BUCKET}/*"),
            }],
        });
        let r = reqwest::blocking::Client::new()
            .put(format!("{}/{BUCKET}?policy", self.endpoint))
            .header("Content-Type", "application/json")
            .body(policy.to_string())
            .send()
            .unwrap();
        assert!(r.status().is_success(), "bucket policy: {}", r.status());
    }

    /// GET an object anonymously over plain HTTP.
    fn get(&self, key: &str) -> reqwest::blocking::Response {
        reqwest::blocking::get(format!("{}/{BUCKET}/{key}", self.endpoint)).unwrap()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `xpm` with S3 credentials and the endpoint of `endpoint`, and no other AWS settings.
fn xpm_s3(ctx: &TestContext, endpoint: &str) -> assert_cmd::Command {
    let mut c = ctx.xpm();
    for k in aws_vars() {
        c.env_remove(k);
    }
    c.envs(s3_vars(endpoint));
    c
}

fn s3_env(c: &mut Command, endpoint: &str) {
    for k in aws_vars() {
        c.env_remove(k);
    }
    c.envs(s3_vars(endpoint));
}

/// The AWS settings of the test's own environment (removed: tests see only their own).
fn aws_vars() -> Vec<std::ffi::OsString> {
    std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| k.to_string_lossy().starts_with("AWS_"))
        .collect()
}

fn s3_vars(endpoint: &str) -> [(&'static str, String); 4] {
    [
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("XPM_S3_ENDPOINT", endpoint.into()),
    ]
}

fn expert(ctx: &TestContext, name: &str, version: &str, seed: u64) -> String {
    let file = format!("{}-{version}-{seed}.xpm", name.replace('/', "-"));
    make_expert(&ctx.path(&file), name, version, "minilm", 4096, seed);
    file
}

/// The lines of an index object, read with a plain anonymous GET (after [`Moto::make_public`]).
fn index_lines(moto: &Moto, key: &str) -> Vec<serde_json::Value> {
    let r = moto.get(key);
    if r.status() == reqwest::StatusCode::NOT_FOUND {
        return vec![];
    }
    assert!(r.status().is_success(), "{key}: {}", r.status());
    r.text()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn publish_yank_search_install_through_s3() {
    let Some(moto) = Moto::start() else { return };
    let ctx = TestContext::new();
    let reg = format!("s3://{BUCKET}/team-reg");
    // Reading a registry that was never published to names the problem.
    xpm_s3(&ctx, &moto.endpoint)
        .args(["install", "sst2", "--registry", &reg])
        .assert()
        .failure()
        .stderr(predicate::str::contains("is not an xpm registry"));
    for (n, v) in [
        ("sst2", "1.2.0"),
        ("sst2", "1.3.1"),
        ("sst2", "2.0.0"),
        ("team/news", "2.0.3"),
    ] {
        let f = expert(&ctx, n, v, 1);
        xpm_s3(&ctx, &moto.endpoint)
            .args(["publish", &f, "--registry", &reg])
            .assert()
            .success()
            .stderr(predicate::str::contains(format!("Published {n}@{v}")));
    }
    // Versions are immutable.
    let again = expert(&ctx, "sst2", "1.3.1", 2);
    xpm_s3(&ctx, &moto.endpoint)
        .args(["publish", &again, "--registry", &reg])
        .assert()
        .failure()
        .stderr(predicate::str::contains("sst2@1.3.1 already exists"));

    xpm_s3(&ctx, &moto.endpoint)
        .args(["search", "test", "expert", "--registry", &reg])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("sst2 = \"2.0.0\"").and(predicate::str::contains("team/news")),
        );
    xpm_s3(&ctx, &moto.endpoint)
        .args([
            "install",
            "sst2@^1.2",
            "team/news@~2.0.1",
            "--registry",
            &reg,
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("sst2@1.3.1 (downloaded)"));
    let lock = std::fs::read_to_string(ctx.path("xpm.lock")).unwrap();
    assert!(
        lock.contains(&format!("source = \"{reg}\"")) && lock.contains("version = \"1.3.1\""),
        "{lock}"
    );
    let installed = files_under(&ctx.path("home/cache/blobs-v1"));
    assert_eq!(installed.len(), 2);
    for p in &installed {
        ctx.xpm().arg("verify").arg(p).assert().success();
    }

    // Yank: a fresh project resolves around it; the lockfile's pin still installs it.
    xpm_s3(&ctx, &moto.endpoint)
        .args(["yank", "sst2@1.3.1", "--registry", &reg])
        .assert()
        .success();
    let fresh = TestContext::new();
    xpm_s3(&fresh, &moto.endpoint)
        .args(["install", "sst2@^1.2", "--registry", &reg])
        .assert()
        .success()
        .stdout(predicate::str::contains("sst2@1.2.0"));
    xpm_s3(&ctx, &moto.endpoint)
        .args(["install", "--locked", "--registry", &reg])
        .assert()
        .success();
    xpm_s3(&ctx, &moto.endpoint)
        .args(["yank", "sst2@1.3.1", "--undo", "--registry", &reg])
        .assert()
        .success();

    // The layout in the bucket is a registry directory's, with the cache metadata a CDN needs.
    moto.make_public();
    let lines = index_lines(&moto, "team-reg/index/ss/t2/sst2");
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1]["yanked"], false);
    assert_eq!(
        index_lines(&moto, "team-reg/index/@team/ne/ws/news").len(),
        1
    );
    let idx = moto.get("team-reg/index/ss/t2/sst2");
    assert_eq!(idx.headers()["cache-control"], "no-cache");
    let cksum = lines[0]["cksum"].as_str().unwrap();
    let hex = &cksum["sha256:".len()..];
    let blob = moto.get(&format!("team-reg/blobs/sha256/{}/{hex}", &hex[..2]));
    assert!(blob.status().is_success());
    assert_eq!(
        blob.headers()["cache-control"],
        "public, max-age=31536000, immutable"
    );
    let cfg: serde_json::Value = moto.get("team-reg/config.json").json().unwrap();
    assert_eq!(cfg["dl"], "blobs/sha256/{prefix}/{sha256}");
    assert!(cfg.get("api").is_none());
}

#[test]
fn installs_through_the_buckets_plain_http_url_without_credentials() {
    let Some(moto) = Moto::start() else { return };
    let ctx = TestContext::new();
    let reg = format!("s3://{BUCKET}/pub/v1");
    for (n, v) in [
        ("alpha", "1.0.0"),
        ("alpha", "1.1.0"),
        ("team/beta", "0.3.0"),
    ] {
        let f = expert(&ctx, n, v, 3);
        xpm_s3(&ctx, &moto.endpoint)
            .args(["publish", &f, "--registry", &reg])
            .assert()
            .success();
    }
    moto.make_public();
    // The existing HTTP client, no xpm server and no AWS settings at all.
    let url = format!("{}/{BUCKET}/pub/v1", moto.endpoint);
    let reader = TestContext::new();
    let mut install = reader.xpm();
    for k in aws_vars() {
        install.env_remove(k);
    }
    install
        .env_remove("XPM_S3_ENDPOINT")
        .args(["install", "alpha", "team/beta@0.3", "--registry", &url])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("alpha@1.1.0 (downloaded)")
                .and(predicate::str::contains("team/beta@0.3.0 (downloaded)")),
        );
    let lock = std::fs::read_to_string(reader.path("xpm.lock")).unwrap();
    assert!(lock.contains(&format!("source = \"{url}\"")), "{lock}");
    // The bytes are the bytes published.
    let out = reader
        .xpm()
        .args(["install", "alpha", "--registry", &url, "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        std::fs::read(report["experts"][0]["path"].as_str().unwrap()).unwrap(),
        std::fs::read(ctx.path("alpha-1.1.0-3.xpm")).unwrap()
    );
    // A read-only front: config.json names no API.
    reader
        .xpm()
        .args(["yank", "alpha@1.1.0", "--registry", &url])
        .assert()
        .failure()
        .stderr(predicate::str::contains("read-only"));
}

#[test]
fn eight_concurrent_publishers_of_distinct_versions_lose_nothing() {
    let Some(moto) = Moto::start() else { return };
    let ctx = TestContext::new();
    let reg = format!("s3://{BUCKET}/crowd");
    // The first publish creates config.json; the race is on the index object.
    let first = expert(&ctx, "crowd", "0.1.0", 100);
    xpm_s3(&ctx, &moto.endpoint)
        .args(["publish", &first, "--registry", &reg, "-q"])
        .assert()
        .success();
    let files: Vec<String> = (0..8)
        .map(|i| expert(&ctx, "crowd", &format!("1.{i}.0"), i))
        .collect();
    let start = Instant::now();
    let children: Vec<_> = files
        .iter()
        .map(|f| {
            let mut c = Command::new(assert_cmd::cargo::cargo_bin("xpm"));
            c.current_dir(ctx.path(""))
                .env("XPM_HOME", ctx.path("home"))
                .args(["publish", f, "--registry", &reg, "-q"])
                .stderr(Stdio::piped());
            s3_env(&mut c, &moto.endpoint);
            c.spawn().unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "8 concurrent publishes to moto: {:.2} s",
        start.elapsed().as_secs_f64()
    );
    moto.make_public();
    let lines = index_lines(&moto, "crowd/index/cr/ow/crowd");
    let mut versions: Vec<&str> = lines.iter().map(|l| l["vers"].as_str().unwrap()).collect();
    versions.sort();
    assert_eq!(
        versions,
        [
            "0.1.0", "1.0.0", "1.1.0", "1.2.0", "1.3.0", "1.4.0", "1.5.0", "1.6.0", "1.7.0"
        ]
    );
    xpm_s3(&ctx, &moto.endpoint)
        .args(["install", "crowd@=1.7.0", "crowd@>=1.7", "--registry", &reg])
        .assert()
        .success();
}

#[test]
fn two_publishers_of_one_version_one_wins_the_other_is_told_it_exists() {
    let Some(moto) = Moto::start() else { return };
    let ctx = TestContext::new();
    let reg = format!("s3://{BUCKET}/race");
    let seed = expert(&ctx, "duel", "0.0.1", 50);
    xpm_s3(&ctx, &moto.endpoint)
        .args(["publish", &seed, "--registry", &reg, "-q"])
        .assert()
        .success();
    for round in 0..4 {
        let version = format!("1.{round}.0");
        // Different bytes, same version.
        let files = [
            expert(&ctx, "duel", &version, 1000 + round),
            expert(&ctx, "duel", &version, 2000 + round),
        ];
        let children: Vec<_> = files
            .iter()
            .map(|f| {
                let mut c = Command::new(assert_cmd::cargo::cargo_bin("xpm"));
                c.current_dir(ctx.path(""))
                    .env("XPM_HOME", ctx.path("home"))
                    .env("NO_COLOR", "1")
                    .args(["publish", f, "--registry", &reg, "-q"])
                    .stderr(Stdio::piped());
                s3_env(&mut c, &moto.endpoint);
                c.spawn().unwrap()
            })
            .collect();
        let outs: Vec<_> = children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        let won = outs.iter().filter(|o| o.status.success()).count();
        assert_eq!(won, 1, "round {round}: {outs:?}");
        let lost = outs.iter().find(|o| !o.status.success()).unwrap();
        let err = String::from_utf8_lossy(&lost.stderr);
        assert!(
            err.contains(&format!("duel@{version} already exists")),
            "round {round}: {err}"
        );
    }
    moto.make_public();
    let lines = index_lines(&moto, "race/index/du/el/duel");
    assert_eq!(lines.len(), 5);
}

/// A fake S3 engine that answers every request `200 OK` (with an ETag) and keeps nothing, as an
/// engine that ignores conditional headers does for PUTs.
fn ignoring_engine() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || answer_200(conn));
        }
    });
    url
}

fn answer_200(conn: TcpStream) {
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    loop {
        let mut len = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let resp = "HTTP/1.1 200 OK\r\nETag: \"0123456789abcdef0123456789abcdef\"\r\n\
                    Content-Length: 0\r\n\r\n";
        if w.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

#[test]
fn the_probe_refuses_an_engine_that_ignores_conditional_writes() {
    let ctx = TestContext::new();
    let endpoint = ignoring_engine();
    let f = expert(&ctx, "sst2", "1.0.0", 9);
    xpm_s3(&ctx, &endpoint)
        .args(["publish", &f, "--registry", "s3://garage-bucket/reg"])
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("refusing to write to this storage")
                .and(predicate::str::contains("ignores `If-None-Match: *`"))
                .and(predicate::str::contains("conditional writes")),
        );
    // Yank needs the same compare-and-swap, and is refused the same way (it reads config.json
    // first: the fake answers 200 to that too).
    xpm_s3(&ctx, &endpoint)
        .args(["yank", "sst2@1.0.0", "--registry", "s3://garage-bucket/reg"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("ignores `If-None-Match: *`"));
}

#[test]
fn s3_locations_are_checked_before_anything_is_sent() {
    let ctx = TestContext::new();
    let f = expert(&ctx, "sst2", "1.0.0", 9);
    for (loc, want) in [
        ("s3://AKIAX:secret@bucket/reg", "carries credentials"),
        ("s3://Bad_Bucket/reg", "not a valid S3 registry location"),
        ("s3://bucket/../up", "not a valid S3 registry location"),
    ] {
        let out = xpm_s3(&ctx, "http://127.0.0.1:9")
            .args(["publish", &f, "--registry", loc])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{loc}: {err}");
        assert!(!err.contains("secret"), "{err}");
    }
}

/// `xpm-registry serve --storage s3://…`: the server keeps its registry in the bucket, in the
/// same layout, so what it publishes installs through `s3://` too (and the other way round).
#[test]
fn the_registry_server_stores_its_registry_in_a_bucket() {
    let Some(moto) = Moto::start() else { return };
    let ctx = TestContext::new();
    let reg = format!("s3://{BUCKET}/served");
    let mut cmd = Command::new(server_bin());
    cmd.args(["serve", "--storage", &reg, "--addr", "127.0.0.1:0", "-q"])
        .env("XPM_REGISTRY_TOKENS", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    s3_env(&mut cmd, &moto.endpoint);
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("server did not start: {line:?}"))
        .to_string();
    assert!(line.contains(&format!("storage {reg}")), "{line}");
    let f = expert(&ctx, "sst2", "1.0.0", 4);
    ctx.xpm()
        .args(["publish", &f, "--registry", &url, "--token", TOKEN])
        .assert()
        .success();
    let g = expert(&ctx, "sst2", "1.1.0", 5);
    xpm_s3(&ctx, &moto.endpoint)
        .args(["publish", &g, "--registry", &reg])
        .assert()
        .success();
    ctx.xpm()
        .args(["publish", &f, "--registry", &url, "--token", TOKEN])
        .assert()
        .failure()
        .stderr(predicate::str::contains("already exists"));
    ctx.xpm()
        .args(["search", "sst2", "--registry", &url])
        .assert()
        .success()
        .stdout(predicate::str::contains("sst2 = \"1.1.0\""));
    ctx.xpm()
        .args(["yank", "sst2@1.1.0", "--registry", &url, "--token", TOKEN])
        .assert()
        .success();
    let a = TestContext::new();
    a.xpm()
        .args(["install", "sst2", "--registry", &url])
        .assert()
        .success()
        .stdout(predicate::str::contains("sst2@1.0.0 (downloaded)"));
    let b = TestContext::new();
    xpm_s3(&b, &moto.endpoint)
        .args(["install", "sst2", "--registry", &reg])
        .assert()
        .success()
        .stdout(predicate::str::contains("sst2@1.0.0 (downloaded)"));
    let _ = child.kill();
    let _ = child.wait();
}
