//! The CPU↔GPU handoff of a hybrid MoE layer (feature `cuda`).
//!
//! The GPU computes the router and its top-k, then, per MoE layer whose experts
//! live on the CPU:
//!
//! 1. `router_fused` (the router's logits and softmax top-k, fused with the
//!    copy) writes the expert ids and weights and the normed hidden states into
//!    a pinned, device-mapped host region ([`Handoff`]) and clears the `done`
//!    flag;
//! 2. the doorbell rings with the layer's tag, after those writes;
//! 3. the GPU waits until `done == tag`;
//! 4. then it adds the CPU's weighted expert sum, read straight from the mapped
//!    region (uncached loads), to the residual, fused with the next RMSNorm
//!    (`add_rmsnorm`).
//!
//! Two ways to signal ([`Signal`]), both plain stream work that a CUDA graph
//! captures:
//! - [`Signal::Kernels`] (the default): `router_fused`'s last block rings the
//!   doorbell itself (after a system-scope fence), and `add_rmsnorm` polls the
//!   `done` word before reading the result;
//! - [`Signal::StreamMemOps`]: `cuStreamWriteValue32` rings the doorbell and
//!   `cuStreamWaitValue32` holds the stream until `done == tag`.
//!
//! Both cost ~9 µs per layer when the host answers at once, but a stream wait
//! that has been pending for a whole expert computation (hundreds of µs) is
//! noticed late, while a polling kernel sees the flag within ~1 µs;
//! [`measure_handoff`] measures both, with and without a CPU delay.
//!
//! On the host, [`Handoff::serve`] spins on the doorbell, clears it, runs
//! [`CpuExperts::forward`] on the pool from and into the mapped region, and
//! writes `done = tag` (release). A decode step with its handoffs is captured
//! once as a CUDA graph and replayed; the host thread that launched the graph
//! then serves the layers in order. Tags are constants (decoder layer index +
//! 1), which is what a graph can hold; `done` is cleared by the GPU before each
//! doorbell, so a stale tag from the previous step can never release a wait
//! early.
//!
//! The host never waits forever: while spinning it polls the stream, and a
//! stream that failed or went idle without ringing is an error. When the experts
//! fail, the layer is still completed (zero output) so the GPU is never left
//! waiting, and the error is returned. A polling kernel gives up (traps) after
//! a minute without an answer.

use std::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use lvllm_kernels_cuda::{Gpu, MappedHost, RouterHandoff};

use crate::{CpuExperts, Error, Result, TopK};

fn gpu_err(e: lvllm_kernels_cuda::Error) -> Error {
    Error::Gpu(e.to_string())
}

const DOORBELL: usize = 0;
const DONE: usize = 64;
const N_TOKENS: usize = 128;
const DATA: usize = 192;

/// How the GPU rings the host and waits for it (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Signal {
    /// The router kernel rings the doorbell; the next kernel polls `done`.
    #[default]
    Kernels,
    /// `cuStreamWriteValue32` / `cuStreamWaitValue32` on the stream.
    StreamMemOps,
}

