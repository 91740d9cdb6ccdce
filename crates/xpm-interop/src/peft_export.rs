//! Any xpm expert as a PEFT adapter directory, exact when merged.
//!
//! Per tensor (the forms INTEROP checked to merge with difference 0):
//! - sparse on an `nn.Linear` weight → SHiRA (when every 2-D tensor is one), padded to one
//!   global r with value-0 entries at unused positions; indices written for every module;
//! - LoRA → LoRA factors as they are (per-module rank and α in `rank_pattern`/`alpha_pattern`);
//! - dense, or sparse on Conv1D / embeddings (or beside LoRA) → a "selection" LoRA: one factor
//!   holds rows of the identity, the other the delta's non-zero columns (or rows), α = r, so
//!   B·A is the delta exactly;
//! - 1-D tensors and new tensors (heads) → `modules_to_save`, holding base + delta (the whole
//!   module: every parameter the base has for it).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use serde_json::json;
use xpm_core::checkpoint::Checkpoint;
use xpm_core::error::{Error, IoResultExt, Result};
use xpm_core::format::manifest::PartRole;
use xpm_core::format::st::{PlannedTensor, SafetensorsWriter};
use xpm_core::format::{Content, Dtype, Manifest, TensorData};

use crate::bytes::{select_columns, select_rows, selection, transpose};
use crate::peft::{CONFIG_FILE, SIDECAR_FILE, Sidecar, WEIGHTS_FILE};

/// Which PEFT adapter type to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeftType {
    /// SHiRA when every 2-D delta is sparse on a linear layer, else LoRA.
    Auto,
    Lora,
    Shira,
}

/// Options of [`export`].
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub peft_type: PeftType,
    /// `base_model_name_or_path`; defaults to the manifest's base id.
    pub base_id: Option<String>,
    /// PEFT's `task_type`; defaults to what the import recorded, or `SEQ_CLS` for an expert with
    /// a head, `CAUSAL_LM` for a `*ForCausalLM` base.
    pub task_type: Option<String>,
    /// Prepended to every module path (e.g. `bert.` when the checkpoint's names lack the
    /// prefix of the model class PEFT will wrap).
    pub prefix: String,
}

/// What [`export`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    pub peft_type: String,
    pub r: u64,
    pub target_modules: Vec<String>,
    pub modules_to_save: Vec<String>,
    /// Modules written in an exact LoRA form of a sparse or dense delta.
    pub selection_modules: Vec<String>,
    pub task_type: Option<String>,
    pub base_model_name_or_path: String,
    pub tensors: usize,
    pub bytes: u64,
}

/// The layer type behind a 2-D weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    Linear,
    /// GPT-2's Conv1D: weight `[in, out]`.
    Conv1D,
    Embedding,
}

fn layer_of(module: &str, model_type: Option<&str>) -> Layer {
    let last = module.rsplit('.').next().unwrap_or(module);
    if last.contains("embed") || matches!(last, "wte" | "wpe" | "shared") {
        Layer::Embedding
    } else if matches!(model_type, Some("gpt2" | "openai-gpt"))
        && matches!(last, "c_attn" | "c_proj" | "c_fc")
    {
        Layer::Conv1D
    } else {
        Layer::Linear
    }
}

/// One output tensor of the adapter file.
struct Out<'t> {
    name: String,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Bytes<'t>,
}

/// An output tensor's bytes: formed when the module is planned, or one of a LoRA expert's
/// factors (most of an adapter's bytes), which is read, transposed where PEFT's orientation
/// differs, and written when the file writer reaches it, so that an export holds a few factors
/// at a time rather than the expert and the adapter.
enum Bytes<'t> {
    Ready(Vec<u8>),
    /// Part `role` of the expert's tensor named `tensor`, read by [`Fetch`].
    Factor {
        tensor: &'t str,
        role: PartRole,
        /// `[rows, cols]` of the factor as xpm stores it, to write it transposed.
        transpose: Option<[usize; 2]>,
        elem: usize,
    },
}

/// Reads part `role` of the expert's tensor named `name` (its values, checked finite): how
/// [`export`] gets the factors of the LoRA tensors it writes as adapter modules.
pub type Fetch<'a> = dyn Fn(&str, PartRole) -> Result<Vec<u8>> + Sync + 'a;

impl From<Vec<u8>> for Bytes<'_> {
    fn from(v: Vec<u8>) -> Self {
        Bytes::Ready(v)
    }
}

