//! Qwen3-MoE entirely on one GPU (`moe-placement: gpu`), eager.
//!
//! Same math as [`crate::qwen3_moe`], with the residual stream in f32. cuBLAS
//! multiplies bf16 by bf16 only, so each f32 activation enters a matrix product as
//! two bf16 terms (`hi = bf16(x)`, `lo = bf16(x − hi)`) stacked as extra rows of
//! one GEMM and summed after: ~16 mantissa bits of the activation, while the
//! weights are still read once (decode is bound by that read, not by the doubled
//! arithmetic). Experts run as one cuBLAS GEMM pair per
//! active expert over its gathered tokens (the router's ids come back to the host
//! to group them, so this path is not graph-capturable yet). The KV cache is
//! paged on the device with the same block tables as the CPU path.

use std::sync::Arc;

use half::bf16;
use lvllm_kernels_cuda::{DevBuf, Gpu};
use lvllm_tensor::{DType, HostTensor};

use crate::cache::{Logits, LogitsSelection};
use crate::config::Qwen3MoeConfig;
use crate::rope::Rope;
use crate::safetensors::WeightSource;
use crate::{Error, ForwardBatch, Result};

fn gpu_err(e: lvllm_kernels_cuda::Error) -> Error {
    Error::Input(format!("CUDA: {e}"))
}

/// Where the weights of a GPU model come from.
#[derive(Debug, Clone, Copy)]
pub enum GpuWeights<'a> {
    /// A checkpoint.
    Checkpoint(&'a WeightSource),
    /// Deterministic random weights of the config's shapes (`load_format: dummy`).
    Dummy {
        /// Seed of the random stream.
        seed: u32,
    },
}

struct Mat {
    buf: DevBuf<u16>,
    rows: usize,
    cols: usize,
}

enum Ffn {
    Dense { gate: Mat, up: Mat, down: Mat },
    Moe { router: Mat, experts: Vec<[Mat; 3]> },
}

struct Layer {
    in_norm: DevBuf<f32>,
    q: Mat,
    k: Mat,
    v: Mat,
    o: Mat,
    q_norm: DevBuf<f32>,
    k_norm: DevBuf<f32>,
    post_norm: DevBuf<f32>,
    ffn: Ffn,
}

/// A Qwen3-MoE model on a GPU, with its paged KV cache.
pub struct CudaQwen3Moe {
    gpu: Arc<Gpu>,
    cfg: Qwen3MoeConfig,
    embed: Mat,
    lm_head: Option<Mat>,
    norm: DevBuf<f32>,
    layers: Vec<Layer>,
    inv_freq: DevBuf<f32>,
    rope_scaling: f32,
    kv: Vec<(DevBuf<f32>, DevBuf<f32>)>,
    block_size: usize,
    num_blocks: usize,
}

impl std::fmt::Debug for CudaQwen3Moe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaQwen3Moe({:?}, {} layers)", self.gpu, self.layers.len())
    }
}

