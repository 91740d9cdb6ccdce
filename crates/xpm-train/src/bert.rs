//! A BERT encoder (BERT, MiniLM, sentence-transformers models) for training.
//!
//! Same weights, names and arithmetic as `candle_transformers::models::bert`, but normalisation
//! and softmax are built from differentiable ops and every linear layer is an
//! [`AdaptedLinear`]. The test `matches_candle_transformers` checks the forward against the
//! stock model. Classification: mean pooling over the attention mask, then a linear head.

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor};
use candle_transformers::models::bert::{Config, HiddenAct};

use super::fused::{attention, gelu, layer_norm};
use super::nn::AdaptedLinear;
use xpm_core::rng::SplitMix64;

pub(crate) struct Norm {
    pub(crate) w: Tensor,
    pub(crate) b: Tensor,
}

pub(crate) struct Layer {
    pub(crate) query: AdaptedLinear,
    pub(crate) key: AdaptedLinear,
    pub(crate) value: AdaptedLinear,
    pub(crate) attn_out: AdaptedLinear,
    pub(crate) attn_norm: Norm,
    pub(crate) inter: AdaptedLinear,
    pub(crate) out: AdaptedLinear,
    pub(crate) out_norm: Norm,
}

/// The encoder with its frozen weights and adapters.
pub struct Bert {
    pub config: Config,
    pub(crate) word: Tensor,
    pub(crate) position: Tensor,
    pub(crate) token_type: Tensor,
    pub(crate) emb_norm: Norm,
    pub(crate) layers: Vec<Layer>,
}

/// Take a tensor out of `w` by name.
pub(crate) fn take(w: &mut HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    w.remove(name)
        .ok_or_else(|| candle_core::Error::Msg(format!("the checkpoint has no tensor `{name}`")))
}

