//! Qwen3-MoE entirely on one GPU (`moe-placement: gpu`), eager.
//!
//! Same math as [`crate::qwen3_moe`], with the residual stream in f32. cuBLAS
//! multiplies bf16 by bf16 only, so each f32 activation enters a matrix product as
//! two bf16 terms (`hi = bf16(x)`, `lo = bf16(x − hi)`) stacked as extra rows of
//! one GEMM and summed after: ~16 mantissa bits of the activation, while the
//! weights are still read once (decode is bound by that read, not by the doubled
//! arithmetic). The KV cache is paged on the device with the same block tables as
//! the CPU path.
//!
//! Two paths:
//! - **prefill / large batches** (eager): cuBLAS GEMMs; routed experts grouped on
//!   the host (the router's ids come back) and run as one GEMM triple per expert;
//! - **decode** (every sequence one token, at most `GEMV_MAX_T` of them): f32 ×
//!   bf16 GEMV kernels, routed experts straight from the device-side top-k ids
//!   (`moe_gemv_bf16`), static buffers, no host round trip — so the whole step is
//!   captured once per batch size as a CUDA graph and replayed.

use std::sync::Arc;

use half::bf16;
use lvllm_kernels_cuda::{DevBuf, Gpu};
use lvllm_tensor::{DType, HostTensor};

use crate::cache::Logits;
use crate::config::Qwen3MoeConfig;
use crate::rope::Rope;
use crate::safetensors::WeightSource;
use crate::{Error, ForwardBatch, Result};

fn gpu_err(e: lvllm_kernels_cuda::Error) -> Error {
    Error::Input(format!("CUDA: {e}"))
}

/// How many KV blocks a GPU model allocates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvSizing {
    /// Exactly this many.
    Blocks(usize),
    /// As many as fit in `utilization` × total device memory after the weights
    /// and buffers (vLLM's `gpu_memory_utilization`), at most `max_blocks`.
    MemoryFraction {
        /// Fraction of the device's memory lvllm may use, in (0, 1].
        utilization: f32,
        /// Upper bound (enough for the context limit).
        max_blocks: usize,
    },
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

/// One per layer, so variant sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Ffn {
    Dense {
        gate: Mat,
        up: Mat,
        down: Mat,
    },
    /// All experts of the layer contiguous: `gate`/`up` `[E·I, H]`, `down` `[E·H, I]`.
    Moe {
        router: Mat,
        gate: Mat,
        up: Mat,
        down: Mat,
    },
    /// Hybrid: the router on the GPU, the routed experts on the CPU.
    CpuMoe {
        router: Mat,
        experts: lvllm_moe::CpuExperts,
    },
}

/// Hybrid placement: which MoE layers keep their experts on the CPU.
#[derive(Debug, Clone)]
pub struct HybridOptions {
    /// The pool that computes CPU experts.
    pub pool: Arc<lvllm_numa::Pool>,
    /// Runtime format of CPU experts.
    pub experts: lvllm_moe::ExpertsOptions,
    /// Decoder layers whose experts stay in VRAM (absolute indices).
    pub gpu_resident_layers: Vec<usize>,
}

/// Buffers of the decode path, sized for `GEMV_MAX_T` tokens at load so the
/// step can be captured as a CUDA graph.
struct Workspace {
    ids: DevBuf<u32>,
    pos: DevBuf<i32>,
    seq: DevBuf<i32>,
    slots: DevBuf<i32>,
    tables: DevBuf<i32>,
    x: DevBuf<f32>,
    a: DevBuf<f32>,
    q: DevBuf<f32>,
    k: DevBuf<f32>,
    v: DevBuf<f32>,
    att: DevBuf<f32>,
    o: DevBuf<f32>,
    rlog: DevBuf<f32>,
    topi: DevBuf<i32>,
    topw: DevBuf<f32>,
    g: DevBuf<f32>,
    u: DevBuf<f32>,
    act: DevBuf<f32>,
    y: DevBuf<f32>,
    logits: DevBuf<f32>,
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

#[derive(Debug, Default)]
struct HandoffCounters {
    /// Layers served through the mapped region (decode).
    mapped: std::sync::atomic::AtomicU64,
    /// Host ns spent waiting for doorbells.
    wait_ns: std::sync::atomic::AtomicU64,
    /// Host ns spent computing experts (mapped path).
    compute_ns: std::sync::atomic::AtomicU64,
    /// Layers handed off with synchronous copies (prefill).
    copied: std::sync::atomic::AtomicU64,
    /// ns of those copies.
    copy_ns: std::sync::atomic::AtomicU64,
}

/// What the CPU MoE layers cost so far (see [`CudaQwen3Moe::handoff_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HandoffStats {
    /// Layers served through mapped memory and stream memory operations.
    pub mapped_layers: u64,
    /// Mean host µs per mapped layer spent computing the experts.
    pub compute_us: f64,
    /// Mean host µs per mapped layer spent waiting for the GPU's doorbell.
    pub wait_us: f64,
    /// Layers handed off with synchronous copies (prefill, or no memory ops).
    pub copied_layers: u64,
    /// Mean µs of those copies per layer.
    pub copy_us: f64,
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
    ws: Workspace,
    /// The mapped region of the decode path's CPU MoE handoffs (`None`: no CPU
    /// MoE layers, or the device lacks stream memory operations).
    ring: Option<lvllm_moe::hybrid::Handoff>,
    /// Why `ring` is `None` although there are CPU MoE layers.
    ring_error: Option<String>,
    /// Counters of the CPU MoE layers served.
    handoff: HandoffCounters,
    /// Captured decode steps by batch size (`None`: graphs off).
    graphs: Option<std::sync::Mutex<std::collections::HashMap<usize, lvllm_kernels_cuda::CudaGraph>>>,
}

