//! The `oci://` registry, end to end: the real `xpm` binary against a real OCI registry (Debian's
//! `docker-registry`, CNCF distribution 2.8) on 127.0.0.1 with htpasswd (Basic) auth and
//! filesystem storage, one registry per test: push, resolution over the tag list, pull by
//! digest, refused overwrites, wrong credentials, a tampered layer and a moved tag.
//!
//! Without `docker-registry` on the PATH the tests are skipped, unless `XPM_REQUIRE_OCI=1`
//! (.ci/run), where that is a failure (`apt-get install docker-registry`).

mod common;
#[path = "support/service.rs"]
mod service;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::registry::*;
use common::*;
use predicates::prelude::*;

const USER: &str = "xpm-ci";
const PASS: &str = "s3cret-pass";
const NS: &str = "team/xpm";

/// A `docker-registry` on 127.0.0.1 with Basic auth for [`USER`]; killed on drop.
struct Oci {
    child: Child,
    port: u16,
    /// The registry's filesystem storage root.
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl Oci {
    /// Start a registry, or `None` (test skipped) when `docker-registry` is not installed and
    /// `XPM_REQUIRE_OCI` is unset.
    fn start() -> Option<Oci> {
        let installed = Command::new("docker-registry")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            assert!(
                std::env::var_os("XPM_REQUIRE_OCI").is_none(),
                "docker-registry is not installed (apt-get install docker-registry)"
            );
            eprintln!(
                "skipping: docker-registry is not installed (apt-get install docker-registry)"
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let hash = bcrypt::hash(PASS, 4).unwrap();
        std::fs::write(dir.path().join("htpasswd"), format!("{USER}:{hash}\n")).unwrap();
        let (child, port) = service::start_docker_registry(dir.path(), &data, "xpm-test");
        Some(Oci {
            child,
            port,
            data,
            _dir: dir,
        })
    }

    fn location(&self) -> String {
        format!("oci://127.0.0.1:{}/{NS}", self.port)
    }

    /// GET `/v2/<path>` with the test user's credentials.
    fn get(&self, path: &str, accept: &str) -> reqwest::blocking::Response {
        reqwest::blocking::Client::new()
            .get(format!("http://127.0.0.1:{}/v2/{path}", self.port))
            .basic_auth(USER, Some(PASS))
            .header("Accept", accept)
            .send()
            .unwrap()
    }

    /// The manifest tagged `tag` in `repo` (under the namespace) and its digest.
    fn manifest(&self, repo: &str, tag: &str) -> (serde_json::Value, String) {
        let r = self.get(
            &format!("{NS}/{repo}/manifests/{tag}"),
            "application/vnd.oci.image.manifest.v1+json",
        );
        assert!(r.status().is_success(), "{repo}:{tag}: {}", r.status());
        let digest = r.headers()["docker-content-digest"]
            .to_str()
            .unwrap()
            .to_string();
        (r.json().unwrap(), digest)
    }

    /// The stored bytes of a blob in the registry's filesystem storage.
    fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.data
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// The file that points tag `tag` of `repo` at a manifest.
    fn tag_link(&self, repo: &str, tag: &str) -> PathBuf {
        self.data
            .join("docker/registry/v2/repositories")
            .join(NS)
            .join(repo)
            .join("_manifests/tags")
            .join(tag)
            .join("current/link")
    }
}

impl Drop for Oci {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `xpm` with these OCI credentials (or none), no Docker config and no token.
fn xpm_as(ctx: &TestContext, creds: Option<(&str, &str)>) -> assert_cmd::Command {
    let mut c = ctx.xpm();
    c.env("DOCKER_CONFIG", ctx.path("no-docker-config"))
        .env_remove("XPM_TOKEN")
        .env_remove("XPM_OCI_PLAIN_HTTP")
        .env_remove("XPM_OCI_USERNAME")
        .env_remove("XPM_OCI_PASSWORD");
    if let Some((u, p)) = creds {
        c.env("XPM_OCI_USERNAME", u).env("XPM_OCI_PASSWORD", p);
    }
    c
}

fn xpm_oci(ctx: &TestContext) -> assert_cmd::Command {
    xpm_as(ctx, Some((USER, PASS)))
}

fn expert(ctx: &TestContext, name: &str, version: &str, base: &str, seed: u64) -> String {
    let file = format!("{}-{version}-{seed}.xpm", name.replace('/', "-"));
    make_expert(&ctx.path(&file), name, version, base, 4096, seed);
    file
}

fn publish(ctx: &TestContext, oci: &Oci, file: &str) -> assert_cmd::assert::Assert {
    xpm_oci(ctx)
        .args(["publish", file, "--registry", &oci.location()])
        .assert()
}

fn sha256_file(p: &Path) -> String {
    sha256_hex(&std::fs::read(p).unwrap())
}

#[test]
fn push_resolve_over_tags_and_pull_by_digest() {
    let Some(oci) = Oci::start() else { return };
    let ctx = TestContext::new();
    let reg = oci.location();
    // Nothing there yet: the expert is unknown.
    xpm_oci(&ctx)
        .args(["install", "sst2", "--registry", &reg])
        .assert()
        .failure()
        .stderr(predicate::str::contains("sst2@*: no such expert"));
    for (n, v, base) in [
        ("sst2", "1.2.0", "minilm"),
        ("sst2", "1.3.1", "minilm"),
        ("sst2", "1.4.0", "bert"),
        ("sst2", "2.0.0", "minilm"),
        ("team/news", "2.0.3", "minilm"),
        ("team/news", "2.1.0+exp.7", "minilm"),
    ] {
        let f = expert(&ctx, n, v, base, 1);
        publish(&ctx, &oci, &f)
            .success()
            .stderr(predicate::str::contains(format!("Published {n}@{v}")));
    }

    // The artifact as OCI sees it: an xpm artifact type, the index line as config, the .xpm as
    // the one layer with its title; build metadata's `+` written `_` in the tag.
    let (m, _) = oci.manifest("sst2", "1.3.1");
    assert_eq!(m["artifactType"], "application/vnd.xpm.expert.v1");
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.xpm.index-line.v1+json"
    );
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0]["mediaType"], "application/vnd.xpm.artifact.v1");
    assert_eq!(
        layers[0]["annotations"]["org.opencontainers.image.title"],
        "sst2-1.3.1.xpm"
    );
    assert_eq!(
        layers[0]["digest"].as_str().unwrap(),
        sha256_file(&ctx.path("sst2-1.3.1-1.xpm"))
    );
    let config: serde_json::Value = oci
        .get(
            &format!(
                "{NS}/sst2/blobs/{}",
                m["config"]["digest"].as_str().unwrap()
            ),
            "*/*",
        )
        .json()
        .unwrap();
    assert_eq!(config["name"], "sst2");
    assert_eq!(config["vers"], "1.3.1");
    assert_eq!(config["base"]["id"], "minilm");
    let tags: serde_json::Value = oci
        .get(&format!("{NS}/team/news/tags/list"), "*/*")
        .json()
        .unwrap();
    let mut tags: Vec<&str> = tags["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    tags.sort();
    assert_eq!(tags, ["2.0.3", "2.1.0_exp.7"]);

    // Resolution over the tag list: the highest match on the requested base (1.4.0 is on
    // another base, 2.0.0 out of range).
    xpm_oci(&ctx)
        .args([
            "install",
            "sst2@^1.2",
            "team/news@~2.1",
            "--registry",
            &reg,
            "--base",
            "minilm",
        ])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("sst2@1.3.1 (downloaded)").and(predicate::str::contains(
                "team/news@2.1.0+exp.7 (downloaded)",
            )),
        );
    let lock = std::fs::read_to_string(ctx.path("xpm.lock")).unwrap();
    assert!(
        lock.contains(&format!("source = \"{reg}\"")) && lock.contains("version = \"1.3.1\""),
        "{lock}"
    );
    assert!(
        lock.contains(&sha256_file(&ctx.path("sst2-1.3.1-1.xpm"))),
        "the lockfile pins the layer digest: {lock}"
    );
    // The bytes are the bytes published.
    let out = xpm_oci(&ctx)
        .args(["install", "sst2@^1.2", "--registry", &reg, "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sst2 = report["experts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "sst2")
        .unwrap();
    assert_eq!(
        std::fs::read(sst2["path"].as_str().unwrap()).unwrap(),
        std::fs::read(ctx.path("sst2-1.3.1-1.xpm")).unwrap()
    );
    // Without a base pin, the newest version wins.
    let fresh = TestContext::new();
    xpm_oci(&fresh)
        .args(["install", "sst2", "--registry", &reg])
        .assert()
        .success()
        .stdout(predicate::str::contains("sst2@2.0.0"));
    // A lockfile install of a fresh checkout fetches by the pinned digest.
    let clone = TestContext::new();
    std::fs::copy(ctx.path("xpm.lock"), clone.path("xpm.lock")).unwrap();
    xpm_oci(&clone)
        .args(["install", "--locked", "--registry", &reg])
        .assert()
        .success()
        .stdout(predicate::str::contains("sst2@1.3.1 (downloaded)"));

    // Search lists repositories with _catalog.
    xpm_oci(&ctx)
        .args(["search", "test", "expert", "--registry", &reg])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("sst2 = \"2.0.0\"").and(predicate::str::contains("team/news")),
        );
    // Yank has nowhere to go in OCI: refused with the reason.
    xpm_oci(&ctx)
        .args(["yank", "sst2@1.3.1", "--registry", &reg])
        .assert()
        .failure()
        .stderr(predicate::str::contains("cannot yank sst2@1.3.1"));
    // --offline resolves against the index last read, with the registry unreachable or not.
    xpm_as(&fresh, None)
        .args(["install", "sst2@2", "--registry", &reg, "--offline"])
        .assert()
        .success()
        .stdout(predicate::str::contains("sst2@2.0.0"));