impl Bytes<'_> {
    /// The bytes to write: read from the artifact and transposed on the writer's workers.
    fn resolve(&self, fetch: &Fetch) -> Result<Cow<'_, [u8]>> {
        match self {
            Bytes::Ready(v) => Ok(Cow::Borrowed(v)),
            Bytes::Factor {
                tensor,
                role,
                transpose: to,
                elem,
            } => {
                let bytes = fetch(tensor, *role)?;
                Ok(Cow::Owned(match to {
                    Some([rows, cols]) => transpose(&bytes, *rows, *cols, *elem),
                    None => bytes,
                }))
            }
        }
    }
}

/// A module's LoRA in PEFT's orientation: ΔW_peft = s·B·A (transposed back for Conv1D and
/// embeddings by PEFT itself).
struct PeftLora<'t> {
    a: Bytes<'t>,
    b: Bytes<'t>,
    a_shape: [usize; 2],
    b_shape: [usize; 2],
    rank: u64,
    alpha: f64,
}

/// The exact factorisation of a matrix M `[p, q]` (row-major, `dtype`): A = rows of the
/// identity for M's non-zero columns and B = those columns, or B = identity columns for its
/// non-zero rows and A = those rows, whichever rank is smaller. `None` for a zero matrix.
fn selection_lora(m: &[u8], p: usize, q: usize, dtype: Dtype) -> Option<PeftLora<'static>> {
    let es = dtype.size();
    let v = dtype.to_f32(m);
    let cols: Vec<usize> = (0..q)
        .filter(|&c| (0..p).any(|r| v[r * q + c] != 0.0))
        .collect();
    let rows: Vec<usize> = (0..p)
        .filter(|&r| (0..q).any(|c| v[r * q + c] != 0.0))
        .collect();
    if cols.is_empty() {
        return None;
    }
    Some(if cols.len() <= rows.len() {
        let r = cols.len();
        PeftLora {
            a: selection(q, &cols, dtype).into(),
            b: select_columns(m, p, q, &cols, es).into(),
            a_shape: [r, q],
            b_shape: [p, r],
            rank: r as u64,
            alpha: r as f64,
        }
    } else {
        let r = rows.len();
        // B = identity columns for the rows: Bᵀ is a selection of the identity's rows.
        let bt = selection(p, &rows, dtype);
        PeftLora {
            a: select_rows(m, q, &rows, es).into(),
            b: transpose(&bt, r, p, es).into(),
            a_shape: [r, q],
            b_shape: [p, r],
            rank: r as u64,
            alpha: r as f64,
        }
    })
}

/// The dense delta of a tensor, as bytes of its dtype.
fn dense_bytes(t: &TensorData) -> Vec<u8> {
    let es = t.dtype.size();
    match &t.content {
        Content::Dense { delta } => delta.clone(),
        Content::Sparse {
            indices, values, ..
        } => {
            let mut out = vec![0u8; t.numel() as usize * es];
            for (k, &i) in indices.iter().enumerate() {
                let i = i as usize;
                out[i * es..(i + 1) * es].copy_from_slice(&values[k * es..(k + 1) * es]);
            }
            out
        }
        // A LoRA delta saved whole (a head's): s·B·A, computed in f32.
        Content::Lora { rank, alpha, a, b } => {
            assert!(!a.is_empty(), "only adapter modules are passed undecoded");
            let (r, rows, cols) = (*rank as usize, t.shape[0] as usize, t.shape[1] as usize);
            let (a, b) = (t.dtype.to_f32(a), t.dtype.to_f32(b));
            let s = (*alpha / *rank as f64) as f32;
            let mut m = vec![0f32; rows * cols];
            for (row, out) in m.chunks_exact_mut(cols).enumerate() {
                for k in 0..r {
                    let bk = s * b[row * r + k];
                    for (o, &ak) in out.iter_mut().zip(&a[k * cols..(k + 1) * cols]) {
                        *o += bk * ak;
                    }
                }
            }
            t.dtype.from_f32(&m)
        }
    }
}

/// A tensor name split into its module path and parameter (`a.b.weight` → `a.b`, `weight`).
fn module_of(name: &str) -> (String, String) {
    match name.rsplit_once('.') {
        Some((m, p)) => (m.to_string(), p.to_string()),
        None => (String::new(), name.to_string()),
    }
}