/// The mapped region of one model's hybrid MoE layers (one handoff in flight at
/// a time: layers run in order on one stream).
#[derive(Debug)]
pub struct Handoff {
    mem: MappedHost,
    signal: Signal,
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
    /// each. With [`Signal::StreamMemOps`] it first checks that this device runs
    /// stream memory operations on mapped memory (a write is enqueued and read
    /// back).
    pub fn new(gpu: &Gpu, hidden: usize, k: usize, max_tokens: usize, signal: Signal) -> Result<Self> {
        let ids_off = DATA + align64(max_tokens * hidden * 4);
        let w_off = ids_off + align64(max_tokens * k * 4);
        let out_off = w_off + align64(max_tokens * k * 4);
        let bytes = out_off + align64(max_tokens * hidden * 4);
        let mem = gpu.alloc_mapped(bytes).map_err(gpu_err)?;
        let h = Handoff { mem, signal, hidden, k, max_tokens, ids_off, w_off, out_off };
        if signal == Signal::Kernels {
            return Ok(h);
        }
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

    /// How this region signals.
    pub fn signal(&self) -> Signal {
        self.signal
    }

    /// GPU side: queues the router (logits of `a` against `router_w` into the
    /// device scratch `logits`, then top-k) fused with the copy of `a` into the
    /// region, and the doorbell `tag`. Returns what the kernel that consumes the
    /// result ([`Handoff::out_dev_ptr`]) must wait for: `Some((done, tag))` for
    /// [`Signal::Kernels`] (pass it to `add_rmsnorm`), `None` when the stream
    /// itself was told to wait ([`Signal::StreamMemOps`]).
    ///
    /// # Safety
    /// `a` holds `n × hidden` f32, `router_w` `n_experts × hidden` bf16 and
    /// `logits` room for `n × n_experts` f32 on this GPU; `tag` is non-zero; a
    /// host thread will [`Handoff::serve`] this tag after the stream reaches it.
    pub unsafe fn enqueue(
        &self,
        gpu: &Gpu,
        tag: u32,
        a: u64,
        (router_w, logits): (u64, u64),
        (n, n_experts, renormalize): (usize, usize, bool),
    ) -> Result<Option<(u64, u32)>> {
        if n > self.max_tokens || tag == 0 {
            return Err(Error::Input(format!("handoff of {n} tokens with tag {tag} (max {})", self.max_tokens)));
        }
        let kernels = self.signal == Signal::Kernels;
        let dst = RouterHandoff {
            hidden: self.dev(DATA),
            done: self.dev(DONE),
            n_tokens: self.dev(N_TOKENS),
            doorbell: kernels.then_some((self.dev(DOORBELL), tag)),
        };
        // SAFETY: the destinations hold max_tokens ≥ n rows; the flags are
        // aligned words of the region; the caller guarantees the sources.
        unsafe {
            gpu.router_fused(
                (a, router_w, logits),
                (n, n_experts, self.k, renormalize),
                self.hidden,
                (self.dev(self.ids_off), self.dev(self.w_off)),
                Some(dst),
            )
            .map_err(gpu_err)?;
            if kernels {
                return Ok(Some((self.dev(DONE), tag)));
            }
            gpu.write_value32(self.dev(DOORBELL), tag).map_err(gpu_err)?;
            gpu.wait_value32(self.dev(DONE), tag).map_err(gpu_err)?;
        }
        Ok(None)
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
        self.serve_with(
            tag,
            &mut |h, release| match experts {
                Some(ex) => h.compute(ex, release),
                None => Ok(()),
            },
            gpu_busy,
        )
    }

    /// [`Handoff::serve`] with the host's work given as `work(self, release)`;
    /// the work may call `release()` as soon as `out` is complete to let the GPU
    /// go on while it finishes (at most once is needed; later calls do nothing).
    /// `done` is written in every case: on an error (with `out` zeroed) and
    /// when the work unwinds, so the GPU never waits forever.
    fn serve_with(
        &self,
        tag: u32,
        work: &mut dyn FnMut(&Self, &ReleaseFn<'_>) -> Result<()>,
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
        /// Writes `done = tag` once: when released, else when dropped (also
        /// while unwinding, after zeroing the result, which may be partial).
        struct Release<'a> {
            handoff: &'a Handoff,
            tag: u32,
            released: AtomicBool,
        }
        impl Release<'_> {
            fn release(&self) {
                if !self.released.swap(true, Ordering::AcqRel) {
                    fence(Ordering::Release);
                    self.handoff.flag(DONE).store(self.tag, Ordering::Release);
                }
            }
            /// Zeroes the result unless the GPU was already released.
            fn zero_unreleased(&self) {
                if !self.released.load(Ordering::Acquire) {
                    let h = self.handoff;
                    let n = h.tokens().min(h.max_tokens);
                    // SAFETY: not released yet, so the GPU does not read `out`
                    // (it waits for `done`), and the work that wrote it has
                    // returned or unwound (the pool's workers have stopped);
                    // `out` holds max_tokens × hidden f32.
                    unsafe { std::ptr::write_bytes(h.mem.host_ptr().add(h.out_off) as *mut f32, 0, n * h.hidden) };
                }
            }
        }
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.zero_unreleased();
                }
                self.release();
            }
        }
        let release = Release { handoff: self, tag, released: AtomicBool::new(false) };
        let result = work(self, &|| release.release());
        if result.is_err() {
            release.zero_unreleased();
        }
        release.release();
        result.map(|()| ServeTiming { wait: t1 - t0, compute: t1.elapsed() })
    }

    fn tokens(&self) -> usize {
        // SAFETY: N_TOKENS is an aligned u32 of the region.
        unsafe { std::ptr::read_volatile(self.mem.host_ptr().add(N_TOKENS) as *const u32) as usize }
    }

    fn compute(&self, experts: &CpuExperts, release: &ReleaseFn<'_>) -> Result<()> {
        let n = self.tokens();
        if n > self.max_tokens {
            return Err(Error::Gpu(format!("handoff of {n} tokens exceeds the region's {}", self.max_tokens)));
        }
        let (h, k) = (self.hidden, self.k);
        let base = self.mem.host_ptr();
        // SAFETY: between the doorbell and `done` the GPU neither reads nor writes
        // these ranges (it wrote the inputs before ringing and reads `out` after
        // the wait), so until `done` the host has exclusive access. `done` is
        // written by `release` from inside `forward_signal` once `out` is
        // complete; from then on the GPU reads `out` and the next layer's kernel
        // overwrites the inputs, and neither slice is read or written again
        // (`topk` below is a copy; `forward_signal` reads `hidden` only before
        // its dispatch). Each range lies inside the region, is 64-byte aligned
        // and sized for max_tokens ≥ n.
        let (hidden, ids, weights, out) = unsafe {
            (
                std::slice::from_raw_parts(base.add(DATA) as *const f32, n * h),
                std::slice::from_raw_parts(base.add(self.ids_off) as *const u32, n * k),
                std::slice::from_raw_parts(base.add(self.w_off) as *const f32, n * k),
                std::slice::from_raw_parts_mut(base.add(self.out_off) as *mut f32, n * h),
            )
        };
        let topk = TopK { k, ids: ids.to_vec(), weights: weights.to_vec() };
        experts.forward_signal(hidden, &topk, out, release)
    }
}

