//! `xpm serve`: the real binary on 127.0.0.1 with tiny BERT and Llama bases and experts trained
//! by `xpm train`. Served answers are checked against `xpm eval` on the same experts and merges,
//! generation against a greedy decode of the `xpm apply`'d model (by transformers where the
//! Python environment is installed), and the base's weights against their digest after every
//! swap.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::Duration;

use common::TestContext;
use common::train::{write_copy_data, write_keyword_data, write_tiny_bert, write_tiny_llama};
use serde_json::{Value, json};

struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(ctx: &TestContext, args: &[&str]) -> Server {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_xpm"));
        cmd.current_dir(ctx.dir.path())
            .env("XPM_HOME", ctx.path("home"))
            .env("NO_COLOR", "1")
            .args(["serve", "--addr", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Server { child, url }
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = client()
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    fn get(&self, path: &str) -> (u16, String) {
        let r = client().get(format!("{}{path}", self.url)).send().unwrap();
        (r.status().as_u16(), r.text().unwrap())
    }

    fn weights_digest(&self) -> String {
        let (s, body) = self.get("/health?weights=sha256");
        assert_eq!(s, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["weights_sha256"].as_str().unwrap().to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

fn train(ctx: &TestContext, base: &str, data: &str, name: &str, extra: &[&str]) {
    let o = ctx
        .xpm()
        .args(["train", "--base", base, "--data", data])
        .args([
            "--name",
            name,
            "--version",
            "1.0.0",
            "-o",
            &format!("{name}.xpm"),
        ])
        .args(["--batch-size", "16", "--lr", "1e-2", "--head-lr", "3e-2"])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn eval_loss(ctx: &TestContext, expert: &str, merged: Option<&str>) -> f64 {
    let mut c = ctx.xpm();
    c.args(["eval", "--base", "bert", "--expert", expert])
        .args(["--data", "eval.jsonl", "--json"]);
    if let Some(m) = merged {
        c.args(["--merged", m]);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["loss"].as_f64().unwrap()
}

/// The eval set's texts and labels.
fn eval_set(ctx: &TestContext) -> (Vec<String>, Vec<String>) {
    let mut texts = Vec::new();
    let mut labels = Vec::new();
    for l in std::fs::read_to_string(ctx.path("eval.jsonl"))
        .unwrap()
        .lines()
    {
        let v: Value = serde_json::from_str(l).unwrap();
        texts.push(v["text"].as_str().unwrap().to_string());
        labels.push(v["label"].as_str().unwrap().to_string());
    }
    (texts, labels)
}

/// Mean cross-entropy of the served probabilities against the labels.
fn served_loss(results: &Value, labels: &[String]) -> f64 {
    let r = results.as_array().unwrap();
    assert_eq!(r.len(), labels.len());
    let mut sum = 0.0;
    for (x, l) in r.iter().zip(labels) {
        let logits: Vec<f64> = x["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let names: Vec<&String> = x["probabilities"].as_object().unwrap().keys().collect();
        let t = names.iter().position(|n| *n == l).unwrap();
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + logits.iter().map(|z| (z - max).exp()).sum::<f64>().ln();
        sum += lse - logits[t];
    }
    sum / labels.len() as f64
}

#[test]
fn classify_swaps_in_place_matches_eval_and_restores_the_base() {
    let ctx = TestContext::new();
    write_tiny_bert(&ctx.path("bert"), 1);
    write_tiny_bert(&ctx.path("other-bert"), 9);
    write_keyword_data(&ctx.path("train.jsonl"), 96, 2);
    write_keyword_data(&ctx.path("eval.jsonl"), 40, 3);
    let sparse = ["--method", "sparse", "--keep-ratio", "0.1", "--epochs", "1"];
    train(
        &ctx,
        "bert",
        "train.jsonl",
        "alpha",
        &[&sparse[..], &["--seed", "1"]].concat(),
    );
    train(
        &ctx,
        "bert",
        "train.jsonl",
        "beta",
        &[&sparse[..], &["--seed", "2"]].concat(),
    );
    train(
        &ctx,
        "bert",
        "train.jsonl",
        "gamma",
        &["--method", "lora", "--lora-rank", "4", "--epochs", "1"],
    );
    train(&ctx, "other-bert", "train.jsonl", "stranger", &sparse);
    let m = ctx
        .xpm()
        .args(["merge", "alpha.xpm", "beta.xpm", "--strategy", "ties"])
        .args(["--param", "density=0.5", "-o", "ties.xpm"])
        .output()
        .unwrap();
    assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));

    let srv = Server::start(
        &ctx,
        &[
            "--base",
            "bert",
            "--expert",
            "alpha.xpm",
            "--expert",
            "beta.xpm",
            "--expert",
            "gamma.xpm",
            "--expert",
            "stranger.xpm",
            "--queue",
            "2",
        ],
    );
    let base_digest = srv.weights_digest();
    let (texts, labels) = eval_set(&ctx);

    // Each expert, and a merge, as `xpm eval` sees them (same loss to 1e-5).
    let mut reference = std::collections::BTreeMap::new();
    for (name, body, want) in [
        (
            "alpha",
            json!({"expert": "alpha@1"}),
            eval_loss(&ctx, "alpha.xpm", None),
        ),
        (
            "beta",
            json!({"expert": "beta"}),
            eval_loss(&ctx, "beta.xpm", None),
        ),
        (
            "gamma",
            json!({"expert": "gamma@^1.0"}),
            eval_loss(&ctx, "gamma.xpm", None),
        ),
        (
            "ties",
            json!({"experts": ["alpha", "beta"], "strategy": "ties", "params": {"density": 0.5}}),
            eval_loss(&ctx, "alpha.xpm", Some("ties.xpm")),
        ),
    ] {
        let mut body = body;
        body["inputs"] = json!(texts);
        let (s, v) = srv.post("/v1/classify", &body);
        assert_eq!(s, 200, "{name}: {v}");
        let got = served_loss(&v["results"], &labels);
        assert!(
            (got - want).abs() < 1e-5,
            "{name}: served {got}, xpm eval {want}"
        );
        reference.insert(name, (body, v["results"].clone()));
        // The plain base is back, bit for bit, after every swap.
        assert_eq!(srv.weights_digest(), base_digest, "after {name}");
    }

    // Interleaved clients of different experts: every answer is its own expert's.
    std::thread::scope(|s| {
        for t in 0..6 {
            let srv = &srv;
            let reference = &reference;
            s.spawn(move || {
                for round in 0..4 {
                    let name = ["alpha", "beta", "gamma", "ties"][(t + round) % 4];
                    let (body, want) = &reference[name];
                    let mut status = 429;
                    let mut v = Value::Null;
                    while status == 429 {
                        (status, v) = srv.post("/v1/classify", body);
                    }
                    assert_eq!(status, 200, "{name}: {v}");
                    for (a, b) in v["results"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .zip(want.as_array().unwrap())
                    {
                        assert_eq!(a["label"], b["label"], "{name}");
                        for (x, y) in a["logits"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .zip(b["logits"].as_array().unwrap())
                        {
                            assert!(
                                (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-4,
                                "{name}"
                            );
                        }
                    }
                }
            });
        }
    });
    assert_eq!(
        srv.weights_digest(),
        base_digest,
        "after the concurrent clients"
    );

    // Bad input: a 4xx with a JSON error, and the server keeps serving.
    let long = vec!["alpha"; 400].join(" ");
    for (body, status, needle) in [
        (
            json!({"expert": "alpah", "inputs": ["x"]}),
            404,
            "did you mean `alpha`",
        ),
        (
            json!({"expert": "alpha@2", "inputs": ["x"]}),
            404,
            "served versions: 1.0.0",
        ),
        (
            json!({"expert": "stranger", "inputs": ["x"]}),
            400,
            "made from base",
        ),
        (
            json!({"expert": "alpha", "inputs": [long]}),
            400,
            "over the expert's limit",
        ),
        (
            json!({"experts": ["alpha", "beta"], "strategy": "ties", "params": {"density": 2.0}, "inputs": ["x"]}),
            400,
            "density",
        ),
        (
            json!({"experts": ["alpha", "beta"], "strategy": "tie", "inputs": ["x"]}),
            400,
            "did you mean `ties`",
        ),
        (
            json!({"expert": "alpha", "inputs": []}),
            400,
            "give 1 to 256",
        ),
        (
            json!({"expert": "alpha", "inputs": ["x"], "bogus": 1}),
            400,
            "not valid JSON for this endpoint",
        ),
    ] {
        let (s, v) = srv.post("/v1/classify", &body);
        assert_eq!(s, status, "{body}: {v}");
        let text = format!("{} {}", v["error"]["message"], v["error"]["hint"]);
        assert!(text.contains(needle), "{body}: {text}");
    }
    let r = client()
        .post(format!("{}/v1/classify", srv.url))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.json::<Value>().unwrap()["error"]["message"].is_string());
    let (s, v) = srv.post("/v1/completions", &json!({"prompt": "x"}));
    assert_eq!(s, 400, "{v}");

    // Overload: a queue of 2 refuses a burst with 429 + Retry-After, never a 5xx.
    let big = json!({"expert": "alpha", "inputs": vec![texts[0].clone(); 256]});
    let statuses: Vec<(u16, bool)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..12)
            .map(|_| {
                let (srv, big) = (&srv, &big);
                s.spawn(move || {
                    let r = client()
                        .post(format!("{}/v1/classify", srv.url))
                        .json(big)
                        .send()
                        .unwrap();
                    (r.status().as_u16(), r.headers().contains_key("retry-after"))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        statuses.iter().all(|&(s, _)| s == 200 || s == 429),
        "{statuses:?}"
    );
    assert!(
        statuses.iter().any(|&(s, ra)| s == 429 && ra),
        "{statuses:?}"
    );
    assert!(statuses.iter().any(|&(s, _)| s == 200), "{statuses:?}");

    let (s, models) = srv.get("/v1/models");
    assert_eq!(s, 200);
    for id in [
        "\"base\"",
        "alpha@1.0.0",
        "gamma@1.0.0",
        "ties(alpha@1.0.0,beta@1.0.0)",
    ] {
        assert!(models.contains(id), "{id} in {models}");
    }
    assert!(
        !models.contains("stranger@"),
        "another base's expert is not listed"
    );
    let (s, metrics) = srv.get("/metrics");
    assert_eq!(s, 200);
    for m in [
        "xpm_serve_requests_total{endpoint=\"classify\",status=\"200\"}",
        "xpm_serve_requests_total{endpoint=\"classify\",status=\"429\"}",
        "xpm_serve_request_duration_seconds_bucket{endpoint=\"classify\",le=\"+Inf\"}",
        "xpm_serve_swaps_total",
        "xpm_serve_merge_cache_hits_total",
        "xpm_serve_queue_depth",
    ] {
        assert!(metrics.contains(m), "{m} in {metrics}");
    }
    assert_eq!(srv.weights_digest(), base_digest, "at the end");
    drop(srv);

    // Timeouts: a 504 with a JSON error; a request whose client has gone is dropped unrun.
    let quick = Server::start(
        &ctx,
        &[
            "--base",
            "bert",
            "--expert",
            "alpha.xpm",
            "--timeout",
            "1ms",
        ],
    );
    let (s, v) = quick.post("/v1/classify", &big);
    assert_eq!(s, 504, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("timeout"),
        "{v}"
    );
    // Requests queued behind running ones are abandoned before the worker reaches them. Big
    // requests at once keep the worker busy (one alone could finish before the next request
    // arrives), so the small one, sent a little later, waits in the queue until its client has
    // gone. How long the bigs keep the worker busy depends on this machine's speed: a round
    // that happens to see no abandoned request is tried again, with more big requests.
    let small = json!({"expert": "alpha", "inputs": ["x"]});
    let cancelled_total = || {
        let (_, m) = quick.get("/metrics");
        m.lines()
            .find_map(|l| l.strip_prefix("xpm_serve_cancelled_total "))
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let mut cancelled = 0;
    for round in 0..5 {
        let statuses: Vec<u16> = std::thread::scope(|sc| {
            let bigs: Vec<_> = (0..4 << round)
                .map(|_| sc.spawn(|| quick.post("/v1/classify", &big).0))
                .collect();
            std::thread::sleep(Duration::from_millis(5));
            let small_status = quick.post("/v1/classify", &small).0;
            let mut all: Vec<u16> = bigs.into_iter().map(|h| h.join().unwrap()).collect();
            all.push(small_status);
            all
        });
        // A request the worker reaches within the 1 ms may still finish (the small one on an
        // idle worker); the queue may refuse some when a round sends many.
        assert!(
            statuses.iter().all(|&s| [504, 429, 200].contains(&s)),
            "{statuses:?}"
        );
        // The worker may still be busy with the last round's requests.
        cancelled = (0..50)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(20));
                cancelled_total()
            })
            .find(|&n| n > 0)
            .unwrap_or(0);
        if cancelled > 0 {
            break;
        }
    }
    assert!(cancelled > 0, "no abandoned request was dropped unrun");
}

/// Read an SSE body's `data:` payloads.
fn sse_text(body: &str) -> (String, Vec<Value>) {
    let mut text = String::new();
    let mut chunks = Vec::new();
    for l in body.lines() {
        let Some(d) = l.strip_prefix("data: ") else {
            continue;
        };
        if d == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(d).unwrap();
        text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
        chunks.push(v);
    }
    (text, chunks)
}

#[test]
fn completions_greedy_match_the_applied_model_and_stream() {
    let ctx = TestContext::new();
    write_tiny_llama(&ctx.path("llama"), 4);
    write_copy_data(&ctx.path("train.jsonl"), 128, 5);
    train(
        &ctx,
        "llama",
        "train.jsonl",
        "copy",
        &[
            "--method",
            "sparse",
            "--keep-ratio",
            "0.2",
            "--targets",
            "all",
            "--epochs",
            "3",
        ],
    );
    train(
        &ctx,
        "llama",
        "train.jsonl",
        "copy2",
        &[
            "--method",
            "sparse",
            "--keep-ratio",
            "0.2",
            "--targets",
            "all",
            "--epochs",
            "1",
            "--seed",
            "3",
        ],
    );
    let a = ctx
        .xpm()
        .args(["apply", "copy.xpm", "--base", "llama", "-o", "applied"])
        .output()
        .unwrap();
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));

    let srv = Server::start(
        &ctx,
        &[
            "--base",
            "llama",
            "--expert",
            "copy.xpm",
            "--expert",
            "copy2.xpm",
        ],
    );
    let base_digest = srv.weights_digest();
    // The applied model served as a plain base: what a greedy decode of it gives.
    let applied = Server::start(&ctx, &["--base", "applied"]);
    let prompts = ["copy : 1 2 3 :", "copy : 7 7 0 4 :", "copy : 9 :"];
    let mut differs = false;
    for p in prompts {
        let req =
            |model: &str| json!({"model": model, "prompt": p, "max_tokens": 8, "temperature": 0});
        let (s, got) = srv.post("/v1/completions", &req("base+copy@1"));
        assert_eq!(s, 200, "{got}");
        let (s2, want) = applied.post("/v1/completions", &req("base"));
        assert_eq!(s2, 200, "{want}");
        assert_eq!(got["choices"][0]["text"], want["choices"][0]["text"], "{p}");
        let (_, plain) = srv.post("/v1/completions", &req("base"));
        differs |= plain["choices"][0]["text"] != got["choices"][0]["text"];
        assert_eq!(got["object"], "text_completion");
        assert!(got["usage"]["completion_tokens"].as_u64().unwrap() >= 1);

        // Streamed: the same text, in chunks, then [DONE].
        let r = client()
            .post(format!("{}/v1/completions", srv.url))
            .json(&json!({"model": "copy", "prompt": p, "max_tokens": 8, "temperature": 0, "stream": true}))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let body = r.text().unwrap();
        assert!(body.contains("data: [DONE]"), "{body}");
        let (text, chunks) = sse_text(&body);
        assert_eq!(text, got["choices"][0]["text"].as_str().unwrap(), "{body}");
        assert!(chunks.last().unwrap()["choices"][0]["finish_reason"].is_string());
    }
    assert!(differs, "the expert changes what the base generates");
    // A stop string ends the text before it.
    let (_, full) = srv.post(
        "/v1/completions",
        &json!({"model": "copy", "prompt": prompts[0], "max_tokens": 8, "temperature": 0}),
    );
    let full = full["choices"][0]["text"].as_str().unwrap().to_string();
    let word = full
        .split_whitespace()
        .nth(1)
        .expect("two words")
        .to_string();
    let (s, v) = srv.post(
        "/v1/completions",
        &json!({"model": "copy", "prompt": prompts[0], "max_tokens": 8, "temperature": 0, "stop": [word.clone()]}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["choices"][0]["text"].as_str().unwrap(),
        &full[..full.find(&word).unwrap()]
    );
    // Sampling with a seed repeats itself.
    let sampled = |seed: u64| {
        srv.post(
            "/v1/completions",
            &json!({"model": "copy", "prompt": prompts[1], "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": seed}),
        )
        .1["choices"][0]["text"]
            .clone()
    };
    assert_eq!(sampled(3), sampled(3));
    // Chat: the plain transcript for a model without a template.
    let (s, v) = srv.post(
        "/v1/chat/completions",
        &json!({"model": "copy", "messages": [{"role": "user", "content": "copy : 1 :"}], "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    // Bad input.
    for (body, needle) in [
        (
            json!({"model": "copy", "prompt": "x", "max_tokens": 1000}),
            "context",
        ),
        (
            json!({"model": "copy", "prompt": "x", "temperature": 5}),
            "temperature",
        ),
        (
            json!({"model": "copy", "prompt": "x", "n": 2}),
            "`n` must be 1",
        ),
        (
            json!({"model": "cpy", "prompt": "x"}),
            "did you mean `copy`",
        ),
    ] {
        let (s, v) = srv.post("/v1/completions", &body);
        assert!((400..500).contains(&s), "{body}: {v}");
        let text = format!("{} {}", v["error"]["message"], v["error"]["hint"]);
        assert!(text.contains(needle), "{body}: {text}");
    }
    let (s, v) = srv.post("/v1/classify", &json!({"expert": "copy", "inputs": ["x"]}));
    assert_eq!(s, 400, "{v}");
    assert_eq!(srv.weights_digest(), base_digest);

    // A model with a chat template: the messages are rendered with it (here: the user's
    // content, then the template's generation prompt), so the chat answer is the completion of
    // the rendered prompt.
    let chat_dir = ctx.path("llama-chat");
    std::fs::create_dir_all(&chat_dir).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(ctx.path("llama").join(f), chat_dir.join(f)).unwrap();
    }
    std::fs::write(
        chat_dir.join("tokenizer_config.json"),
        json!({
            "bos_token": "<s>",
            "chat_template": "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}{% if add_generation_prompt %} :{% endif %}"
        })
        .to_string(),
    )
    .unwrap();
    let chat = Server::start(&ctx, &["--base", "llama-chat", "--expert", "copy.xpm"]);
    let (s, v) = chat.post(
        "/v1/chat/completions",
        &json!({"model": "copy", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "copy : 4 5"}], "max_tokens": 6, "temperature": 0}),
    );
    assert_eq!(s, 200, "{v}");
    let (_, want) = chat.post(
        "/v1/completions",
        &json!({"model": "copy", "prompt": "copy : 4 5 :", "max_tokens": 6, "temperature": 0}),
    );
    assert_eq!(
        v["choices"][0]["message"]["content"], want["choices"][0]["text"],
        "{v} {want}"
    );
    assert_eq!(v["usage"]["prompt_tokens"], want["usage"]["prompt_tokens"]);
    drop(chat);

    // The OpenAI Python client, as a real client: completions (plain and streamed), chat,
    // the model list and a 404 it raises as its own error type.
    if let Some(py) = common::python("openai") {
        let script = r#"
import json, sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
p = sys.argv[2]
text = c.completions.create(model="copy", prompt=p, max_tokens=8, temperature=0).choices[0].text
streamed = "".join(ch.choices[0].text for ch in c.completions.create(
    model="copy", prompt=p, max_tokens=8, temperature=0, stream=True))
chat = c.chat.completions.create(model="base+copy@1", messages=[{"role": "user", "content": "copy : 1 :"}],
                                 max_tokens=4, temperature=0)
merged = c.completions.create(model="copy", prompt=p, max_tokens=4, temperature=0,
                              extra_body={"xpm": {"experts": ["copy", "copy2"], "strategy": "sparse-mean"}})
models = [m.id for m in c.models.list()]
try:
    c.completions.create(model="cpy", prompt=p)
    missing = None
except openai.NotFoundError as e:
    missing = e.status_code
print(json.dumps({"text": text, "streamed": streamed, "chat": chat.choices[0].message.content,
                  "merged": merged.choices[0].text, "models": models, "missing": missing}))
"#;
        let o = std::process::Command::new(py)
            .args(["-c", script, &srv.url, prompts[0]])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_slice(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .last()
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
        let (_, direct) = srv.post(
            "/v1/completions",
            &json!({"model": "copy", "prompt": prompts[0], "max_tokens": 8, "temperature": 0}),
        );
        assert_eq!(v["text"], direct["choices"][0]["text"], "{v}");
        assert_eq!(v["streamed"], v["text"], "{v}");
        assert!(v["chat"].is_string(), "{v}");
        assert!(v["merged"].is_string(), "{v}");
        assert_eq!(v["missing"], 404, "{v}");
        let models: Vec<&str> = v["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap())
            .collect();
        assert!(
            models.contains(&"base") && models.contains(&"copy@1.0.0"),
            "{models:?}"
        );
    }

    // transformers' greedy decode of the applied model gives the served text.
    if let Some(py) = common::python("transformers, torch") {
        let script = r#"
import json, sys, torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
d, prompts = sys.argv[1], json.loads(sys.argv[2])
tok = PreTrainedTokenizerFast(tokenizer_file=d + "/tokenizer.json")
m = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
out = []
for p in prompts:
    ids = tok(p, return_tensors="pt").input_ids
    g = m.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0)
    out.append(g[0, ids.shape[1]:].tolist())
print(json.dumps(out))
"#;
        let o = std::process::Command::new(py)
            .args(["-c", script, ctx.path("applied").to_str().unwrap()])
            .arg(serde_json::to_string(&prompts).unwrap())
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_VERBOSITY", "error")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let ids: Vec<Vec<u32>> = serde_json::from_slice(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .last()
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
        let words = common::train::LLAMA_WORDS;
        for (p, ids) in prompts.iter().zip(ids) {
            let want: Vec<&str> = ids
                .iter()
                .take_while(|&&i| i != 2)
                .map(|&i| words[i as usize])
                .collect();
            let (_, got) = srv.post(
                "/v1/completions",
                &json!({"model": "copy", "prompt": p, "max_tokens": 8, "temperature": 0}),
            );
            let got: Vec<&str> = got["choices"][0]["text"]
                .as_str()
                .unwrap()
                .split_whitespace()
                .collect();
            assert_eq!(got, want, "{p}");
        }
    }
}