/// PEFT's `task_type`: the option, else what the import recorded, else `CAUSAL_LM` for a
/// `*ForCausalLM` base, `SEQ_CLS` for an expert with a head or a sequence classifier base.
fn task_type(
    manifest: &Manifest,
    has_head: bool,
    architectures: &[String],
    opts: &ExportOptions,
) -> Option<String> {
    opts.task_type
        .clone()
        .or_else(|| {
            manifest
                .extra
                .get("peft_task_type")
                .and_then(|v| v.as_str())
                .map(str::to_string)
        })
        .or_else(|| {
            if architectures.iter().any(|a| a.ends_with("ForCausalLM")) {
                Some("CAUSAL_LM".into())
            } else if has_head
                || architectures
                    .iter()
                    .any(|a| a.ends_with("ForSequenceClassification"))
            {
                Some("SEQ_CLS".into())
            } else {
                None
            }
        })
}

/// The expert's tensors sorted by how PEFT holds them.
struct Plan<'t> {
    /// 2-D weight deltas: adapter modules, with their module path and layer type.
    adapter: Vec<(&'t TensorData, String, Layer)>,
    /// Everything else (with its `new` flag), by module: saved whole, or an adapter module's
    /// bias (PEFT's `lora_bias`).
    whole: BTreeMap<String, Vec<(&'t TensorData, bool)>>,
    /// Whether the adapter is written as SHiRA (else LoRA).
    shira: bool,
}

impl Plan<'_> {
    fn adapter_modules(&self) -> BTreeSet<&str> {
        self.adapter.iter().map(|(_, m, _)| m.as_str()).collect()
    }
}

/// Classify: 2-D weight deltas become adapter modules; the rest `modules_to_save` (a
/// sequence classifier's head always: PEFT saves it whole for `SEQ_CLS`). Refuses tensors of
/// more than 2 dimensions, and SHiRA where it cannot be exact.
fn classify<'t>(
    manifest: &Manifest,
    tensors: &'t [(TensorData, bool)],
    model_type: Option<&str>,
    task_type: Option<&str>,
    peft_type: PeftType,
) -> Result<Plan<'t>> {
    let mut adapter: Vec<(&TensorData, String, Layer)> = Vec::new();
    let mut whole: BTreeMap<String, Vec<(&TensorData, bool)>> = BTreeMap::new();
    for (t, new) in tensors {
        let (module, _) = module_of(&t.name);
        if is_adapter_module(&t.name, &t.shape, *new, task_type) {
            adapter.push((t, module.clone(), layer_of(&module, model_type)));
        } else if t.shape.len() > 2 {
            return Err(Error::input(
                format!(
                    "tensor `{}` is {}-D; PEFT has no exact form for it",
                    t.name,
                    t.shape.len()
                ),
                Some(
                    "export experts whose deltas are on linear layers, embeddings, norms or heads",
                ),
            ));
        } else {
            whole.entry(module).or_default().push((t, *new));
        }
    }
    let mut plan = Plan {
        adapter,
        whole,
        shira: false,
    };
    plan.shira = use_shira(manifest, &plan, peft_type)?;
    Ok(plan)
}

/// Whether the tensor `name` of `shape` (with its `new` flag) becomes an adapter module: a 2-D
/// weight delta of a base tensor that is not a sequence classifier's head (PEFT saves those
/// whole).
fn is_adapter_module(name: &str, shape: &[u64], new: bool, task_type: Option<&str>) -> bool {
    let heads: &[&str] = if task_type == Some("SEQ_CLS") {
        &["classifier", "score"]
    } else {
        &[]
    };
    let (module, param) = module_of(name);
    let head = heads.contains(&module.rsplit('.').next().unwrap_or(""));
    !new && !head && shape.len() == 2 && param == "weight"
}

/// The names of the expert's tensors that [`export`] writes as adapter modules. A LoRA tensor
/// among them may be passed to [`export`] undecoded (empty factors, with a [`Fetch`]): its
/// factors are read when the adapter file is written.
pub fn adapter_tensors(
    manifest: &Manifest,
    architectures: &[String],
    opts: &ExportOptions,
) -> BTreeSet<String> {
    let has_head = manifest.tensors.iter().any(|t| t.new);
    let task_type = task_type(manifest, has_head, architectures, opts);
    manifest
        .tensors
        .iter()
        .filter(|t| is_adapter_module(&t.name, &t.shape, t.new, task_type.as_deref()))
        .map(|t| t.name.clone())
        .collect()
}

