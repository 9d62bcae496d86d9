//! Typed `config.json` of the supported architectures.
//!
//! Parsing is lenient the way Hugging Face is: unknown keys are ignored, and both
//! the transformers 4.x spellings of real checkpoints (`num_experts`, `rope_theta`,
//! `rope_scaling`, `torch_dtype`) and the 5.x ones that `save_pretrained` writes
//! (`num_local_experts`, `rope_parameters`, `dtype`) are accepted. Behavioural
//! flags fall back to Hugging Face's defaults; dimensions are required, and a
//! missing or inconsistent one is an error naming the key.

use serde::Deserialize;

use crate::{Error, Result};

/// Architectures lvllm implements, as `architectures` names them.
pub const SUPPORTED_ARCHITECTURES: &str = "Qwen3MoeForCausalLM";

/// A parsed model config, one variant per architecture.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ModelConfig {
    /// `Qwen3MoeForCausalLM`.
    Qwen3Moe(Qwen3MoeConfig),
}

impl ModelConfig {
    /// Parses `config.json` bytes; `what` names the file in errors.
    pub fn from_json(bytes: &[u8], what: &str) -> Result<Self> {
        let err = |msg: String| Error::Config { what: what.to_string(), msg };
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let arch = match v.get("architectures") {
            Some(serde_json::Value::Array(a)) => a.first().and_then(|x| x.as_str()).map(str::to_string),
            _ => None,
        };
        let arch = arch.or_else(|| {
            v.get("model_type")
                .and_then(|m| m.as_str())
                .and_then(|m| (m == "qwen3_moe").then(|| "Qwen3MoeForCausalLM".to_string()))
        });
        match arch.as_deref() {
            Some("Qwen3MoeForCausalLM") => {
                let raw: RawQwen3Moe = serde_json::from_value(v).map_err(|e| err(e.to_string()))?;
                Ok(ModelConfig::Qwen3Moe(raw.validate().map_err(err)?))
            }
            Some(other) => {
                Err(Error::UnsupportedArchitecture { found: other.to_string(), supported: SUPPORTED_ARCHITECTURES })
            }
            None => Err(err("no `architectures` entry and no known `model_type`".into())),
        }
    }

    /// The context length the model was trained for.
    pub fn max_position_embeddings(&self) -> usize {
        match self {
            ModelConfig::Qwen3Moe(c) => c.max_position_embeddings,
        }
    }

    /// Decoder layers.
    pub fn num_hidden_layers(&self) -> usize {
        match self {
            ModelConfig::Qwen3Moe(c) => c.num_hidden_layers,
        }
    }

    /// Vocabulary size (rows of the embedding).
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Qwen3Moe(c) => c.vocab_size,
        }
    }

    /// What each decoder layer caches (the same for the CPU and GPU paths).
    pub fn cache_spec(&self) -> Vec<crate::LayerCacheSpec> {
        match self {
            ModelConfig::Qwen3Moe(c) => {
                vec![
                    crate::LayerCacheSpec::PagedKv { n_kv_heads: c.num_key_value_heads, head_dim: c.head_dim };
                    c.num_hidden_layers
                ]
            }
        }
    }

    /// `eos_token_id` from the config, as a list.
    pub fn eos_token_ids(&self) -> &[u32] {
        match self {
            ModelConfig::Qwen3Moe(c) => &c.eos_token_ids,
        }
    }
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// The scale factor.
        factor: f64,
    },
    /// YaRN (NTK-by-parts interpolation with an attention temperature).
    Yarn {
        /// The scale factor.
        factor: f64,
        /// The pretraining context length.
        original_max_position_embeddings: Option<usize>,
        /// Explicit attention factor (otherwise derived from `factor`).
        attention_factor: Option<f64>,
        /// High-frequency boundary in rotations (default 32).
        beta_fast: Option<f64>,
        /// Low-frequency boundary in rotations (default 1).
        beta_slow: Option<f64>,
        /// DeepSeek-style mscale.
        mscale: Option<f64>,
        /// DeepSeek-style mscale_all_dim.
        mscale_all_dim: Option<f64>,
        /// Round the correction range outward (default true).
        truncate: Option<bool>,
    },
}

#[derive(Debug, Deserialize)]
struct RawRope {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
    attention_factor: Option<f64>,
    beta_fast: Option<f64>,
    beta_slow: Option<f64>,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
    truncate: Option<bool>,
}

