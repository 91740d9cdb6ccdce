//! A tiny BERT model directory and a synthetic classification task, for `xpm demo` and the
//! tests: `config.json`, a whitespace WordLevel `tokenizer.json` and random `model.safetensors`
//! that load exactly like a real Hugging Face BERT folder, with nothing to download.

use std::path::Path;

use xpm_core::error::{Error, IoResultExt, Result};
use xpm_core::rng::SplitMix64;

/// The vocabulary: special tokens, three class keywords, then filler words.
pub const WORDS: &[&str] = &[
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "alpha", "beta", "gamma", "the", "a", "of", "and", "to",
    "in", "is", "it", "that", "was", "for", "on", "are", "with", "as", "at", "be", "this", "have",
    "from", "or", "one", "had", "by", "word", "but", "not", "what", "all", "were", "we", "when",
];

/// The classes of [`write_keyword_data`], each marked by its keyword.
pub const CLASSES: [&str; 3] = ["alpha", "beta", "gamma"];

/// A `tokenizers` WordLevel tokenizer over `words` (ids in order), splitting on whitespace.
/// Like the files sentence-transformers publishes (MiniLM's pads every text to 128 tokens), it
/// asks for fixed-length padding, which xpm must ignore: batches are padded by xpm, with a mask.
pub fn tokenizer_json(words: &[&str]) -> String {
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
        .collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "added_tokens": [],
        "padding": {
            "strategy": {"Fixed": 24}, "direction": "Right", "pad_to_multiple_of": null,
            "pad_id": 0, "pad_type_id": 0, "pad_token": words[0]
        },
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
    .to_string()
}

/// Named f32 tensors: (name, shape, values).
pub type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// A 2-layer BERT (hidden 32, 4 heads, 128 positions): its `config.json` and random weights.
pub fn tiny_bert(seed: u64) -> (serde_json::Value, Tensors) {
    let (h, i, v, p) = (32usize, 64usize, WORDS.len(), 128usize);
    let config = serde_json::json!({
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": v,
        "hidden_size": h, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": i, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "max_position_embeddings": p,
        "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12,
        "pad_token_id": 0
    });
    let mut rng = SplitMix64(seed);
    let mut tensors: Tensors = Vec::new();
    let mut put = |name: String, shape: Vec<usize>, scale: f32, add: f32| {
        let n: usize = shape.iter().product();
        let values = (0..n).map(|_| rng.normal() * scale + add).collect();
        tensors.push((name, shape, values));
    };
    put(
        "embeddings.word_embeddings.weight".into(),
        vec![v, h],
        0.5,
        0.0,
    );
    put(
        "embeddings.position_embeddings.weight".into(),
        vec![p, h],
        0.1,
        0.0,
    );
    put(
        "embeddings.token_type_embeddings.weight".into(),
        vec![2, h],
        0.1,
        0.0,
    );
    put("embeddings.LayerNorm.weight".into(), vec![h], 0.1, 1.0);
    put("embeddings.LayerNorm.bias".into(), vec![h], 0.1, 0.0);
    for l in 0..2 {
        let q = |s: &str| format!("encoder.layer.{l}.{s}");
        for (n, o, inn) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", i, h),
            ("output.dense", h, i),
        ] {
            put(q(&format!("{n}.weight")), vec![o, inn], 0.15, 0.0);
            put(q(&format!("{n}.bias")), vec![o], 0.02, 0.0);
        }
        for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
            put(q(&format!("{n}.weight")), vec![h], 0.1, 1.0);
            put(q(&format!("{n}.bias")), vec![h], 0.1, 0.0);
        }
    }
    (config, tensors)
}

/// Write [`tiny_bert`] as a model directory: `config.json`, `tokenizer.json` (over [`WORDS`])
/// and `model.safetensors`.
pub fn write_tiny_bert(dir: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).at("create directory", dir)?;
    let (config, tensors) = tiny_bert(seed);
    xpm_core::fsutil::write_atomic(&dir.join("config.json"), config.to_string().as_bytes())?;
    xpm_core::fsutil::write_atomic(
        &dir.join("tokenizer.json"),
        tokenizer_json(WORDS).as_bytes(),
    )?;
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|t| (n.clone(), t))
                .map_err(|e| Error::input(format!("tensor `{n}`: {e}"), None))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| Error::input(format!("cannot serialize the toy model: {e}"), None))?;
    xpm_core::fsutil::write_atomic(&dir.join("model.safetensors"), &bytes)
}

/// `n` examples of three classes, each text holding its class keyword among filler words.
pub fn write_keyword_data(path: &Path, n: usize, seed: u64) -> Result<()> {
    let mut rng = SplitMix64(seed);
    let mut out = String::new();
    for k in 0..n {
        let key = CLASSES[k % 3];
        let len = 4 + (rng.next_u64() % 8) as usize;
        let pos = (rng.next_u64() as usize) % len;
        let words: Vec<&str> = (0..len)
            .map(|j| {
                if j == pos {
                    key
                } else {
                    WORDS[7 + (rng.next_u64() as usize) % (WORDS.len() - 7)]
                }
            })
            .collect();
        out.push_str(&serde_json::json!({"text": words.join(" "), "label": key}).to_string());
        out.push('\n');
    }
    xpm_core::fsutil::write_atomic(path, out.as_bytes())
}