/// Whether to write SHiRA: asked for (refused unless every adapter module is a sparse delta
/// on a linear layer's weight alone), or with `Auto` when that holds.
fn use_shira(manifest: &Manifest, plan: &Plan, peft_type: PeftType) -> Result<bool> {
    let (adapter, whole) = (&plan.adapter, &plan.whole);
    let adapter_modules = plan.adapter_modules();
    let shira_ok = adapter
        .iter()
        .all(|(t, _, l)| *l == Layer::Linear && matches!(t.content, Content::Sparse { .. }))
        && !adapter.is_empty()
        && whole.keys().all(|m| !adapter_modules.contains(m.as_str()));
    Ok(match peft_type {
        PeftType::Shira if !shira_ok => {
            let bad = adapter
                .iter()
                .find(|(t, _, l)| {
                    *l != Layer::Linear || !matches!(t.content, Content::Sparse { .. })
                })
                .map(|(t, _, _)| t.name.clone())
                .or_else(|| {
                    whole
                        .keys()
                        .find(|m| adapter_modules.contains(m.as_str()))
                        .map(|m| format!("{m}.bias"))
                })
                .unwrap_or_else(|| "(no 2-D tensor)".into());
            return Err(Error::input(
                format!(
                    "`{}` cannot be written as SHiRA: `{bad}` is not a sparse delta on a linear layer's weight alone",
                    manifest.name
                ),
                Some(
                    "SHiRA holds sparse deltas of nn.Linear weights only; use `--peft-type lora` (exact too) or `--peft-type auto`",
                ),
            ));
        }
        PeftType::Shira => true,
        PeftType::Lora => false,
        PeftType::Auto => shira_ok,
    })
}

/// What the module writers produced.
#[derive(Default)]
struct Written<'t> {
    /// The adapter file's tensors.
    out: Vec<Out<'t>>,
    /// Per adapter module: its PEFT path, rank and α.
    modules: Vec<(String, u64, f64)>,
    /// Modules written in an exact LoRA form of a sparse or dense delta.
    selection: Vec<String>,
    /// LoRA scale α/r per module (as the expert names it), for `lora_bias`.
    scales: HashMap<String, f64>,
    /// SHiRA: the expert's own entry count per PEFT module (for the sidecar).
    shira_nnz: BTreeMap<String, u64>,
}

/// SHiRA's one global r: enough for the module with the most entries relative to its size.
fn shira_rank(adapter: &[(&TensorData, String, Layer)]) -> u64 {
    let mut shira_r = 0u64;
    for (t, _, _) in adapter {
        let (o, i) = (t.shape[0], t.shape[1]);
        let nnz = match &t.content {
            Content::Sparse { indices, .. } => indices.len() as u64,
            _ => unreachable!(),
        };
        shira_r = shira_r.max(nnz.div_ceil(o + i)).max(1);
    }
    shira_r
}

/// One SHiRA module `pm` from the sparse delta `t`: its entries, padded to `shira_r·(in + out)`
/// with value-0 entries at unused positions.
fn write_shira(t: &TensorData, pm: String, shira_r: u64, w: &mut Written) -> Result<()> {
    let es = t.dtype.size();
    let st = t.dtype.to_safetensors();
    let (o, i) = (t.shape[0], t.shape[1]);
    let want = shira_r * (o + i);
    if want > o * i {
        return Err(Error::input(
            format!(
                "`{}`: SHiRA's r = {shira_r} needs {want} entries, more than its {} elements",
                t.name,
                o * i
            ),
            Some("SHiRA needs r·(in + out) ≤ in·out for one global r; use `--peft-type lora`"),
        ));
    }
    let Content::Sparse {
        indices, values, ..
    } = &t.content
    else {
        unreachable!()
    };
    let mut rows: Vec<i64> = indices.iter().map(|&f| (f / i) as i64).collect();
    let mut cols: Vec<i64> = indices.iter().map(|&f| (f % i) as i64).collect();
    let mut vals = values.clone();
    // Pad with value-0 entries at unused positions (never a duplicate of a real one).
    let used: BTreeSet<u64> = indices.iter().copied().collect();
    let mut pos = 0u64;
    while (rows.len() as u64) < want {
        if !used.contains(&pos) {
            rows.push((pos / i) as i64);
            cols.push((pos % i) as i64);
            vals.extend(std::iter::repeat_n(0u8, es));
        }
        pos += 1;
    }
    let n = rows.len();
    let idx: Vec<u8> = rows
        .iter()
        .chain(&cols)
        .flat_map(|v| v.to_le_bytes())
        .collect();
    w.out.push(Out {
        name: format!("base_model.model.{pm}.shira_indices"),
        dtype: safetensors::Dtype::I64,
        shape: vec![2, n],
        bytes: idx.into(),
    });
    w.out.push(Out {
        name: format!("base_model.model.{pm}.shira_weight"),
        dtype: st,
        shape: vec![n],
        bytes: vals.into(),
    });
    w.shira_nnz.insert(pm.clone(), indices.len() as u64);
    w.modules.push((pm, shira_r, 0.0));
    Ok(())
}