impl CudaQwen3Moe {
    /// Uploads the model and allocates `num_blocks` KV blocks of `block_size` tokens.
    pub fn load(
        gpu: Arc<Gpu>,
        cfg: &Qwen3MoeConfig,
        weights: GpuWeights<'_>,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<Self> {
        let (h, hd, nh, nkv) = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads);
        let mut seed = 0u32;
        let mut mat = |name: &str, rows: usize, cols: usize| -> Result<Mat> {
            match weights {
                GpuWeights::Checkpoint(src) => {
                    let t = src.get_float(name, &[rows, cols])?;
                    Ok(Mat { buf: upload_bf16(&gpu, &t)?, rows, cols })
                }
                GpuWeights::Dummy { seed: base } => {
                    seed = seed.wrapping_add(1);
                    let buf = gpu.alloc::<u16>(rows * cols).map_err(gpu_err)?;
                    let scale = 1.0 / (cols as f32).sqrt();
                    // SAFETY: `buf` holds rows × cols bf16.
                    unsafe {
                        gpu.fill_random_bf16(gpu.ptr(&buf), rows * cols, base ^ seed.wrapping_mul(0x9e37_79b9), scale)
                    }
                    .map_err(gpu_err)?;
                    Ok(Mat { buf, rows, cols })
                }
            }
        };
        let vec = |name: &str, n: usize| -> Result<DevBuf<f32>> {
            let v = match weights {
                GpuWeights::Checkpoint(src) => src.get_f32(name, &[n])?,
                GpuWeights::Dummy { .. } => vec![1.0; n],
            };
            gpu.upload(&v).map_err(gpu_err)
        };
        let embed = mat("model.embed_tokens.weight", cfg.vocab_size, h)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            if cfg.attention_bias {
                return Err(Error::NotSupported("attention_bias on the CUDA path".into()));
            }
            let p = format!("model.layers.{l}");
            let ffn = if cfg.is_moe_layer(l) {
                let i = cfg.moe_intermediate_size;
                let router = mat(&format!("{p}.mlp.gate.weight"), cfg.num_experts, h)?;
                let experts = (0..cfg.num_experts)
                    .map(|e| {
                        let ep = format!("{p}.mlp.experts.{e}");
                        Ok([
                            mat(&format!("{ep}.gate_proj.weight"), i, h)?,
                            mat(&format!("{ep}.up_proj.weight"), i, h)?,
                            mat(&format!("{ep}.down_proj.weight"), h, i)?,
                        ])
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ffn::Moe { router, experts }
            } else {
                let i = cfg.intermediate_size;
                Ffn::Dense {
                    gate: mat(&format!("{p}.mlp.gate_proj.weight"), i, h)?,
                    up: mat(&format!("{p}.mlp.up_proj.weight"), i, h)?,
                    down: mat(&format!("{p}.mlp.down_proj.weight"), h, i)?,
                }
            };
            layers.push(Layer {
                in_norm: vec(&format!("{p}.input_layernorm.weight"), h)?,
                q: mat(&format!("{p}.self_attn.q_proj.weight"), nh * hd, h)?,
                k: mat(&format!("{p}.self_attn.k_proj.weight"), nkv * hd, h)?,
                v: mat(&format!("{p}.self_attn.v_proj.weight"), nkv * hd, h)?,
                o: mat(&format!("{p}.self_attn.o_proj.weight"), h, nh * hd)?,
                q_norm: vec(&format!("{p}.self_attn.q_norm.weight"), hd)?,
                k_norm: vec(&format!("{p}.self_attn.k_norm.weight"), hd)?,
                post_norm: vec(&format!("{p}.post_attention_layernorm.weight"), h)?,
                ffn,
            });
        }
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(mat("lm_head.weight", cfg.vocab_size, h)?) };
        let norm = vec("model.norm.weight", h)?;
        let rope = Rope::new(hd, cfg.rope_theta, &cfg.rope_scaling, cfg.max_position_embeddings);
        let inv_freq = gpu.upload(rope.inv_freq()).map_err(gpu_err)?;
        let slots = block_size * num_blocks * nkv * hd;
        let kv = (0..cfg.num_hidden_layers)
            .map(|_| Ok((gpu.alloc::<f32>(slots).map_err(gpu_err)?, gpu.alloc::<f32>(slots).map_err(gpu_err)?)))
            .collect::<Result<Vec<_>>>()?;
        gpu.synchronize().map_err(gpu_err)?;
        Ok(CudaQwen3Moe {
            gpu,
            cfg: cfg.clone(),
            embed,
            lm_head,
            norm,
            layers,
            inv_freq,
            rope_scaling: rope.attention_scaling(),
            kv,
            block_size,
            num_blocks,
        })
    }

    /// The GPU.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Runs a batch (same contract as the CPU model), writing the device KV cache.
    pub fn forward(&self, batch: &ForwardBatch<'_>) -> Result<Logits> {
        let cfg = &self.cfg;
        let g = &*self.gpu;
        let n = batch.tokens.len();
        let (h, hd, nh, nkv) = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads);
        let shape = crate::CacheConfig { block_size: self.block_size, num_blocks: self.num_blocks };
        crate::validate_batch_shape(batch, shape, cfg.max_position_embeddings)?;
        if let Some(&bad) = batch.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(Error::Input(format!("token id {bad} is outside the vocabulary of {}", cfg.vocab_size)));
        }
        let e = gpu_err;
        // Per-token metadata.
        let max_blocks = batch.seqs.iter().map(|s| s.block_table.len()).max().unwrap_or(1).max(1);
        let mut tables = vec![0i32; batch.seqs.len() * max_blocks];
        let (mut seq_of, mut slots) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut start = 0;
        for (si, s) in batch.seqs.iter().enumerate() {
            for (b, &blk) in s.block_table.iter().enumerate() {
                tables[si * max_blocks + b] = blk as i32;
            }
            for &p in &batch.positions[start..start + s.len] {
                seq_of.push(si as i32);
                slots
                    .push((s.block_table[p / self.block_size] as usize * self.block_size + p % self.block_size) as i32);
            }
            start += s.len;
        }
        let pos: Vec<i32> = batch.positions.iter().map(|&p| p as i32).collect();
        let d_ids = g.upload(batch.tokens).map_err(e)?;
        let (d_pos, d_seq, d_slots, d_tables) = (
            g.upload(&pos).map_err(e)?,
            g.upload(&seq_of).map_err(e)?,
            g.upload(&slots).map_err(e)?,
            g.upload(&tables).map_err(e)?,
        );
        let x = g.alloc::<f32>(n * h).map_err(e)?;
        let a = g.alloc::<f32>(n * h).map_err(e)?;
        let q = g.alloc::<f32>(n * nh * hd).map_err(e)?;
        let k = g.alloc::<f32>(n * nkv * hd).map_err(e)?;
        let v = g.alloc::<f32>(n * nkv * hd).map_err(e)?;
        let att = g.alloc::<f32>(n * nh * hd).map_err(e)?;
        let o = g.alloc::<f32>(n * h).map_err(e)?;
        let p = |b: &DevBuf<f32>| g.ptr(b);
        // SAFETY: for all launches in this function, every buffer above is sized for
        // `n` tokens of the widths passed; weights were uploaded with the shapes
        // the config implies; batch metadata was validated against the cache.
        unsafe {
            g.embedding(g.ptr(&d_ids), g.ptr(&self.embed.buf), p(&x), n, h).map_err(e)?;
            for (l, layer) in self.layers.iter().enumerate() {
                let (kc, vc) = &self.kv[l];
                g.rmsnorm(p(&x), p(&layer.in_norm), p(&a), n, h, cfg.rms_norm_eps as f32).map_err(e)?;
                self.linear(&a, &layer.q, &q, n)?;
                self.linear(&a, &layer.k, &k, n)?;
                self.linear(&a, &layer.v, &v, n)?;
                let eps = cfg.rms_norm_eps as f32;
                g.rmsnorm(p(&q), p(&layer.q_norm), p(&q), n * nh, hd, eps).map_err(e)?;
                g.rmsnorm(p(&k), p(&layer.k_norm), p(&k), n * nkv, hd, eps).map_err(e)?;
                g.rope_neox(p(&q), g.ptr(&d_pos), p(&self.inv_freq), self.rope_scaling, n, nh, hd).map_err(e)?;
                g.rope_neox(p(&k), g.ptr(&d_pos), p(&self.inv_freq), self.rope_scaling, n, nkv, hd).map_err(e)?;
                g.kv_write(p(&k), p(&v), p(kc), p(vc), g.ptr(&d_slots), n, nkv * hd).map_err(e)?;
                g.paged_attention(
                    p(&q),
                    p(kc),
                    p(vc),
                    p(&att),
                    g.ptr(&d_pos),
                    g.ptr(&d_seq),
                    g.ptr(&d_tables),
                    max_blocks,
                    self.block_size,
                    n,
                    nh,
                    nkv,
                    hd,
                    1.0 / (hd as f32).sqrt(),
                )
                .map_err(e)?;
                self.linear(&att, &layer.o, &o, n)?;
                g.add_inplace(p(&x), p(&o), n * h).map_err(e)?;
                g.rmsnorm(p(&x), p(&layer.post_norm), p(&a), n, h, eps).map_err(e)?;
                match &layer.ffn {
                    Ffn::Dense { gate, up, down } => {
                        let y = self.mlp(&a, n, gate, up, down)?;
                        g.add_inplace(p(&x), p(&y), n * h).map_err(e)?;
                    }
                    Ffn::Moe { router, experts } => {
                        let y = self.moe(&a, n, router, experts)?;
                        g.add_inplace(p(&x), p(&y), n * h).map_err(e)?;
                    }
                }
            }
            let rows: Vec<usize> = match batch.logits {
                LogitsSelection::All => (0..n).collect(),
                LogitsSelection::LastPerSeq => batch
                    .seqs
                    .iter()
                    .scan(0usize, |end, s| {
                        *end += s.len;
                        Some(*end - 1)
                    })
                    .collect(),
            };
            let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
            let d_idx = g.upload(&idx).map_err(e)?;
            let sel = g.alloc::<f32>(rows.len() * h).map_err(e)?;
            g.gather_rows(p(&x), g.ptr(&d_idx), p(&sel), rows.len(), h).map_err(e)?;
            g.rmsnorm(p(&sel), p(&self.norm), p(&sel), rows.len(), h, cfg.rms_norm_eps as f32).map_err(e)?;
            let head = self.lm_head.as_ref().unwrap_or(&self.embed);
            let logits = g.alloc::<f32>(rows.len() * cfg.vocab_size).map_err(e)?;
            self.linear(&sel, head, &logits, rows.len())?;
            let data = g.download(&logits).map_err(e)?;
            if data.iter().any(|v| !v.is_finite()) {
                return Err(Error::Input("the GPU forward pass produced non-finite logits".into()));
            }
            Ok(Logits { rows, vocab: cfg.vocab_size, data })
        }
    }

    /// `y[t, rows] = x[t, cols] · Wᵀ` for f32 `x`, through the two-term bf16 split.
    fn linear(&self, x: &DevBuf<f32>, w: &Mat, y: &DevBuf<f32>, t: usize) -> Result<()> {
        let g = &*self.gpu;
        let e = gpu_err;
        let xs = g.alloc::<u16>(2 * t * w.cols).map_err(e)?;
        let y2 = g.alloc::<f32>(2 * t * w.rows).map_err(e)?;
        // SAFETY: `x` holds ≥ t × cols f32 and `y` ≥ t × rows f32 (callers size
        // them); `xs` and `y2` are sized for the 2t stacked rows here.
        unsafe {
            g.split_bf16(g.ptr(x), g.ptr(&xs), t * w.cols).map_err(e)?;
            g.gemm_bf16(g.ptr(&xs), g.ptr(&w.buf), g.ptr(&y2), 2 * t, w.rows, w.cols).map_err(e)?;
            g.sum_halves(g.ptr(&y2), g.ptr(y), t * w.rows).map_err(e)
        }
    }

    /// Dense SwiGLU MLP of `n` rows of `a` (f32); returns `[n, hidden]`.
    fn mlp(&self, a: &DevBuf<f32>, n: usize, gate: &Mat, up: &Mat, down: &Mat) -> Result<DevBuf<f32>> {
        let g = &*self.gpu;
        let e = gpu_err;
        let i = gate.rows;
        let (gb, ub, act) =
            (g.alloc::<f32>(n * i).map_err(e)?, g.alloc::<f32>(n * i).map_err(e)?, g.alloc::<f32>(n * i).map_err(e)?);
        let y = g.alloc::<f32>(n * down.rows).map_err(e)?;
        self.linear(a, gate, &gb, n)?;
        self.linear(a, up, &ub, n)?;
        // SAFETY: buffers sized for n rows of the intermediate width.
        unsafe { g.silu_mul(g.ptr(&gb), g.ptr(&ub), g.ptr(&act), n * i) }.map_err(e)?;
        self.linear(&act, down, &y, n)?;
        Ok(y)
    }

    /// The routed experts of `n` rows of `a`; returns `[n, hidden]`.
    fn moe(&self, a: &DevBuf<f32>, n: usize, router: &Mat, experts: &[[Mat; 3]]) -> Result<DevBuf<f32>> {
        let g = &*self.gpu;
        let e = gpu_err;
        let cfg = &self.cfg;
        let (h, k, ne) = (cfg.hidden_size, cfg.num_experts_per_tok, cfg.num_experts);
        let logits = g.alloc::<f32>(n * ne).map_err(e)?;
        let (ids, wts) = (g.alloc::<i32>(n * k).map_err(e)?, g.alloc::<f32>(n * k).map_err(e)?);
        self.linear(a, router, &logits, n)?;
        // SAFETY: buffers sized for n rows.
        unsafe {
            g.router_topk(g.ptr(&logits), n, ne, k, cfg.norm_topk_prob, g.ptr(&ids), g.ptr(&wts)).map_err(e)?;
        }
        let ids_h = g.download(&ids).map_err(e)?;
        let w_h = g.download(&wts).map_err(e)?;
        let mut per: Vec<(Vec<i32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); ne];
        for (slot, (&ex, &w)) in ids_h.iter().zip(&w_h).enumerate() {
            per[ex as usize].0.push((slot / k) as i32);
            per[ex as usize].1.push(w);
        }
        let y = g.alloc::<f32>(n * h).map_err(e)?;
        for (ex, (tok, w)) in per.iter().enumerate() {
            if tok.is_empty() {
                continue;
            }
            let m = tok.len();
            let (d_tok, d_w) = (g.upload(tok).map_err(e)?, g.upload(w).map_err(e)?);
            let xg = g.alloc::<f32>(m * h).map_err(e)?;
            // SAFETY: `tok` indexes rows of `a`; xg holds m rows.
            unsafe { g.gather_rows(g.ptr(a), g.ptr(&d_tok), g.ptr(&xg), m, h) }.map_err(e)?;
            let [gate, up, down] = &experts[ex];
            let out = self.mlp(&xg, m, gate, up, down)?;
            // SAFETY: `out` holds m rows; `tok` is distinct within one expert.
            unsafe { g.scatter_add_weighted(g.ptr(&out), g.ptr(&d_tok), g.ptr(&d_w), g.ptr(&y), m, h) }.map_err(e)?;
        }
        Ok(y)
    }
}

/// Uploads a float tensor as bf16 (converting f16/f32 on the host).
fn upload_bf16(gpu: &Gpu, t: &HostTensor) -> Result<DevBuf<u16>> {
    let bits: Vec<u16> = match t.dtype() {
        DType::BF16 => t.typed::<bf16>()?.iter().map(|v| v.to_bits()).collect(),
        _ => t.to_f32_vec()?.into_iter().map(|v| bf16::from_f32(v).to_bits()).collect(),
    };
    gpu.upload(&bits).map_err(gpu_err)
}
