//! Owners and scoped tokens end to end: the real `xpm` binary (`xpm publish`, `xpm yank`,
//! `xpm owner`) against the real `xpm-registry` server with a token config of several
//! identities (the server's API itself is probed in registry/tests/owners.rs).

mod common;

use common::registry::*;
use common::*;
use predicates::prelude::*;

fn hash(token: &str) -> String {
    sha256_hex(token.as_bytes())
}

/// alice and bob may do everything; carol's token has expired; dave may only publish `team/*`.
fn start(ctx: &TestContext) -> Server {
    let config = format!(
        "[[identity]]\nname = \"alice\"\ntoken_sha256 = \"{}\"\n\
         scopes = [\"publish\", \"yank\", \"owners\"]\n\n\
         [[identity]]\nname = \"bob\"\ntoken_sha256 = \"{}\"\n\
         scopes = [\"publish\", \"yank\", \"owners\"]\n\n\
         [[identity]]\nname = \"carol\"\ntoken_sha256 = \"{}\"\n\
         scopes = [\"publish\", \"yank\"]\nexpires = 2001-01-01T00:00:00Z\n\n\
         [[identity]]\nname = \"dave\"\ntoken_sha256 = \"{}\"\n\
         scopes = [\"publish\"]\nnames = [\"team/*\"]\n",
        hash("alice-t"),
        hash("bob-t"),
        hash("carol-t"),
        hash("dave-t"),
    );
    std::fs::write(ctx.path("tokens.toml"), config).unwrap();
    let tokens = ctx.path("tokens.toml");
    Server::start_with(
        &ctx.path("srv"),
        &["--token-file", tokens.to_str().unwrap(), "-q"],
    )
}

fn expert(ctx: &TestContext, name: &str, version: &str) -> String {
    let file = format!("{}-{version}.xpm", name.replace('/', "-"));
    let seed = name.len() as u64 * 31 + version.len() as u64;
    make_expert(&ctx.path(&file), name, version, "tiny", 2048, seed);
    file
}

fn xpm_as(ctx: &TestContext, token: &str, args: &[&str], url: &str) -> assert_cmd::assert::Assert {
    ctx.xpm()
        .args(args)
        .args(["--registry", url, "--token", token])
        .assert()
}

#[test]
fn owners_decide_who_publishes_and_yanks() {
    let ctx = TestContext::new();
    let srv = start(&ctx);
    let url = srv.url.clone();
    let v1 = expert(&ctx, "sst2", "1.0.0");
    let v2 = expert(&ctx, "sst2", "1.1.0");
    xpm_as(&ctx, "alice-t", &["publish", &v1], &url).success();
    ctx.xpm()
        .args(["owner", "list", "sst2", "--registry", &url])
        .assert()
        .success()
        .stdout("alice\n");

    // bob is not an owner: refused, with the server's message and hint.
    xpm_as(&ctx, "bob-t", &["publish", &v2], &url)
        .failure()
        .stderr(predicate::str::contains(
            "identity `bob` is not one of its owners",
        ))
        .stderr(predicate::str::contains("xpm owner add sst2 bob"));
    xpm_as(&ctx, "bob-t", &["yank", "sst2@1.0.0"], &url)
        .failure()
        .stderr(predicate::str::contains("not one of its owners"));
    xpm_as(&ctx, "bob-t", &["owner", "add", "sst2", "bob"], &url).failure();
    assert_eq!(srv.index_lines("ss/t2/sst2").len(), 1);
    assert_eq!(srv.index_lines("ss/t2/sst2")[0]["yanked"], false);

    // alice adds bob; then he may publish and yank.
    let out = xpm_as(
        &ctx,
        "alice-t",
        &["owner", "add", "sst2", "bob", "--json"],
        &url,
    )
    .success()
    .get_output()
    .stdout
    .clone();
    let owners: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        owners,
        serde_json::json!({"name": "sst2", "owners": ["alice", "bob"]})
    );
    xpm_as(&ctx, "bob-t", &["publish", &v2], &url).success();
    xpm_as(&ctx, "bob-t", &["yank", "sst2@1.0.0"], &url).success();
    xpm_as(&ctx, "bob-t", &["owner", "remove", "sst2", "alice"], &url)
        .success()
        .stderr(predicate::str::contains("sst2: bob"));
    xpm_as(&ctx, "alice-t", &["yank", "sst2@1.0.0", "--undo"], &url).failure();
    xpm_as(&ctx, "bob-t", &["owner", "remove", "sst2", "bob"], &url)
        .failure()
        .stderr(predicate::str::contains("no owner left"));

    // The audit log has every write, with who did it.
    let log: Vec<serde_json::Value> = std::fs::read_to_string(srv.root.join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seen: Vec<String> = log
        .iter()
        .map(|r| format!("{} {} {}", r["identity"], r["action"], r["result"]).replace('"', ""))
        .collect();
    assert_eq!(
        seen,
        [
            "alice publish ok",
            "bob publish refused",
            "bob yank refused",
            "bob owner-add refused",
            "alice owner-add ok",
            "bob publish ok",
            "bob yank ok",
            "bob owner-remove ok",
            "alice unyank refused",
            "bob owner-remove refused",
        ]
    );
}

#[test]
fn expired_and_out_of_scope_tokens_are_refused() {
    let ctx = TestContext::new();
    let srv = start(&ctx);
    let url = srv.url.clone();
    let team = expert(&ctx, "team/sst2", "1.0.0");
    let plain = expert(&ctx, "sst2", "1.0.0");
    xpm_as(&ctx, "carol-t", &["publish", &team], &url)
        .failure()
        .stderr(predicate::str::contains("identity `carol` expired"))
        .stderr(predicate::str::contains("new token"));
    xpm_as(&ctx, "dave-t", &["publish", &plain], &url)
        .failure()
        .stderr(predicate::str::contains(
            "identity `dave` may not publish `sst2`",
        ));
    xpm_as(&ctx, "dave-t", &["publish", &team], &url).success();
    xpm_as(&ctx, "dave-t", &["yank", "team/sst2@1.0.0"], &url)
        .failure()
        .stderr(predicate::str::contains("no `yank` scope"));
    xpm_as(
        &ctx,
        "dave-t",
        &["owner", "add", "team/sst2", "alice"],
        &url,
    )
    .failure()
    .stderr(predicate::str::contains("no `owners` scope"));
    ctx.xpm()
        .args(["owner", "list", "team/sst2", "--registry", &url])
        .assert()
        .success()
        .stdout("dave\n");
    // The plain test token (XPM_REGISTRY_TOKENS) is the all-powerful `default` identity.
    xpm_as(&ctx, TOKEN, &["yank", "team/sst2@1.0.0"], &url).success();
    assert!(
        srv.access_log()
            .contains("plain tokens are one all-powerful identity")
    );
    // A registry that is not a server has no owners.
    ctx.xpm()
        .args(["owner", "list", "sst2", "--registry"])
        .arg(ctx.path("dir-registry"))
        .assert()
        .failure()
        .stderr(predicate::str::contains("only a server"));
}