/// The delta `t` as LoRA factors in PEFT's orientation (M = B·A of shape `[p, q]`): a LoRA
/// delta's own factors, else the exact selection form (`None` for an all-zero delta).
fn peft_lora(t: &TensorData, layer: Layer) -> Option<PeftLora<'_>> {
    let es = t.dtype.size();
    let (rows, cols) = (t.shape[0] as usize, t.shape[1] as usize);
    // PEFT's B·A is ΔW for Linear, ΔWᵀ for Conv1D and embeddings.
    let flip = layer != Layer::Linear;
    match &t.content {
        Content::Lora { rank, alpha, .. } => {
            let r = *rank as usize;
            // Read from the artifact when the writer reaches them (the tensor may come
            // undecoded, with empty factors).
            let (a, b) = (PartRole::LoraA, PartRole::LoraB);
            let factor = |role, transpose| Bytes::Factor {
                tensor: &t.name,
                role,
                transpose,
                elem: es,
            };
            // xpm: ΔW = s·B'·A' with A' [r, cols], B' [rows, r].
            Some(if flip {
                // ΔWᵀ = s·A'ᵀ·B'ᵀ: PEFT B = A'ᵀ [cols, r], A = B'ᵀ [r, rows].
                PeftLora {
                    a: factor(b, Some([rows, r])),
                    b: factor(a, Some([r, cols])),
                    a_shape: [r, rows],
                    b_shape: [cols, r],
                    rank: r as u64,
                    alpha: *alpha,
                }
            } else {
                PeftLora {
                    a: factor(a, None),
                    b: factor(b, None),
                    a_shape: [r, cols],
                    b_shape: [rows, r],
                    rank: r as u64,
                    alpha: *alpha,
                }
            })
        }
        _ => {
            let m = dense_bytes(t);
            let (m, p, q) = if flip {
                (transpose(&m, rows, cols, es), cols, rows)
            } else {
                (m, rows, cols)
            };
            selection_lora(&m, p, q, t.dtype)
        }
    }
}

/// One LoRA module `module` (PEFT path `pm`) from the delta `t`; an all-zero sparse or dense
/// delta writes nothing (but is still listed as a selection module).
fn write_lora<'t>(t: &'t TensorData, module: &str, layer: Layer, pm: String, w: &mut Written<'t>) {
    if !matches!(t.content, Content::Lora { .. }) {
        w.selection.push(pm.clone());
    }
    let Some(lora) = peft_lora(t, layer) else {
        return; // an all-zero delta: nothing to write
    };
    let st = t.dtype.to_safetensors();
    let (an, bn) = if layer == Layer::Embedding {
        (
            format!("base_model.model.{pm}.lora_embedding_A"),
            format!("base_model.model.{pm}.lora_embedding_B"),
        )
    } else {
        (
            format!("base_model.model.{pm}.lora_A.weight"),
            format!("base_model.model.{pm}.lora_B.weight"),
        )
    };
    w.out.push(Out {
        name: an,
        dtype: st,
        shape: lora.a_shape.to_vec(),
        bytes: lora.a,
    });
    w.out.push(Out {
        name: bn,
        dtype: st,
        shape: lora.b_shape.to_vec(),
        bytes: lora.b,
    });
    w.scales
        .insert(module.to_string(), lora.alpha / lora.rank as f64);
    w.modules.push((pm, lora.rank, lora.alpha));
}

/// The modules that are not adapters, saved whole; returns the bias deltas of adapter modules
/// (for `lora_bias`, LoRA only) and the `modules_to_save`.
fn write_whole<'t>(
    manifest: &Manifest,
    base: &Checkpoint,
    plan: &Plan<'t>,
    prefix: &str,
    out: &mut Vec<Out>,
) -> Result<(BTreeMap<String, &'t TensorData>, Vec<String>)> {
    let adapter_modules = plan.adapter_modules();
    let mut lora_bias: BTreeMap<String, &TensorData> = BTreeMap::new();
    let mut to_save: Vec<String> = Vec::new();
    for (module, ts) in &plan.whole {
        if adapter_modules.contains(module.as_str()) {
            for (t, _) in ts {
                if !t.name.ends_with(".bias") || plan.shira {
                    return Err(Error::input(
                        format!(
                            "`{}` changes `{}` of module `{module}`, which also has a weight adapter",
                            manifest.name, t.name
                        ),
                        Some(
                            "export with `--peft-type lora` (bias deltas go to lora_bias), or split the expert",
                        ),
                    ));
                }
                lora_bias.insert(module.clone(), *t);
            }
            continue;
        }
        // A head the base lacks sits at the top of the wrapped model: no prefix.
        let pm = if ts.iter().all(|(_, new)| *new) {
            module.clone()
        } else {
            format!("{prefix}{module}")
        };
        write_whole_module(base, module, ts, &pm, out)?;
        to_save.push(pm);
    }
    Ok((lora_bias, to_save))
}

