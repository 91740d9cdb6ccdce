//! Owners, scoped and expiring tokens, and the audit log, through the server's HTTP API (the
//! `xpm owner` commands are tested against the real binaries in the top-level tests/owners.rs).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};
use xpm_core::format::{
    ArtifactWriter, BaseModel, Content, Dtype, ExpertKind, Manifest, TensorData, encode_tensor,
};

struct Server {
    child: Child,
    url: String,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hash(token: &str) -> String {
    xpm_core::digest::sha256(token.as_bytes())["sha256:".len()..].to_string()
}

/// alice and bob may do everything to every name; carol's token has expired; dave may only
/// publish, and only under `team/`.
fn team_config() -> String {
    format!(
        r#"# identities of the test registry
[[identity]]
name = "alice"
token_sha256 = "{}"
scopes = ["publish", "yank", "owners"]

[[identity]]
name = "bob"
token_sha256 = ["{}", "{}"]
scopes = ["publish", "yank", "owners"]
expires = "2999-01-01T00:00:00Z"

[[identity]]
name = "carol"
token_sha256 = "{}"
scopes = ["publish", "yank", "owners"]
expires = "2001-01-01T00:00:00Z"

[[identity]]
name = "dave"
token_sha256 = "{}"
scopes = ["publish"]
names = ["team/*"]
"#,
        hash("alice-token"),
        hash("bob-token"),
        hash("bob-second-token"),
        hash("carol-token"),
        hash("dave-token"),
    )
}

fn start_with_config(config: &str, extra: &[&str]) -> Server {
    start_in(tempfile::tempdir().unwrap(), config, extra)
}

/// A server on `dir/root` (created if missing) with the token file `config`.
fn start_in(dir: tempfile::TempDir, config: &str, extra: &[&str]) -> Server {
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(&tokens, config).unwrap();
    let root = dir.path().join("root");
    let stderr = dir.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_xpm-registry"))
        .args(["serve", "--addr", "127.0.0.1:0", "--quiet", "--root"])
        .arg(&root)
        .arg("--token-file")
        .arg(&tokens)
        .args(extra)
        .env_remove("XPM_REGISTRY_TOKENS")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| {
            panic!(
                "server did not start: {line:?}; {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            )
        })
        .to_string();
    Server {
        child,
        url,
        root,
        _dir: dir,
    }
}

/// A small valid artifact `name@version`.
fn artifact(dir: &Path, name: &str, version: &str) -> Vec<u8> {
    let path = dir.join(format!("{}-{version}.xpm", name.replace('/', "_")));
    let t = TensorData {
        name: "layer.0.attn.q.weight".into(),
        shape: vec![4, 4],
        dtype: Dtype::F32,
        content: Content::Sparse {
            indices: vec![0, 5, 10, 15],
            values: [1.0f32, 2.0, 3.0, 4.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            block_size: None,
        },
    };
    let mut w = ArtifactWriter::create(&path, 1).unwrap();
    w.push(encode_tensor(&t, 1).unwrap()).unwrap();
    w.finish(Manifest::new(
        name,
        version.parse().unwrap(),
        BaseModel {
            id: "tiny-base".into(),
            digest: xpm_core::digest::sha256(b"tiny-base"),
        },
        ExpertKind::Sparse,
    ))
    .unwrap();
    std::fs::read(&path).unwrap()
}

struct Client<'a> {
    s: &'a Server,
    http: reqwest::blocking::Client,
    dir: tempfile::TempDir,
}

impl<'a> Client<'a> {
    fn new(s: &'a Server) -> Self {
        Client {
            s,
            http: reqwest::blocking::Client::new(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn publish(&self, token: &str, name: &str, version: &str) -> (u16, Value) {
        let bytes = artifact(self.dir.path(), name, version);
        let r = self
            .http
            .put(format!("{}/api/v1/experts/new", self.s.url))
            .bearer_auth(token)
            .header("X-Xpm-Sha256", xpm_core::digest::sha256(&bytes))
            .body(bytes)
            .send()
            .unwrap();
        (r.status().as_u16(), r.json().unwrap())
    }

    fn yank(&self, token: &str, name: &str, version: &str, yank: bool) -> (u16, Value) {
        let verb = if yank { "yank" } else { "unyank" };
        let r = self
            .http
            .post(format!("{}/api/v1/{verb}", self.s.url))
            .bearer_auth(token)
            .json(&json!({"name": name, "vers": version}))
            .send()
            .unwrap();
        (r.status().as_u16(), r.json().unwrap())
    }

    fn owners(&self, name: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}/api/v1/experts/{name}/owners", self.s.url))
            .send()
            .unwrap();
        (r.status().as_u16(), r.json().unwrap())
    }

    fn change(&self, token: &str, name: &str, add: bool, who: &[&str]) -> (u16, Value) {
        let url = format!("{}/api/v1/experts/{name}/owners", self.s.url);
        let rb = if add {
            self.http.put(url)
        } else {
            self.http.delete(url)
        };
        let r = rb
            .bearer_auth(token)
            .json(&json!({ "owners": who }))
            .send()
            .unwrap();
        (r.status().as_u16(), r.json().unwrap())
    }
}

fn error_of(v: &Value) -> &str {
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {v}"))
}

fn audit(s: &Server) -> Vec<Value> {
    std::fs::read_to_string(s.root.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_second_identity_cannot_publish_or_yank_the_first_ones_name() {
    let s = start_with_config(&team_config(), &[]);
    let c = Client::new(&s);
    let (st, line) = c.publish("alice-token", "sst2", "1.0.0");
    assert_eq!(st, 201, "{line}");
    assert_eq!(
        c.owners("sst2"),
        (200, json!({"name": "sst2", "owners": ["alice"]}))
    );

    let (st, body) = c.publish("bob-token", "sst2", "1.1.0");
    assert_eq!(st, 403, "{body}");
    assert!(
        error_of(&body).contains("identity `bob` is not one of its owners"),
        "{body}"
    );
    assert!(
        body["hint"]
            .as_str()
            .unwrap()
            .contains("xpm owner add sst2 bob")
    );
    let (st, body) = c.yank("bob-token", "sst2", "1.0.0", true);
    assert_eq!(st, 403, "{body}");
    let (st, _) = c.yank("bob-token", "sst2", "1.0.0", false);
    assert_eq!(st, 403);
    // Nor may bob make himself an owner, or strip alice.
    assert_eq!(c.change("bob-token", "sst2", true, &["bob"]).0, 403);
    assert_eq!(c.change("bob-token", "sst2", false, &["alice"]).0, 403);
    // Still only alice's version.
    let index = reqwest::blocking::get(format!("{}/index/ss/t2/sst2", s.url))
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(index.lines().count(), 1);

    // bob publishes a name of his own.
    assert_eq!(c.publish("bob-second-token", "cola", "1.0.0").0, 201);
    assert_eq!(c.owners("cola").1["owners"], json!(["bob"]));
    assert_eq!(c.publish("alice-token", "cola", "1.0.1").0, 403);

    // alice adds bob: now he may publish and yank.
    let (st, body) = c.change("alice-token", "sst2", true, &["bob"]);
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["owners"], json!(["alice", "bob"]));
    assert_eq!(c.publish("bob-token", "sst2", "1.1.0").0, 201);
    assert_eq!(c.yank("bob-token", "sst2", "1.0.0", true).0, 200);
    assert_eq!(c.yank("bob-token", "sst2", "1.0.0", false).0, 200);
    // bob removes alice; then alice is refused.
    assert_eq!(c.change("bob-token", "sst2", false, &["alice"]).0, 200);
    assert_eq!(c.owners("sst2").1["owners"], json!(["bob"]));
    assert_eq!(c.yank("alice-token", "sst2", "1.1.0", true).0, 403);
    // The last owner stays; unknown identities cannot be added; unknown names have no owners.
    let (st, body) = c.change("bob-token", "sst2", false, &["bob"]);
    assert_eq!(st, 409, "{body}");
    let (st, body) = c.change("bob-token", "sst2", true, &["mallory"]);
    assert_eq!(st, 400);
    assert!(error_of(&body).contains("no identity `mallory`"));
    assert_eq!(c.owners("nothing").0, 404);
    assert_eq!(c.change("bob-token", "nothing", true, &["alice"]).0, 404);
    assert_eq!(c.yank("bob-token", "nothing", "1.0.0", true).0, 404);
}

#[test]
fn an_expired_or_out_of_scope_token_is_refused() {
    let s = start_with_config(&team_config(), &[]);
    let c = Client::new(&s);
    // Expired: 401, before anything else, for every write.
    let (st, body) = c.publish("carol-token", "team/carol", "1.0.0");
    assert_eq!(st, 401, "{body}");
    assert!(error_of(&body).contains("identity `carol` expired at 2001-01-01T00:00:00Z"));
    assert!(body["hint"].as_str().unwrap().contains("new token"));
    assert_eq!(c.yank("carol-token", "x", "1.0.0", true).0, 401);
    assert_eq!(c.change("carol-token", "x", true, &["carol"]).0, 401);
    // Unknown token: 401.
    assert_eq!(c.publish("nobody", "team/x", "1.0.0").0, 401);

    // dave may publish under team/ only.
    let (st, body) = c.publish("dave-token", "sst2", "1.0.0");
    assert_eq!(st, 403, "{body}");
    assert!(
        error_of(&body).contains("identity `dave` may not publish `sst2`"),
        "{body}"
    );
    assert!(error_of(&body).contains("team/*"));
    assert!(body["hint"].is_string());
    assert_eq!(
        reqwest::blocking::get(format!("{}/index/ss/t2/sst2", s.url))
            .unwrap()
            .status(),
        404
    );
    let (st, body) = c.publish("dave-token", "team/sst2", "1.0.0");
    assert_eq!(st, 201, "{body}");
    assert_eq!(c.owners("team/sst2").1["owners"], json!(["dave"]));
    // ... and may neither yank nor manage owners, even of his own name.
    let (st, body) = c.yank("dave-token", "team/sst2", "1.0.0", true);
    assert_eq!(st, 403);
    assert!(
        error_of(&body).contains("identity `dave` has no `yank` scope"),
        "{body}"
    );
    let (st, body) = c.change("dave-token", "team/sst2", true, &["alice"]);
    assert_eq!(st, 403);
    assert!(error_of(&body).contains("no `owners` scope"), "{body}");
}

#[test]
fn the_audit_log_records_each_write() {
    let mut s = start_with_config(&team_config(), &[]);
    let c = Client::new(&s);
    let (_, line) = c.publish("alice-token", "sst2", "1.0.0");
    let digest = line["cksum"].as_str().unwrap().to_string();
    c.yank("alice-token", "sst2", "1.0.0", true);
    c.yank("alice-token", "sst2", "1.0.0", false);
    c.change("alice-token", "sst2", true, &["bob"]);
    c.change("bob-token", "sst2", false, &["bob"]);
    c.publish("dave-token", "sst2", "2.0.0");
    c.publish("carol-token", "sst2", "2.0.0"); // expired: not identified, not audited
    let log = audit(&s);
    let summary: Vec<(&str, &str, &str, &str)> = log
        .iter()
        .map(|r| {
            (
                r["identity"].as_str().unwrap(),
                r["action"].as_str().unwrap(),
                r["name"].as_str().unwrap(),
                r["result"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("alice", "publish", "sst2", "ok"),
            ("alice", "yank", "sst2", "ok"),
            ("alice", "unyank", "sst2", "ok"),
            ("alice", "owner-add", "sst2", "ok"),
            ("bob", "owner-remove", "sst2", "ok"),
            ("dave", "publish", "sst2", "refused"),
        ],
        "{log:#?}"
    );
    for r in &log[..3] {
        assert_eq!(r["version"], "1.0.0");
        assert_eq!(r["digest"], digest.as_str());
    }
    assert_eq!(log[0]["status"], 201);
    assert_eq!(log[3]["owners"], json!(["bob"]));
    assert_eq!(log[5]["status"], 403);
    assert!(
        log[5]["error"]
            .as_str()
            .unwrap()
            .contains("may not publish")
    );
    for r in &log {
        humantime::parse_rfc3339(r["time"].as_str().unwrap()).unwrap();
    }
    // Appended to, never rewritten: a restarted server adds to the same file.
    let root = s.root.clone();
    let _ = s.child.kill();
    let _ = s.child.wait();
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("t");
    std::fs::write(&tokens, "alice-token\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_xpm-registry"))
        .args(["serve", "--addr", "127.0.0.1:0", "--quiet", "--root"])
        .arg(&root)
        .arg("--token-file")
        .arg(&tokens)
        .env_remove("XPM_REGISTRY_TOKENS")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap();
    // The plain token is the all-powerful `default` identity: an admin, so it may yank
    // alice's name.
    let r = reqwest::blocking::Client::new()
        .post(format!("{url}/api/v1/yank"))
        .bearer_auth("alice-token")
        .json(&json!({"name": "sst2", "vers": "1.0.0"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("plain tokens are one all-powerful identity"),
        "no warning"
    );
    let text = std::fs::read_to_string(root.join("audit.log")).unwrap();
    assert_eq!(text.lines().count(), 7);
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["identity"], "default");
    assert_eq!(last["action"], "yank");
}

#[test]
fn names_published_before_owners_need_an_admin() {
    let dir = tempfile::tempdir().unwrap();
    // A registry written directly (as a file:// registry): no owners recorded.
    let root = dir.path().join("root");
    let reg = xpm_core::registry::LocalRegistry::open_or_init(&root).unwrap();
    let bytes = artifact(dir.path(), "old", "1.0.0");
    let f = dir.path().join("old.xpm");
    std::fs::write(&f, &bytes).unwrap();
    let m = xpm_core::format::ArtifactReader::open(&f)
        .unwrap()
        .manifest()
        .clone();
    let line = xpm_core::registry::IndexLine::for_artifact(
        &m,
        &xpm_core::digest::sha256(&bytes),
        bytes.len() as u64,
    );
    reg.publish(&f, &line, false).unwrap();
    drop(reg);
    let config = format!(
        "{}\n[[identity]]\nname = \"root\"\ntoken_sha256 = \"{}\"\nscopes = [\"owners\"]\n\
         admin = true\n",
        team_config(),
        hash("root-token")
    );
    let s = start_in(dir, &config, &[]);
    let c = Client::new(&s);
    assert_eq!(c.owners("old"), (200, json!({"name": "old", "owners": []})));
    let (st, body) = c.publish("alice-token", "old", "1.1.0");
    assert_eq!(st, 403);
    assert!(error_of(&body).contains("no recorded owners"), "{body}");
    assert_eq!(c.yank("alice-token", "old", "1.0.0", true).0, 403);
    assert_eq!(c.change("alice-token", "old", true, &["alice"]).0, 403);
    // The admin (owners scope only) hands it to alice.
    let (st, body) = c.change("root-token", "old", true, &["alice"]);
    assert_eq!(st, 200, "{body}");
    assert_eq!(c.publish("alice-token", "old", "1.1.0").0, 201);
    assert_eq!(c.owners("old").1["owners"], json!(["alice"]));
}

#[test]
fn bad_token_configs_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    for (config, expect) in [
        (
            "[[identity]]\nname = \"a\"\ntoken_sha256 = \"xyz\"\nscopes = [\"publish\"]\n",
            "not 64 hex digits",
        ),
        (
            &format!(
                "[[identity]]\nname = \"a\"\ntoken_sha256 = \"{}\"\nscopes = [\"publish\"]\n\
                 [[identity]]\nname = \"b\"\ntoken_sha256 = \"{}\"\nscopes = [\"yank\"]\n",
                hash("t"),
                hash("t")
            ),
            "has a token that identity `a` has too",
        ),
        (
            &format!(
                "[[identity]]\nname = \"a\"\ntoken_sha256 = \"{}\"\nscopes = [\"delete\"]\n",
                hash("t")
            ),
            "unknown variant",
        ),
    ] {
        let f = dir.path().join("tokens.toml");
        std::fs::write(&f, config).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_xpm-registry"))
            .args(["serve", "--addr", "127.0.0.1:0", "--root"])
            .arg(dir.path().join("root"))
            .arg("--token-file")
            .arg(&f)
            .env_remove("XPM_REGISTRY_TOKENS")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{config}: {err}");
    }
}
