//! Registry fixtures: real artifacts of chosen names, versions, bases and sizes (written with
//! xpm's own artifact writer), the real `xpm-registry` server binary on 127.0.0.1, and a TCP
//! relay that cuts blob downloads short — the one fault (a connection dying mid-transfer) that
//! cannot be produced on demand with the real server alone.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use xpm::format::{
    ArtifactWriter, BaseModel, Content, Dtype, ExpertKind, Manifest, TensorData, encode_tensor,
};

/// The base digest tests use for a base id: any stable `sha256:` string works.
pub fn base_digest(base_id: &str) -> String {
    xpm::digest::sha256(base_id.as_bytes())
}

/// Write a sparse expert of about `bytes` bytes (random values, so it does not compress).
pub fn make_expert(path: &Path, name: &str, version: &str, base_id: &str, bytes: usize, seed: u64) {
    let nnz = (bytes / 5).max(8);
    let mut rng = super::Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let indices: Vec<u64> = (0..nnz as u64)
        .map(|i| i * 20 + (rng.next() % 20))
        .collect();
    let values: Vec<u8> = (0..nnz).flat_map(|_| rng.f32().to_le_bytes()).collect();
    let t = TensorData {
        name: "layer.0.attn.q.weight".into(),
        shape: vec![nnz as u64, 20],
        dtype: Dtype::F32,
        content: Content::Sparse {
            indices,
            values,
            block_size: None,
        },
    };
    let mut w = ArtifactWriter::create(path, 1).unwrap();
    w.push(encode_tensor(&t, 1).unwrap()).unwrap();
    let m = Manifest {
        description: Some(format!("test expert {name} for {base_id}")),
        ..Manifest::new(
            name,
            version.parse().unwrap(),
            BaseModel {
                id: base_id.into(),
                digest: base_digest(base_id),
            },
            ExpertKind::Sparse,
        )
    };
    w.finish(m).unwrap();
}

/// The `xpm-registry` binary: built by `cargo test --workspace` next to `xpm` (the registry
/// crate's own tests need it); when missing (`cargo test -p xpm-cli`), built here once.
pub fn server_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let xpm = assert_cmd::cargo::cargo_bin("xpm");
        let bin = xpm.parent().unwrap().join("xpm-registry");
        if !bin.is_file() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let st = Command::new(cargo)
                .args(["build", "-p", "xpm-registry", "--bin", "xpm-registry"])
                .status()
                .expect("run cargo build");
            assert!(st.success(), "cannot build xpm-registry");
        }
        assert!(bin.is_file(), "{} missing", bin.display());
        bin
    })
    .clone()
}

pub const TOKEN: &str = "test-token-8f2c";

/// A running registry server; killed on drop.
pub struct Server {
    pub child: Child,
    pub url: String,
    pub root: PathBuf,
    pub log: PathBuf,
}

impl Server {
    pub fn start(root: &Path) -> Server {
        Self::start_with(root, &[])
    }

    pub fn start_with(root: &Path, extra: &[&str]) -> Server {
        let log = root.with_extension("log");
        let mut child = Command::new(server_bin())
            .args(["serve", "--root"])
            .arg(root)
            .args(["--addr", "127.0.0.1:0"])
            .args(extra)
            .env("XPM_REGISTRY_TOKENS", TOKEN)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start xpm-registry");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("server did not start: {line:?}"))
            .to_string();
        Server {
            child,
            url,
            root: root.to_path_buf(),
            log,
        }
    }

    /// Stop the server now.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The raw index file of `name` (relative path as the protocol lays it out).
    pub fn index_lines(&self, rel: &str) -> Vec<serde_json::Value> {
        match std::fs::read_to_string(self.root.join("index").join(rel)) {
            Ok(t) => t
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
            Err(_) => vec![],
        }
    }

    /// Every file under the server's blob directory.
    pub fn blobs(&self) -> Vec<PathBuf> {
        files_under(&self.root.join("blobs"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A TCP relay in front of `upstream` that cuts the first `cuts` blob responses after
/// `after` bytes (simulating a server that dies mid-download).
pub struct CuttingRelay {
    pub url: String,
    pub cuts_left: Arc<AtomicUsize>,
}

impl CuttingRelay {
    pub fn start(upstream: &str, cuts: usize, after: usize) -> CuttingRelay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let up = upstream.trim_start_matches("http://").to_string();
        let cuts_left = Arc::new(AtomicUsize::new(cuts));
        let c = cuts_left.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let up = up.clone();
                let c = c.clone();
                std::thread::spawn(move || relay(client, &up, &c, after));
            }
        });
        CuttingRelay { url, cuts_left }
    }
}

fn relay(client: TcpStream, upstream: &str, cuts: &AtomicUsize, after: usize) {
    let Ok(server) = TcpStream::connect(upstream) else {
        return;
    };
    // Client → server: plain copy; note whether a blob was requested on this connection.
    let blob_seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let seen = blob_seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        while let Ok(n) = c_in.read(&mut buf) {
            if n == 0 {
                break;
            }
            if buf[..n].windows(11).any(|w| w == b"GET /blobs/") {
                seen.store(true, Ordering::SeqCst);
            }
            if s_out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = s_out.shutdown(Shutdown::Write);
    });
    // Server → client: cut after `after` bytes of a blob response while cuts remain.
    let (mut s_in, mut c_out) = (server, client);
    let mut buf = [0u8; 16384];
    let mut sent = 0usize;
    let mut cutting = false;
    while let Ok(n) = s_in.read(&mut buf) {
        if n == 0 {
            break;
        }
        if !cutting && blob_seen.load(Ordering::SeqCst) {
            cutting = cuts
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |k| k.checked_sub(1))
                .is_ok();
            sent = 0;
        }
        if cutting && sent + n > after {
            let _ = c_out.write_all(&buf[..after.saturating_sub(sent)]);
            let _ = c_out.shutdown(Shutdown::Both);
            let _ = s_in.shutdown(Shutdown::Both);
            return;
        }
        if c_out.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n;
    }
    let _ = c_out.shutdown(Shutdown::Write);
}
