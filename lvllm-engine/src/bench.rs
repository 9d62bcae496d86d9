//! `Engine::bench`: prefill and decode throughput of the loaded model, with the
//! bandwidth-bound limit of DESIGN.md's performance model next to every decode
//! figure.
//!
//! The limit is `batch / (host_bytes / cpu_bw + device_bytes / gpu_bw)` per
//! step, where the bytes are what one step reads (weights as stored, int4
//! scales included; the experts a batch touches under uniform routing; the KV
//! cache), `cpu_bw` is measured by the project's probe on the engine's own pool
//! (same threads, same binding) and `gpu_bw` by device-to-device copies. With
//! CPU MoE layers the report adds the isolated handoff cost (empty CPU work,
//! eager and in a CUDA graph) and what the host spent per layer computing
//! experts and waiting for the GPU.
//!
//! The bench drives the model directly with synthetic token ids (no sampling,
//! no tokenizer), so it measures the forward passes alone.

use std::fmt;
use std::time::Instant;

use lvllm_models::{ForwardBatch, LogitsSelection, SeqSpan, WeightTraffic};

use crate::engine::{Backend, Engine};
use crate::{Error, Result};

/// What to measure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchOptions {
    /// Decode batch sizes.
    pub batch_sizes: Vec<usize>,
    /// Prompt tokens of each sequence before decoding starts.
    pub input_len: usize,
    /// Decode steps timed per batch size.
    pub output_len: usize,
    /// Single-sequence prefill lengths to time.
    pub prefill_lens: Vec<usize>,
    /// Bytes for the CPU bandwidth probe (`0`: skip the probe).
    pub probe_bytes: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            batch_sizes: vec![1],
            input_len: 64,
            output_len: 32,
            prefill_lens: Vec::new(),
            probe_bytes: 1 << 30,
        }
    }
}

/// One decode measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeRow {
    /// Sequences decoded together.
    pub batch: usize,
    /// Generated tokens per second (all sequences).
    pub tokens_per_sec: f64,
    /// Milliseconds per step.
    pub ms_per_step: f64,
    /// Bytes one step reads from host memory.
    pub host_bytes: f64,
    /// Bytes one step reads from device memory.
    pub device_bytes: f64,
    /// The bandwidth-bound limit in tokens/s.
    pub bound: f64,
    /// Host µs per CPU MoE layer computing experts (hybrid decode).
    pub cpu_compute_us: Option<f64>,
    /// Host µs per CPU MoE layer waiting for the GPU (hybrid decode).
    pub cpu_wait_us: Option<f64>,
}

impl DecodeRow {
    /// Achieved ÷ bound.
    pub fn ratio(&self) -> f64 {
        self.tokens_per_sec / self.bound
    }
}

/// One prefill measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefillRow {
    /// Prompt tokens.
    pub tokens: usize,
    /// Tokens per second.
    pub tokens_per_sec: f64,
    /// Seconds.
    pub secs: f64,
}

/// The handoff measured alone: µs per layer it adds, with the host answering
/// at once or after a simulated expert computation, for each way to signal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HandoffFigure {
    /// Kernel-polled flags (the engine's choice), inside a captured CUDA graph.
    pub graph_us: f64,
    /// The same, launched eagerly.
    pub eager_us: f64,
    /// Kernel-polled flags in a graph, the host answering after [`HANDOFF_CPU_US`].
    pub graph_after_cpu_us: f64,
    /// Stream memory operations in a graph.
    pub memops_us: f64,
    /// Stream memory operations in a graph, the host answering after [`HANDOFF_CPU_US`].
    pub memops_after_cpu_us: f64,
    /// µs per layer of the baseline (the router and add+norm kernels per layer).
    pub base_us: f64,
}

/// The simulated expert time (µs) of the handoff figures "after a CPU task".
pub const HANDOFF_CPU_US: u64 = 500;

