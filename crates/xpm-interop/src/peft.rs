//! PEFT adapter directories (`save_pretrained`) in: LoRA and SHiRA as xpm tensors (out:
//! [`crate::peft_export`]).
//!
//! Facts this follows (checked against peft 0.21.2): tensor names are
//! `base_model.model.<module path>.<part>`; LoRA's ΔW = (B·A)·s with s = α/r, or α/√r with
//! `use_rslora`, transposed for `fan_in_fan_out` (GPT-2's Conv1D, weight `[in, out]`) and for
//! embeddings (`lora_embedding_A` `[r, num]`, `lora_embedding_B` `[dim, r]`); the bias delta of
//! `lora_bias` is `lora_B.bias · s`; α per module comes from `alpha_pattern`, matched as
//! `re.match(rf"(.*\.)?({key})$", module)`, the first match in the file's order; SHiRA stores
//! `shira_indices` `[2, nnz]` (row; col of the `[out, in]` weight) and `shira_weight` `[nnz]`,
//! duplicates summed; `modules_to_save` (a head, a norm) are stored whole as
//! `base_model.model.<module>.<param>`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use xpm_core::checkpoint::Checkpoint;
use xpm_core::error::{Error, Result};
use xpm_core::format::{Content, ContentView, Dtype, TensorData, TensorView, encode_view};

use crate::bytes::transpose;
use crate::{Imported, ImportedTensor, Pending, PendingKind, Source};

/// The adapter's config file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's weights.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The legacy pickle weights, refused.
pub const LEGACY_WEIGHTS_FILE: &str = "adapter_model.bin";
/// xpm's sidecar in exported directories (PEFT ignores it): the expert's manifest and the
/// padding that SHiRA needed, so that importing an export gives the expert back bit for bit.
pub const SIDECAR_FILE: &str = "xpm_export.json";

/// `rank_pattern` / `alpha_pattern`: the object's entries in the file's order (PEFT matches
/// patterns in dict order), each key compiled once, when the config is read, into PEFT's rule
/// `re.match(rf"(.*\.)?({key})$", module)` (size-limited: the key comes from someone else).
#[derive(Debug, Clone, Default)]
pub struct Ordered<T>(pub Vec<(String, T, regex::Regex)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Ordered<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Ordered<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, T>()? {
                    let re = pattern(&k).map_err(serde::de::Error::custom)?;
                    out.push((k, v, re));
                }
                Ok(Ordered(out))
            }
            fn visit_unit<E>(self) -> std::result::Result<Self::Value, E> {
                Ok(Ordered(Vec::new()))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// The keys of `adapter_config.json` that xpm reads. Unknown keys are ignored, except those
/// in [`REFUSED_KEYS`], which change what the tensors mean.
#[derive(Debug, Clone, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    #[serde(default)]
    pub r: Option<u64>,
    #[serde(default)]
    pub lora_alpha: Option<f64>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub rank_pattern: Option<Ordered<u64>>,
    #[serde(default)]
    pub alpha_pattern: Option<Ordered<f64>>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub lora_bias: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
    #[serde(flatten)]
    pub rest: BTreeMap<String, serde_json::Value>,
}

/// Config keys that change what the tensors mean in ways xpm does not model: refused unless
/// null, false or empty.
pub const REFUSED_KEYS: [&str; 4] = [
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
];

fn is_unset(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null | serde_json::Value::Bool(false) => true,
        serde_json::Value::Array(a) => a.is_empty(),
        serde_json::Value::Object(o) => o.is_empty(),
        serde_json::Value::String(s) => s.is_empty(),
        _ => false,
    }
}

