//! Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder.
//!
//! Per decoder layer: RMSNorm → q/k/v → per-head q/k RMSNorm → RoPE (NeoX) →
//! GQA attention over the paged KV cache → o_proj → residual; RMSNorm → either the
//! sparse MoE block (softmax top-k router, routed experts through
//! `lvllm_moe::CpuExperts`) or a dense SwiGLU MLP (`mlp_only_layers`,
//! `decoder_sparse_step`) → residual. Then the final norm and the LM head (tied to
//! the embedding when `tie_word_embeddings`). Activations are f32, weights keep
//! their checkpoint dtype, accumulation is f32.

use lvllm_moe::{CpuExperts, ExpertMatrix, ExpertWeights};

use crate::cache::{LayerCache, LayerCacheSpec, Logits, ModelCache};
use crate::config::Qwen3MoeConfig;
use crate::layers::{paged_attention, write_kv, AttnDims, Embedding, Linear, Mlp, RmsNorm};
use crate::rope::Rope;
use crate::safetensors::WeightSource;
use crate::{Error, ForwardBatch, LoadOptions, Result};

#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
}

#[derive(Debug)]
struct SparseMoe {
    gate: Linear,
    experts: CpuExperts,
}

/// One per layer, so the size difference between variants does not matter.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum FeedForward {
    Dense(Mlp),
    Sparse(SparseMoe),
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    attn: Attention,
    post_attention_layernorm: RmsNorm,
    ffn: FeedForward,
}

/// A loaded Qwen3-MoE model.
#[derive(Debug)]
pub struct Qwen3Moe {
    cfg: Qwen3MoeConfig,
    embed: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
}

impl Qwen3Moe {
    /// What one decode token reads.
    pub fn weight_traffic(&self) -> crate::WeightTraffic {
        let mut t = crate::WeightTraffic { host_fixed: self.lm_head.weight_bytes(), ..Default::default() };
        for (l, layer) in self.layers.iter().enumerate() {
            let a = &layer.attn;
            t.host_fixed +=
                [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj].iter().map(|p| p.weight_bytes()).sum::<usize>();
            match &layer.ffn {
                FeedForward::Dense(mlp) => t.host_fixed += mlp.weight_bytes(),
                FeedForward::Sparse(moe) => {
                    t.host_fixed += moe.gate.weight_bytes();
                    t.moe_layers.push(crate::MoeLayerTraffic {
                        layer: l,
                        n_experts: self.cfg.num_experts,
                        top_k: self.cfg.num_experts_per_tok,
                        expert_bytes: moe.experts.expert_bytes(),
                        on_host: true,
                    });
                }
            }
        }
        t
    }

    /// Loads every tensor the config implies from `src`, checking shapes.
    pub fn load(cfg: &Qwen3MoeConfig, src: &WeightSource, opts: &LoadOptions) -> Result<Self> {
        let (h, hd, nh, nkv) = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads);
        let eps = cfg.rms_norm_eps;
        let embed = Embedding::load(src, "model.embed_tokens.weight", cfg.vocab_size, h)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let bias = cfg.attention_bias;
            let attn = Attention {
                q_proj: Linear::load(src, &format!("{p}.self_attn.q_proj"), nh * hd, h, bias)?,
                k_proj: Linear::load(src, &format!("{p}.self_attn.k_proj"), nkv * hd, h, bias)?,
                v_proj: Linear::load(src, &format!("{p}.self_attn.v_proj"), nkv * hd, h, bias)?,
                o_proj: Linear::load(src, &format!("{p}.self_attn.o_proj"), h, nh * hd, false)?,
                q_norm: RmsNorm::load(src, &format!("{p}.self_attn.q_norm"), hd, eps)?,
                k_norm: RmsNorm::load(src, &format!("{p}.self_attn.k_norm"), hd, eps)?,
            };
            let ffn = if cfg.is_moe_layer(l) {
                let gate = Linear::load(src, &format!("{p}.mlp.gate"), cfg.num_experts, h, false)?;
                let i = cfg.moe_intermediate_size;
                let experts = (0..cfg.num_experts)
                    .map(|e| {
                        let ep = format!("{p}.mlp.experts.{e}");
                        Ok(ExpertWeights {
                            gate: expert_matrix(src, &format!("{ep}.gate_proj"), i, h)?,
                            up: expert_matrix(src, &format!("{ep}.up_proj"), i, h)?,
                            down: expert_matrix(src, &format!("{ep}.down_proj"), h, i)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let experts =
                    CpuExperts::new(opts.pool.clone(), experts, h, i, &opts.experts, ExpertWeights::release_pages)?;
                FeedForward::Sparse(SparseMoe { gate, experts })
            } else {
                FeedForward::Dense(Mlp::load(src, &format!("{p}.mlp"), h, cfg.intermediate_size)?)
            };
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::load(src, &format!("{p}.input_layernorm"), h, eps)?,
                attn,
                post_attention_layernorm: RmsNorm::load(src, &format!("{p}.post_attention_layernorm"), h, eps)?,
                ffn,
            });
        }
        let norm = RmsNorm::load(src, "model.norm", h, eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::from_weight(embed.weight().clone())?
        } else {
            Linear::load(src, "lm_head", cfg.vocab_size, h, false)?
        };
        let rope = Rope::new(hd, cfg.rope_theta, &cfg.rope_scaling, cfg.max_position_embeddings);
        Ok(Qwen3Moe { cfg: cfg.clone(), embed, layers, norm, lm_head, rope })
    }