/// What [`Engine::bench`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// Where things ran, in words.
    pub setup: String,
    /// CPU bandwidth (GB/s) measured on the engine's pool, when probed.
    pub cpu_gb_per_s: Option<f64>,
    /// GPU bandwidth (GB/s), on the CUDA device.
    pub gpu_gb_per_s: Option<f64>,
    /// MoE layers whose experts the CPU computes.
    pub cpu_moe_layers: usize,
    /// The handoff alone, with CPU MoE layers on a GPU.
    pub handoff: Option<HandoffFigure>,
    /// Decode rows.
    pub decode: Vec<DecodeRow>,
    /// Prefill rows.
    pub prefill: Vec<PrefillRow>,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# {}", self.setup)?;
        let bw = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} GB/s"));
        writeln!(
            f,
            "# CPU bandwidth {} (probe, same pool); GPU bandwidth {}",
            bw(self.cpu_gb_per_s),
            bw(self.gpu_gb_per_s)
        )?;
        if let Some(h) = &self.handoff {
            writeln!(
                f,
                "# handoff alone (empty CPU work): {:.1} µs/layer in a CUDA graph, {:.1} µs/layer eager (baseline {:.1} µs/layer)",
                h.graph_us, h.eager_us, h.base_us
            )?;
            writeln!(
                f,
                "# handoff after a {HANDOFF_CPU_US} µs CPU task, in a graph: {:.1} µs/layer with kernel-polled flags (used), {:.1} with stream memory ops ({:.1} when the host answers at once)",
                h.graph_after_cpu_us, h.memops_after_cpu_us, h.memops_us
            )?;
        }
        if !self.decode.is_empty() {
            writeln!(f, "| batch | decode tok/s | ms/step | host GB/step | device GB/step | bandwidth-bound tok/s | ratio | CPU expert µs/layer | CPU wait µs/layer |")?;
            writeln!(f, "|---|---|---|---|---|---|---|---|---|")?;
            let us = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
            for r in &self.decode {
                writeln!(
                    f,
                    "| {} | {:.1} | {:.2} | {:.3} | {:.3} | {:.1} | {:.1}% | {} | {} |",
                    r.batch,
                    r.tokens_per_sec,
                    r.ms_per_step,
                    r.host_bytes / 1e9,
                    r.device_bytes / 1e9,
                    r.bound,
                    100.0 * r.ratio(),
                    us(r.cpu_compute_us),
                    us(r.cpu_wait_us)
                )?;
            }
        }
        for p in &self.prefill {
            writeln!(f, "# prefill {} tokens: {:.0} tok/s ({:.2} s)", p.tokens, p.tokens_per_sec, p.secs)?;
        }
        Ok(())
    }
}

impl Engine {
    /// Measures decode (per batch size, after `input_len` prompt tokens per
    /// sequence) and prefill throughput on this engine's model. Needs the engine
    /// idle: it holds the model for the whole run.
    pub fn bench(&self, opts: &BenchOptions) -> Result<BenchReport> {
        if opts.batch_sizes.contains(&0) || opts.output_len == 0 || opts.input_len == 0 {
            return Err(Error::Config("bench batch sizes, input and output lengths must be at least 1".into()));
        }
        let block_size = self.block_size();
        let max_batch = opts.batch_sizes.iter().copied().max().unwrap_or(0);
        let decode_len = opts.input_len + opts.output_len + 1;
        let longest = opts.prefill_lens.iter().copied().max().unwrap_or(0).max(decode_len);
        if longest > self.max_model_len() {
            return Err(Error::Config(format!(
                "bench sequences of {longest} tokens exceed max_model_len {}",
                self.max_model_len()
            )));
        }
        let mut runner = self.lock_runner();
        let runner = &mut *runner;
        let per_seq = decode_len.div_ceil(block_size);
        let need = (max_batch * per_seq).max(longest.div_ceil(block_size));
        let blocks = runner.blocks.allocate(need).ok_or_else(|| {
            Error::Config(format!(
                "bench needs {need} KV blocks ({max_batch} sequences of {decode_len} tokens) but {} are free: lower the batch or lengths, or raise the KV cache",
                runner.blocks.num_free()
            ))
        })?;
        let result = bench_on(&mut runner.backend, runner.pool.as_deref(), opts, &blocks, per_seq, self.vocab_size());
        runner.blocks.release(&blocks);
        let mut report = result?;
        let on = describe(&runner.backend, runner.pool.as_deref());
        report.setup = format!("{} on {on}; {}", self.model_name(), report.setup);
        Ok(report)
    }
}

fn describe(backend: &Backend, pool: Option<&lvllm_numa::Pool>) -> String {
    let threads = pool.map_or(String::new(), |p| format!(", {} CPU expert threads", p.num_threads()));
    match backend {
        Backend::Cpu { .. } => format!("the CPU{threads}"),
        #[cfg(feature = "cuda")]
        Backend::Cuda(m) => match m.handoff_mode() {
            Some(mode) => format!("{:?}, hybrid: routed experts on the CPU{threads}, handoff by {mode}", m.gpu()),
            None => {
                format!("{:?}, all experts in VRAM, {}", m.gpu(), if m.uses_graphs() { "CUDA graphs" } else { "eager" })
            }
        },
    }
}

