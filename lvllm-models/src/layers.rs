//! Building blocks shared by architectures: linear layers, RMSNorm, embedding,
//! the dense SiLU MLP and paged-KV attention.

use half::bf16;
use lvllm_tensor::{ops, DType, HostTensor};

use crate::cache::PagedKv;
use crate::safetensors::WeightSource;
use crate::{Error, Result};

/// A linear layer `y = x Wᵀ (+ b)` with `W` of shape `[out, in]`.
#[derive(Debug)]
pub struct Linear {
    weight: HostTensor,
    bias: Option<Vec<f32>>,
    out_features: usize,
    in_features: usize,
}

impl Linear {
    /// Bytes of the weight as stored.
    pub fn weight_bytes(&self) -> usize {
        self.weight.as_bytes().len()
    }

    /// Loads `{prefix}.weight` (and `{prefix}.bias` when `bias`) of shape `[out, in]`.
    pub fn load(src: &WeightSource, prefix: &str, out_features: usize, in_features: usize, bias: bool) -> Result<Self> {
        let weight = ops::to_linear_dtype(src.get_float(&format!("{prefix}.weight"), &[out_features, in_features])?)?;
        let bias = if bias { Some(src.get_f32(&format!("{prefix}.bias"), &[out_features])?) } else { None };
        Ok(Linear { weight, bias, out_features, in_features })
    }

    /// A linear layer over an existing weight (tied LM head).
    pub fn from_weight(weight: HostTensor) -> Result<Self> {
        let (out_features, in_features) = weight.shape().dims2("linear weight")?;
        Ok(Linear { weight: ops::to_linear_dtype(weight)?, bias: None, out_features, in_features })
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// `x` is `[m, in]`; returns `[m, out]`.
    pub fn forward(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; m * self.out_features];
        ops::linear(x, m, &self.weight, &mut out)?;
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(self.out_features) {
                for (o, b) in row.iter_mut().zip(b) {
                    *o += b;
                }
            }
        }
        debug_assert_eq!(x.len(), m * self.in_features);
        Ok(out)
    }
}

/// RMSNorm with an f32 weight.
#[derive(Debug)]
pub struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    /// Loads `{prefix}.weight` of shape `[dim]`.
    pub fn load(src: &WeightSource, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm { weight: src.get_f32(&format!("{prefix}.weight"), &[dim])?, eps: eps as f32 })
    }

    /// Normalises each row of `x` (rows of the weight's width) in place.
    pub fn forward_inplace(&self, x: &mut [f32]) {
        lvllm_kernels_cpu::ops::rms_norm_inplace(x, &self.weight, self.eps);
    }
}

/// Token embedding table `[vocab, hidden]`.
#[derive(Debug)]
pub struct Embedding {
    weight: HostTensor,
    hidden: usize,
}

impl Embedding {
    /// Loads `name` of shape `[vocab, hidden]`.
    pub fn load(src: &WeightSource, name: &str, vocab: usize, hidden: usize) -> Result<Self> {
        Ok(Embedding { weight: ops::to_linear_dtype(src.get_float(name, &[vocab, hidden])?)?, hidden })
    }

    /// The table (for a tied LM head).
    pub fn weight(&self) -> &HostTensor {
        &self.weight
    }

    /// Rows of `ids` as f32, `[ids.len(), hidden]`.
    pub fn forward(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let vocab = self.weight.dims()[0];
        let h = self.hidden;
        let mut out = vec![0f32; ids.len() * h];
        for (o, &id) in out.chunks_exact_mut(h).zip(ids) {
            let id = id as usize;
            if id >= vocab {
                return Err(Error::Input(format!("token id {id} is outside the vocabulary of {vocab}")));
            }
            match self.weight.dtype() {
                DType::BF16 => {
                    lvllm_kernels_cpu::matmul::bf16_to_f32(&self.weight.typed::<bf16>()?[id * h..(id + 1) * h], o)
                }
                _ => o.copy_from_slice(&self.weight.typed::<f32>()?[id * h..(id + 1) * h]),
            }
        }
        Ok(out)
    }
}