impl AdapterConfig {
    /// Read and check `dir/adapter_config.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        if !path.is_file() {
            return Err(Error::input(
                format!("`{}` has no {CONFIG_FILE}", dir.display()),
                Some("point at a directory written by PEFT's `save_pretrained`"),
            ));
        }
        let bytes = crate::read_small(&path, 1 << 20)?;
        let cfg: AdapterConfig = serde_json::from_slice(&bytes).map_err(|e| {
            Error::input(
                format!("`{}` is not a PEFT adapter config: {e}", path.display()),
                Some("it needs at least `peft_type`; other keys must have PEFT's types"),
            )
        })?;
        for key in REFUSED_KEYS {
            if let Some(v) = cfg.rest.get(key).filter(|v| !is_unset(v)) {
                return Err(Error::input(
                    format!(
                        "`{}` sets `{key}` ({v}), which xpm cannot import",
                        path.display()
                    ),
                    Some(
                        "xpm imports adapters whose tensors alone define the delta; merge this \
                         adapter in PEFT (`merge_and_unload`) and `xpm extract` the result",
                    ),
                ));
            }
        }
        if cfg.use_dora {
            return Err(Error::input(
                format!("`{}` is a DoRA adapter (`use_dora: true`)", path.display()),
                Some(
                    "DoRA rescales whole weight columns by a learned magnitude, which no sparse, \
                     LoRA or dense delta of xpm's reproduces exactly; merge it in PEFT \
                     (`merge_and_unload`) and `xpm extract --kind dense` the result",
                ),
            ));
        }
        Ok(cfg)
    }

    /// α of `module` (its path without `base_model.model.`): `alpha_pattern`'s first match,
    /// else `lora_alpha`, else 8 (PEFT's default).
    pub fn alpha_for(&self, module: &str) -> Result<f64> {
        if let Some(p) = &self.alpha_pattern
            && let Some((_, alpha, _)) = p.0.iter().find(|(_, _, re)| re.is_match(module))
        {
            return Ok(*alpha);
        }
        Ok(self.lora_alpha.unwrap_or(8.0))
    }

    /// The rank the config declares for `module`, if it declares one.
    pub fn rank_for(&self, module: &str) -> Result<Option<u64>> {
        if let Some(p) = &self.rank_pattern
            && let Some((_, r, _)) = p.0.iter().find(|(_, _, re)| re.is_match(module))
        {
            return Ok(Some(*r));
        }
        Ok(self.r)
    }
}

/// PEFT's pattern rule for `key`: `re.match(rf"(.*\.)?({key})$", module)`.
fn pattern(key: &str) -> std::result::Result<regex::Regex, String> {
    regex::RegexBuilder::new(&format!(r"^(?:.*\.)?(?:{key})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| {
            format!(
                "pattern `{key}` of rank_pattern or alpha_pattern is not a regular expression \
                 xpm reads (module names or simple regexes): {e}"
            )
        })
}

/// What one PEFT tensor name holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Part {
    LoraA,
    LoraB,
    LoraBias,
    EmbA,
    EmbB,
    ShiraIndices,
    ShiraWeight,
}

const PARTS: [(&str, Part); 7] = [
    (".lora_A.weight", Part::LoraA),
    (".lora_B.weight", Part::LoraB),
    (".lora_B.bias", Part::LoraBias),
    (".lora_embedding_A", Part::EmbA),
    (".lora_embedding_B", Part::EmbB),
    (".shira_indices", Part::ShiraIndices),
    (".shira_weight", Part::ShiraWeight),
];

const PREFIX: &str = "base_model.model.";

/// Map a module path (as PEFT names it) plus a parameter to the base's tensor name: the path
/// itself, the path without leading segments (`bert.encoder…` → `encoder…`), or the one base
/// tensor that ends with it (the base has a prefix the path lacks).
pub fn base_name(base: &Checkpoint, module: &str, param: &str) -> Option<String> {
    let segs: Vec<&str> = module.split('.').collect();
    for k in 0..segs.len() {
        let cand = format!("{}.{param}", segs[k..].join("."));
        if base.info(&cand).is_some() {
            return Some(cand);
        }
    }
    let suffix = format!(".{module}.{param}");
    let mut hits = base.names().filter(|n| n.ends_with(&suffix));
    match (hits.next(), hits.next()) {
        (Some(one), None) => Some(one.to_string()),
        _ => None,
    }
}

fn base_shape(base: &Checkpoint, name: &str) -> Vec<u64> {
    base.info(name)
        .map(|i| i.shape.iter().map(|&d| d as u64).collect())
        .unwrap_or_default()
}

/// One adapter tensor: its dtype, shape and bytes.
struct Raw<'a> {
    name: String,
    dtype: safetensors::Dtype,
    shape: Vec<u64>,
    bytes: &'a [u8],
}

impl Raw<'_> {
    fn float(&self, file: &Path) -> Result<Dtype> {
        Dtype::from_safetensors(self.dtype).ok_or_else(|| {
            Error::input(
                format!(
                    "tensor `{}` in `{}` is {:?}; xpm stores f32, f16 or bf16 values",
                    self.name,
                    file.display(),
                    self.dtype
                ),
                None,
            )
        })
    }
}

