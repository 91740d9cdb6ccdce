//! The `hf://` registry, end to end: the real `xpm` binary against a local stand-in for the
//! Hugging Face Hub (tests/hub_mock: the Hub cannot be reached from the test machines; the mock
//! keeps commits and LFS objects and answers a stale parent commit with 412 as the Hub does).
//! The last test runs Python's `huggingface_hub` (the real client) against the same mock:
//! it reads what xpm published and its uploads land where xpm reads them, so the mock speaks the
//! protocol the real client speaks.

mod common;
mod hub_mock;

use common::registry::*;
use common::*;
use hub_mock::HubMock;
use predicates::prelude::*;

const TOKEN: &str = "hf_test_write_token";
const REPO: &str = "models/acme/experts";
const REG: &str = "hf://acme/experts";

/// `xpm` pointed at the mock, with the write token unless `token` is `None`.
fn xpm_hub(ctx: &TestContext, hub: &HubMock, token: Option<&str>) -> assert_cmd::Command {
    let mut c = ctx.xpm();
    c.env("HF_ENDPOINT", &hub.url)
        .env("HF_HOME", ctx.path("hf-home"))
        .env_remove("XPM_TOKEN")
        .env_remove("HF_TOKEN");
    if let Some(t) = token {
        c.env("HF_TOKEN", t);
    }
    c
}

fn expert(ctx: &TestContext, name: &str, version: &str, seed: u64) -> String {
    let file = format!("{}-{version}-{seed}.xpm", name.replace('/', "-"));
    make_expert(&ctx.path(&file), name, version, "minilm", 4096, seed);
    file
}

/// `xpm publish FILE` to [`REG`] started in the background (stderr captured).
fn spawn_publish(ctx: &TestContext, hub: &HubMock, file: &str) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_xpm"))
        .current_dir(ctx.path(""))
        .env("XPM_HOME", ctx.path("home"))
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_TOKEN", TOKEN)
        .env("HF_HOME", ctx.path("hf-home"))
        .env_remove("XPM_TOKEN")
        .args(["publish", file, "--registry", REG])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn index_lines(hub: &HubMock, rel: &str) -> Vec<serde_json::Value> {
    match hub.file(REPO, rel) {
        None => vec![],
        Some(b) => String::from_utf8(b)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
    }
}

