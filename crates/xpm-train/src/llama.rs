//! A Llama-family decoder for causal-LM training.
//!
//! Same weights, names and arithmetic as `candle_transformers::models::llama` (RMSNorm, rotary
//! embeddings in the "rotate half" layout, grouped-query attention, SwiGLU MLP, optional tied
//! embeddings), with differentiable normalisation and softmax and [`AdaptedLinear`] layers.
//! It reads `config.json` as transformers writes it, so a real checkpoint directory loads
//! unchanged. Llama-3 rope scaling is refused rather than silently ignored.

use std::collections::HashMap;

use candle_core::{D, DType, Device, Result, Tensor};

use super::bert::take;
use super::fused::masked_softmax;
use super::nn::{AdaptedLinear, linear, rms_norm};
use xpm_core::rng::SplitMix64;

/// The fields of a Llama `config.json` the model needs.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
}

fn default_theta() -> f64 {
    10_000.0
}

struct Block {
    input_norm: Tensor,
    q: AdaptedLinear,
    k: AdaptedLinear,
    v: AdaptedLinear,
    o: AdaptedLinear,
    post_norm: Tensor,
    gate: AdaptedLinear,
    up: AdaptedLinear,
    down: AdaptedLinear,
}

pub struct Llama {
    pub config: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
}