/// Import the PEFT adapter in `dir` against `base`. Every name, shape and dtype is checked
/// here; LoRA factors are copied out of the weights file only when the writer materialises
/// them ([`Pending`]), and the weights file is hashed on a thread of its own meanwhile (from
/// its mapping, which the factors are compressed from).
pub fn import(dir: &Path, base: &Checkpoint) -> Result<Imported> {
    import_with(dir, base, &BTreeMap::new())
}

/// [`import`], recording `verified` digests (file name → `sha256:`, checked by the caller
/// against the bytes, as a Hub download's are) instead of hashing those files again.
pub fn import_with(
    dir: &Path,
    base: &Checkpoint,
    verified: &BTreeMap<String, String>,
) -> Result<Imported> {
    let cfg = AdapterConfig::read(dir)?;
    let (weights, peft_type) = weights_and_type(dir, &cfg)?;
    let file = Arc::new(Checkpoint::open(&weights)?);
    let (modules, whole) = group_tensors(&file, &weights, &peft_type)?;
    check_layers(&cfg, modules.keys().map(String::as_str))?;
    // The weights file's digest (for provenance) on another core while the tensors convert
    // and encode: both read the same pages, and the hash would otherwise be a serial pass.
    let known = verified.get(WEIGHTS_FILE).cloned();
    let hashing = {
        let file = Arc::clone(&file);
        std::thread::spawn(move || {
            if let Some(d) = known {
                return Ok(d);
            }
            let mut digests = file.file_digests();
            debug_assert_eq!(digests.len(), 1, "one weights file");
            Ok(digests.pop().expect("a checkpoint has a file").1)
        })
    };
    let converted = convert(
        dir, &cfg, base, &weights, &peft_type, &file, &modules, &whole,
    )
    .and_then(|out| Ok((out, crate::file_digest(&dir.join(CONFIG_FILE))?)));
    let (out, config_digest) = match converted {
        Ok(done) => done,
        Err(e) => {
            // No reader of the mapped file outlives a failed import (the file may be
            // rewritten or truncated next, and a mapping read past its end is a SIGBUS).
            let _ = hashing.join();
            return Err(e);
        }
    };
    let mut files = BTreeMap::new();
    files.insert(CONFIG_FILE.to_string(), config_digest);
    let mut extra = BTreeMap::new();
    if let Some(t) = &cfg.task_type {
        extra.insert(
            "peft_task_type".to_string(),
            serde_json::Value::String(t.clone()),
        );
    }
    let source = Source {
        format: format!("peft-{}", peft_type.to_ascii_lowercase()),
        location: dir.display().to_string(),
        revision: None,
        files,
    };
    let mut imported = Imported::new(out, source, cfg.base_model_name_or_path.clone(), extra);
    imported
        .pending_files
        .push((WEIGHTS_FILE.to_string(), hashing));
    Ok(imported)
}

/// The adapter's weights file (refusing a directory with only the legacy pickle) and its
/// upper-case `peft_type` (LORA or SHIRA; others refused).
fn weights_and_type(dir: &Path, cfg: &AdapterConfig) -> Result<(std::path::PathBuf, String)> {
    let weights = dir.join(WEIGHTS_FILE);
    if !weights.is_file() {
        let hint = if dir.join(LEGACY_WEIGHTS_FILE).is_file() {
            "this adapter has only the legacy pickle `adapter_model.bin`, which xpm does not \
             read (a pickle can run code); re-save it in PEFT with `safe_serialization=True`"
        } else {
            "point at a directory written by PEFT's `save_pretrained`"
        };
        return Err(Error::input(
            format!("`{}` has no {WEIGHTS_FILE}", dir.display()),
            Some(hint),
        ));
    }
    let peft_type = cfg.peft_type.to_ascii_uppercase();
    if peft_type != "LORA" && peft_type != "SHIRA" {
        return Err(Error::input(
            format!(
                "`{}` is a {} adapter",
                dir.join(CONFIG_FILE).display(),
                cfg.peft_type
            ),
            Some("xpm imports PEFT's LORA and SHIRA adapters"),
        ));
    }
    Ok((weights, peft_type))
}

/// An adapter file's tensors, by module: `Part`s of adapter modules, and whole tensors
/// (`modules_to_save`, named without the prefix).
type Grouped<'a> = (BTreeMap<String, HashMap<Part, Raw<'a>>>, Vec<Raw<'a>>);