/// Every parameter of `module` (the base's, plus new ones) as PEFT module `pm`: base + delta,
/// the new tensor itself, or the base's tensor where the expert leaves it unchanged.
fn write_whole_module(
    base: &Checkpoint,
    module: &str,
    ts: &[(&TensorData, bool)],
    pm: &str,
    out: &mut Vec<Out>,
) -> Result<()> {
    let deltas: HashMap<&str, (&TensorData, bool)> = ts
        .iter()
        .map(|(t, n)| (t.name.as_str(), (*t, *n)))
        .collect();
    let mut params: BTreeSet<String> = base
        .names()
        .filter(|n| module_of(n).0 == *module)
        .map(str::to_string)
        .collect();
    params.extend(deltas.keys().map(|s| s.to_string()));
    for name in params {
        let (_, param) = module_of(&name);
        let full = format!("base_model.model.{pm}.{param}");
        match (deltas.get(name.as_str()), base.info(&name)) {
            (Some((t, true)), _) | (Some((t, false)), None) => {
                out.push(Out {
                    name: full,
                    dtype: t.dtype.to_safetensors(),
                    shape: t.shape.iter().map(|&d| d as usize).collect(),
                    bytes: dense_bytes(t).into(),
                });
            }
            (Some((t, false)), Some(info)) => {
                let b = base.to_f32(&name)?;
                let d = t.dtype.to_f32(&dense_bytes(t));
                let sum: Vec<f32> = b.iter().zip(&d).map(|(b, d)| b + d).collect();
                let dt = Dtype::from_safetensors(info.dtype).unwrap_or(t.dtype);
                out.push(Out {
                    name: full,
                    dtype: dt.to_safetensors(),
                    shape: info.shape.clone(),
                    bytes: dt.from_f32(&sum).into(),
                });
            }
            (None, Some(info)) => {
                out.push(Out {
                    name: full,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    bytes: base.bytes(&name).expect("listed").to_vec().into(),
                });
            }
            (None, None) => unreachable!(),
        }
    }
    Ok(())
}

/// PEFT's `lora_bias`: a `lora_B.bias` for every LoRA module, the bias delta divided by the
/// module's scale (zero where the expert leaves the bias unchanged).
fn write_lora_bias(
    manifest: &Manifest,
    base: &Checkpoint,
    plan: &Plan,
    lora_bias: &BTreeMap<String, &TensorData>,
    w: &mut Written,
    prefix: &str,
) -> Result<()> {
    // lora_bias adds a bias to every LoRA module: each needs a base bias to merge into,
    // and PEFT refuses it on embeddings.
    if let Some((t, _, _)) = plan.adapter.iter().find(|(_, _, l)| *l == Layer::Embedding) {
        return Err(Error::input(
            format!(
                "`{}` has bias deltas (PEFT's lora_bias) and a delta on the embedding `{}`, which PEFT cannot hold together",
                manifest.name, t.name
            ),
            Some("split the expert: export the embedding delta and the bias deltas as two experts"),
        ));
    }
    for (t, module, _) in &plan.adapter {
        let Some(bname) = base
            .names()
            .find(|n| *n == format!("{module}.bias"))
            .map(str::to_string)
        else {
            return Err(Error::input(
                format!(
                    "`{}` has bias deltas, but the LoRA module `{module}` has no bias in the base",
                    manifest.name
                ),
                Some(
                    "PEFT's lora_bias gives every LoRA module a bias; split the bias deltas into another expert",
                ),
            ));
        };
        let s = w.scales.get(module).copied().unwrap_or(1.0) as f32;
        let info = base.info(&bname).expect("found");
        let dt = Dtype::from_safetensors(info.dtype).unwrap_or(t.dtype);
        let vals: Vec<f32> = match lora_bias.get(module) {
            Some(bt) => bt
                .dtype
                .to_f32(&dense_bytes(bt))
                .iter()
                .map(|v| v / s)
                .collect(),
            None => vec![0.0; info.shape.iter().product()],
        };
        w.out.push(Out {
            name: format!("base_model.model.{prefix}{module}.lora_B.bias"),
            dtype: dt.to_safetensors(),
            shape: info.shape.clone(),
            bytes: dt.from_f32(&vals).into(),
        });
    }
    Ok(())
}

