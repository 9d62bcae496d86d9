//! The CPU↔GPU handoff of a hybrid MoE layer (feature `cuda`).
//!
//! The GPU computes the router and its top-k, then, per MoE layer whose experts
//! live on the CPU:
//!
//! 1. `router_topk_handoff` (the router's softmax top-k, fused with the copy)
//!    writes the expert ids and weights and the normed hidden states into a
//!    pinned, device-mapped host region ([`Handoff`]) and clears the `done` flag;
//! 2. `cuStreamWriteValue32` rings the doorbell with the layer's tag (it fences
//!    the stream's earlier writes, so the data is visible before the tag);
//! 3. `cuStreamWaitValue32` holds the stream until `done == tag`;
//! 4. after it, `add_from_host` adds the CPU's weighted expert sum, read straight
//!    from the mapped region, to the residual.
//!
//! On the host, [`Handoff::serve`] spins on the doorbell, clears it, runs
//! [`CpuExperts::forward`] on the pool from and into the mapped region, and
//! writes `done = tag` (release). All four GPU steps are ordinary stream work, so
//! a decode step with its handoffs is captured once as a CUDA graph and
//! replayed; the host thread that launched the graph then serves the layers in
//! order. Tags are constants (decoder layer index + 1), which is what a graph can
//! hold; `done` is cleared by the GPU before each doorbell, so a stale tag from
//! the previous step can never release a wait early.
//!
//! The host never waits forever: while spinning it polls the stream, and a
//! stream that failed or went idle without ringing is an error. When the experts
//! fail, the layer is still completed (zero output) so the GPU is never left
//! waiting, and the error is returned.
//!
//! [`measure_handoff`] times the handoff alone (empty CPU work), eager and
//! inside a captured graph.

use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use lvllm_kernels_cuda::{Gpu, MappedHost};

use crate::{CpuExperts, Error, Result, TopK};

fn gpu_err(e: lvllm_kernels_cuda::Error) -> Error {
    Error::Gpu(e.to_string())
}

const DOORBELL: usize = 0;
const DONE: usize = 64;
const N_TOKENS: usize = 128;
const DATA: usize = 192;

/// The mapped region of one model's hybrid MoE layers (one handoff in flight at
/// a time: layers run in order on one stream).
#[derive(Debug)]
pub struct Handoff {
    mem: MappedHost,
    hidden: usize,
    k: usize,
    max_tokens: usize,
    ids_off: usize,
    w_off: usize,
    out_off: usize,
}

/// Host-side time of one served layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServeTiming {
    /// Spinning until the doorbell rang (the GPU's work before the handoff).
    pub wait: Duration,
    /// Reading the inputs, the experts and writing the result.
    pub compute: Duration,
}

fn align64(n: usize) -> usize {
    n.div_ceil(64) * 64
}

impl Handoff {
    /// A region for up to `max_tokens` tokens of width `hidden` with `k` experts
    /// each, after checking that this device runs stream memory operations on
    /// mapped memory (a write is enqueued and read back).
    pub fn new(gpu: &Gpu, hidden: usize, k: usize, max_tokens: usize) -> Result<Self> {
        let ids_off = DATA + align64(max_tokens * hidden * 4);
        let w_off = ids_off + align64(max_tokens * k * 4);
        let out_off = w_off + align64(max_tokens * k * 4);
        let bytes = out_off + align64(max_tokens * hidden * 4);
        let mem = gpu.alloc_mapped(bytes).map_err(gpu_err)?;
        let h = Handoff { mem, hidden, k, max_tokens, ids_off, w_off, out_off };
        // SAFETY: DONE is a 4-byte aligned word of the mapped region.
        unsafe { gpu.write_value32(h.dev(DONE), 0x5eed) }.map_err(gpu_err)?;
        gpu.synchronize().map_err(gpu_err)?;
        if h.flag(DONE).load(Ordering::Acquire) != 0x5eed {
            return Err(Error::Gpu("a stream memory write to mapped host memory did not arrive".into()));
        }
        h.flag(DONE).store(0, Ordering::Release);
        Ok(h)
    }

    fn dev(&self, off: usize) -> u64 {
        self.mem.dev_ptr() + off as u64
    }

    fn flag(&self, off: usize) -> &AtomicU32 {
        // SAFETY: `off` is one of the 64-byte aligned flag words inside the
        // region, which lives as long as `self`; AtomicU32 has u32's layout and
        // the GPU only writes whole aligned words.
        unsafe { &*(self.mem.host_ptr().add(off) as *const AtomicU32) }
    }