fn traffic_of(backend: &Backend) -> WeightTraffic {
    match backend {
        Backend::Cpu { model, .. } => model.weight_traffic(),
        #[cfg(feature = "cuda")]
        Backend::Cuda(m) => m.weight_traffic(),
    }
}

/// (mapped layers, compute µs, wait µs) of a hybrid GPU model.
fn handoff_counters(backend: &Backend) -> Option<(u64, f64, f64)> {
    match backend {
        Backend::Cpu { .. } => None,
        #[cfg(feature = "cuda")]
        Backend::Cuda(m) => {
            let s = m.handoff_stats();
            m.is_hybrid().then_some((s.mapped_layers, s.compute_us, s.wait_us))
        }
    }
}

fn bench_on(
    backend: &mut Backend,
    pool: Option<&lvllm_numa::Pool>,
    opts: &BenchOptions,
    blocks: &[u32],
    per_seq: usize,
    vocab: usize,
) -> Result<BenchReport> {
    let traffic = traffic_of(backend);
    let cpu_moe_layers = traffic.moe_layers.iter().filter(|m| m.on_host).count();
    let needs_cpu_bw = traffic.host_fixed > 0 || cpu_moe_layers > 0;
    let cpu_gb_per_s = match pool {
        Some(p) if needs_cpu_bw && opts.probe_bytes > 0 => Some(
            lvllm_numa::bandwidth::probe(p, opts.probe_bytes, 5)
                .map_err(|e| Error::Config(format!("CPU bandwidth probe: {e}")))?
                .gb_per_s,
        ),
        _ => None,
    };
    let (gpu_gb_per_s, handoff, kv_on_device) = gpu_figures(backend, cpu_moe_layers)?;
    let kv_bytes_per_token = kv_bytes_per_token(backend);
    let cpu_bw = cpu_gb_per_s.map_or(f64::NAN, |g| g * 1e9);
    let gpu_bw = gpu_gb_per_s.map_or(f64::NAN, |g| g * 1e9);
    let token = |i: usize| (1000 + (i * 7919) % vocab.saturating_sub(1000).max(1)) as u32 % vocab as u32;

    let mut decode = Vec::new();
    for &batch in &opts.batch_sizes {
        let tables: Vec<&[u32]> = (0..batch).map(|s| &blocks[s * per_seq..(s + 1) * per_seq]).collect();
        // Prompts, all sequences in one batch.
        let n = opts.input_len;
        let tokens: Vec<u32> = (0..batch * n).map(token).collect();
        let positions: Vec<usize> = (0..batch).flat_map(|_| 0..n).collect();
        let seqs: Vec<SeqSpan> = tables.iter().map(|t| SeqSpan { len: n, block_table: t, state_slot: None }).collect();
        let logits = backend.forward(&ForwardBatch {
            tokens: &tokens,
            positions: &positions,
            seqs: &seqs,
            logits: LogitsSelection::LastPerSeq,
        })?;
        let mut next: Vec<u32> = (0..batch).map(|r| crate::sampling::argmax(logits.row(r))).collect();
        let step = |backend: &mut Backend, pos: usize, next: &mut Vec<u32>| -> Result<()> {
            let positions = vec![pos; batch];
            let seqs: Vec<SeqSpan> =
                tables.iter().map(|t| SeqSpan { len: 1, block_table: t, state_slot: None }).collect();
            let l = backend.forward(&ForwardBatch {
                tokens: next,
                positions: &positions,
                seqs: &seqs,
                logits: LogitsSelection::LastPerSeq,
            })?;
            *next = (0..batch).map(|r| crate::sampling::argmax(l.row(r))).collect();
            Ok(())
        };
        // One warm-up step (captures the CUDA graph of this batch size).
        step(backend, n, &mut next)?;
        let before = handoff_counters(backend);
        let t0 = Instant::now();
        for s in 1..opts.output_len {
            step(backend, n + s, &mut next)?;
        }
        let steps = opts.output_len.saturating_sub(1).max(1);
        let secs = t0.elapsed().as_secs_f64();
        let after = handoff_counters(backend);
        let (cpu_compute_us, cpu_wait_us) = match (before, after) {
            (Some((n0, c0, w0)), Some((n1, c1, w1))) if n1 > n0 => {
                let d = (n1 - n0) as f64;
                (Some((c1 * n1 as f64 - c0 * n0 as f64) / d), Some((w1 * n1 as f64 - w0 * n0 as f64) / d))
            }
            _ => (None, None),
        };
        let (mut host, mut dev) = traffic.step_bytes(batch);
        let kv = (batch * (n + opts.output_len / 2) * kv_bytes_per_token) as f64;
        if kv_on_device {
            dev += kv;
        } else {
            host += kv;
        }
        let part = |bytes: f64, bw: f64| if bytes > 0.0 { bytes / bw } else { 0.0 };
        let t_bound = part(host, cpu_bw) + part(dev, gpu_bw);
        let tps = (steps * batch) as f64 / secs;
        decode.push(DecodeRow {
            batch,
            tokens_per_sec: tps,
            ms_per_step: secs / steps as f64 * 1e3,
            host_bytes: host,
            device_bytes: dev,
            bound: batch as f64 / t_bound,
            cpu_compute_us,
            cpu_wait_us,
        });
    }
    let mut prefill = Vec::new();
    for &len in &opts.prefill_lens {
        let tokens: Vec<u32> = (0..len).map(token).collect();
        let positions: Vec<usize> = (0..len).collect();
        let seqs = [SeqSpan { len, block_table: blocks, state_slot: None }];
        let t0 = Instant::now();
        backend.forward(&ForwardBatch {
            tokens: &tokens,
            positions: &positions,
            seqs: &seqs,
            logits: LogitsSelection::LastPerSeq,
        })?;
        let secs = t0.elapsed().as_secs_f64();
        prefill.push(PrefillRow { tokens: len, tokens_per_sec: len as f64 / secs, secs });
    }
    Ok(BenchReport {
        setup: format!("input {} tokens, {} decode steps", opts.input_len, opts.output_len),
        cpu_gb_per_s,
        gpu_gb_per_s,
        cpu_moe_layers,
        handoff,
        decode,
        prefill,
    })
}