/// The most common of `vals`.
fn most_common(vals: Vec<String>) -> Option<String> {
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for v in vals {
        *count.entry(v).or_default() += 1;
    }
    count.into_iter().max_by_key(|(_, c)| *c).map(|(v, _)| v)
}

/// What `adapter_config.json` says besides the modules.
struct ConfigFacts<'a> {
    shira: bool,
    shira_r: u64,
    task_type: Option<&'a str>,
    base_id: &'a str,
    fan_in_fan_out: bool,
    lora_bias: bool,
    to_save: &'a [String],
}

/// `adapter_config.json` and its global r. Global r and α are the most common; the others go
/// to `rank_pattern` / `alpha_pattern`.
fn adapter_config(modules: &[(String, u64, f64)], f: &ConfigFacts) -> (serde_json::Value, u64) {
    let shira = f.shira;
    let r = if shira {
        f.shira_r
    } else {
        most_common(modules.iter().map(|m| m.1.to_string()).collect())
            .and_then(|s| s.parse().ok())
            .unwrap_or(8)
    };
    let alpha: f64 = most_common(modules.iter().map(|m| m.2.to_string()).collect())
        .and_then(|s| s.parse().ok())
        .unwrap_or(8.0);
    let mut rank_pattern = serde_json::Map::new();
    let mut alpha_pattern = serde_json::Map::new();
    for (m, mr, ma) in modules {
        if !shira && *mr != r {
            rank_pattern.insert(regex::escape(m), json!(mr));
        }
        if !shira && *ma != alpha {
            alpha_pattern.insert(regex::escape(m), json!(ma));
        }
    }
    let target_modules: Vec<&String> = modules.iter().map(|m| &m.0).collect();
    let (task_type, base_id, to_save) = (f.task_type, f.base_id, f.to_save);
    let config = if shira {
        json!({
            "peft_type": "SHIRA", "task_type": task_type, "base_model_name_or_path": base_id,
            "r": r, "mask_type": "random", "random_seed": 42, "target_modules": target_modules,
            "fan_in_fan_out": false, "init_weights": true,
            "modules_to_save": if to_save.is_empty() { serde_json::Value::Null } else { json!(to_save) },
            "inference_mode": true,
        })
    } else {
        json!({
            "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_id,
            "r": r, "lora_alpha": alpha, "target_modules": target_modules,
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "fan_in_fan_out": f.fan_in_fan_out, "use_rslora": false, "lora_bias": f.lora_bias,
            "use_dora": false, "lora_dropout": 0.0, "bias": "none", "init_lora_weights": true,
            "modules_to_save": if to_save.is_empty() { serde_json::Value::Null } else { json!(to_save) },
            "inference_mode": true,
        })
    };
    (config, r)
}