    // An artifact of several upload chunks goes up streamed and comes back byte for byte.
    let big = "big-1.0.0-5.xpm";
    make_expert(&ctx.path(big), "big", "1.0.0", "minilm", 10 << 20, 5);
    publish(&ctx, &oci, big).success();
    let out = xpm_oci(&fresh)
        .args(["install", "big", "--registry", &reg, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got = report["experts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "big")
        .unwrap();
    assert_eq!(
        std::fs::read(got["path"].as_str().unwrap()).unwrap(),
        std::fs::read(ctx.path(big)).unwrap()
    );

    // Names OCI cannot hold are refused before anything is sent.
    let odd = expert(&ctx, "odd_", "1.0.0", "minilm", 1);
    publish(&ctx, &oci, &odd)
        .failure()
        .stderr(predicate::str::contains("cannot be an OCI repository name"));
}

#[test]
fn overwrites_are_refused_and_credentials_are_checked() {
    let Some(oci) = Oci::start() else { return };
    let ctx = TestContext::new();
    let reg = oci.location();
    publish(&ctx, &oci, &expert(&ctx, "alpha", "1.0.0", "minilm", 1)).success();
    let (_, before) = oci.manifest("alpha", "1.0.0");
    // The registry would overwrite the tag; xpm refuses before pushing.
    let again = expert(&ctx, "alpha", "1.0.0", "minilm", 2);
    publish(&ctx, &oci, &again)
        .failure()
        .stderr(predicate::str::contains("alpha@1.0.0 already exists"));
    // The same version with build metadata is the same version (a different tag).
    let meta = expert(&ctx, "alpha", "1.0.0+rebuild", "minilm", 3);
    publish(&ctx, &oci, &meta)
        .failure()
        .stderr(predicate::str::contains("already exists"));
    let (_, after) = oci.manifest("alpha", "1.0.0");
    assert_eq!(before, after, "the tag was not moved");

    // A wrong password, and no credentials at all: 401, named, with where to put them.
    for creds in [Some((USER, "wrong")), None] {
        xpm_as(&ctx, creds)
            .args(["install", "alpha", "--registry", &reg])
            .assert()
            .failure()
            .stderr(
                predicate::str::contains("refused the credentials")
                    .and(predicate::str::contains("XPM_OCI_USERNAME"))
                    .and(predicate::str::contains("wrong").not()),
            );
    }
    xpm_as(&ctx, Some((USER, "wrong")))
        .args([
            "publish",
            &expert(&ctx, "alpha", "1.1.0", "minilm", 4),
            "--registry",
            &reg,
        ])
        .assert()
        .failure()
        .stderr(predicate::str::contains("refused the credentials"));

    // Docker's config.json `auths` (base64 user:password) works as well.
    use base64::Engine as _;
    let docker = ctx.path("docker");
    std::fs::create_dir_all(&docker).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASS}"));
    std::fs::write(
        docker.join("config.json"),
        serde_json::json!({"auths": {format!("127.0.0.1:{}", oci.port): {"auth": auth}}})
            .to_string(),
    )
    .unwrap();
    xpm_as(&ctx, None)
        .env("DOCKER_CONFIG", &docker)
        .args(["install", "alpha", "--registry", &reg])
        .assert()
        .success()
        .stdout(predicate::str::contains("alpha@1.0.0"));
}

#[test]
fn a_tampered_layer_and_a_moved_tag_are_caught() {
    let Some(oci) = Oci::start() else { return };
    let ctx = TestContext::new();
    let reg = oci.location();
    publish(&ctx, &oci, &expert(&ctx, "beta", "1.0.0", "minilm", 1)).success();
    publish(&ctx, &oci, &expert(&ctx, "beta", "1.1.0", "minilm", 2)).success();

    // Flip a byte of 1.1.0's layer in the registry's storage: the registry serves it as is;
    // the download does not match the digest and nothing is installed.
    let blob = oci.blob_path(&sha256_file(&ctx.path("beta-1.1.0-2.xpm")));
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&blob, &bytes).unwrap();
    xpm_oci(&ctx)
        .args(["install", "beta", "--registry", &reg])
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "the artifact does not match the registry's index",
        ));
    assert!(files_under(&ctx.path("home/cache/blobs-v1")).is_empty());
    bytes[mid] ^= 0x55;
    std::fs::write(&blob, &bytes).unwrap();

    // Move 1.0.0's tag to 1.1.0's manifest (tags are mutable in OCI): the index names the
    // moved tag instead of serving 1.1.0's bytes as 1.0.0.
    let (_, digest_110) = oci.manifest("beta", "1.1.0");
    std::fs::write(oci.tag_link("beta", "1.0.0"), &digest_110).unwrap();
    let fresh = TestContext::new();
    xpm_oci(&fresh)
        .args(["install", "beta", "--registry", &reg])
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "the tag does not hold the version its index line names",
        ));
}