/// Lets the GPU go on: writes the handoff's `done` flag (once).
type ReleaseFn<'a> = dyn Fn() + Sync + 'a;

/// The handoff measured alone.
#[derive(Debug, Clone, Copy)]
pub struct HandoffProbe {
    /// Layers per step.
    pub layers: usize,
    /// µs per layer of the baseline step (the fused router kernel and an
    /// add+norm kernel, as an all-GPU layer runs them in its place).
    pub base_us: f64,
    /// µs per layer with the handoff instead (the router fused with the copy to
    /// the host, doorbell, host answer, wait, add+norm of the host's result),
    /// the host's simulated expert time excluded.
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
/// `n_experts`, signalled by `signal`, with the host answering each after
/// spinning `cpu_us` µs (0: at once, the handoff alone; a few hundred: as
/// after a real expert computation), against the same step without handoffs
/// (the fused router and add+norm kernels per layer); best of `reps` steps,
/// eager or as a captured graph.
pub fn measure_handoff(
    gpu: &Gpu,
    (hidden, n_experts, k): (usize, usize, usize),
    layers: usize,
    (reps, graph): (usize, bool),
    signal: Signal,
    cpu_us: u64,
) -> Result<HandoffProbe> {
    let hf = Handoff::new(gpu, hidden, k, 1, signal)?;
    let x = gpu.alloc::<f32>(hidden).map_err(gpu_err)?;
    let a = gpu.alloc::<f32>(hidden).map_err(gpu_err)?;
    let norm = gpu.upload(&vec![1f32; hidden]).map_err(gpu_err)?;
    let logits = gpu.alloc::<f32>(n_experts).map_err(gpu_err)?;
    let router = gpu.alloc::<u16>(n_experts * hidden).map_err(gpu_err)?;
    let topi = gpu.alloc::<i32>(k).map_err(gpu_err)?;
    let topw = gpu.alloc::<f32>(k).map_err(gpu_err)?;
    let (px, pa, pl, pr, pn) = (gpu.ptr(&x), gpu.ptr(&a), gpu.ptr(&logits), gpu.ptr(&router), gpu.ptr(&norm));
    let mut busy = || gpu.stream_busy().map_err(gpu_err);
    let delay = Duration::from_micros(cpu_us);
    let serve = |tag: u32, busy: &mut dyn FnMut() -> Result<bool>| -> Result<()> {
        hf.serve_with(
            tag,
            &mut |_, _| {
                let t = Instant::now();
                while t.elapsed() < delay {
                    std::hint::spin_loop();
                }
                Ok(())
            },
            busy,
        )
        .map(|_| ())
    };
    let mut time = |with: bool| -> Result<f64> {
        let enqueue = |inline: bool, busy: &mut dyn FnMut() -> Result<bool>| -> Result<()> {
            for l in 0..layers {
                let tag = l as u32 + 1;
                // SAFETY: all buffers hold `hidden` (or `k`, `n_experts`) values;
                // the tag is served below (inline when eager, after launch for a
                // graph).
                unsafe {
                    if with {
                        let wait = hf.enqueue(gpu, tag, pa, (pr, pl), (1, n_experts, true))?;
                        if inline {
                            serve(tag, busy)?;
                        }
                        gpu.add_rmsnorm(px, hf.out_dev_ptr(), true, pn, pa, 1, hidden, 1e-6, wait).map_err(gpu_err)?;
                    } else {
                        let dst = (gpu.ptr(&topi), gpu.ptr(&topw));
                        gpu.router_fused((pa, pr, pl), (1, n_experts, k, true), hidden, dst, None).map_err(gpu_err)?;
                        gpu.add_rmsnorm(px, pa, false, pn, pa, 1, hidden, 1e-6, None).map_err(gpu_err)?;
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
                            serve(l as u32 + 1, &mut busy)?;
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
    let with_handoff_us = time(true)? - cpu_us as f64;
    Ok(HandoffProbe { layers, base_us, with_handoff_us, graph })
}