impl RawRope {
    fn to_scaling(&self) -> std::result::Result<RopeScaling, String> {
        let ty = self.rope_type.as_deref().unwrap_or("default");
        let factor = || self.factor.ok_or_else(|| format!("`rope_scaling.factor` is required for rope_type {ty:?}"));
        Ok(match ty {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "yarn" => RopeScaling::Yarn {
                factor: factor()?,
                original_max_position_embeddings: self.original_max_position_embeddings,
                attention_factor: self.attention_factor,
                beta_fast: self.beta_fast,
                beta_slow: self.beta_slow,
                mscale: self.mscale,
                mscale_all_dim: self.mscale_all_dim,
                truncate: self.truncate,
            },
            other => {
                return Err(format!(
                    "`rope_scaling.rope_type` {other:?} is not supported yet (supported: default, linear, yarn)"
                ))
            }
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Deserialize)]
struct RawQwen3Moe {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: Option<usize>,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRope>,
    rope_parameters: Option<RawRope>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default = "one")]
    decoder_sparse_step: usize,
    moe_intermediate_size: usize,
    num_experts_per_tok: usize,
    #[serde(alias = "num_local_experts")]
    num_experts: usize,
    #[serde(default)]
    norm_topk_prob: bool,
    #[serde(default)]
    mlp_only_layers: Vec<usize>,
    #[serde(alias = "dtype")]
    torch_dtype: Option<String>,
    eos_token_id: Option<OneOrMany>,
    bos_token_id: Option<u32>,
    quantization_config: Option<serde_json::Value>,
    #[serde(default)]
    use_sliding_window: bool,
}

fn default_act() -> String {
    "silu".into()
}
fn default_max_pos() -> usize {
    32768
}
fn default_eps() -> f64 {
    1e-6
}
fn one() -> usize {
    1
}

/// The config of a Qwen3-MoE model (`Qwen3MoeForCausalLM`).
#[derive(Debug, Clone)]
pub struct Qwen3MoeConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Width of the dense MLP layers (those in `mlp_only_layers` or off the sparse step).
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Context length the model was trained for.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether the LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Whether q/k/v projections have biases.
    pub attention_bias: bool,
    /// Every `decoder_sparse_step`-th layer is MoE.
    pub decoder_sparse_step: usize,
    /// Width of one expert.
    pub moe_intermediate_size: usize,
    /// Experts per token (top-k).
    pub num_experts_per_tok: usize,
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Renormalise the top-k routing weights.
    pub norm_topk_prob: bool,
    /// Layers that use a dense MLP whatever the sparse step says.
    pub mlp_only_layers: Vec<usize>,
    /// The checkpoint's dtype as the config states it.
    pub torch_dtype: Option<String>,
    /// End-of-sequence ids.
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<u32>,
}

impl Qwen3MoeConfig {
    /// KV-cache bytes one token occupies (f32 keys and values of every layer).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim * 4
    }

    /// Whether decoder layer `layer` has a sparse MoE block (Hugging Face's rule).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        !self.mlp_only_layers.contains(&layer)
            && self.num_experts > 0
            && (layer + 1).is_multiple_of(self.decoder_sparse_step)
    }
}