impl Llama {
    pub fn load(mut w: HashMap<String, Tensor>, config: &serde_json::Value) -> Result<Self> {
        let config: LlamaConfig = serde_json::from_value(config.clone())
            .map_err(|e| candle_core::Error::Msg(format!("not a Llama config: {e}")))?;
        if config.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(candle_core::Error::Msg(
                "rope_scaling is not supported by xpm's trainer yet".into(),
            ));
        }
        let lin = |w: &mut HashMap<String, Tensor>, at: String| -> Result<AdaptedLinear> {
            let name = format!("{at}.weight");
            let weight = take(w, &name)?;
            let bias = w.remove(&format!("{at}.bias"));
            Ok(AdaptedLinear::new(name, weight, bias))
        };
        let embed = take(&mut w, "model.embed_tokens.weight")?;
        let mut blocks = Vec::new();
        for i in 0..config.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            blocks.push(Block {
                input_norm: take(&mut w, &p("input_layernorm.weight"))?,
                q: lin(&mut w, p("self_attn.q_proj"))?,
                k: lin(&mut w, p("self_attn.k_proj"))?,
                v: lin(&mut w, p("self_attn.v_proj"))?,
                o: lin(&mut w, p("self_attn.o_proj"))?,
                post_norm: take(&mut w, &p("post_attention_layernorm.weight"))?,
                gate: lin(&mut w, p("mlp.gate_proj"))?,
                up: lin(&mut w, p("mlp.up_proj"))?,
                down: lin(&mut w, p("mlp.down_proj"))?,
            });
        }
        let norm = take(&mut w, "model.norm.weight")?;
        let lm_head = match w.remove("lm_head.weight") {
            Some(t) => t,
            None => embed.clone(),
        };
        Ok(Llama {
            config,
            embed,
            blocks,
            norm,
            lm_head,
        })
    }

    pub fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        let mut out = Vec::new();
        for b in &mut self.blocks {
            out.extend([
                &mut b.q,
                &mut b.k,
                &mut b.v,
                &mut b.o,
                &mut b.gate,
                &mut b.up,
                &mut b.down,
            ]);
        }
        out
    }

    pub fn linears(&self) -> Vec<&AdaptedLinear> {
        let mut out = Vec::new();
        for b in &self.blocks {
            out.extend([&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down]);
        }
        out
    }

    fn rope_tables(&self, s: usize, hd: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
        let theta = self.config.rope_theta;
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / hd as f64)) as f32)
            .collect();
        let inv = Tensor::from_vec(inv, (1, hd / 2), dev)?;
        let pos = Tensor::arange(0u32, s as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((s, 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        Ok((freqs.cos()?, freqs.sin()?))
    }

    /// Logits (b × s × vocab) for `ids` (b × s) with right padding marked by `mask` (b × s).
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        mut rng: Option<&mut SplitMix64>,
    ) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let dev = ids.device();
        let c = &self.config;
        let h = c.hidden_size;
        let nh = c.num_attention_heads;
        let nkv = c.num_key_value_heads.unwrap_or(nh);
        let hd = h / nh;
        let (cos, sin) = self.rope_tables(s, hd, dev)?;
        let rope = |x: &Tensor| -> Result<Tensor> {
            let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
            let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
            let a = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
            let bb = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
            Tensor::cat(&[a, bb], D::Minus1)
        };
        // Additive mask: causal, and padded keys hidden.
        let mut allowed = vec![0f32; b * s * s];
        let m: Vec<f32> = mask.flatten_all()?.to_vec1()?;
        for r in 0..b {
            for i in 0..s {
                for j in 0..s {
                    if j > i || m[r * s + j] == 0.0 {
                        allowed[(r * s + i) * s + j] = f32::MIN;
                    }
                }
            }
        }
        let bias = Tensor::from_vec(allowed, (b, 1, s, s), dev)?;
        let mut x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, s, h))?;
        for blk in &self.blocks {
            let xn = rms_norm(&x, &blk.input_norm, c.rms_norm_eps)?;
            let heads = |t: Tensor, n: usize| -> Result<Tensor> {
                t.reshape((b, s, n, hd))?.transpose(1, 2)?.contiguous()
            };
            let q = rope(&heads(blk.q.forward(&xn, rng.as_deref_mut())?, nh)?)?;
            let k = rope(&heads(blk.k.forward(&xn, rng.as_deref_mut())?, nkv)?)?;
            let v = heads(blk.v.forward(&xn, rng.as_deref_mut())?, nkv)?;
            let (k, v) = if nkv != nh {
                let rep = nh / nkv;
                let r = |t: Tensor| -> Result<Tensor> {
                    t.unsqueeze(2)?
                        .broadcast_as((b, nkv, rep, s, hd))?
                        .contiguous()?
                        .reshape((b, nh, s, hd))
                };
                (r(k)?, r(v)?)
            } else {
                (k, v)
            };
            let ctx = masked_softmax(&q.matmul(&k.t()?)?, &bias, 1.0 / (hd as f64).sqrt())?
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b, s, h))?;
            x = (x + blk.o.forward(&ctx, rng.as_deref_mut())?)?;
            let xn = rms_norm(&x, &blk.post_norm, c.rms_norm_eps)?;
            let g = blk.gate.forward(&xn, rng.as_deref_mut())?.silu()?;
            let u = blk.up.forward(&xn, rng.as_deref_mut())?;
            x = (x + blk.down.forward(&(g * u)?, rng.as_deref_mut())?)?;
        }
        let x = rms_norm(&x, &self.norm, c.rms_norm_eps)?;
        linear(&x, &self.lm_head, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarBuilder;

    fn config() -> serde_json::Value {
        serde_json::json!({
            "model_type": "llama", "hidden_size": 16, "intermediate_size": 24,
            "vocab_size": 40, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 64, "tie_word_embeddings": false
        })
    }

    fn weights(seed: u64) -> HashMap<String, Tensor> {
        let mut r = SplitMix64(seed);
        let dev = Device::Cpu;
        let mut w = HashMap::new();
        let mut put = |name: String, shape: &[usize], scale: f32, add: f32| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| r.normal() * scale + add).collect();
            w.insert(name, Tensor::from_vec(v, shape, &dev).unwrap());
        };
        put("model.embed_tokens.weight".into(), &[40, 16], 0.5, 0.0);
        for l in 0..2 {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            put(p("input_layernorm.weight"), &[16], 0.1, 1.0);
            put(p("post_attention_layernorm.weight"), &[16], 0.1, 1.0);
            put(p("self_attn.q_proj.weight"), &[16, 16], 0.3, 0.0);
            put(p("self_attn.k_proj.weight"), &[8, 16], 0.3, 0.0);
            put(p("self_attn.v_proj.weight"), &[8, 16], 0.3, 0.0);
            put(p("self_attn.o_proj.weight"), &[16, 16], 0.3, 0.0);
            put(p("mlp.gate_proj.weight"), &[24, 16], 0.3, 0.0);
            put(p("mlp.up_proj.weight"), &[24, 16], 0.3, 0.0);
            put(p("mlp.down_proj.weight"), &[16, 24], 0.3, 0.0);
        }
        put("model.norm.weight".into(), &[16], 0.1, 1.0);
        put("lm_head.weight".into(), &[40, 16], 0.3, 0.0);
        w
    }

    #[test]
    fn matches_candle_transformers() {
        use candle_transformers::models::llama as stock;
        let dev = Device::Cpu;
        let w = weights(5);
        let cfg: stock::LlamaConfig = serde_json::from_value(config()).unwrap();
        let cfg = cfg.into_config(false);
        let model = stock::Llama::load(VarBuilder::from_tensors(w.clone(), DType::F32, &dev), &cfg)
            .unwrap();
        let mut cache = stock::Cache::new(false, DType::F32, &cfg, &dev).unwrap();
        let ids = Tensor::new(&[[1u32, 5, 9, 3, 22, 7]], &dev).unwrap();
        let want = model.forward(&ids, 0, &mut cache).unwrap(); // last position: 1 × vocab
        let ours = Llama::load(w, &config()).unwrap();
        let got = ours
            .forward(
                &ids,
                &ids.ones_like().unwrap().to_dtype(DType::F32).unwrap(),
                None,
            )
            .unwrap()
            .narrow(1, 5, 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let diff = crate::nn::tests::max_diff(&want, &got);
        assert!(diff < 1e-4, "max |stock − ours| = {diff}");
    }
}
