//! The server's HTTP surface, probed directly with raw requests (the client side is tested
//! through the real `xpm` binary in the top-level `tests/registry.rs`).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

struct Server {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_xpm-registry"))
        .args(["serve", "--addr", "127.0.0.1:0", "--quiet", "--root"])
        .arg(dir.path().join("root"))
        .args(extra)
        .env("XPM_REGISTRY_TOKENS", "tok")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_string();
    Server {
        child,
        url,
        _dir: dir,
    }
}

fn get(url: &str) -> reqwest::blocking::Response {
    reqwest::blocking::get(url).unwrap()
}

#[test]
fn config_and_health() {
    let s = start(&["--max-upload-size", "10MB"]);
    let cfg: serde_json::Value = get(&format!("{}/config.json", s.url)).json().unwrap();
    assert_eq!(cfg["auth-required"], true);
    assert_eq!(cfg["max-upload-size"], 10_000_000);
    assert_eq!(cfg["dl"], "blobs/sha256/{prefix}/{sha256}");
    assert_eq!(get(&format!("{}/health", s.url)).text().unwrap(), "ok");
}

#[test]
fn paths_cannot_escape_or_alias() {
    let s = start(&[]);
    for p in [
        "index/..%2Fconfig.json",
        "index/ab/cd/../../config.json",
        "index/xx/yy/sst2", // not the canonical path of `sst2`
        "index/ss/t2/sst2", // canonical, but never published
        "index/@../ss/t2/sst2",
        "blobs/sha256/ab/abcd", // not a digest
        "blobs/sha256/00/0000000000000000000000000000000000000000000000000000000000000000",
        "blobs/sha256/ff/0000000000000000000000000000000000000000000000000000000000000000",
    ] {
        let r = get(&format!("{}/{p}", s.url));
        assert!(
            r.status() == 404 || r.status() == 400,
            "{p}: {}",
            r.status()
        );
    }
}

#[test]
fn writes_need_a_valid_token_and_a_digest() {
    let s = start(&[]);
    let c = reqwest::blocking::Client::new();
    let yank = |token: Option<&str>| {
        let mut rb = c
            .post(format!("{}/api/v1/yank", s.url))
            .json(&serde_json::json!({"name": "sst2", "vers": "1.0.0"}));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        rb.send().unwrap()
    };
    assert_eq!(yank(None).status(), 401);
    assert_eq!(yank(Some("nope")).status(), 401);
    let r = yank(Some("tok"));
    assert_eq!(r.status(), 404);
    assert!(r.text().unwrap().contains("no expert named `sst2`"));
    let r = c
        .put(format!("{}/api/v1/experts/new", s.url))
        .bearer_auth("tok")
        .body("xx")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().unwrap();
    assert!(body["error"].as_str().unwrap().contains("X-Xpm-Sha256"));
    assert!(body["hint"].is_string());
}

#[test]
fn search_on_an_empty_registry() {
    let s = start(&[]);
    let r: serde_json::Value = get(&format!("{}/api/v1/search?q=anything&limit=5", s.url))
        .json()
        .unwrap();
    assert_eq!(r["total"], 0);
    assert_eq!(r["experts"], serde_json::json!([]));
}

#[test]
fn refuses_to_start_without_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xpm-registry"))
        .args(["serve", "--addr", "127.0.0.1:0", "--root"])
        .arg(dir.path())
        .env_remove("XPM_REGISTRY_TOKENS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no tokens configured"));
}

/// `host:port` of a server URL.
fn host_port(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

/// Whether the server closed `s` within `within` (reads return 0 or fail with a reset).
fn closed_within(s: &mut std::net::TcpStream, within: std::time::Duration) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a response (e.g. 408) before the close
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false, // timed out: still open
        }
    }
}

/// Slow clients (headers a byte at a time, idle keep-alive connections, stalled upload bodies)
/// are cut off, and a connection cap holds while normal clients still get through.
#[test]
fn slow_clients_are_cut_off_and_connections_are_capped() {
    use std::io::Write;
    use std::net::TcpStream;
    use std::time::{Duration, Instant};
    let s = start(&[
        "--header-timeout",
        "1s",
        "--body-idle-timeout",
        "1s",
        "--max-connections",
        "4",
    ]);
    let addr = host_port(&s.url);
    // Four clients that dribble their headers take every slot…
    let mut slow: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut c = TcpStream::connect(&addr).unwrap();
            c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
            c
        })
        .collect();
    // …and a normal request waits for a slot, which the header timeout frees.
    let t = Instant::now();
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let r = client.get(format!("{}/health", s.url)).send().unwrap();
    assert_eq!(r.text().unwrap(), "ok");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    for c in &mut slow {
        assert!(
            closed_within(c, Duration::from_secs(5)),
            "a slow client stayed connected"
        );
    }
    // A kept-alive connection that goes quiet after a request is closed too.
    let mut idle = TcpStream::connect(&addr).unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(
        closed_within(&mut idle, Duration::from_secs(5)),
        "an idle connection stayed open"
    );
    // An upload that stalls mid-body is refused with 408.
    let mut up = TcpStream::connect(&addr).unwrap();
    let digest = format!("sha256:{}", "0".repeat(64));
    write!(
        up,
        "PUT /api/v1/experts/new HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\n\
         X-Xpm-Sha256: {digest}\r\nContent-Length: 1000\r\n\r\n0123456789"
    )
    .unwrap();
    up.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut resp = String::new();
    let _ = std::io::Read::read_to_string(&mut up, &mut resp);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("the upload stalled"), "{resp}");
}