#[test]
fn publish_yank_search_install_through_the_hub() {
    let hub = HubMock::start(TOKEN);
    hub.create_repo(REPO, false);
    hub.set(|s| s.page = 1); // the tree listing comes one entry per page
    let ctx = TestContext::new();
    // An existing repository with no registry in it yet.
    xpm_hub(&ctx, &hub, None)
        .args(["install", "sst2", "--registry", REG])
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
        xpm_hub(&ctx, &hub, Some(TOKEN))
            .args(["publish", &f, "--registry", REG])
            .assert()
            .success()
            .stderr(predicate::str::contains(format!("Published {n}@{v}")));
    }
    // One commit per publish; blobs went to LFS, index files and config.json inline.
    assert_eq!(hub.state.lock().unwrap().commits, 4);
    let lines = index_lines(&hub, "index/ss/t2/sst2");
    assert_eq!(lines.len(), 3);
    let hex = &lines[0]["cksum"].as_str().unwrap()["sha256:".len()..];
    let blob = format!("blobs/sha256/{}/{hex}", &hex[..2]);
    assert!(hub.is_lfs(REPO, &blob), "{:?}", hub.paths(REPO));
    assert!(!hub.is_lfs(REPO, "index/ss/t2/sst2"));
    let cfg: serde_json::Value =
        serde_json::from_slice(&hub.file(REPO, "config.json").unwrap()).unwrap();
    assert_eq!(cfg["dl"], "blobs/sha256/{prefix}/{sha256}");

    // Versions are immutable: refused before anything is uploaded or committed.
    let again = expert(&ctx, "sst2", "1.3.1", 2);
    xpm_hub(&ctx, &hub, Some(TOKEN))
        .args(["publish", &again, "--registry", REG])
        .assert()
        .failure()
        .stderr(predicate::str::contains("sst2@1.3.1 already exists"));
    assert_eq!(hub.state.lock().unwrap().commits, 4);

    xpm_hub(&ctx, &hub, None)
        .args(["search", "test", "expert", "--registry", REG])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("sst2 = \"2.0.0\"").and(predicate::str::contains("team/news")),
        );
    xpm_hub(&ctx, &hub, None)
        .args([
            "install",
            "sst2@^1.2",
            "team/news@~2.0.1",
            "--registry",
            REG,
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("sst2@1.3.1 (downloaded)"));
    let lock = std::fs::read_to_string(ctx.path("xpm.lock")).unwrap();
    assert!(lock.contains(&format!("source = \"{REG}\"")), "{lock}");
    for p in files_under(&ctx.path("home/cache/blobs-v1")) {
        ctx.xpm().arg("verify").arg(p).assert().success();
    }

    // Yank in one commit; a fresh project resolves around it, the lockfile's pin still installs.
    xpm_hub(&ctx, &hub, Some(TOKEN))
        .args(["yank", "sst2@1.3.1", "--registry", REG])
        .assert()
        .success();
    assert_eq!(hub.state.lock().unwrap().commits, 5);
    assert_eq!(index_lines(&hub, "index/ss/t2/sst2")[1]["yanked"], true);
    let fresh = TestContext::new();
    xpm_hub(&fresh, &hub, None)
        .args(["install", "sst2@^1.2", "--registry", REG])
        .assert()
        .success()
        .stdout(predicate::str::contains("sst2@1.2.0"));
    xpm_hub(&ctx, &hub, None)
        .args(["install", "--locked", "--registry", REG])
        .assert()
        .success();

    // The same repository is a plain HTTP registry at its resolve URL (no xpm code on the
    // Hub side): what the Hub's CDN serves is enough to install.
    let plain = TestContext::new();
    plain
        .xpm()
        .args([
            "install",
            "team/news",
            "--registry",
            &format!("{}/acme/experts/resolve/main", hub.url),
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("team/news@2.0.3"));
}

#[test]
fn stale_parent_commits_are_retried_and_concurrent_publishers_lose_nothing() {
    let hub = HubMock::start(TOKEN);
    hub.create_repo(REPO, false);
    let ctx = TestContext::new();
    // Three commits answered 412 ("a commit has happened since"): read again, commit again.
    hub.set(|s| s.stale_commits = 3);
    let f = expert(&ctx, "sst2", "1.0.0", 1);
    xpm_hub(&ctx, &hub, Some(TOKEN))
        .args(["publish", &f, "--registry", REG])
        .assert()
        .success();
    assert_eq!(hub.state.lock().unwrap().commits, 1);

    // 6 publishers of distinct versions at once: every line lands, in 6 commits.
    let files: Vec<String> = (0..6)
        .map(|i| expert(&ctx, "sst2", &format!("1.1.{i}"), 10 + i))
        .collect();
    let children: Vec<_> = files.iter().map(|f| spawn_publish(&ctx, &hub, f)).collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let lines = index_lines(&hub, "index/ss/t2/sst2");
    assert_eq!(lines.len(), 7, "{lines:?}");
    assert_eq!(hub.state.lock().unwrap().commits, 7);

    // 2 publishers of one version: one wins, the other is told it exists.
    let a = expert(&ctx, "sst2", "3.0.0", 100);
    let b = expert(&ctx, "sst2", "3.0.0", 200);
    let (ca, cb) = (spawn_publish(&ctx, &hub, &a), spawn_publish(&ctx, &hub, &b));
    let (oa, ob) = (
        ca.wait_with_output().unwrap(),
        cb.wait_with_output().unwrap(),
    );
    assert_ne!(oa.status.success(), ob.status.success());
    let loser = if oa.status.success() { &ob } else { &oa };
    assert!(
        String::from_utf8_lossy(&loser.stderr).contains("sst2@3.0.0 already exists"),
        "{}",
        String::from_utf8_lossy(&loser.stderr)
    );
    assert_eq!(index_lines(&hub, "index/ss/t2/sst2").len(), 8);
}

#[test]
fn tokens_private_repositories_and_missing_repositories_get_clear_errors() {
    let hub = HubMock::start(TOKEN);
    hub.create_repo("models/acme/private", true);
    let ctx = TestContext::new();
    let f = expert(&ctx, "sst2", "1.0.0", 1);
    let private = "hf://acme/private";
    // No token, and a wrong one: refused, with the hint on where the token comes from.
    for t in [None, Some("hf_wrong")] {
        xpm_hub(&ctx, &hub, t)
            .args(["publish", &f, "--registry", private])
            .assert()
            .failure()
            .stderr(predicate::str::contains("HF_TOKEN"));
    }
    // The token file `hf auth login` writes is used when HF_TOKEN is unset.
    std::fs::create_dir_all(ctx.path("hf-home")).unwrap();
    std::fs::write(ctx.path("hf-home/token"), format!("{TOKEN}\n")).unwrap();
    xpm_hub(&ctx, &hub, None)
        .args(["publish", &f, "--registry", private])
        .assert()
        .success();
    // Reads of a private repository send the token too.
    let reader = TestContext::new();
    xpm_hub(&reader, &hub, Some(TOKEN))
        .args(["install", "sst2", "--registry", private])
        .assert()
        .success()
        .stdout(predicate::str::contains("sst2@1.0.0"));
    // A repository that does not exist: named, with how to create it.
    xpm_hub(&ctx, &hub, Some(TOKEN))
        .args(["publish", &f, "--registry", "hf://acme/nothing-here"])
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("Repository not found")
                .and(predicate::str::contains("hf repo create")),
        );
    xpm_hub(&ctx, &hub, Some(TOKEN))
        .args([
            "install",
            "sst2",
            "--registry",
            "hf://acme/private@no-branch",
        ])
        .assert()
        .failure()
        .stderr(predicate::str::contains("no branch `no-branch`"));
    // A location is checked before anything is sent.
    let before = hub.log().len();
    xpm_hub(&ctx, &hub, Some(TOKEN))
        .args(["install", "sst2", "--registry", "hf://acme/../etc"])
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "not a valid Hugging Face registry location",
        ));
    assert_eq!(hub.log().len(), before);
    // The token never shows in output.
    let out = xpm_hub(&ctx, &hub, Some("hf_wrong_secret"))
        .args(["publish", &f, "--registry", private])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("hf_wrong_secret"));
}