/// Sort the tensors of `file` into adapter modules and whole tensors, refusing names without
/// PEFT's prefix, DoRA magnitudes, parts of the other adapter type and unknown adapter parts.
fn group_tensors<'a>(file: &'a Checkpoint, weights: &Path, peft_type: &str) -> Result<Grouped<'a>> {
    let mut modules: BTreeMap<String, HashMap<Part, Raw>> = BTreeMap::new();
    let mut whole: Vec<Raw> = Vec::new();
    for name in file.names() {
        let info = file.info(name).expect("listed");
        let raw = Raw {
            name: name.to_string(),
            dtype: info.dtype,
            shape: info.shape.iter().map(|&d| d as u64).collect(),
            bytes: file.bytes(name).expect("listed"),
        };
        let Some(rest) = name.strip_prefix(PREFIX) else {
            return Err(Error::input(
                format!(
                    "tensor `{name}` in `{}` does not start with `{PREFIX}`",
                    weights.display()
                ),
                Some("PEFT names every adapter tensor `base_model.model.<module>.<part>`"),
            ));
        };
        if name.ends_with(".lora_magnitude_vector") || name.contains(".lora_magnitude_vector.") {
            return Err(Error::input(
                format!("`{name}` in `{}` is a DoRA magnitude", weights.display()),
                Some(
                    "DoRA adapters are not imported; merge in PEFT and `xpm extract --kind dense`",
                ),
            ));
        }
        match PARTS.iter().find(|(s, _)| rest.ends_with(s)) {
            Some((suffix, part)) => {
                let module = rest[..rest.len() - suffix.len()].to_string();
                let lora = matches!(part, Part::ShiraIndices | Part::ShiraWeight);
                if lora != (peft_type == "SHIRA") {
                    return Err(Error::input(
                        format!(
                            "`{name}` in `{}` does not belong to a {peft_type} adapter",
                            weights.display()
                        ),
                        Some("the config's `peft_type` and the tensors disagree"),
                    ));
                }
                modules.entry(module).or_default().insert(*part, raw);
            }
            None if rest.contains(".lora_") || rest.contains(".shira_") => {
                return Err(Error::input(
                    format!(
                        "`{name}` in `{}` is an adapter tensor xpm does not know",
                        weights.display()
                    ),
                    Some(
                        "xpm imports lora_A/lora_B(.bias), lora_embedding_A/B, shira_indices/shira_weight and modules_to_save",
                    ),
                ));
            }
            None => whole.push(Raw {
                name: rest.to_string(),
                ..raw
            }),
        }
    }
    Ok((modules, whole))
}

/// The xpm tensors of the grouped adapter, sorted by name; two that map to the same base
/// tensor are refused.
#[allow(clippy::too_many_arguments)]
fn convert(
    dir: &Path,
    cfg: &AdapterConfig,
    base: &Checkpoint,
    weights: &Path,
    peft_type: &str,
    file: &Arc<Checkpoint>,
    modules: &BTreeMap<String, HashMap<Part, Raw>>,
    whole: &[Raw],
) -> Result<Vec<Pending>> {
    let sidecar = read_sidecar(dir)?;
    let mut out: Vec<Pending> = Vec::new();
    for (module, parts) in modules {
        if peft_type == "SHIRA" {
            let nnz = sidecar
                .as_ref()
                .and_then(|s| s.get(module.as_str()).copied());
            out.push(Pending::ready(shira_tensor(
                base, weights, module, parts, nnz,
            )?));
        } else {
            out.extend(lora_tensors(cfg, base, weights, file, module, parts)?);
        }
    }
    for raw in whole {
        out.push(Pending::ready(whole_tensor(base, weights, raw)?));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = out.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(Error::input(
            format!(
                "two tensors of `{}` map to the base tensor `{}`",
                weights.display(),
                w[0].name
            ),
            Some("an adapter may hold one delta per base tensor"),
        ));
    }
    Ok(out)
}

/// `layers_to_transform` must agree with the modules present.
fn check_layers<'a>(cfg: &AdapterConfig, modules: impl Iterator<Item = &'a str>) -> Result<()> {
    let Some(v) = cfg.layers_to_transform.as_ref().filter(|v| !is_unset(v)) else {
        return Ok(());
    };
    let allowed: Vec<u64> = match v {
        serde_json::Value::Number(n) => n.as_u64().into_iter().collect(),
        serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_u64()).collect(),
        _ => Vec::new(),
    };
    for m in modules {
        let layer = m
            .split('.')
            .collect::<Vec<_>>()
            .windows(2)
            .find(|w| matches!(w[0], "layer" | "layers" | "h" | "blocks" | "block"))
            .and_then(|w| w[1].parse::<u64>().ok());
        if layer.is_some_and(|l| !allowed.contains(&l)) {
            return Err(Error::input(
                format!("module `{m}` is outside `layers_to_transform` ({v}) of {CONFIG_FILE}"),
                Some("the config and the tensors disagree; re-save the adapter with PEFT"),
            ));
        }
    }
    Ok(())
}