/// KV bytes one cached token costs per step (all layers, keys and values).
fn kv_bytes_per_token(backend: &Backend) -> usize {
    match backend {
        Backend::Cpu { model, .. } => model.kv_bytes_per_token(),
        #[cfg(feature = "cuda")]
        Backend::Cuda(m) => m.kv_bytes_per_token(),
    }
}

/// GPU bandwidth, the isolated handoff and whether the KV cache is on the device.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn gpu_figures(backend: &Backend, cpu_moe_layers: usize) -> Result<(Option<f64>, Option<HandoffFigure>, bool)> {
    match backend {
        Backend::Cpu { .. } => Ok((None, None, false)),
        #[cfg(feature = "cuda")]
        Backend::Cuda(m) => {
            let g = m.gpu();
            let dev =
                |e: lvllm_kernels_cuda::Error| Error::Device { device: crate::Device::Cuda(0), msg: e.to_string() };
            let bw = g.measure_bandwidth(1 << 30, 5).map_err(dev)?;
            let handoff = if cpu_moe_layers > 0 && m.handoff_mode().is_some_and(|s| s.starts_with("mapped")) {
                use lvllm_moe::hybrid::{measure_handoff, Signal};
                let shape = m.handoff_shape();
                let probe = |graph, signal, cpu_us| {
                    measure_handoff(g, shape, cpu_moe_layers, (20, graph), signal, cpu_us)
                        .map_err(|e| Error::Inference(lvllm_models::Error::Moe(e)))
                };
                let graph = probe(true, Signal::Kernels, 0)?;
                Some(HandoffFigure {
                    graph_us: graph.handoff_us(),
                    eager_us: probe(false, Signal::Kernels, 0)?.handoff_us(),
                    graph_after_cpu_us: probe(true, Signal::Kernels, HANDOFF_CPU_US)?.handoff_us(),
                    memops_us: probe(true, Signal::StreamMemOps, 0)?.handoff_us(),
                    memops_after_cpu_us: probe(true, Signal::StreamMemOps, HANDOFF_CPU_US)?.handoff_us(),
                    base_us: graph.base_us,
                })
            } else {
                None
            };
            Ok((Some(bw), handoff, true))
        }
    }
}