    /// The config.
    pub fn config(&self) -> &Qwen3MoeConfig {
        &self.cfg
    }

    /// The RoPE tables (exposed for tests against the reference).
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// What each layer caches.
    pub fn cache_spec(&self) -> Vec<LayerCacheSpec> {
        vec![
            LayerCacheSpec::PagedKv { n_kv_heads: self.cfg.num_key_value_heads, head_dim: self.cfg.head_dim };
            self.cfg.num_hidden_layers
        ]
    }

    /// Runs the batch through the model, writing its keys/values into `cache`.
    pub fn forward(&self, batch: &ForwardBatch<'_>, cache: &mut ModelCache) -> Result<Logits> {
        let cfg = &self.cfg;
        let n = batch.tokens.len();
        let (h, hd, nh, nkv) = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads);
        let block_size = cache.config().block_size;
        crate::validate_batch(batch, cache, cfg.max_position_embeddings)?;
        let mut x = self.embed.forward(batch.tokens)?;
        let dims = AttnDims { n_heads: nh, n_kv_heads: nkv, head_dim: hd, scale: 1.0 / (hd as f32).sqrt() };
        let (mut cos, mut sin) = (vec![0f32; hd / 2], vec![0f32; hd / 2]);
        for (l, layer) in self.layers.iter().enumerate() {
            // Attention.
            let mut a = x.clone();
            layer.input_layernorm.forward_inplace(&mut a);
            let mut q = layer.attn.q_proj.forward(&a, n)?;
            let mut k = layer.attn.k_proj.forward(&a, n)?;
            let v = layer.attn.v_proj.forward(&a, n)?;
            layer.attn.q_norm.forward_inplace(&mut q);
            layer.attn.k_norm.forward_inplace(&mut k);
            for (t, &p) in batch.positions.iter().enumerate() {
                self.rope.cos_sin(p, &mut cos, &mut sin);
                Rope::apply_neox(&mut q[t * nh * hd..(t + 1) * nh * hd], hd, &cos, &sin);
                Rope::apply_neox(&mut k[t * nkv * hd..(t + 1) * nkv * hd], hd, &cos, &sin);
            }
            let LayerCache::PagedKv(kv) = cache.layer_mut(l);
            let mut attn_out = Vec::with_capacity(n * nh * hd);
            let mut start = 0;
            for seq in batch.seqs {
                let r = start..start + seq.len;
                let pos = &batch.positions[r.clone()];
                let w = nkv * hd;
                write_kv(kv, seq.block_table, block_size, pos, &k[r.start * w..r.end * w], &v[r.start * w..r.end * w]);
                attn_out.extend(paged_attention(
                    kv,
                    seq.block_table,
                    block_size,
                    pos,
                    &q[r.start * nh * hd..r.end * nh * hd],
                    dims,
                ));
                start = r.end;
            }
            let o = layer.attn.o_proj.forward(&attn_out, n)?;
            for (xv, ov) in x.iter_mut().zip(&o) {
                *xv += ov;
            }
            // Feed-forward.
            let mut f = x.clone();
            layer.post_attention_layernorm.forward_inplace(&mut f);
            let y = match &layer.ffn {
                FeedForward::Dense(mlp) => mlp.forward(&f, n)?,
                FeedForward::Sparse(moe) => {
                    let router_logits = moe.gate.forward(&f, n)?;
                    let topk = lvllm_moe::softmax_topk(
                        &router_logits,
                        cfg.num_experts,
                        cfg.num_experts_per_tok,
                        cfg.norm_topk_prob,
                    );
                    let mut y = vec![0f32; n * h];
                    moe.experts.forward(&f, &topk, &mut y)?;
                    y
                }
            };
            for (xv, yv) in x.iter_mut().zip(&y) {
                *xv += yv;
            }
        }
        let rows = batch.logit_rows();
        let mut sel = Vec::with_capacity(rows.len() * h);
        for &r in &rows {
            sel.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        self.norm.forward_inplace(&mut sel);
        let data = self.lm_head.forward(&sel, rows.len())?;
        if data.iter().any(|v| !v.is_finite()) {
            return Err(Error::Input("the forward pass produced non-finite logits".into()));
        }
        Ok(Logits { rows, vocab: self.lm_head.out_features(), data })
    }
}

/// An expert projection by name: dense (`{name}.weight` in bf16/f16/f32) or FP8
/// with `{name}.weight_scale_inv`.
pub(crate) fn expert_matrix(src: &WeightSource, name: &str, rows: usize, cols: usize) -> Result<ExpertMatrix> {
    let w = src.get(&format!("{name}.weight"))?;
    if w.dtype() == lvllm_tensor::DType::F8E4M3 {
        let scale_inv = src.get(&format!("{name}.weight_scale_inv"))?;
        if w.dims() != [rows, cols] {
            return Err(Error::TensorShape {
                name: format!("{name}.weight"),
                expected: [rows, cols].into(),
                got: w.shape().clone(),
            });
        }
        return Ok(ExpertMatrix::Fp8 { weight: w, scale_inv });
    }
    Ok(ExpertMatrix::Dense(src.get_float(&format!("{name}.weight"), &[rows, cols])?))
}
