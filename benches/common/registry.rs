//! Registry helpers of the install and publish benches (`#[path = "common/registry.rs"] mod
//! registry;`): the expert files they publish, the `xpm-registry` server, moto (S3) and
//! `docker-registry` (OCI) on 127.0.0.1.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../../tests/support/service.rs"]
mod service;

use xpm::format::{
    ArtifactWriter, BaseModel, Content, Dtype, ExpertKind, Manifest, TensorData, encode_tensor,
};

/// The release build of the registry server, built on first use.
pub static SERVER_BIN: std::sync::LazyLock<PathBuf> = std::sync::LazyLock::new(|| {
    crate::common::build_release(
        "xpm-registry",
        &format!("xpm-registry{}", std::env::consts::EXE_SUFFIX),
    )
});

/// The release build of `xpm`, built on first use.
pub static XPM_BIN: std::sync::LazyLock<PathBuf> = std::sync::LazyLock::new(|| {
    crate::common::build_release("xpm-cli", &format!("xpm{}", std::env::consts::EXE_SUFFIX))
});

/// The token a [`Server::start_with_token`] server accepts.
pub const TOKEN: &str = "bench-token-5d1e";

/// An expert of about `bytes` (one sparse tensor, f32 values), written to `path`.
pub fn write_expert(path: &Path, name: &str, version: &str, bytes: usize, seed: u64) {
    let nnz = bytes / 5;
    let mut s = xpm::rng::SplitMix64(seed + 1);
    let indices: Vec<u64> = (0..nnz as u64)
        .map(|i| i * 20 + s.next_u64() % 20)
        .collect();
    let values: Vec<u8> = (0..nnz)
        .flat_map(|_| ((s.next_u64() >> 40) as f32 / 16_777_216.0 - 0.5).to_le_bytes())
        .collect();
    let t = TensorData {
        name: "encoder.layer.0.attention.self.query.weight".into(),
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
    w.finish(manifest(name, version, "bench-base")).unwrap();
}

pub fn manifest(name: &str, version: &str, base: &str) -> Manifest {
    Manifest::new(
        name,
        version.parse().unwrap(),
        BaseModel {
            id: base.into(),
            digest: xpm::digest::sha256(base.as_bytes()),
        },
        ExpertKind::Sparse,
    )
}

/// The lowercase sha256 hex and the size of a file.
pub fn file_sha(path: &Path) -> (String, u64) {
    let (cksum, size) = xpm::digest::sha256_reader(std::fs::File::open(path).unwrap()).unwrap();
    let hex = cksum.rsplit(':').next().unwrap().to_string();
    (hex, size)
}

/// A free port on 127.0.0.1 (free when asked; callers retry when it is taken meanwhile).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `xpm-registry` server; killed on drop.
pub struct Server {
    child: Child,
    pub url: String,
}

impl Server {
    /// A server without auth (`--no-auth`): reads only, in the benches.
    pub fn start(root: &Path) -> Server {
        Self::spawn(root, None)
    }

    /// A server that accepts publishes with [`TOKEN`].
    pub fn start_with_token(root: &Path) -> Server {
        Self::spawn(root, Some(TOKEN))
    }

    fn spawn(root: &Path, token: Option<&str>) -> Server {
        let mut c = Command::new(&*SERVER_BIN);
        c.args(["serve", "--quiet", "--addr", "127.0.0.1:0", "--root"])
            .arg(root)
            .stdout(Stdio::piped());
        match token {
            Some(t) => c.env("XPM_REGISTRY_TOKENS", t),
            None => c.arg("--no-auth").env_remove("XPM_REGISTRY_TOKENS"),
        };
        let mut child = c.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("xpm-registry did not start: {line:?}"))
            .to_string();
        Server { child, url }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The bucket of [`Moto`].
pub const BUCKET: &str = "xpm-bench";

/// A moto S3 server (`$XPM_MOTO`, from scripts/moto-env.sh) on 127.0.0.1 with the bucket
/// [`BUCKET`], readable anonymously; killed on drop.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    /// Start moto, or `None` when `$XPM_MOTO` is not set.
    pub fn start() -> Option<Moto> {
        let bin = PathBuf::from(std::env::var_os("XPM_MOTO")?);
        let (child, endpoint) = service::start_moto(&bin);
        let moto = Moto { child, endpoint };
        let http = reqwest::blocking::Client::new();
        // moto checks no signatures: an unsigned PUT creates the bucket.
        let r = http
            .put(format!("{}/{BUCKET}", moto.endpoint))
            .send()
            .unwrap();
        assert!(r.status().is_success(), "create bucket: {}", r.status());
        // Anyone may read the objects: the bucket's plain HTTP front.
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Sid": "PublicRead", "Effect": "Allow", "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": format!("arn:aws:s3:::{BUCKET}/*"),
            }],
        });
        let r = http
            .put(format!("{}/{BUCKET}?policy", moto.endpoint))
            .header("Content-Type", "application/json")
            .body(policy.to_string())
            .send()
            .unwrap();
        assert!(r.status().is_success(), "bucket policy: {}", r.status());
        Some(moto)
    }

    /// The registry at `prefix` of the bucket, as `xpm` names it.
    pub fn location(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// The same registry through the bucket's plain HTTP URL (anonymous reads).
    pub fn http_url(&self, prefix: &str) -> String {
        format!("{}/{BUCKET}/{prefix}", self.endpoint)
    }

    /// Give `c` the credentials and the endpoint of this server, and no other AWS setting.
    pub fn env(&self, c: &mut Command) {
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("AWS_") {
                c.env_remove(k);
            }
        }
        c.env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("XPM_S3_ENDPOINT", &self.endpoint);
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The user of [`Oci`]'s htpasswd file.
pub const OCI_USER: &str = "xpm-bench";
/// Their password.
pub const OCI_PASS: &str = "bench-pass-7c";
/// The repository namespace the benches publish under.
pub const OCI_NS: &str = "bench/xpm";

/// Debian's `docker-registry` (CNCF distribution) on 127.0.0.1 with htpasswd (Basic) auth and
/// filesystem storage, as tests/registry_oci.rs starts it; killed on drop.
pub struct Oci {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Oci {
    /// Start a registry, or `None` when `docker-registry` is not installed.
    pub fn start(tmp: &Path) -> Option<Oci> {
        let installed = Command::new("docker-registry")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            return None;
        }
        let dir = tempfile::tempdir_in(tmp).unwrap();
        let data = dir.path().join("data");
        let hash = bcrypt::hash(OCI_PASS, 4).unwrap();
        std::fs::write(dir.path().join("htpasswd"), format!("{OCI_USER}:{hash}\n")).unwrap();
        let (child, port) = service::start_docker_registry(dir.path(), &data, "xpm-bench");
        Some(Oci {
            child,
            port,
            _dir: dir,
        })
    }

    pub fn location(&self) -> String {
        format!("oci://127.0.0.1:{}/{OCI_NS}", self.port)
    }

    /// Give `c` the Basic credentials, and no Docker config or token.
    pub fn env(&self, c: &mut Command, home: &Path) {
        c.env("DOCKER_CONFIG", home.join("no-docker-config"))
            .env_remove("XPM_TOKEN")
            .env_remove("XPM_OCI_PLAIN_HTTP")
            .env("XPM_OCI_USERNAME", OCI_USER)
            .env("XPM_OCI_PASSWORD", OCI_PASS);
    }

    /// The tags of the repository of expert `name`.
    pub fn tags(&self, name: &str) -> Vec<String> {
        let r = reqwest::blocking::Client::new()
            .get(format!(
                "http://127.0.0.1:{}/v2/{OCI_NS}/{name}/tags/list",
                self.port
            ))
            .basic_auth(OCI_USER, Some(OCI_PASS))
            .send()
            .unwrap();
        if r.status() == reqwest::StatusCode::NOT_FOUND {
            return vec![];
        }
        assert!(r.status().is_success(), "tags of {name}: {}", r.status());
        let v: serde_json::Value = r.json().unwrap();
        v["tags"]
            .as_array()
            .map(|a| a.iter().map(|t| t.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Oci {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `xpm publish FILE --registry REGISTRY -q` for every file, `jobs` processes at once
/// (each worker publishes its share one after the other), with `env` applied to each command
/// and `$XPM_HOME` under `home`; the latency of each publish, in the order of `files`. Panics
/// when a publish fails.
pub fn publish_all(
    files: &[PathBuf],
    registry: &str,
    jobs: usize,
    home: &Path,
    env: &(dyn Fn(&mut Command) + Sync),
) -> Vec<Duration> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let times = std::sync::Mutex::new(vec![Duration::ZERO; files.len()]);
    std::thread::scope(|s| {
        for w in 0..jobs {
            let (next, times) = (&next, &times);
            s.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(f) = files.get(i) else { break };
                    let mut c = Command::new(&*XPM_BIN);
                    c.args(["publish", "-q", "--registry", registry])
                        .arg(f)
                        .env("XPM_HOME", home.join(format!("home{w}")))
                        .env("NO_COLOR", "1")
                        .stdout(Stdio::null());
                    env(&mut c);
                    let t = Instant::now();
                    let o = c.output().unwrap();
                    let d = t.elapsed();
                    assert!(
                        o.status.success(),
                        "publish {} to {registry}: {}",
                        f.display(),
                        String::from_utf8_lossy(&o.stderr)
                    );
                    times.lock().unwrap()[i] = d;
                }
            });
        }
    });
    times.into_inner().unwrap()
}