fn mismatch(weights: &Path, module: &str, what: String) -> Error {
    Error::input(
        format!("module `{module}` of `{}`: {what}", weights.display()),
        Some("is `--base` the model this adapter was trained on?"),
    )
}

fn need<'a, 'b>(
    parts: &'a HashMap<Part, Raw<'b>>,
    p: Part,
    module: &str,
    weights: &Path,
) -> Result<&'a Raw<'b>> {
    parts.get(&p).ok_or_else(|| {
        let suffix = PARTS.iter().find(|(_, q)| *q == p).map_or("", |(s, _)| *s);
        Error::input(
            format!("`{}` lacks `{PREFIX}{module}{suffix}`", weights.display()),
            Some("the adapter file is incomplete"),
        )
    })
}

/// LoRA factors (and a `lora_bias` delta) of one module. The factors are checked here and
/// copied out of `file` (transposed where PEFT's orientation differs) on materialisation.
fn lora_tensors(
    cfg: &AdapterConfig,
    base: &Checkpoint,
    weights: &Path,
    file: &Arc<Checkpoint>,
    module: &str,
    parts: &HashMap<Part, Raw>,
) -> Result<Vec<Pending>> {
    let embedding = parts.contains_key(&Part::EmbA) || parts.contains_key(&Part::EmbB);
    let (a, b, dtype) = lora_factors(weights, module, parts, embedding)?;
    let r = a.shape[0];
    let (scale, xpm_alpha) = lora_scale(cfg, weights, module, r)?;
    let target = lora_target(base, weights, module)?;
    let shape = base_shape(base, &target);
    let transposed =
        transposed_factors((a, b), embedding, cfg.fan_in_fan_out, &shape).map_err(|what| {
            mismatch(
                weights,
                module,
                format!("{what}, but the base tensor `{target}` is {shape:?}"),
            )
        })?;
    let (a_name, b_name) = (a.name.clone(), b.name.clone());
    let (rows_a, cols_a, rows_b) = (
        a.shape[0] as usize,
        a.shape[1] as usize,
        b.shape[0] as usize,
    );
    let es = dtype.size();
    let (name, alpha) = (target.clone(), xpm_alpha);
    let factors = Pending::lazy(target.clone(), false, PendingKind::Lora, {
        let (file, name, shape, a_name, b_name) = (
            Arc::clone(file),
            name.clone(),
            shape.clone(),
            a_name.clone(),
            b_name.clone(),
        );
        move || {
            let bytes = |n: &str| file.bytes(n).expect("checked when the adapter was read");
            let (a, b) = (bytes(&a_name), bytes(&b_name));
            let (xa, xb) = if transposed {
                (
                    transpose(b, rows_b, rows_a, es),
                    transpose(a, rows_a, cols_a, es),
                )
            } else {
                (a.to_vec(), b.to_vec())
            };
            Ok(ImportedTensor {
                data: TensorData {
                    name: name.clone(),
                    shape: shape.clone(),
                    dtype,
                    content: Content::Lora {
                        rank: r as u32,
                        alpha,
                        a: xa,
                        b: xb,
                    },
                },
                new: false,
            })
        }
    });
    // Factors in xpm's orientation are compressed where they lie in the mapped file (no copy).
    let factors = if transposed {
        factors
    } else {
        let file = Arc::clone(file);
        factors.with_encoder(move |level| {
            let bytes = |n: &str| file.bytes(n).expect("checked when the adapter was read");
            let content = ContentView::Lora {
                rank: r as u32,
                alpha,
                a: bytes(&a_name),
                b: bytes(&b_name),
            };
            encode_view(
                TensorView {
                    name: &name,
                    shape: &shape,
                    dtype,
                    content,
                },
                level,
            )
        })
    };
    let mut out = vec![factors];
    if let Some(bias) = parts.get(&Part::LoraBias) {
        out.push(Pending::ready(lora_bias_tensor(
            base, weights, module, bias, scale,
        )?));
    }
    Ok(out)
}