/// The dense SwiGLU MLP: `down(silu(gate(x)) · up(x))`.
#[derive(Debug)]
pub struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    /// Bytes of the three weights as stored.
    pub fn weight_bytes(&self) -> usize {
        self.gate.weight_bytes() + self.up.weight_bytes() + self.down.weight_bytes()
    }

    /// Loads `{prefix}.{gate,up,down}_proj`.
    pub fn load(src: &WeightSource, prefix: &str, hidden: usize, intermediate: usize) -> Result<Self> {
        Ok(Mlp {
            gate: Linear::load(src, &format!("{prefix}.gate_proj"), intermediate, hidden, false)?,
            up: Linear::load(src, &format!("{prefix}.up_proj"), intermediate, hidden, false)?,
            down: Linear::load(src, &format!("{prefix}.down_proj"), hidden, intermediate, false)?,
        })
    }

    /// `x` is `[m, hidden]`.
    pub fn forward(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let mut g = self.gate.forward(x, m)?;
        let u = self.up.forward(x, m)?;
        for (gv, uv) in g.iter_mut().zip(&u) {
            *gv = lvllm_kernels_cpu::ops::silu(*gv) * uv;
        }
        self.down.forward(&g, m)
    }
}

/// Geometry of one attention layer.
#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Softmax scale.
    pub scale: f32,
}

/// Writes `k` and `v` (`[n, n_kv_heads * head_dim]`) of positions `positions` into
/// the pages named by `block_table`.
pub fn write_kv(
    cache: &mut PagedKv,
    block_table: &[u32],
    block_size: usize,
    positions: &[usize],
    k: &[f32],
    v: &[f32],
) {
    let w = cache.slot_width;
    for (i, &p) in positions.iter().enumerate() {
        let slot = block_table[p / block_size] as usize * block_size + p % block_size;
        cache.k[slot * w..(slot + 1) * w].copy_from_slice(&k[i * w..(i + 1) * w]);
        cache.v[slot * w..(slot + 1) * w].copy_from_slice(&v[i * w..(i + 1) * w]);
    }
}

/// Causal attention of the queries `q` (`[n, n_heads * head_dim]`, at `positions`)
/// over the cached keys/values of positions `0..=position` of one sequence.
/// Returns `[n, n_heads * head_dim]`.
pub fn paged_attention(
    cache: &PagedKv,
    block_table: &[u32],
    block_size: usize,
    positions: &[usize],
    q: &[f32],
    d: AttnDims,
) -> Vec<f32> {
    let (hd, w) = (d.head_dim, cache.slot_width);
    let group = d.n_heads / d.n_kv_heads;
    let mut out = vec![0f32; positions.len() * d.n_heads * hd];
    let mut scores = Vec::new();
    for (i, &p) in positions.iter().enumerate() {
        let slots: Vec<usize> =
            (0..=p).map(|j| block_table[j / block_size] as usize * block_size + j % block_size).collect();
        for h in 0..d.n_heads {
            let kvh = h / group;
            let qh = &q[(i * d.n_heads + h) * hd..(i * d.n_heads + h + 1) * hd];
            scores.clear();
            scores.extend(slots.iter().map(|&s| {
                let k = &cache.k[s * w + kvh * hd..s * w + (kvh + 1) * hd];
                lvllm_kernels_cpu::matmul::dot(qh, k) * d.scale
            }));
            lvllm_kernels_cpu::ops::softmax_inplace(&mut scores);
            let o = &mut out[(i * d.n_heads + h) * hd..(i * d.n_heads + h + 1) * hd];
            for (&s, &pr) in slots.iter().zip(&scores) {
                let v = &cache.v[s * w + kvh * hd..s * w + (kvh + 1) * hd];
                for (ov, vv) in o.iter_mut().zip(v) {
                    *ov += pr * vv;
                }
            }
        }
    }
    out
}