/// Write the adapter directory: weights (sorted by name), config, README and sidecar. Returns
/// the number of tensors and the weights file's size.
fn write_dir(
    dir: &Path,
    mut out: Vec<Out>,
    fetch: &Fetch,
    config: &serde_json::Value,
    readme: &str,
    sidecar: &Sidecar,
) -> Result<(usize, u64)> {
    out.sort_by(|a, b| a.name.cmp(&b.name));
    let planned: Vec<PlannedTensor> = out
        .iter()
        .map(|o| PlannedTensor {
            name: o.name.clone(),
            dtype: o.dtype,
            shape: o.shape.clone(),
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let weights = dir.join(WEIGHTS_FILE);
    // Factors are read, checked and transposed on every core, in file order, a few ahead of
    // the writer.
    let mut file = SafetensorsWriter::create(&weights, planned.clone(), Some(meta))?;
    let order = file.order().to_vec();
    xpm_core::parallel::map_ordered(
        &order,
        |&i| out[i].bytes.resolve(fetch),
        |bytes| file.write_next(&bytes),
    )?;
    file.finish()?;
    let bytes = std::fs::metadata(&weights).at("read", &weights)?.len();
    let cfg_path = dir.join(CONFIG_FILE);
    xpm_core::fsutil::write_atomic(
        &cfg_path,
        (serde_json::to_string_pretty(config).expect("json") + "\n").as_bytes(),
    )?;
    xpm_core::fsutil::write_atomic(&dir.join("README.md"), readme.as_bytes())?;
    let side = dir.join(SIDECAR_FILE);
    xpm_core::fsutil::write_atomic(
        &side,
        (serde_json::to_string_pretty(sidecar).expect("json") + "\n").as_bytes(),
    )?;
    Ok((planned.len(), bytes))
}

/// Export `tensors` (the expert's, with their `new` flags) against `base` into `dir` (which
/// the caller creates atomically). `model_type` is the base config's `model_type`. LoRA
/// tensors named by [`adapter_tensors`] may come with empty factors: `fetch` reads every
/// adapter module's factors.
#[allow(clippy::too_many_arguments)]
pub fn export(
    manifest: &Manifest,
    tensors: &[(TensorData, bool)],
    fetch: &Fetch,
    base: &Checkpoint,
    model_type: Option<&str>,
    architectures: &[String],
    opts: &ExportOptions,
    dir: &Path,
) -> Result<ExportReport> {
    let has_head = tensors.iter().any(|(_, new)| *new);
    let task_type = task_type(manifest, has_head, architectures, opts);
    let plan = classify(
        manifest,
        tensors,
        model_type,
        task_type.as_deref(),
        opts.peft_type,
    )?;
    let prefix = &opts.prefix;
    let mut w = Written::default();
    let shira_r = if plan.shira {
        shira_rank(&plan.adapter)
    } else {
        0
    };
    for (t, module, layer) in &plan.adapter {
        let pm = format!("{prefix}{module}");
        if plan.shira {
            write_shira(t, pm, shira_r, &mut w)?;
        } else {
            write_lora(t, module, *layer, pm, &mut w);
        }
    }
    let (lora_bias, to_save) = write_whole(manifest, base, &plan, prefix, &mut w.out)?;
    let use_lora_bias = !lora_bias.is_empty();
    if use_lora_bias {
        write_lora_bias(manifest, base, &plan, &lora_bias, &mut w, prefix)?;
    }
    if w.out.is_empty() {
        return Err(Error::input(
            format!("`{}` holds no non-zero delta to export", manifest.name),
            None,
        ));
    }
    let base_id = opts
        .base_id
        .clone()
        .unwrap_or_else(|| manifest.base.id.clone());
    let (config, r) = adapter_config(
        &w.modules,
        &ConfigFacts {
            shira: plan.shira,
            shira_r,
            task_type: task_type.as_deref(),
            base_id: &base_id,
            fan_in_fan_out: plan.adapter.iter().any(|(_, _, l)| *l == Layer::Conv1D),
            lora_bias: use_lora_bias,
            to_save: &to_save,
        },
    );
    let peft_type = if plan.shira { "SHIRA" } else { "LORA" };
    let sidecar = Sidecar {
        expert: format!("{}@{}", manifest.name, manifest.version),
        base_digest: manifest.base.digest.clone(),
        shira_nnz: std::mem::take(&mut w.shira_nnz),
    };
    let readme = readme(manifest, &base_id, peft_type, task_type.as_deref());
    let target_modules: Vec<String> = w.modules.iter().map(|m| m.0.clone()).collect();
    let (tensors, bytes) = write_dir(dir, w.out, fetch, &config, &readme, &sidecar)?;
    Ok(ExportReport {
        peft_type: peft_type.into(),
        r,
        target_modules,
        modules_to_save: to_save,
        selection_modules: w.selection,
        task_type,
        base_model_name_or_path: base_id,
        tensors,
        bytes,
    })
}

/// The model card: the Hub's front matter as PEFT writes it, and where the adapter came from.
fn readme(m: &Manifest, base_id: &str, peft_type: &str, task_type: Option<&str>) -> String {
    let mut s = String::from("---\n");
    s += &format!("base_model: {}\n", yaml_str(base_id));
    s += "library_name: peft\n";
    if task_type == Some("CAUSAL_LM") {
        s += "pipeline_tag: text-generation\n";
    }
    s += "tags:\n";
    s += &format!("- {}\n", yaml_str(&format!("base_model:adapter:{base_id}")));
    s += &format!("- {}\n", peft_type.to_ascii_lowercase());
    s += "- transformers\n- xpm\n---\n\n";
    s += &format!("# {} {}\n\n", m.name, m.version);
    if let Some(d) = &m.description {
        s += &format!("{d}\n\n");
    }
    s += &format!(
        "A PEFT {peft_type} adapter exported by xpm from the expert `{}@{}` ({} expert, base \
         `{}`, base digest `{}`). Merged into the base it gives the same weights as `xpm apply`.\n",
        m.name, m.version, m.kind, m.base.id, m.base.digest
    );
    s
}

/// A YAML scalar: plain when safe, else double-quoted.
fn yaml_str(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@".contains(c))
        && !s.starts_with(['-', ':', '@'])
    {
        s.to_string()
    } else {
        serde_json::to_string(s).expect("json string")
    }
}