// SAFETY: the raw CUDA handles inside (graphs, buffers) belong to this model's
// context and stream; all use goes through `&self` methods that enqueue on that
// one stream, and graphs sit behind a Mutex.
unsafe impl Send for CudaQwen3Moe {}
// SAFETY: as above.
unsafe impl Sync for CudaQwen3Moe {}

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
        kv_sizing: KvSizing,
        cuda_graphs: bool,
        hybrid: Option<&HybridOptions>,
    ) -> Result<Self> {
        let (h, hd, nh, nkv) = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads);
        let stacked = |names: &dyn Fn(usize) -> String, count: usize, rows: usize, cols: usize| -> Result<Mat> {
            let mut buf = gpu.alloc::<u16>(count * rows * cols).map_err(gpu_err)?;
            match weights {
                GpuWeights::Checkpoint(src) => {
                    for e in 0..count {
                        let t = src.get_float(&names(e), &[rows, cols])?;
                        gpu.upload_at(&bf16_bits(&t)?, &mut buf, e * rows * cols).map_err(gpu_err)?;
                    }
                }
                GpuWeights::Dummy { seed } => {
                    let scale = 1.0 / (cols as f32).sqrt();
                    let salt = (count * rows * cols) as u32 ^ names(0).len() as u32;
                    // SAFETY: `buf` holds count × rows × cols bf16.
                    unsafe {
                        gpu.fill_random_bf16(
                            gpu.ptr(&buf),
                            count * rows * cols,
                            seed ^ salt.wrapping_mul(0x85eb_ca6b),
                            scale,
                        )
                    }
                    .map_err(gpu_err)?;
                }
            }
            Ok(Mat { buf, rows: count * rows, cols })
        };
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
                let ne = cfg.num_experts;
                if let Some(hy) = hybrid.filter(|hy| !hy.gpu_resident_layers.contains(&l)) {
                    let experts = match weights {
                        GpuWeights::Checkpoint(src) => {
                            let ex = (0..ne)
                                .map(|e| {
                                    let ep = format!("{p}.mlp.experts.{e}");
                                    Ok(lvllm_moe::ExpertWeights {
                                        gate: crate::qwen3_moe::expert_matrix(src, &format!("{ep}.gate_proj"), i, h)?,
                                        up: crate::qwen3_moe::expert_matrix(src, &format!("{ep}.up_proj"), i, h)?,
                                        down: crate::qwen3_moe::expert_matrix(src, &format!("{ep}.down_proj"), h, i)?,
                                    })
                                })
                                .collect::<Result<Vec<_>>>()?;
                            let release = lvllm_moe::ExpertWeights::release_pages;
                            lvllm_moe::CpuExperts::new(hy.pool.clone(), ex, h, i, &hy.experts, release)?
                        }
                        GpuWeights::Dummy { seed } => {
                            let format = match hy.experts.weight {
                                lvllm_moe::MoeWeight::Int4 => {
                                    lvllm_kernels_cpu::packed::WeightFormat::Int4 { group: hy.experts.int4_group }
                                }
                                _ => hy.experts.dtype,
                            };
                            let s = seed as u64 ^ (l as u64) << 32;
                            lvllm_moe::CpuExperts::dummy(
                                hy.pool.clone(),
                                ne,
                                h,
                                i,
                                format,
                                hy.experts.int8_activations,
                                s,
                            )?
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
                        ffn: Ffn::CpuMoe { router, experts },
                    });
                    continue;
                }
                let gate = stacked(&|e| format!("{p}.mlp.experts.{e}.gate_proj.weight"), ne, i, h)?;
                let up = stacked(&|e| format!("{p}.mlp.experts.{e}.up_proj.weight"), ne, i, h)?;
                let down = stacked(&|e| format!("{p}.mlp.experts.{e}.down_proj.weight"), ne, h, i)?;
                Ffn::Moe { router, gate, up, down }
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
        let mt = lvllm_kernels_cuda::GEMV_MAX_T;
        let bytes_per_block = cfg.num_hidden_layers * 2 * block_size * nkv * hd * 4 + mt * 4;
        let num_blocks = match kv_sizing {
            KvSizing::Blocks(n) => n,
            KvSizing::MemoryFraction { utilization, max_blocks } => {
                if !(utilization > 0.0 && utilization <= 1.0) {
                    return Err(Error::Config {
                        what: "gpu_memory_utilization".into(),
                        msg: format!("{utilization} must be in (0, 1]"),
                    });
                }
                let (free, total) = gpu.mem_info().map_err(gpu_err)?;
                // Keep room for the decode workspace and cuBLAS/prefill temporaries.
                const RESERVE: usize = 1 << 30;
                let allowed = (total as f64 * utilization as f64) as usize;
                let used = total - free;
                let avail = allowed.saturating_sub(used + RESERVE);
                let n = (avail / bytes_per_block).min(max_blocks);
                if n == 0 {
                    return Err(Error::Config {
                        what: "gpu_memory_utilization".into(),
                        msg: format!(
                            "{utilization} leaves no room for the KV cache: {:.1} GB of {:.1} GB are already in use",
                            used as f64 / 1e9,
                            total as f64 / 1e9
                        ),
                    });
                }
                n
            }
        };
        let slots = block_size * num_blocks * nkv * hd;
        let kv = (0..cfg.num_hidden_layers)
            .map(|_| Ok((gpu.alloc::<f32>(slots).map_err(gpu_err)?, gpu.alloc::<f32>(slots).map_err(gpu_err)?)))
            .collect::<Result<Vec<_>>>()?;
        let (k, i) = (cfg.num_experts_per_tok.max(1), cfg.moe_intermediate_size.max(cfg.intermediate_size));
        let f = |n: usize| gpu.alloc::<f32>(n).map_err(gpu_err);
        let ws = Workspace {
            ids: gpu.alloc::<u32>(mt).map_err(gpu_err)?,
            pos: gpu.alloc::<i32>(mt).map_err(gpu_err)?,
            seq: gpu.alloc::<i32>(mt).map_err(gpu_err)?,
            slots: gpu.alloc::<i32>(mt).map_err(gpu_err)?,
            tables: gpu.alloc::<i32>(mt * num_blocks).map_err(gpu_err)?,
            x: f(mt * h)?,
            a: f(mt * h)?,
            q: f(mt * nh * hd)?,
            k: f(mt * nkv * hd)?,
            v: f(mt * nkv * hd)?,
            att: f(mt * nh * hd)?,
            o: f(mt * h)?,
            rlog: f(mt * cfg.num_experts.max(1))?,
            topi: gpu.alloc::<i32>(mt * k).map_err(gpu_err)?,
            topw: f(mt * k)?,
            g: f(mt * k * i)?,
            u: f(mt * k * i)?,
            act: f(mt * k * i)?,
            y: f(mt * k * h.max(i))?,
            logits: f(mt * cfg.vocab_size)?,
        };
        gpu.synchronize().map_err(gpu_err)?;
        let hybrid = layers.iter().any(|l| matches!(l.ffn, Ffn::CpuMoe { .. }));
        let (ring, ring_error) = if hybrid {
            match lvllm_moe::hybrid::Handoff::new(&gpu, h, k, mt, lvllm_moe::hybrid::Signal::Kernels) {
                Ok(r) => (Some(r), None),
                Err(err) => (None, Some(err.to_string())),
            }
        } else {
            (None, None)
        };
        Ok(CudaQwen3Moe {
            ws,
            // Without the mapped handoff the CPU layers synchronise with the host,
            // which a graph cannot hold.
            graphs: (cuda_graphs && (!hybrid || ring.is_some()))
                .then(|| std::sync::Mutex::new(std::collections::HashMap::new())),
            ring,
            ring_error,
            handoff: Default::default(),
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

    /// What the CPU MoE layers have cost so far.
    pub fn handoff_stats(&self) -> HandoffStats {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.handoff;
        let mean = |ns: &std::sync::atomic::AtomicU64, n: u64| {
            if n == 0 {
                0.0
            } else {
                ns.load(Relaxed) as f64 / n as f64 / 1e3
            }
        };
        let (m, cp) = (c.mapped.load(Relaxed), c.copied.load(Relaxed));
        HandoffStats {
            mapped_layers: m,
            compute_us: mean(&c.compute_ns, m),
            wait_us: mean(&c.wait_ns, m),
            copied_layers: cp,
            copy_us: mean(&c.copy_ns, cp),
        }
    }

    /// How decode steps hand CPU MoE layers off: `None` for no CPU layers,
    /// else a description (mapped memory with stream memory operations, or the
    /// synchronous-copy fallback and why).
    pub fn handoff_mode(&self) -> Option<String> {
        if !self.is_hybrid() {
            return None;
        }
        Some(match (&self.ring, &self.ring_error) {
            (Some(ring), _) => format!(
                "mapped memory, {}{}",
                match ring.signal() {
                    lvllm_moe::hybrid::Signal::Kernels => "flags rung and polled by kernels",
                    lvllm_moe::hybrid::Signal::StreamMemOps => "stream memory operations",
                },
                if self.graphs.is_some() { ", CUDA graphs" } else { ", eager" }
            ),
            (None, e) => format!("synchronous copies, eager ({})", e.as_deref().unwrap_or("no mapped region")),
        })
    }

    /// Whether decode steps are captured as CUDA graphs.
    pub fn uses_graphs(&self) -> bool {
        self.graphs.is_some()
    }

    /// What one decode token reads: bf16 weights on the device, CPU experts in
    /// their packed format on the host.
    pub fn weight_traffic(&self) -> crate::WeightTraffic {
        let cfg = &self.cfg;
        let bytes = |m: &Mat| m.rows * m.cols * 2;
        let mut t = crate::WeightTraffic {
            device_fixed: bytes(self.lm_head.as_ref().unwrap_or(&self.embed)),
            ..Default::default()
        };
        for (l, layer) in self.layers.iter().enumerate() {
            t.device_fixed += bytes(&layer.q) + bytes(&layer.k) + bytes(&layer.v) + bytes(&layer.o);
            let moe = |expert_bytes, on_host| crate::MoeLayerTraffic {
                layer: l,
                n_experts: cfg.num_experts,
                top_k: cfg.num_experts_per_tok,
                expert_bytes,
                on_host,
            };
            match &layer.ffn {
                Ffn::Dense { gate, up, down } => t.device_fixed += bytes(gate) + bytes(up) + bytes(down),
                Ffn::Moe { router, gate, up, down } => {
                    t.device_fixed += bytes(router);
                    t.moe_layers.push(moe((bytes(gate) + bytes(up) + bytes(down)) / cfg.num_experts, false));
                }
                Ffn::CpuMoe { router, experts } => {
                    t.device_fixed += bytes(router);
                    t.moe_layers.push(moe(experts.expert_bytes(), true));
                }
            }
        }
        t
    }

    /// KV-cache bytes one token occupies.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.cfg.kv_bytes_per_token()
    }

    /// (hidden size, experts, experts per token) of the handoffs.
    pub fn handoff_shape(&self) -> (usize, usize, usize) {
        (self.cfg.hidden_size, self.cfg.num_experts, self.cfg.num_experts_per_tok)
    }

    /// Whether any MoE layer runs its experts on the CPU.
    pub fn is_hybrid(&self) -> bool {
        self.layers.iter().any(|l| matches!(l.ffn, Ffn::CpuMoe { .. }))
    }

    /// KV blocks allocated.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// The GPU.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Runs a batch (same contract as the CPU model), writing the device KV cache.
    pub fn forward(&self, batch: &ForwardBatch<'_>) -> Result<Logits> {
        let cfg = &self.cfg;
        let g = &*self.gpu;
        // The engine's model loop is not the thread that loaded the model.
        g.bind_to_thread().map_err(gpu_err)?;
        let n = batch.tokens.len();
        let (h, hd, nh, nkv) = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads);
        let shape = crate::CacheConfig { block_size: self.block_size, num_blocks: self.num_blocks };
        crate::validate_batch_shape(batch, shape, cfg.max_position_embeddings)?;
        if let Some(&bad) = batch.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(Error::Input(format!("token id {bad} is outside the vocabulary of {}", cfg.vocab_size)));
        }
        let e = gpu_err;
        // The decode path returns every row: take it only when every row is asked for.
        if n <= lvllm_kernels_cuda::GEMV_MAX_T && batch.seqs.iter().all(|s| s.len == 1) && batch.logit_rows().len() == n
        {
            return self.decode(batch);
        }
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
                    Ffn::CpuMoe { router, experts } => {
                        let y = g.alloc::<f32>(n * h).map_err(e)?;
                        self.cpu_moe(&a, n, router, experts, &y)?;
                        g.add_inplace(p(&x), p(&y), n * h).map_err(e)?;
                    }
                    Ffn::Moe { router, gate, up, down } => {
                        let y = self.moe(&a, n, router, [gate, up, down])?;
                        g.add_inplace(p(&x), p(&y), n * h).map_err(e)?;
                    }
                }
            }
            let rows = batch.logit_rows();
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

    /// One decode step of `n ≤ GEMV_MAX_T` sequences (one token each): metadata to
    /// the static buffers, then the captured graph for `n` (or the eager kernels).
    fn decode(&self, batch: &ForwardBatch<'_>) -> Result<Logits> {
        let g = &*self.gpu;
        let e = gpu_err;
        let n = batch.tokens.len();
        let nb = self.num_blocks;
        let mut tables = vec![0i32; n * nb];
        let (mut seq, mut slots) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for (si, s) in batch.seqs.iter().enumerate() {
            for (b, &blk) in s.block_table.iter().take(nb).enumerate() {
                tables[si * nb + b] = blk as i32;
            }
            let p = batch.positions[si];
            seq.push(si as i32);
            slots.push((s.block_table[p / self.block_size] as usize * self.block_size + p % self.block_size) as i32);
        }
        let pos: Vec<i32> = batch.positions.iter().map(|&p| p as i32).collect();
        // The metadata buffers are written only by these copies, on the model's
        // stream, so they are ordered before the step that reads them.
        let ws = &self.ws;
        // SAFETY: each buffer is this model's, sized for GEMV_MAX_T ≥ n tokens
        // (tables: GEMV_MAX_T × num_blocks), and the data fits.
        unsafe {
            g.upload_to(batch.tokens, g.ptr(&ws.ids)).map_err(e)?;
            g.upload_to(&pos, g.ptr(&ws.pos)).map_err(e)?;
            g.upload_to(&seq, g.ptr(&ws.seq)).map_err(e)?;
            g.upload_to(&slots, g.ptr(&ws.slots)).map_err(e)?;
            g.upload_to(&tables, g.ptr(&ws.tables)).map_err(e)?;
        }
        match &self.graphs {
            Some(graphs) => {
                let mut map = graphs.lock().unwrap_or_else(|p| p.into_inner());
                let graph = match map.entry(n) {
                    std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        g.begin_capture().map_err(e)?;
                        let r = self.decode_kernels(n, false);
                        let graph = g.end_capture().map_err(e);
                        r?;
                        v.insert(graph?)
                    }
                };
                graph.launch().map_err(|err| Error::Input(format!("CUDA graph launch: {err:?}")))?;
                // The graph rings one doorbell per CPU MoE layer, in order.
                let mut first_err = None;
                for (l, layer) in self.layers.iter().enumerate() {
                    if let Ffn::CpuMoe { experts, .. } = &layer.ffn {
                        match self.serve(l, experts) {
                            Ok(()) => {}
                            Err(err @ Error::Moe(lvllm_moe::Error::Gpu(_))) => return Err(err),
                            Err(err) => first_err = first_err.or(Some(err)),
                        }
                    }
                }
                if let Some(err) = first_err {
                    g.synchronize().map_err(e)?;
                    return Err(err);
                }
            }
            None => self.decode_kernels(n, true)?,
        }
        let data = g.download_n(&ws.logits, n * self.cfg.vocab_size).map_err(e)?;
        if data.iter().any(|v| !v.is_finite()) {
            return Err(Error::Input("the GPU decode step produced non-finite logits".into()));
        }
        Ok(Logits { rows: (0..n).collect(), vocab: self.cfg.vocab_size, data })
    }

    /// Serves decoder layer `l`'s CPU MoE handoff on this thread.
    fn serve(&self, l: usize, experts: &lvllm_moe::CpuExperts) -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let ring = self.ring.as_ref().ok_or_else(|| Error::Input("no handoff region".into()))?;
        let g = &*self.gpu;
        let mut busy = || g.stream_busy().map_err(|e| lvllm_moe::Error::Gpu(e.to_string()));
        let t = ring.serve(l as u32 + 1, Some(experts), &mut busy)?;
        self.handoff.mapped.fetch_add(1, Relaxed);
        self.handoff.wait_ns.fetch_add(t.wait.as_nanos() as u64, Relaxed);
        self.handoff.compute_ns.fetch_add(t.compute.as_nanos() as u64, Relaxed);
        Ok(())
    }

    /// The kernels of one decode step over the static workspace (capturable:
    /// no allocation, no host synchronisation). CPU MoE layers hand off through
    /// the mapped region; `serve_inline` serves each right after queuing it
    /// (eager), otherwise the caller serves them after launching the graph.
    fn decode_kernels(&self, n: usize, serve_inline: bool) -> Result<()> {
        let cfg = &self.cfg;
        let g = &*self.gpu;
        let e = gpu_err;
        let ws = &self.ws;
        let (h, hd, nh, nkv) = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads);
        let eps = cfg.rms_norm_eps as f32;
        let p = |b: &DevBuf<f32>| g.ptr(b);
        let gemv = |x: &DevBuf<f32>, m: &Mat, y: &DevBuf<f32>| {
            // SAFETY: workspace rows hold GEMV_MAX_T ≥ n tokens of each width.
            unsafe { g.gemv_bf16(p(x), g.ptr(&m.buf), p(y), n, m.rows, m.cols) }.map_err(e)
        };
        // SAFETY: for every launch below, the workspace buffers are sized for
        // GEMV_MAX_T ≥ n tokens (and k slots per token), the metadata buffers were
        // filled for n tokens, and the weights have the config's shapes.
        unsafe {
            g.embedding(g.ptr(&ws.ids), g.ptr(&self.embed.buf), p(&ws.x), n, h).map_err(e)?;
            // What the previous layer's FFN left to add to the residual before the
            // next norm: (buffer, whether it is mapped host memory, the host flag
            // to wait for first). Adding it is fused with that norm.
            type Pending = Option<(u64, bool, Option<(u64, u32)>)>;
            let mut pending: Pending = None;
            let norm_into_a = |pending: Pending, w: &DevBuf<f32>| match pending {
                Some((y, mapped, wait)) => g.add_rmsnorm(p(&ws.x), y, mapped, p(w), p(&ws.a), n, h, eps, wait),
                None => g.rmsnorm(p(&ws.x), p(w), p(&ws.a), n, h, eps),
            };
            for (l, layer) in self.layers.iter().enumerate() {
                let (kc, vc) = &self.kv[l];
                norm_into_a(pending.take(), &layer.in_norm).map_err(e)?;
                g.gemv3_bf16(
                    p(&ws.a),
                    n,
                    h,
                    [
                        (g.ptr(&layer.q.buf), p(&ws.q), layer.q.rows),
                        (g.ptr(&layer.k.buf), p(&ws.k), layer.k.rows),
                        (g.ptr(&layer.v.buf), p(&ws.v), layer.v.rows),
                    ],
                )
                .map_err(e)?;
                g.qk_norm_rope_kv(
                    (p(&ws.q), p(&ws.k), p(&ws.v)),
                    (p(&layer.q_norm), p(&layer.k_norm)),
                    (g.ptr(&ws.pos), p(&self.inv_freq), self.rope_scaling),
                    (p(kc), p(vc), g.ptr(&ws.slots)),
                    n,
                    (nh, nkv, hd),
                    eps,
                )
                .map_err(e)?;
                g.paged_attention(
                    p(&ws.q),
                    p(kc),
                    p(vc),
                    p(&ws.att),
                    g.ptr(&ws.pos),
                    g.ptr(&ws.seq),
                    g.ptr(&ws.tables),
                    self.num_blocks,
                    self.block_size,
                    n,
                    nh,
                    nkv,
                    hd,
                    1.0 / (hd as f32).sqrt(),
                )
                .map_err(e)?;
                g.gemv_add_rmsnorm(
                    (p(&ws.att), g.ptr(&layer.o.buf), p(&ws.o)),
                    (n, h, nh * hd),
                    p(&ws.x),
                    p(&layer.post_norm),
                    p(&ws.a),
                    eps,
                )
                .map_err(e)?;
                match &layer.ffn {
                    Ffn::Dense { gate, up, down } => {
                        let (gp, up_p) = ((g.ptr(&gate.buf), p(&ws.g), gate.rows), (g.ptr(&up.buf), p(&ws.u), up.rows));
                        g.gemv3_bf16(p(&ws.a), n, h, [gp, up_p, (0, 0, 0)]).map_err(e)?;
                        g.silu_mul(p(&ws.g), p(&ws.u), p(&ws.act), n * gate.rows).map_err(e)?;
                        gemv(&ws.act, down, &ws.o)?;
                        pending = Some((p(&ws.o), false, None));
                    }
                    Ffn::CpuMoe { router, experts } => match &self.ring {
                        Some(ring) => {
                            let (ne, rw) = (cfg.num_experts, g.ptr(&router.buf));
                            let wait = ring.enqueue(
                                g,
                                l as u32 + 1,
                                p(&ws.a),
                                (rw, p(&ws.rlog)),
                                (n, ne, cfg.norm_topk_prob),
                            )?;
                            if serve_inline {
                                self.serve(l, experts)?;
                            }
                            pending = Some((ring.out_dev_ptr(), true, wait));
                        }
                        None => {
                            self.cpu_moe(&ws.a, n, router, experts, &ws.o)?;
                            pending = Some((p(&ws.o), false, None));
                        }
                    },
                    Ffn::Moe { router, gate, up, down } => {
                        let (k, ne, i) = (cfg.num_experts_per_tok, cfg.num_experts, cfg.moe_intermediate_size);
                        g.router_fused(
                            (p(&ws.a), g.ptr(&router.buf), p(&ws.rlog)),
                            (n, ne, k, cfg.norm_topk_prob),
                            h,
                            (g.ptr(&ws.topi), p(&ws.topw)),
                            None,
                        )
                        .map_err(e)?;
                        let s = n * k;
                        g.moe_gemv_bf16(p(&ws.a), g.ptr(&gate.buf), g.ptr(&ws.topi), p(&ws.g), s, i, h, k, false)
                            .map_err(e)?;
                        g.moe_gemv_bf16(p(&ws.a), g.ptr(&up.buf), g.ptr(&ws.topi), p(&ws.u), s, i, h, k, false)
                            .map_err(e)?;
                        g.silu_mul(p(&ws.g), p(&ws.u), p(&ws.act), s * i).map_err(e)?;
                        g.moe_gemv_bf16(p(&ws.act), g.ptr(&down.buf), g.ptr(&ws.topi), p(&ws.y), s, h, i, k, true)
                            .map_err(e)?;
                        g.moe_combine_add(p(&ws.y), p(&ws.topw), p(&ws.x), n, k, h).map_err(e)?;
                    }
                }
            }
            norm_into_a(pending.take(), &self.norm).map_err(e)?;
            let head = self.lm_head.as_ref().unwrap_or(&self.embed);
            gemv(&ws.a, head, &ws.logits)?;
        }
        Ok(())
    }

    /// `y[t, rows] = x[t, cols] · Wᵀ` for f32 `x`, through the two-term bf16 split.
    fn linear(&self, x: &DevBuf<f32>, w: &Mat, y: &DevBuf<f32>, t: usize) -> Result<()> {
        self.linear_at(x, self.gpu.ptr(&w.buf), w.rows, w.cols, y, t)
    }

    /// [`Self::linear`] on a `rows × cols` bf16 matrix at device address `w`.
    fn linear_at(&self, x: &DevBuf<f32>, w: u64, rows: usize, cols: usize, y: &DevBuf<f32>, t: usize) -> Result<()> {
        let g = &*self.gpu;
        let e = gpu_err;
        let xs = g.alloc::<u16>(2 * t * cols).map_err(e)?;
        let y2 = g.alloc::<f32>(2 * t * rows).map_err(e)?;
        // SAFETY: `x` holds ≥ t × cols f32, `w` rows × cols bf16 and `y` ≥ t × rows
        // f32 (callers size them); `xs` and `y2` are sized for the 2t stacked rows.
        unsafe {
            g.split_bf16(g.ptr(x), g.ptr(&xs), t * cols).map_err(e)?;
            g.gemm_bf16(g.ptr(&xs), w, g.ptr(&y2), 2 * t, rows, cols).map_err(e)?;
            g.sum_halves(g.ptr(&y2), g.ptr(y), t * rows).map_err(e)
        }
    }

    /// Dense SwiGLU MLP of `n` rows of `a` (f32); returns `[n, hidden]`.
    fn mlp(&self, a: &DevBuf<f32>, n: usize, gate: &Mat, up: &Mat, down: &Mat) -> Result<DevBuf<f32>> {
        let g = &*self.gpu;
        self.mlp_at(a, n, [g.ptr(&gate.buf), g.ptr(&up.buf), g.ptr(&down.buf)], gate.rows, gate.cols)
    }

    /// SwiGLU MLP with `gate`/`up` (`i × h`) and `down` (`h × i`) at device addresses.
    fn mlp_at(&self, a: &DevBuf<f32>, n: usize, w: [u64; 3], i: usize, h: usize) -> Result<DevBuf<f32>> {
        let g = &*self.gpu;
        let e = gpu_err;
        let (gb, ub, act) =
            (g.alloc::<f32>(n * i).map_err(e)?, g.alloc::<f32>(n * i).map_err(e)?, g.alloc::<f32>(n * i).map_err(e)?);
        let y = g.alloc::<f32>(n * h).map_err(e)?;
        self.linear_at(a, w[0], i, h, &gb, n)?;
        self.linear_at(a, w[1], i, h, &ub, n)?;
        // SAFETY: buffers sized for n rows of the intermediate width.
        unsafe { g.silu_mul(g.ptr(&gb), g.ptr(&ub), g.ptr(&act), n * i) }.map_err(e)?;
        self.linear_at(&act, w[2], h, i, &y, n)?;
        Ok(y)
    }

    /// Hybrid MoE: router and top-k on the GPU, hidden states and routing to the
    /// host, the routed experts on the CPU pool, the result back into `y`.
    fn cpu_moe(
        &self,
        a: &DevBuf<f32>,
        n: usize,
        router: &Mat,
        experts: &lvllm_moe::CpuExperts,
        y: &DevBuf<f32>,
    ) -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let g = &*self.gpu;
        let e = gpu_err;
        let cfg = &self.cfg;
        let (h, k, ne) = (cfg.hidden_size, cfg.num_experts_per_tok, cfg.num_experts);
        let ws = &self.ws;
        let small = n <= lvllm_kernels_cuda::GEMV_MAX_T;
        let (logits, ids, wts) = if small {
            (None, None, None)
        } else {
            (
                Some(g.alloc::<f32>(n * ne).map_err(e)?),
                Some(g.alloc::<i32>(n * k).map_err(e)?),
                Some(g.alloc::<f32>(n * k).map_err(e)?),
            )
        };
        let (lg, id, wt) =
            (logits.as_ref().unwrap_or(&ws.rlog), ids.as_ref().unwrap_or(&ws.topi), wts.as_ref().unwrap_or(&ws.topw));
        if small {
            // SAFETY: workspace buffers hold GEMV_MAX_T ≥ n rows.
            unsafe { g.gemv_bf16(g.ptr(a), g.ptr(&router.buf), g.ptr(lg), n, router.rows, router.cols) }.map_err(e)?;
        } else {
            self.linear(a, router, lg, n)?;
        }
        // SAFETY: `lg` holds n × E logits, `id`/`wt` n × k.
        unsafe { g.router_topk(g.ptr(lg), n, ne, k, cfg.norm_topk_prob, g.ptr(id), g.ptr(wt)) }.map_err(e)?;
        g.synchronize().map_err(e)?;
        let t0 = std::time::Instant::now();
        let hidden = g.download_n(a, n * h).map_err(e)?;
        let ids_h = g.download_n(id, n * k).map_err(e)?;
        let w_h = g.download_n(wt, n * k).map_err(e)?;
        let copy_in = t0.elapsed();
        let topk = lvllm_moe::TopK { k, ids: ids_h.into_iter().map(|v| v as u32).collect(), weights: w_h };
        let mut out = vec![0f32; n * h];
        experts.forward(&hidden, &topk, &mut out)?;
        let t1 = std::time::Instant::now();
        // SAFETY: `y` holds ≥ n × h f32.
        unsafe { g.upload_to(&out, g.ptr(y)) }.map_err(e)?;
        let copy_out = t1.elapsed();
        self.handoff.copied.fetch_add(1, Relaxed);
        self.handoff.copy_ns.fetch_add((copy_in + copy_out).as_nanos() as u64, Relaxed);
        Ok(())
    }

    /// The routed experts of `n` rows of `a`; returns `[n, hidden]`.
    fn moe(&self, a: &DevBuf<f32>, n: usize, router: &Mat, experts: [&Mat; 3]) -> Result<DevBuf<f32>> {
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
            let i = cfg.moe_intermediate_size;
            let at = |mat: &Mat| g.ptr(&mat.buf) + (ex * mat.rows / ne * mat.cols * 2) as u64;
            let out = self.mlp_at(&xg, m, [at(experts[0]), at(experts[1]), at(experts[2])], i, h)?;
            // SAFETY: `out` holds m rows; `tok` is distinct within one expert.
            unsafe { g.scatter_add_weighted(g.ptr(&out), g.ptr(&d_tok), g.ptr(&d_w), g.ptr(&y), m, h) }.map_err(e)?;
        }
        Ok(y)
    }
}

/// A float tensor as bf16 bits (converting f16/f32 on the host).
fn bf16_bits(t: &HostTensor) -> Result<Vec<u16>> {
    Ok(match t.dtype() {
        DType::BF16 => t.typed::<bf16>()?.iter().map(|v| v.to_bits()).collect(),
        _ => t.to_f32_vec()?.into_iter().map(|v| bf16::from_f32(v).to_bits()).collect(),
    })
}

/// Uploads a float tensor as bf16.
fn upload_bf16(gpu: &Gpu, t: &HostTensor) -> Result<DevBuf<u16>> {
    gpu.upload(&bf16_bits(t)?).map_err(gpu_err)
}