impl Bert {
    /// Build from f32 weights keyed by their checkpoint names. Accepts names with or without
    /// a `bert.` prefix; the adapters' names keep the checkpoint's spelling.
    pub fn load(mut w: HashMap<String, Tensor>, config: Config) -> Result<Self> {
        let prefix = if w.contains_key("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let p = |s: &str| format!("{prefix}{s}");
        let norm = |w: &mut HashMap<String, Tensor>, at: &str| -> Result<Norm> {
            // Old checkpoints name the parameters gamma/beta.
            let (wn, bn) = if w.contains_key(&format!("{at}.weight")) {
                (format!("{at}.weight"), format!("{at}.bias"))
            } else {
                (format!("{at}.gamma"), format!("{at}.beta"))
            };
            Ok(Norm {
                w: take(w, &wn)?,
                b: take(w, &bn)?,
            })
        };
        let lin = |w: &mut HashMap<String, Tensor>, at: &str| -> Result<AdaptedLinear> {
            let name = format!("{at}.weight");
            let weight = take(w, &name)?;
            let bias = w.remove(&format!("{at}.bias"));
            Ok(AdaptedLinear::new(name, weight, bias))
        };
        let word = take(&mut w, &p("embeddings.word_embeddings.weight"))?;
        let position = take(&mut w, &p("embeddings.position_embeddings.weight"))?;
        let token_type = take(&mut w, &p("embeddings.token_type_embeddings.weight"))?;
        let emb_norm = norm(&mut w, &p("embeddings.LayerNorm"))?;
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            let at = |s: &str| p(&format!("encoder.layer.{i}.{s}"));
            layers.push(Layer {
                query: lin(&mut w, &at("attention.self.query"))?,
                key: lin(&mut w, &at("attention.self.key"))?,
                value: lin(&mut w, &at("attention.self.value"))?,
                attn_out: lin(&mut w, &at("attention.output.dense"))?,
                attn_norm: norm(&mut w, &at("attention.output.LayerNorm"))?,
                inter: lin(&mut w, &at("intermediate.dense"))?,
                out: lin(&mut w, &at("output.dense"))?,
                out_norm: norm(&mut w, &at("output.LayerNorm"))?,
            });
        }
        Ok(Bert {
            config,
            word,
            position,
            token_type,
            emb_norm,
            layers,
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Every linear layer, in checkpoint order.
    pub fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        let mut out = Vec::new();
        for l in &mut self.layers {
            out.extend([
                &mut l.query,
                &mut l.key,
                &mut l.value,
                &mut l.attn_out,
                &mut l.inter,
                &mut l.out,
            ]);
        }
        out
    }

    pub fn linears(&self) -> Vec<&AdaptedLinear> {
        let mut out = Vec::new();
        for l in &self.layers {
            out.extend([&l.query, &l.key, &l.value, &l.attn_out, &l.inter, &l.out]);
        }
        out
    }

    /// Hidden states (b × s × h) for `ids` (b × s, u32) and `mask` (b × s, f32 0/1).
    /// `rng` enables the LoRA dropout (training).
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        mut rng: Option<&mut SplitMix64>,
    ) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let h = self.config.hidden_size;
        let eps = self.config.layer_norm_eps;
        let x = self
            .word
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, s, h))?;
        let x = x.broadcast_add(&self.position.narrow(0, 0, s)?)?;
        let x = x.broadcast_add(&self.token_type.narrow(0, 0, 1)?)?;
        let mut x = layer_norm(&x, &self.emb_norm.w, &self.emb_norm.b, eps)?;
        // (1 − mask) · f32::MIN, as the stock model and transformers do.
        let ext = ((mask.ones_like()? - mask)? * f32::MIN as f64)?
            .unsqueeze(1)?
            .unsqueeze(1)?;
        let nh = self.config.num_attention_heads;
        let scale = 1.0 / ((h / nh) as f64).sqrt();
        for l in &self.layers {
            let q = l.query.forward(&x, rng.as_deref_mut())?;
            let k = l.key.forward(&x, rng.as_deref_mut())?;
            let v = l.value.forward(&x, rng.as_deref_mut())?;
            let ctx = attention(&q, &k, &v, &ext, nh, scale)?;
            let a = l.attn_out.forward(&ctx, rng.as_deref_mut())?;
            let x1 = layer_norm(&(a + &x)?, &l.attn_norm.w, &l.attn_norm.b, eps)?;
            let i = l.inter.forward(&x1, rng.as_deref_mut())?;
            let i = match self.config.hidden_act {
                HiddenAct::Gelu => gelu(&i)?,
                HiddenAct::GeluApproximate => i.gelu()?,
                HiddenAct::Relu => i.relu()?,
            };
            let o = l.out.forward(&i, rng.as_deref_mut())?;
            x = layer_norm(&(o + x1)?, &l.out_norm.w, &l.out_norm.b, eps)?;
        }
        Ok(x)
    }
}

/// Mean of `hidden` (b × s × h) over the positions where `mask` (b × s) is 1.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
    sum.broadcast_div(&count)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarBuilder;

    pub(crate) fn tiny_config() -> Config {
        serde_json::from_value(crate::toy::tiny_bert(0).0).unwrap()
    }

    /// The toy BERT's random weights as tensors.
    pub(crate) fn tiny_weights(seed: u64) -> HashMap<String, Tensor> {
        crate::toy::tiny_bert(seed)
            .1
            .into_iter()
            .map(|(n, s, v)| (n, Tensor::from_vec(v, s, &Device::Cpu).unwrap()))
            .collect()
    }

    #[test]
    fn matches_candle_transformers() {
        let c = tiny_config();
        let w = tiny_weights(11);
        let dev = Device::Cpu;
        let stock = candle_transformers::models::bert::BertModel::load(
            VarBuilder::from_tensors(w.clone(), DType::F32, &dev),
            &c,
        )
        .unwrap();
        let ours = Bert::load(w, c).unwrap();
        let ids = Tensor::new(&[[3u32, 7, 9, 2, 0], [4, 5, 6, 0, 0]], &dev).unwrap();
        let mask = Tensor::new(&[[1f32, 1., 1., 1., 0.], [1., 1., 1., 0., 0.]], &dev).unwrap();
        let want = stock
            .forward(&ids, &ids.zeros_like().unwrap(), Some(&mask))
            .unwrap();
        let got = ours.forward(&ids, &mask, None).unwrap();
        let diff = crate::nn::tests::max_diff(&want, &got);
        assert!(diff < 1e-5, "max |stock − ours| = {diff}");
    }
}