/// A module's factors A and B (`lora_embedding_A/B` for an embedding) and their dtype, checked
/// to form B·A.
fn lora_factors<'a, 'b>(
    weights: &Path,
    module: &str,
    parts: &'a HashMap<Part, Raw<'b>>,
    embedding: bool,
) -> Result<(&'a Raw<'b>, &'a Raw<'b>, Dtype)> {
    let (a, b) = if embedding {
        (
            need(parts, Part::EmbA, module, weights)?,
            need(parts, Part::EmbB, module, weights)?,
        )
    } else {
        (
            need(parts, Part::LoraA, module, weights)?,
            need(parts, Part::LoraB, module, weights)?,
        )
    };
    let dtype = a.float(weights)?;
    if b.float(weights)? != dtype {
        return Err(mismatch(
            weights,
            module,
            "lora_A and lora_B have different dtypes".into(),
        ));
    }
    if a.shape.len() != 2 || b.shape.len() != 2 || a.shape[0] != b.shape[1] || a.shape[0] == 0 {
        return Err(mismatch(
            weights,
            module,
            format!(
                "factor shapes {:?} and {:?} do not form B·A",
                b.shape, a.shape
            ),
        ));
    }
    Ok((a, b, dtype))
}

/// The module's PEFT scale (α/r, or α/√r with rslora) and the α xpm records for rank `r`
/// (xpm's scale is α/r), after checking the rank against `rank_pattern`.
fn lora_scale(cfg: &AdapterConfig, weights: &Path, module: &str, r: u64) -> Result<(f64, f64)> {
    if let Some(want) = cfg.rank_for(module)?.filter(|_| cfg.rank_pattern.is_some())
        && want != r
    {
        return Err(mismatch(
            weights,
            module,
            format!("rank {r}, but rank_pattern/r says {want}"),
        ));
    }
    let alpha = cfg.alpha_for(module)?;
    if !(alpha.is_finite() && alpha != 0.0) {
        return Err(mismatch(
            weights,
            module,
            format!("lora_alpha {alpha} is not a usable scale"),
        ));
    }
    let scale = if cfg.use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    };
    // xpm's LoRA scale is alpha/rank: keep α as it is unless rslora changes the scale.
    let xpm_alpha = if cfg.use_rslora {
        scale * r as f64
    } else {
        alpha
    };
    Ok((scale, xpm_alpha))
}

/// The base weight a LoRA module adapts (with a hint for GPT-2's tied `lm_head`).
fn lora_target(base: &Checkpoint, weights: &Path, module: &str) -> Result<String> {
    base_name(base, module, "weight").ok_or_else(|| {
        let tied = module.ends_with("lm_head") && base.names().any(|n| n.ends_with("wte.weight"));
        Error::input(
            format!(
                "module `{module}` of `{}` matches no tensor of the base `{}` (looked for `{module}.weight` and its suffixes)",
                weights.display(),
                base.root().display()
            ),
            Some(if tied {
                "this model ties lm_head to the token embedding (wte), which has no tensor of its own; xpm cannot import a LoRA on a tied weight"
            } else {
                "is `--base` the model this adapter was trained on?"
            }),
        )
    })
}

/// Whether PEFT's factors must be transposed into xpm's orientation, ΔW[shape] = (α/r)·B'·A'
/// with A' `[r, shape[1]]` and B' `[shape[0], r]`: as they are, or (true) A' = Bᵀ and B' = Aᵀ
/// for embeddings and `fan_in_fan_out`. Errs with what the factors give when that is not
/// `shape`.
fn transposed_factors(
    (a, b): (&Raw, &Raw),
    embedding: bool,
    fan_in_fan_out: bool,
    shape: &[u64],
) -> std::result::Result<bool, String> {
    if embedding {
        // ΔW [num, dim] = (B_e·A_e)ᵀ = A_eᵀ·B_eᵀ: A' = B_eᵀ [r, dim], B' = A_eᵀ [num, r].
        if shape != [a.shape[1], b.shape[0]] {
            return Err(format!(
                "embedding factors give [{}, {}]",
                a.shape[1], b.shape[0]
            ));
        }
        Ok(true)
    } else if shape == [b.shape[0], a.shape[1]] && !(fan_in_fan_out && shape[0] == shape[1]) {
        Ok(false)
    } else if shape == [a.shape[1], b.shape[0]] {
        // fan_in_fan_out (Conv1D, weight [in, out]): ΔW = (B·A)ᵀ.
        Ok(true)
    } else {
        Err(format!("B·A is [{}, {}]", b.shape[0], a.shape[1]))
    }
}