impl RawQwen3Moe {
    fn validate(self) -> std::result::Result<Qwen3MoeConfig, String> {
        if let Some(q) = &self.quantization_config {
            let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("unknown");
            return Err(format!(
                "`quantization_config` with quant_method {method:?}: quantized checkpoints are not supported yet"
            ));
        }
        if self.hidden_act != "silu" {
            return Err(format!("`hidden_act` {:?} is not supported (Qwen3-MoE uses \"silu\")", self.hidden_act));
        }
        if self.use_sliding_window {
            return Err("`use_sliding_window: true` is not supported yet".into());
        }
        let nonzero = |v: usize, key: &str| if v == 0 { Err(format!("`{key}` must be > 0")) } else { Ok(v) };
        nonzero(self.vocab_size, "vocab_size")?;
        nonzero(self.hidden_size, "hidden_size")?;
        nonzero(self.num_attention_heads, "num_attention_heads")?;
        nonzero(self.decoder_sparse_step, "decoder_sparse_step")?;
        let n_kv = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        nonzero(n_kv, "num_key_value_heads")?;
        if !self.num_attention_heads.is_multiple_of(n_kv) {
            return Err(format!(
                "`num_attention_heads` {} is not a multiple of `num_key_value_heads` {n_kv}",
                self.num_attention_heads
            ));
        }
        let head_dim = match self.head_dim {
            Some(h) => h,
            None if self.hidden_size.is_multiple_of(self.num_attention_heads) => {
                self.hidden_size / self.num_attention_heads
            }
            None => {
                return Err("`head_dim` is missing and `hidden_size` is not a multiple of `num_attention_heads`".into())
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(format!("`head_dim` {head_dim} must be even and > 0 for RoPE"));
        }
        if self.num_experts > 0 {
            nonzero(self.moe_intermediate_size, "moe_intermediate_size")?;
            if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_experts {
                return Err(format!(
                    "`num_experts_per_tok` {} must be between 1 and `num_experts` {}",
                    self.num_experts_per_tok, self.num_experts
                ));
            }
        }
        let rope_src = self.rope_scaling.as_ref().or(self.rope_parameters.as_ref());
        let rope_theta =
            self.rope_theta.or_else(|| self.rope_parameters.as_ref().and_then(|r| r.rope_theta)).unwrap_or(10000.0);
        let rope_scaling = match rope_src {
            Some(r) => r.to_scaling()?,
            None => RopeScaling::None,
        };
        let has_dense = (0..self.num_hidden_layers).any(|l| {
            self.mlp_only_layers.contains(&l) || self.num_experts == 0 || (l + 1) % self.decoder_sparse_step != 0
        });
        let intermediate_size = match self.intermediate_size {
            Some(i) => i,
            None if !has_dense => 0,
            None => return Err("`intermediate_size` is required: some layers use a dense MLP".into()),
        };
        Ok(Qwen3MoeConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: n_kv,
            head_dim,
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            rope_theta,
            rope_scaling,
            attention_bias: self.attention_bias,
            decoder_sparse_step: self.decoder_sparse_step,
            moe_intermediate_size: self.moe_intermediate_size,
            num_experts_per_tok: self.num_experts_per_tok,
            num_experts: self.num_experts,
            norm_topk_prob: self.norm_topk_prob,
            mlp_only_layers: self.mlp_only_layers,
            torch_dtype: self.torch_dtype,
            eos_token_ids: match self.eos_token_id {
                Some(OneOrMany::One(i)) => vec![i],
                Some(OneOrMany::Many(v)) => v,
                None => vec![],
            },
            bos_token_id: self.bos_token_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REAL: &str = r#"{
      "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
      "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
      "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
      "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": true,
      "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
      "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": false,
      "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000.0,
      "router_aux_loss_coef": 0.001, "sliding_window": null, "tie_word_embeddings": false,
      "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": true,
      "use_sliding_window": false, "vocab_size": 151936
    }"#;

    fn qwen(json: &str) -> Result<Qwen3MoeConfig> {
        ModelConfig::from_json(json.as_bytes(), "config.json").map(|ModelConfig::Qwen3Moe(c)| c)
    }

    #[test]
    fn parses_real_qwen3_30b_a3b_config() {
        let c = qwen(REAL).unwrap();
        assert_eq!((c.hidden_size, c.head_dim, c.num_experts, c.num_experts_per_tok), (2048, 128, 128, 8));
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert_eq!(c.eos_token_ids, vec![151645]);
        assert!(c.is_moe_layer(0) && c.is_moe_layer(47));
    }

    #[test]
    fn accepts_transformers_5_spellings() {
        let v5 = REAL
            .replace("\"num_experts\"", "\"num_local_experts\"")
            .replace("\"torch_dtype\"", "\"dtype\"")
            .replace(r#""rope_scaling": null, "rope_theta": 1000000.0,"#, r#""rope_parameters": {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0, "original_max_position_embeddings": 32768},"#);
        let c = qwen(&v5).unwrap();
        assert_eq!(c.num_experts, 128);
        assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
        assert_eq!(c.rope_theta, 5000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Yarn { factor, .. } if factor == 4.0));
    }

    #[test]
    fn sparse_step_and_mlp_only_layers() {
        let c = qwen(
            &REAL
                .replace(r#""decoder_sparse_step": 1"#, r#""decoder_sparse_step": 2"#)
                .replace(r#""mlp_only_layers": []"#, r#""mlp_only_layers": [3]"#),
        )
        .unwrap();
        let moe: Vec<usize> = (0..6).filter(|&l| c.is_moe_layer(l)).collect();
        assert_eq!(moe, vec![1, 5]);
    }

    #[test]
    fn errors_name_the_key() {
        let e = qwen(&REAL.replace(r#""hidden_size": 2048,"#, "")).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
        let e =
            qwen(&REAL.replace(r#""num_key_value_heads": 4"#, r#""num_key_value_heads": 5"#)).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let e = qwen(&REAL.replace(r#""num_experts_per_tok": 8"#, r#""num_experts_per_tok": 300"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_experts_per_tok"), "{e}");
        let e = qwen(&REAL.replace(r#""rope_scaling": null"#, r#""rope_scaling": {"type": "dynamic", "factor": 2.0}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("dynamic"), "{e}");
        let e = qwen(&REAL.replace(r#""hidden_size": 2048"#, r#""hidden_size": "big""#)).unwrap_err().to_string();
        assert!(e.contains("config.json"), "{e}");
        let e = qwen(&REAL.replace("\"use_cache\": true", r#""quantization_config": {"quant_method": "fp8"}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("fp8"), "{e}");
        let e = ModelConfig::from_json(b"{", "x/config.json").unwrap_err().to_string();
        assert!(e.contains("x/config.json") && e.contains("JSON"), "{e}");
    }

    #[test]
    fn unknown_architecture_is_named() {
        let e = ModelConfig::from_json(br#"{"architectures": ["LlamaForCausalLM"]}"#, "c").unwrap_err().to_string();
        assert!(e.contains("LlamaForCausalLM") && e.contains("Qwen3MoeForCausalLM"), "{e}");
    }
}