    /// Most tokens one handoff carries.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Device address of the CPU's result, `[n, hidden]` f32, valid after the
    /// wait that [`Handoff::enqueue`] queued.
    pub fn out_dev_ptr(&self) -> u64 {
        self.dev(self.out_off)
    }

    /// GPU side: queues the router's top-k over `logits` fused with the copy of
    /// `a` into the region, the doorbell `tag` and the wait for `done == tag`.
    ///
    /// # Safety
    /// `a` holds `n × hidden` f32 and `logits` `n × n_experts` f32 on this GPU;
    /// `tag` is non-zero; a host thread will [`Handoff::serve`] this tag after the
    /// stream reaches it.
    pub unsafe fn enqueue(
        &self,
        gpu: &Gpu,
        tag: u32,
        a: u64,
        logits: u64,
        (n, n_experts, renormalize): (usize, usize, bool),
    ) -> Result<()> {
        if n > self.max_tokens || tag == 0 {
            return Err(Error::Input(format!("handoff of {n} tokens with tag {tag} (max {})", self.max_tokens)));
        }
        let dst = [self.dev(self.ids_off), self.dev(self.w_off), self.dev(DATA)];
        // SAFETY: the destinations hold max_tokens ≥ n rows; the flags are
        // aligned words of the region; the caller guarantees the sources.
        unsafe {
            gpu.router_topk_handoff(
                logits,
                a,
                (n, n_experts, self.k, renormalize),
                self.hidden,
                dst,
                self.dev(DONE),
                self.dev(N_TOKENS),
            )
            .map_err(gpu_err)?;
            gpu.write_value32(self.dev(DOORBELL), tag).map_err(gpu_err)?;
            gpu.wait_value32(self.dev(DONE), tag).map_err(gpu_err)
        }
    }

    /// Host side: waits for the doorbell `tag`, computes the routed experts
    /// (`None`: no work, for measuring the handoff alone) and releases the GPU.
    /// `gpu_busy` is polled while spinning (false = the stream went idle without
    /// ringing; an error = the stream failed).
    pub fn serve(
        &self,
        tag: u32,
        experts: Option<&CpuExperts>,
        gpu_busy: &mut dyn FnMut() -> Result<bool>,
    ) -> Result<ServeTiming> {
        let t0 = Instant::now();
        let bell = self.flag(DOORBELL);
        let mut spins = 0u32;
        loop {
            let v = bell.load(Ordering::Acquire);
            if v == tag {
                break;
            }
            if v != 0 {
                return Err(Error::Gpu(format!("handoff doorbell rang {v} while the host expected {tag}")));
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1 << 14) && !gpu_busy()? {
                // The stream may have rung just before it went idle.
                if bell.load(Ordering::Acquire) != tag {
                    return Err(Error::Gpu(format!("the GPU stream finished without ringing handoff {tag}")));
                }
            }
            std::hint::spin_loop();
        }
        bell.store(0, Ordering::Relaxed);
        let t1 = Instant::now();
        let result = match experts {
            Some(ex) => self.compute(ex),
            None => Ok(()),
        };
        if result.is_err() {
            let n = self.tokens().min(self.max_tokens);
            // SAFETY: the GPU reads `out` only after `done`; see `compute`.
            unsafe { std::ptr::write_bytes(self.mem.host_ptr().add(self.out_off) as *mut f32, 0, n * self.hidden) };
        }
        fence(Ordering::Release);
        self.flag(DONE).store(tag, Ordering::Release);
        result.map(|()| ServeTiming { wait: t1 - t0, compute: t1.elapsed() })
    }

    fn tokens(&self) -> usize {
        // SAFETY: N_TOKENS is an aligned u32 of the region.
        unsafe { std::ptr::read_volatile(self.mem.host_ptr().add(N_TOKENS) as *const u32) as usize }
    }