/// `lora_bias`: the module's bias delta, `lora_B.bias · s`.
fn lora_bias_tensor(
    base: &Checkpoint,
    weights: &Path,
    module: &str,
    bias: &Raw,
    scale: f64,
) -> Result<ImportedTensor> {
    let bias_name = base_name(base, module, "bias").ok_or_else(|| {
        mismatch(
            weights,
            module,
            "has a lora_B.bias, but the base module has no bias".into(),
        )
    })?;
    let bshape = base_shape(base, &bias_name);
    if bias.shape != bshape {
        return Err(mismatch(
            weights,
            module,
            format!(
                "lora_B.bias is {:?}, but `{bias_name}` is {bshape:?}",
                bias.shape
            ),
        ));
    }
    let bd = bias.float(weights)?;
    // PEFT multiplies by the scale as a scalar of the tensor's dtype.
    let s = scale as f32;
    let delta: Vec<f32> = bd.to_f32(bias.bytes).iter().map(|v| v * s).collect();
    Ok(ImportedTensor {
        data: TensorData {
            name: bias_name,
            shape: bshape,
            dtype: bd,
            content: Content::Dense {
                delta: bd.from_f32(&delta),
            },
        },
        new: false,
    })
}

/// Read an integer index tensor (i32 or i64) as i64s.
fn indices_i64(raw: &Raw, weights: &Path) -> Result<Vec<i64>> {
    match raw.dtype {
        safetensors::Dtype::I64 => Ok(raw
            .bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()),
        safetensors::Dtype::I32 => Ok(raw
            .bytes
            .chunks_exact(4)
            .map(|c| i64::from(i32::from_le_bytes(c.try_into().expect("4 bytes"))))
            .collect()),
        other => Err(Error::input(
            format!(
                "`{}` in `{}` is {other:?}; SHiRA indices are i32 or i64",
                raw.name,
                weights.display()
            ),
            None,
        )),
    }
}

/// A SHiRA module: indices `[2, nnz]` (rows; cols) and values `[nnz]` → a sparse delta, sorted,
/// duplicates summed. `keep` (from xpm's export sidecar) drops the padding an export added.
fn shira_tensor(
    base: &Checkpoint,
    weights: &Path,
    module: &str,
    parts: &HashMap<Part, Raw>,
    keep: Option<u64>,
) -> Result<ImportedTensor> {
    let idx = need(parts, Part::ShiraIndices, module, weights)?;
    let val = need(parts, Part::ShiraWeight, module, weights)?;
    let dtype = val.float(weights)?;
    let target = base_name(base, module, "weight").ok_or_else(|| {
        mismatch(
            weights,
            module,
            format!("no tensor of the base `{}` matches", base.root().display()),
        )
    })?;
    let shape = base_shape(base, &target);
    if shape.len() != 2 {
        return Err(mismatch(
            weights,
            module,
            format!("SHiRA needs a 2-D weight; `{target}` is {shape:?}"),
        ));
    }
    if idx.shape.len() != 2
        || idx.shape[0] != 2
        || val.shape.len() != 1
        || idx.shape[1] != val.shape[0]
    {
        return Err(mismatch(
            weights,
            module,
            format!(
                "shira_indices {:?} and shira_weight {:?} are not [2, nnz] and [nnz]",
                idx.shape, val.shape
            ),
        ));
    }
    let nnz = val.shape[0] as usize;
    let ids = indices_i64(idx, weights)?;
    let values = dtype.to_f32(val.bytes);
    let n = nnz.min(keep.map_or(usize::MAX, |k| k as usize));
    if keep.is_some_and(|k| values[n..].iter().any(|v| *v != 0.0) || k as usize > nnz) {
        return Err(mismatch(
            weights,
            module,
            format!(
                "the export sidecar says {} entries, but the padding after them is not all zero",
                keep.unwrap_or(0)
            ),
        ));
    }
    let (rows, cols) = (shape[0] as i64, shape[1] as i64);
    let mut flat: Vec<(u64, f32)> = Vec::with_capacity(n);
    for i in 0..n {
        let (r, c) = (ids[i], ids[nnz + i]);
        if !(0..rows).contains(&r) || !(0..cols).contains(&c) {
            return Err(mismatch(
                weights,
                module,
                format!("SHiRA index ({r}, {c}) is outside `{target}` {shape:?}"),
            ));
        }
        flat.push(((r * cols + c) as u64, values[i]));
    }
    flat.sort_by_key(|e| e.0);
    let mut indices = Vec::with_capacity(flat.len());
    let mut vals: Vec<f32> = Vec::with_capacity(flat.len());
    for (i, v) in flat {
        if indices.last() == Some(&i) {
            *vals.last_mut().expect("paired") += v;
        } else {
            indices.push(i);
            vals.push(v);
        }
    }
    // f32 holds every f16/bf16 value exactly: only summed duplicates are rounded.
    let values = dtype.from_f32(&vals);
    Ok(ImportedTensor {
        data: TensorData {
            name: target,
            shape,
            dtype,
            content: Content::Sparse {
                indices,
                values,
                block_size: None,
            },
        },
        new: false,
    })
}

