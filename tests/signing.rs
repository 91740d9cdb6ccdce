//! Signed releases with the real binary: `xpm key generate`, `xpm publish --sign`, and the trust
//! policy of `xpm install` (pinned keys, trust on first use, rotation, `--require-signatures`),
//! on a registry directory and on the real registry server; the signature checked by Debian's
//! `minisign` CLI as well (CI installs it; skipped where it is missing unless
//! XPM_REQUIRE_MINISIGN=1).

mod common;

use std::path::{Path, PathBuf};

use common::registry::{Server, TOKEN, make_expert};
use common::*;
use predicates::prelude::*;

fn key(ctx: &TestContext, name: &str) -> String {
    let out = ctx
        .xpm()
        .args(["key", "generate", name, "--no-password", "--json"])
        .assert()
        .success();
    let v: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    v["public_key"].as_str().unwrap().to_string()
}

fn expert(ctx: &TestContext, name: &str, version: &str, seed: u64) -> String {
    let file = format!("{name}-{version}.xpm");
    make_expert(&ctx.path(&file), name, version, "minilm", 2048, seed);
    file
}

fn registry(ctx: &TestContext) -> String {
    ctx.path("reg").display().to_string()
}

fn publish(ctx: &TestContext, file: &str, extra: &[&str]) -> assert_cmd::assert::Assert {
    ctx.xpm()
        .args(["publish", file, "--registry", &registry(ctx)])
        .args(extra)
        .assert()
}

fn install(ctx: &TestContext, dir: &str, spec: &str, extra: &[&str]) -> assert_cmd::assert::Assert {
    let d = ctx.path(dir);
    std::fs::create_dir_all(&d).unwrap();
    ctx.xpm()
        .current_dir(&d)
        .args(["install", spec, "--registry", &registry(ctx)])
        .args(extra)
        .assert()
}