    fn compute(&self, experts: &CpuExperts) -> Result<()> {
        let n = self.tokens();
        if n > self.max_tokens {
            return Err(Error::Gpu(format!("handoff of {n} tokens exceeds the region's {}", self.max_tokens)));
        }
        let (h, k) = (self.hidden, self.k);
        let base = self.mem.host_ptr();
        // SAFETY: between the doorbell and `done` the GPU neither reads nor writes
        // these ranges (it wrote the inputs before ringing and reads `out` after
        // the wait), so for this call the host has exclusive access; each range
        // lies inside the region, is 64-byte aligned and sized for max_tokens ≥ n.
        let (hidden, ids, weights, out) = unsafe {
            (
                std::slice::from_raw_parts(base.add(DATA) as *const f32, n * h),
                std::slice::from_raw_parts(base.add(self.ids_off) as *const u32, n * k),
                std::slice::from_raw_parts(base.add(self.w_off) as *const f32, n * k),
                std::slice::from_raw_parts_mut(base.add(self.out_off) as *mut f32, n * h),
            )
        };
        let topk = TopK { k, ids: ids.to_vec(), weights: weights.to_vec() };
        experts.forward(hidden, &topk, out)
    }
}

/// The handoff measured alone (empty CPU work).
#[derive(Debug, Clone, Copy)]
pub struct HandoffProbe {
    /// Layers per step.
    pub layers: usize,
    /// µs per layer of the baseline step (the router's top-k kernel alone).
    pub base_us: f64,
    /// µs per layer with the handoff instead (top-k fused with the copy to the
    /// host, doorbell, wait, add of the host's result).
    pub with_handoff_us: f64,
    /// Whether the steps ran as CUDA graphs.
    pub graph: bool,
}

impl HandoffProbe {
    /// µs the handoff adds per layer.
    pub fn handoff_us(&self) -> f64 {
        self.with_handoff_us - self.base_us
    }
}

/// Times `layers` handoffs of one token of width `hidden` routed to `k` of
/// `n_experts`, with the host serving each at once (no expert work), against the
/// same step with only the router's top-k kernel per layer (what an all-GPU
/// layer runs in its place); best of `reps` steps, eager or as a captured graph.
pub fn measure_handoff(
    gpu: &Gpu,
    (hidden, n_experts, k): (usize, usize, usize),
    layers: usize,
    reps: usize,
    graph: bool,
) -> Result<HandoffProbe> {
    let hf = Handoff::new(gpu, hidden, k, 1)?;
    let x = gpu.alloc::<f32>(hidden).map_err(gpu_err)?;
    let a = gpu.alloc::<f32>(hidden).map_err(gpu_err)?;
    let logits = gpu.alloc::<f32>(n_experts).map_err(gpu_err)?;
    let topi = gpu.alloc::<i32>(k).map_err(gpu_err)?;
    let topw = gpu.alloc::<f32>(k).map_err(gpu_err)?;
    let (px, pa, pl) = (gpu.ptr(&x), gpu.ptr(&a), gpu.ptr(&logits));
    let mut busy = || gpu.stream_busy().map_err(gpu_err);
    let mut time = |with: bool| -> Result<f64> {
        let enqueue = |serve: bool, busy: &mut dyn FnMut() -> Result<bool>| -> Result<()> {
            for l in 0..layers {
                // SAFETY: all buffers hold `hidden` (or `k`) values; the tag is
                // served below (inline when eager, after launch for a graph).
                unsafe {
                    if with {
                        hf.enqueue(gpu, l as u32 + 1, pa, pl, (1, n_experts, true))?;
                        if serve {
                            hf.serve(l as u32 + 1, None, busy)?;
                        }
                        gpu.add_from_host(px, hf.out_dev_ptr(), hidden).map_err(gpu_err)?;
                    } else {
                        gpu.router_topk(pl, 1, n_experts, k, true, gpu.ptr(&topi), gpu.ptr(&topw)).map_err(gpu_err)?;
                    }
                }
            }
            Ok(())
        };
        let captured = if graph {
            gpu.begin_capture().map_err(gpu_err)?;
            let r = enqueue(false, &mut busy);
            let g = gpu.end_capture().map_err(gpu_err);
            r?;
            Some(g?)
        } else {
            None
        };
        let mut best = f64::INFINITY;
        for _ in 0..reps.max(1) + 1 {
            let t0 = Instant::now();
            match &captured {
                Some(g) => {
                    g.launch().map_err(|e| Error::Gpu(format!("graph launch: {e:?}")))?;
                    if with {
                        for l in 0..layers {
                            hf.serve(l as u32 + 1, None, &mut busy)?;
                        }
                    }
                }
                None => enqueue(true, &mut busy)?,
            }
            gpu.synchronize().map_err(gpu_err)?;
            best = best.min(t0.elapsed().as_secs_f64());
        }
        Ok(best * 1e6 / layers as f64)
    };
    let base_us = time(false)?;
    let with_handoff_us = time(true)?;
    Ok(HandoffProbe { layers, base_us, with_handoff_us, graph })
}