/// A whole tensor (`modules_to_save`, a trained bias): a dense delta against the base, or a
/// new tensor where the base has none (a task head).
fn whole_tensor(base: &Checkpoint, weights: &Path, raw: &Raw) -> Result<ImportedTensor> {
    let dtype = raw.float(weights)?;
    let (module, param) = raw.name.rsplit_once('.').unwrap_or(("", raw.name.as_str()));
    let mapped = if module.is_empty() {
        base.info(param).map(|_| param.to_string())
    } else {
        base_name(base, module, param)
    };
    let Some(target) = mapped else {
        return Ok(ImportedTensor {
            data: TensorData {
                name: raw.name.clone(),
                shape: raw.shape.clone(),
                dtype,
                content: Content::Dense {
                    delta: raw.bytes.to_vec(),
                },
            },
            new: true,
        });
    };
    let shape = base_shape(base, &target);
    if shape != raw.shape {
        return Err(mismatch(
            weights,
            module,
            format!(
                "`{}` is {:?}, but the base tensor `{target}` is {shape:?}",
                raw.name, raw.shape
            ),
        ));
    }
    let saved = dtype.to_f32(raw.bytes);
    let b = base.to_f32(&target)?;
    let delta: Vec<f32> = saved.iter().zip(&b).map(|(s, b)| s - b).collect();
    Ok(ImportedTensor {
        data: TensorData {
            name: target,
            shape,
            dtype,
            content: Content::Dense {
                delta: dtype.from_f32(&delta),
            },
        },
        new: false,
    })
}

/// The per-module entry counts of an xpm export's sidecar, if the directory has one.
fn read_sidecar(dir: &Path) -> Result<Option<BTreeMap<String, u64>>> {
    let path = dir.join(SIDECAR_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = crate::read_small(&path, 64 << 20)?;
    let v: Sidecar = serde_json::from_slice(&bytes).map_err(|e| {
        Error::input(
            format!("`{}` is not an xpm export sidecar: {e}", path.display()),
            None,
        )
    })?;
    Ok(Some(v.shira_nnz))
}

/// What `xpm export` records beside the PEFT files.
#[derive(Debug, Clone, Default, serde::Serialize, Deserialize)]
pub struct Sidecar {
    /// The exported expert's `name@version`.
    pub expert: String,
    /// Its base digest.
    pub base_digest: String,
    /// SHiRA: the expert's own entry count per module; entries after it are zero padding.
    #[serde(default)]
    pub shira_nnz: BTreeMap<String, u64>,
}

/// Where an import came from, for a directory source.
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file()
}

/// The files of a PEFT adapter repository that an import needs (for `hf:` sources).
pub const HUB_FILES: [&str; 3] = [CONFIG_FILE, WEIGHTS_FILE, SIDECAR_FILE];

#[cfg(test)]
mod pattern_tests {
    use super::*;

    fn config(patterns: &str) -> std::result::Result<AdapterConfig, serde_json::Error> {
        serde_json::from_str(&format!(
            r#"{{"peft_type": "LORA", "lora_alpha": 8, "alpha_pattern": {patterns}}}"#
        ))
    }

    #[test]
    fn patterns_match_peft_s_rule_in_file_order_and_bad_ones_are_refused_on_read() {
        let c = config(r#"{"q": 2, "layer\\.1\\.q": 3, "v": 4}"#).unwrap();
        assert_eq!(
            c.alpha_for("encoder.layer.1.q").unwrap(),
            2.0,
            "first match wins"
        );
        assert_eq!(c.alpha_for("encoder.layer.1.v").unwrap(), 4.0);
        assert_eq!(
            c.alpha_for("encoder.layer.1.qq").unwrap(),
            8.0,
            "whole segments only"
        );
        let e = config(r#"{"(": 2}"#).unwrap_err().to_string();
        assert!(e.contains("is not a regular expression"), "{e}");
        // A key that compiles to a huge automaton is refused, not built.
        let e = config(r#"{"(a{1000}){1000}": 2}"#).unwrap_err().to_string();
        assert!(e.contains("is not a regular expression"), "{e}");
    }
}
