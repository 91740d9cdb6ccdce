//! Starting a local service for tests and benches (moto, `docker-registry`): on a free port of
//! 127.0.0.1, retried on another port when the chosen one was taken between choosing and
//! binding. Included with `#[path]` by tests/registry_s3.rs, tests/registry_oci.rs and
//! benches/common/registry.rs (each uses a part of it).
#![allow(dead_code)]

use std::process::Child;
use std::time::{Duration, Instant};

/// Start `what` with `spawn(port)` until `ready(port)` holds (up to 30 s per try), on up to 5
/// free ports; the running child and its port. Panics when it never becomes ready.
pub fn start_on_free_port(
    what: &str,
    mut spawn: impl FnMut(u16) -> Child,
    ready: impl Fn(u16) -> bool,
) -> (Child, u16) {
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = spawn(port);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break; // port taken between bind and spawn: try another
            }
            if ready(port) {
                return (child, port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("{what} did not start");
}

/// moto's S3 server (`bin`, from scripts/moto-env.sh) on a free port; the child and its
/// endpoint URL.
pub fn start_moto(bin: &std::path::Path) -> (Child, String) {
    let (child, port) = start_on_free_port(
        "moto_server",
        |port| {
            std::process::Command::new(bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()))
        },
        |port| {
            reqwest::blocking::get(format!("http://127.0.0.1:{port}/moto-api/"))
                .is_ok_and(|r| r.status().is_success())
        },
    );
    (child, format!("http://127.0.0.1:{port}"))
}

/// Debian's `docker-registry` (CNCF distribution) on a free port, with filesystem storage under
/// `data`, Basic auth from the htpasswd file `dir/htpasswd` and its config in `dir`; the child
/// and its port.
pub fn start_docker_registry(
    dir: &std::path::Path,
    data: &std::path::Path,
    realm: &str,
) -> (Child, u16) {
    start_on_free_port(
        "docker-registry",
        |port| {
            let config = format!(
                "version: 0.1\n\
                 log:\n  level: error\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: false\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: {realm}\n\
                 auth:\n  htpasswd:\n    realm: {realm}\n    path: {}\n",
                data.display(),
                dir.join("htpasswd").display()
            );
            let cfg = dir.join("config.yml");
            std::fs::write(&cfg, config).unwrap();
            std::process::Command::new("docker-registry")
                .arg("serve")
                .arg(&cfg)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("run docker-registry")
        },
        |port| {
            reqwest::blocking::get(format!("http://127.0.0.1:{port}/v2/"))
                .is_ok_and(|r| r.status() == reqwest::StatusCode::UNAUTHORIZED)
        },
    )
}