#[test]
fn large_artifacts_go_up_in_parts_and_a_tampered_object_is_caught() {
    let hub = HubMock::start(TOKEN);
    hub.create_repo("datasets/acme/experts", false);
    hub.set(|s| s.multipart_over = 64 << 10);
    let reg = "hf://datasets/acme/experts";
    let ctx = TestContext::new();
    let file = "big.xpm";
    make_expert(&ctx.path(file), "big", "1.0.0", "minilm", 300 << 10, 7);
    let size = std::fs::metadata(ctx.path(file)).unwrap().len();
    assert!(size > 3 * (64 << 10), "{size}");
    xpm_hub(&ctx, &hub, Some(TOKEN))
        .args(["publish", file, "--registry", reg])
        .assert()
        .success();
    let log = hub.log();
    assert!(
        log.iter()
            .filter(|l| l.starts_with("PUT /lfs-part/"))
            .count()
            >= 3,
        "{log:?}"
    );
    assert!(log.iter().any(|l| l.starts_with("POST /lfs-complete/")));
    let fresh = TestContext::new();
    xpm_hub(&fresh, &hub, None)
        .args(["install", "big", "--registry", reg])
        .assert()
        .success();
    // Storage that serves other bytes under the digest: refused, nothing installed.
    hub.corrupt_lfs();
    let victim = TestContext::new();
    xpm_hub(&victim, &hub, None)
        .args(["install", "big", "--registry", reg])
        .assert()
        .failure()
        .stderr(predicate::str::contains("sha256"));
    assert!(files_under(&victim.path("home/cache/blobs-v1")).is_empty());
}

/// Python's `huggingface_hub` against the mock: it downloads what xpm published (the same
/// bytes), its `upload_file` goes through the same preupload, LFS batch and commit endpoints
/// (text inline, binary to LFS), and its commit on a stale parent gets the 412 xpm retries on.
#[test]
fn huggingface_hub_reads_what_xpm_publishes_and_its_commits_follow_the_same_rules() {
    let Some(py) = python("huggingface_hub") else {
        return;
    };
    let hub = HubMock::start(TOKEN);
    hub.create_repo(REPO, false);
    let ctx = TestContext::new();
    let f = expert(&ctx, "sst2", "1.0.0", 1);
    xpm_hub(&ctx, &hub, Some(TOKEN))
        .args(["publish", &f, "--registry", REG])
        .assert()
        .success();
    let bytes = std::fs::read(ctx.path(&f)).unwrap();
    let digest = sha256_hex(&bytes);
    let hex = digest.trim_start_matches("sha256:");
    let blob = format!("blobs/sha256/{}/{hex}", &hex[..2]);
    let script = r#"
import hashlib, os, sys
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
ep, token, blob, want = sys.argv[1:5]
api = HfApi(endpoint=ep, token=token)
p = hf_hub_download("acme/experts", blob, endpoint=ep, token=token, cache_dir=os.environ["CACHE"])
got = hashlib.sha256(open(p, "rb").read()).hexdigest()
assert got == want, (got, want)
head = api.repo_info("acme/experts").sha
api.upload_file(path_or_fileobj=b"from python\n", path_in_repo="notes/python.txt",
                repo_id="acme/experts", parent_commit=head)
api.upload_file(path_or_fileobj=bytes(range(256)) * 64, path_in_repo="notes/binary.dat",
                repo_id="acme/experts")
try:
    api.upload_file(path_or_fileobj=b"stale\n", path_in_repo="notes/stale.txt",
                    repo_id="acme/experts", parent_commit=head)
    print("stale commit accepted"); sys.exit(1)
except HfHubHTTPError as e:
    assert e.response.status_code == 412, e.response.status_code
print("ok", got)
"#;
    let out = std::process::Command::new(&py)
        .args(["-c", script, &hub.url, TOKEN, &blob, hex])
        .env("CACHE", ctx.path("py-cache"))
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        .env("HF_HUB_DISABLE_XET", "1")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        hub.file(REPO, "notes/python.txt").as_deref(),
        Some(&b"from python\n"[..])
    );
    // A binary file goes through the same LFS batch upload xpm uses.
    assert!(hub.is_lfs(REPO, "notes/binary.dat"));
    assert_eq!(
        hub.file(REPO, "notes/binary.dat").unwrap(),
        (0..64).flat_map(|_| 0..=255u8).collect::<Vec<u8>>()
    );
    // xpm's next publish commits on top of python's commits (it reads the new head).
    let g = expert(&ctx, "sst2", "1.1.0", 2);
    xpm_hub(&ctx, &hub, Some(TOKEN))
        .args(["publish", &g, "--registry", REG])
        .assert()
        .success();
    assert!(hub.file(REPO, "notes/python.txt").is_some());
    assert_eq!(index_lines(&hub, "index/ss/t2/sst2").len(), 2);
}