fn index_file(ctx: &TestContext, name: &str) -> PathBuf {
    let p = ctx.path("reg/index").join(match name.len() {
        1 => format!("1/{name}"),
        2 => format!("2/{name}"),
        3 => format!("3/{}/{name}", &name[..1]),
        _ => format!("{}/{}/{name}", &name[..2], &name[2..4]),
    });
    assert!(p.is_file(), "{}", p.display());
    p
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn write_lines(path: &Path, lines: &[serde_json::Value]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn lock_signer(ctx: &TestContext, dir: &str) -> Option<String> {
    let lock = std::fs::read_to_string(ctx.path(dir).join("xpm.lock")).unwrap();
    let v: toml_edit::DocumentMut = lock.parse().unwrap();
    v["expert"][0]["signer"].as_str().map(str::to_string)
}

#[test]
fn signed_releases_install_under_trust_on_first_use_and_rotation() {
    let ctx = TestContext::new();
    let a = key(&ctx, "alice");
    let b = key(&ctx, "bob");
    assert_ne!(a, b);
    // Keys are never overwritten.
    ctx.xpm()
        .args(["key", "generate", "alice", "--no-password"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("already exists"));
    // Without a password or --no-password, no key is made.
    ctx.xpm()
        .env_remove("XPM_KEY_PASSWORD")
        .args(["key", "generate", "carol"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("XPM_KEY_PASSWORD"));

    let f = expert(&ctx, "alpha", "1.0.0", 1);
    publish(&ctx, &f, &["--sign", "alice"])
        .success()
        .stderr(predicate::str::contains("Signed"));
    let idx = index_file(&ctx, "alpha");
    assert_eq!(lines(&idx)[0]["sig"]["key"], a.as_str());

    // First install: the key is trusted on first use and recorded.
    install(&ctx, "p", "alpha", &[])
        .success()
        .stderr(predicate::str::contains("Trusting"));
    assert_eq!(lock_signer(&ctx, "p").as_deref(), Some(a.as_str()));

    // A new version signed by another key, with no rotation statement: refused.
    let f = expert(&ctx, "alpha", "1.1.0", 2);
    publish(&ctx, &f, &["--sign", "bob"]).success();
    install(&ctx, "p", "alpha@1.1.0", &[])
        .failure()
        .stderr(predicate::str::contains("has no rotation statement"));
    assert_eq!(
        lock_signer(&ctx, "p").as_deref(),
        Some(a.as_str()),
        "lock unchanged"
    );
    // With a statement signed by the old key: accepted, and the new key is recorded.
    let f = expert(&ctx, "alpha", "1.2.0", 3);
    publish(&ctx, &f, &["--sign", "bob", "--rotate-from", "alice"]).success();
    install(&ctx, "p", "alpha@1.2.0", &[])
        .success()
        .stderr(predicate::str::contains("Rotated"));
    assert_eq!(lock_signer(&ctx, "p").as_deref(), Some(b.as_str()));
    // A forged statement (signed by bob for a key of his own) does not pass for the next one.
    let c = key(&ctx, "carol");
    let f = expert(&ctx, "alpha", "1.3.0", 4);
    publish(&ctx, &f, &["--sign", "carol", "--rotate-from", "carol"]).success();
    install(&ctx, "p", "alpha@1.3.0", &[])
        .failure()
        .stderr(predicate::str::contains("not the trusted key"));
    let _ = c;

    // An unsigned version of a name that was signed before: refused.
    let f = expert(&ctx, "alpha", "1.4.0", 5);
    publish(&ctx, &f, &[]).success();
    install(&ctx, "p", "alpha@1.4.0", &[])
        .failure()
        .stderr(predicate::str::contains("is not signed"));
}

#[test]
fn tampering_moving_and_unknown_keys_are_caught() {
    let ctx = TestContext::new();
    let a = key(&ctx, "alice");
    let b = key(&ctx, "bob");
    for (v, seed) in [("1.0.0", 1), ("1.0.1", 2)] {
        let f = expert(&ctx, "beta", v, seed);
        publish(&ctx, &f, &["--sign", "alice"]).success();
    }
    let idx = index_file(&ctx, "beta");
    let original = lines(&idx);

    // The registry's operator replaces 1.0.1 with other bytes and fixes up the digest and size:
    // the signature no longer verifies.
    let evil = expert(&ctx, "beta-evil", "1.0.1", 9);
    let bytes = std::fs::read(ctx.path(&evil)).unwrap();
    // Same name and version inside: rewrite the manifest name of the evil artifact.
    make_expert(&ctx.path("evil.xpm"), "beta", "1.0.1", "minilm", 2048, 9);
    let bytes2 = std::fs::read(ctx.path("evil.xpm")).unwrap();
    assert_ne!(bytes, bytes2);
    let sum = sha256_hex(&bytes2);
    let blob = ctx
        .path("reg/blobs/sha256")
        .join(&sum[7..9])
        .join(&sum[7..]);
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    std::fs::write(&blob, &bytes2).unwrap();
    let mut tampered = original.clone();
    tampered[1]["cksum"] = sum.clone().into();
    tampered[1]["size"] = bytes2.len().into();
    write_lines(&idx, &tampered);
    install(&ctx, "p1", "beta@1.0.1", &[])
        .failure()
        .stderr(predicate::str::contains("does not verify"));

    // The signature of 1.0.0 copied onto 1.0.1: it covers other bytes.
    let mut moved = original.clone();
    moved[1]["sig"] = original[0]["sig"].clone();
    write_lines(&idx, &moved);
    install(&ctx, "p2", "beta@1.0.1", &[])
        .failure()
        .stderr(predicate::str::contains("does not verify"));
    // The whole registry copied elsewhere (same bytes, same signatures): the signatures name
    // the registry they were made for.
    write_lines(&idx, &original);
    let copy = ctx.path("copy");
    std::process::Command::new("cp")
        .arg("-r")
        .arg(ctx.path("reg"))
        .arg(&copy)
        .status()
        .unwrap();
    let d = ctx.path("p5");
    std::fs::create_dir_all(&d).unwrap();
    ctx.xpm()
        .current_dir(&d)
        .args(["install", "beta", "--registry"])
        .arg(&copy)
        .assert()
        .failure()
        .stderr(predicate::str::contains("made for another release"));

    // Pinned keys: bob only for this registry's `beta*` names.
    write_lines(&idx, &original);
    let dir = ctx.path("p3");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("xpm.toml"),
        format!("[experts]\nbeta = \"1\"\n\n[[trust.key]]\nkey = \"{b}\"\nprefix = \"beta\"\n"),
    )
    .unwrap();
    install(&ctx, "p3", "beta", &[])
        .failure()
        .stderr(predicate::str::contains("xpm.toml trusts"));
    std::fs::write(
        dir.join("xpm.toml"),
        format!("[experts]\nbeta = \"1\"\n\n[[trust.key]]\nkey = \"{a}\"\nprefix = \"beta\"\n"),
    )
    .unwrap();
    install(&ctx, "p3", "beta", &[]).success();

    // --require-signatures refuses an unsigned expert; without it, a notice.
    let f = expert(&ctx, "gamma", "1.0.0", 7);
    publish(&ctx, &f, &[]).success();
    install(&ctx, "p4", "gamma", &["--require-signatures"])
        .failure()
        .stderr(predicate::str::contains("gamma@1.0.0 is not signed"));
    assert!(!ctx.path("p4/xpm.lock").exists(), "nothing locked");
    install(&ctx, "p4", "gamma", &[])
        .success()
        .stderr(predicate::str::contains("gamma@1.0.0 is not signed"));
    // ... and --locked with --require-signatures refuses the unsigned lock entry.
    ctx.xpm()
        .current_dir(ctx.path("p4"))
        .args([
            "install",
            "--locked",
            "--require-signatures",
            "--registry",
            &registry(&ctx),
        ])
        .assert()
        .failure()
        .stderr(predicate::str::contains("locked without a signature"));
}

#[test]
fn the_server_keeps_signatures_and_minisign_verifies_them() {
    let ctx = TestContext::new();
    key(&ctx, "alice");
    let srv = Server::start(&ctx.path("srv"));
    let f = expert(&ctx, "delta", "1.0.0", 3);
    let out = ctx
        .xpm()
        .args([
            "publish",
            &f,
            "--registry",
            &srv.url,
            "--token",
            TOKEN,
            "--sign",
            "alice",
            "--json",
        ])
        .assert()
        .success();
    let line: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert!(
        line["sig"]["minisig"]
            .as_str()
            .unwrap()
            .contains("trusted comment: xpm-release v1")
    );
    let stored = srv.index_lines("de/lt/delta");
    assert_eq!(
        stored[0]["sig"], line["sig"],
        "the server stored the signature"
    );
    let d = ctx.path("p");
    std::fs::create_dir_all(&d).unwrap();
    ctx.xpm()
        .current_dir(&d)
        .args([
            "install",
            "delta",
            "--registry",
            &srv.url,
            "--require-signatures",
        ])
        .assert()
        .success();

    let sig = line["sig"]["minisig"].as_str().unwrap();
    std::fs::write(ctx.path("delta.minisig"), sig).unwrap();
    let have = std::process::Command::new("minisign")
        .arg("-v")
        .output()
        .is_ok();
    if !have {
        assert!(
            std::env::var_os("XPM_REQUIRE_MINISIGN").is_none(),
            "the minisign CLI is required (apt-get install minisign)"
        );
        eprintln!("skipping the minisign CLI check: minisign is not installed");
        return;
    }
    let out = std::process::Command::new("minisign")
        .args(["-V", "-m"])
        .arg(ctx.path(&f))
        .arg("-x")
        .arg(ctx.path("delta.minisig"))
        .arg("-p")
        .arg(ctx.path("home/keys/alice.pub"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("Signature and comment signature verified"),
        "{text}"
    );
    assert!(text.contains("name=delta version=1.0.0 sha256="), "{text}");
    // And the CLI refuses the artifact once changed.
    let mut bytes = std::fs::read(ctx.path(&f)).unwrap();
    let k = bytes.len() / 2;
    bytes[k] ^= 1;
    std::fs::write(ctx.path("changed.xpm"), bytes).unwrap();
    let st = std::process::Command::new("minisign")
        .args(["-V", "-m"])
        .arg(ctx.path("changed.xpm"))
        .arg("-x")
        .arg(ctx.path("delta.minisig"))
        .arg("-p")
        .arg(ctx.path("home/keys/alice.pub"))
        .output()
        .unwrap();
    assert!(!st.status.success());
}
