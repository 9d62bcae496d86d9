//! The device handle and typed launchers.
//!
//! Launchers take raw device addresses (`u64`) so callers can pass offsets into
//! large buffers (a layer's weights, a KV cache) without borrow juggling; they
//! are `unsafe` and their contract is that every address range named by the
//! arguments is a live allocation of this context, as large as stated.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::{Error, Result};

/// A device buffer.
pub type DevBuf<T> = CudaSlice<T>;

const SOURCE: &str = include_str!("kernels.cu");

const KERNELS: &[&str] = &[
    "embedding",
    "rmsnorm",
    "to_bf16",
    "add_inplace",
    "silu_mul",
    "rope_neox",
    "kv_write",
    "paged_attention",
    "router_topk",
    "gather_rows",
    "scatter_add_weighted",
    "fill_random_bf16",
    "split_bf16",
    "sum_halves",
    "gemv_bf16",
    "moe_gemv_bf16",
    "moe_combine_add",
    "gemv3_bf16",
    "qk_norm_rope_kv",
    "add_rmsnorm",
    "gemv_add_rmsnorm",
    "router_fused",
    "gemv_bf16_t1",
    "gemv3_bf16_t1",
    "gemv_add_rmsnorm_t1",
    "router_fused_t1",
];

/// The kernel `name`, or its one-row specialisation (`name_t1`, fewer registers,
/// more loads in flight; same arithmetic) when `t == 1`.
fn rows_variant(name: &'static str, t: usize) -> &'static str {
    match (name, t) {
        ("gemv_bf16", 1) => "gemv_bf16_t1",
        ("gemv3_bf16", 1) => "gemv3_bf16_t1",
        ("gemv_add_rmsnorm", 1) => "gemv_add_rmsnorm_t1",
        ("router_fused", 1) => "router_fused_t1",
        _ => name,
    }
}

/// Where [`Gpu::router_fused`] hands a hybrid MoE layer's inputs to the host
/// (mapped addresses).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouterHandoff {
    /// Destination of the hidden states (`t × h` f32).
    pub hidden: u64,
    /// The u32 "done" flag, cleared.
    pub done: u64,
    /// The u32 token count, set.
    pub n_tokens: u64,
    /// The doorbell word and the tag the kernel rings it with when done (`None`:
    /// a stream memory write after the kernel rings it).
    pub doorbell: Option<(u64, u32)>,
}

/// Most experts the router kernels take (`32 × TOPK_PER_LANE` in kernels.cu).
pub const ROUTER_MAX_EXPERTS: usize = 512;

/// Checks a router's shape against what the warp top-k kernel takes.
fn check_router(n_experts: usize, k: usize) -> Result<()> {
    if n_experts > ROUTER_MAX_EXPERTS || k > 32 || k > n_experts || k == 0 {
        return Err(Error::Args(format!(
            "top-{k} of {n_experts} experts (the router kernels take 1 ≤ k ≤ 32 of at most {ROUTER_MAX_EXPERTS})"
        )));
    }
    Ok(())
}

/// Warps per block of the one-token router ([`Gpu::router_fused`] with `t = 1`).
const ROUTER_T1_WARPS: usize = 2;

/// Most rows (tokens) the GEMV kernels take at once (`GEMV_MAX_T` in kernels.cu).
pub const GEMV_MAX_T: usize = 16;

fn drv(e: impl std::fmt::Debug) -> Error {
    Error::Driver(format!("{e:?}"))
}

/// One GPU: context, stream, cuBLAS handle and the compiled kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: HashMap<&'static str, CudaFunction>,
    name: String,
    arch: (i32, i32),
    /// The grid-completion counter of the fused kernels that finish with their
    /// grid's last block (zero between launches; kernels on one stream never
    /// overlap, so one serves them all).
    counter: DevBuf<u32>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({}, sm_{}{})", self.name, self.arch.0, self.arch.1)
    }
}

fn grid1(n: usize, block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: ((n as u32).div_ceil(block).max(1), 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

fn rows(n: usize, block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.max(1) as u32, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

impl Gpu {
    /// Opens device `ordinal`, compiling (or loading from `cache_dir`) the kernels.
    pub fn new(ordinal: usize, cache_dir: Option<&Path>) -> Result<Self> {
        crate::check_libraries()?;
        let count = CudaContext::device_count().map_err(drv)? as usize;
        if ordinal >= count {
            return Err(Error::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(drv)?;
        // SAFETY: lvllm orders its work on one stream itself; disabling cudarc's
        // event tracking is what CUDA-graph capture needs (DESIGN.md).
        unsafe { ctx.disable_event_tracking() };
        // A created stream, not the legacy default one: CUDA graphs cannot capture that.
        let stream = ctx.new_stream().map_err(drv)?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| Error::Cublas(format!("{e:?}")))?;
        let arch = ctx.compute_capability().map_err(drv)?;
        let name = ctx.name().map_err(drv)?;
        let ptx = compile(arch, cache_dir)?;
        let module = ctx.load_module(ptx).map_err(drv)?;
        let mut funcs = HashMap::new();
        for &k in KERNELS {
            funcs.insert(k, module.load_function(k).map_err(drv)?);
        }
        let counter = stream.alloc_zeros::<u32>(1).map_err(drv)?;
        Ok(Gpu { ctx, stream, blas, funcs, name, arch, counter })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compute capability.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.arch
    }

    /// Free and total device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(drv)
    }

    /// A zeroed buffer of `n` elements.
    pub fn alloc<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<DevBuf<T>> {
        self.stream.alloc_zeros(n.max(1)).map_err(drv)
    }

    /// Copies host data to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<DevBuf<T>> {
        self.stream.clone_htod(data).map_err(drv)
    }

    /// Copies host data into an existing buffer (same length).
    pub fn upload_into<T: DeviceRepr>(&self, data: &[T], buf: &mut DevBuf<T>) -> Result<()> {
        if data.len() > buf.len() {
            return Err(Error::Args(format!("upload of {} elements into {}", data.len(), buf.len())));
        }
        let mut view = buf.slice_mut(..data.len());
        self.stream.memcpy_htod(data, &mut view).map_err(drv)
    }

    /// Copies host data into `buf` starting at element `offset`.
    pub fn upload_at<T: DeviceRepr>(&self, data: &[T], buf: &mut DevBuf<T>, offset: usize) -> Result<()> {
        if offset + data.len() > buf.len() {
            return Err(Error::Args(format!("upload of {} elements at {offset} into {}", data.len(), buf.len())));
        }
        let mut view = buf.slice_mut(offset..offset + data.len());
        self.stream.memcpy_htod(data, &mut view).map_err(drv)
    }

    /// Copies host data to device address `dst` on this GPU's stream. The host
    /// slice may be dropped when this returns (pageable copies are staged first).
    ///
    /// # Safety
    /// `dst` is a live allocation of this context with room for `data`.
    pub unsafe fn upload_to<T: DeviceRepr>(&self, data: &[T], dst: u64) -> Result<()> {
        self.ctx.bind_to_thread().map_err(drv)?;
        // SAFETY: forwarded contract; the source slice is valid for its length.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, data, self.stream.cu_stream()) }.map_err(drv)
    }

    /// Copies a device buffer to the host (waits for the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(&self, buf: &DevBuf<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(buf).map_err(drv)
    }

    /// Copies the first `n` elements of a device buffer to the host.
    pub fn download_n<T: DeviceRepr + Default + Clone>(&self, buf: &DevBuf<T>, n: usize) -> Result<Vec<T>> {
        let view = buf.slice(..n);
        self.stream.clone_dtoh(&view).map_err(drv)
    }

    /// Measures device memory bandwidth with device-to-device copies of `bytes`
    /// (best of `reps`; a copy reads and writes, so 2 × bytes move), in GB/s.
    pub fn measure_bandwidth(&self, bytes: usize, reps: usize) -> Result<f64> {
        let n = bytes / 4;
        let src = self.alloc::<f32>(n)?;
        let mut dst = self.alloc::<f32>(n)?;
        let mut best = f64::MAX;
        for _ in 0..reps.max(1) {
            self.synchronize()?;
            let t0 = std::time::Instant::now();
            self.stream.memcpy_dtod(&src, &mut dst).map_err(drv)?;
            self.synchronize()?;
            best = best.min(t0.elapsed().as_secs_f64());
        }
        Ok(2.0 * (n * 4) as f64 / best / 1e9)
    }

    /// Makes this GPU's context current on the calling thread: a model used from
    /// another thread than the one that opened it (the engine's model loop)
    /// calls this first, so raw driver and cuBLAS calls find their context.
    pub fn bind_to_thread(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(drv)
    }

    /// Waits for all work queued on this GPU's stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(drv)
    }

    /// The device address of a buffer.
    pub fn ptr<T>(&self, b: &DevBuf<T>) -> u64 {
        let (p, _sync) = b.device_ptr(&self.stream);
        p
    }

    fn launch(&self, name: &str, cfg: LaunchConfig, args: &[&dyn Arg]) -> Result<()> {
        let f = &self.funcs[name];
        let mut b = self.stream.launch_builder(f);
        for a in args {
            a.push(&mut b);
        }
        // SAFETY: argument kinds and counts match the kernel signatures in
        // kernels.cu (each launcher below mirrors one), and the caller of the
        // launcher guarantees the addresses' extents.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(drv)
    }

    /// `out[t, :] = table[ids[t], :]` (`table` bf16 `[vocab, hidden]`, `out` f32).
    ///
    /// # Safety
    /// `ids` holds `tokens` u32 < vocab, `table` `[vocab, hidden]` bf16, `out` `tokens × hidden` f32.
    pub unsafe fn embedding(&self, ids: u64, table: u64, out: u64, tokens: usize, hidden: usize) -> Result<()> {
        self.launch("embedding", rows(tokens, 256), &[&ids, &table, &out, &(hidden as i32)])
    }

    /// RMSNorm of `rows` rows of `width` (in place allowed).
    ///
    /// # Safety
    /// `x`, `out`: `rows × width` f32; `w`: `width` f32.
    pub unsafe fn rmsnorm(&self, x: u64, w: u64, out: u64, n_rows: usize, width: usize, eps: f32) -> Result<()> {
        self.launch("rmsnorm", rows(n_rows, 256), &[&x, &w, &out, &(width as i32), &eps])
    }

    /// `out = bf16(x)` for `n` values.
    ///
    /// # Safety
    /// `x`: `n` f32, `out`: `n` bf16.
    pub unsafe fn to_bf16(&self, x: u64, out: u64, n: usize) -> Result<()> {
        self.launch("to_bf16", grid1(n, 256), &[&x, &out, &(n as i64)])
    }

    /// `x += y` for `n` values.
    ///
    /// # Safety
    /// `x`, `y`: `n` f32.
    pub unsafe fn add_inplace(&self, x: u64, y: u64, n: usize) -> Result<()> {
        self.launch("add_inplace", grid1(n, 256), &[&x, &y, &(n as i64)])
    }

    /// `out = silu(g) · u` for `n` values.
    ///
    /// # Safety
    /// `g`, `u`, `out`: `n` f32.
    pub unsafe fn silu_mul(&self, g: u64, u: u64, out: u64, n: usize) -> Result<()> {
        self.launch("silu_mul", grid1(n, 256), &[&g, &u, &out, &(n as i64)])
    }

    /// NeoX RoPE in place on `x[tokens, heads, dim]`.
    ///
    /// # Safety
    /// `x`: `tokens × heads × dim` f32, `positions`: `tokens` i32, `inv_freq`: `dim/2` f32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rope_neox(
        &self,
        x: u64,
        positions: u64,
        inv_freq: u64,
        scaling: f32,
        tokens: usize,
        heads: usize,
        dim: usize,
    ) -> Result<()> {
        self.launch(
            "rope_neox",
            rows(tokens, 128),
            &[&x, &positions, &inv_freq, &scaling, &(heads as i32), &(dim as i32)],
        )
    }

    /// `kc[slots[t]] = k[t]`, `vc[slots[t]] = v[t]` (rows of `width`).
    ///
    /// # Safety
    /// `k`, `v`: `tokens × width` f32; `slots`: `tokens` i32 within the caches.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kv_write(
        &self,
        k: u64,
        v: u64,
        kc: u64,
        vc: u64,
        slots: u64,
        tokens: usize,
        width: usize,
    ) -> Result<()> {
        self.launch("kv_write", rows(tokens, 256), &[&k, &v, &kc, &vc, &slots, &(width as i32)])
    }

    /// Causal attention over the paged cache (see kernels.cu).
    ///
    /// # Safety
    /// `q`, `out`: `tokens × n_heads × dim` f32; `pos`, `seq`: `tokens` i32;
    /// `block_tables`: `n_seqs × max_blocks` i32 covering every position; caches
    /// `slots × n_kv × dim` f32; `dim ≤ 256`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn paged_attention(
        &self,
        q: u64,
        kc: u64,
        vc: u64,
        out: u64,
        pos: u64,
        seq: u64,
        block_tables: u64,
        max_blocks: usize,
        block_size: usize,
        tokens: usize,
        n_heads: usize,
        n_kv: usize,
        dim: usize,
        scale: f32,
    ) -> Result<()> {
        if dim > 256 {
            return Err(Error::Args(format!("head_dim {dim} > 256")));
        }
        let cfg =
            LaunchConfig { grid_dim: (tokens as u32, n_heads as u32, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        self.launch(
            "paged_attention",
            cfg,
            &[
                &q,
                &kc,
                &vc,
                &out,
                &pos,
                &seq,
                &block_tables,
                &(max_blocks as i32),
                &(block_size as i32),
                &(n_heads as i32),
                &(n_kv as i32),
                &(dim as i32),
                &scale,
            ],
        )
    }

    /// Softmax top-k routing of `tokens` rows of `n_experts` logits.
    ///
    /// # Safety
    /// `logits`: `tokens × n_experts` f32; `ids`, `weights`: `tokens × k`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn router_topk(
        &self,
        logits: u64,
        tokens: usize,
        n_experts: usize,
        k: usize,
        renormalize: bool,
        ids: u64,
        weights: u64,
    ) -> Result<()> {
        check_router(n_experts, k)?;
        self.launch(
            "router_topk",
            rows(tokens, 32),
            &[&logits, &(tokens as i32), &(n_experts as i32), &(k as i32), &(renormalize as i32), &ids, &weights],
        )
    }

    /// `out[r] = x[idx[r]]` for `n_rows` rows of `width`.
    ///
    /// # Safety
    /// `idx`: `n_rows` i32 rows of `x`; `out`: `n_rows × width` f32.
    pub unsafe fn gather_rows(&self, x: u64, idx: u64, out: u64, n_rows: usize, width: usize) -> Result<()> {
        self.launch("gather_rows", rows(n_rows, 256), &[&x, &idx, &out, &(width as i32)])
    }

    /// `out[idx[r]] += w[r] · y[r]` (`idx` distinct within the call).
    ///
    /// # Safety
    /// `y`: `n_rows × width`; `idx`, `w`: `n_rows`; `out` holds every `idx` row.
    pub unsafe fn scatter_add_weighted(
        &self,
        y: u64,
        idx: u64,
        w: u64,
        out: u64,
        n_rows: usize,
        width: usize,
    ) -> Result<()> {
        self.launch("scatter_add_weighted", rows(n_rows, 256), &[&y, &idx, &w, &out, &(width as i32)])
    }

    /// Splits `n` f32 values into two bf16 terms: `out[..n]` = hi, `out[n..2n]` = lo.
    ///
    /// # Safety
    /// `x`: `n` f32, `out`: `2n` bf16.
    pub unsafe fn split_bf16(&self, x: u64, out: u64, n: usize) -> Result<()> {
        self.launch("split_bf16", grid1(n, 256), &[&x, &out, &(n as i64)])
    }

    /// `y[i] = y2[i] + y2[n + i]`.
    ///
    /// # Safety
    /// `y2`: `2n` f32, `y`: `n` f32.
    pub unsafe fn sum_halves(&self, y2: u64, y: u64, n: usize) -> Result<()> {
        self.launch("sum_halves", grid1(n, 256), &[&y2, &y, &(n as i64)])
    }

    /// `y[t, n] = Σ_k x[t, k] · w[n, k]` for `t < T ≤ 16`, f32 activations and
    /// accumulation, bf16 weights (decode-sized products; no cuBLAS, graph-capturable).
    ///
    /// # Safety
    /// `x`: `T × K` f32, `w`: `N × K` bf16, `y`: `T × N` f32.
    pub unsafe fn gemv_bf16(&self, x: u64, w: u64, y: u64, t: usize, n: usize, k: usize) -> Result<()> {
        if t > GEMV_MAX_T {
            return Err(Error::Args(format!("gemv of {t} rows > {GEMV_MAX_T}")));
        }
        let cfg = LaunchConfig { grid_dim: (n.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        self.launch(rows_variant("gemv_bf16", t), cfg, &[&x, &w, &y, &(t as i32), &(n as i32), &(k as i32)])
    }

    /// Routed expert rows: `y[s, n] = Σ_k x[row(s), k] · w[ids[s], n, k]` with
    /// `row(s) = s / topk`, or `s` when `x_per_slot`.
    ///
    /// # Safety
    /// `w`: `E × N × K` bf16 with every `ids` < E; `ids`: `slots` i32; `x` holds
    /// the rows named; `y`: `slots × N` f32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn moe_gemv_bf16(
        &self,
        x: u64,
        w: u64,
        ids: u64,
        y: u64,
        slots: usize,
        n: usize,
        k: usize,
        topk: usize,
        x_per_slot: bool,
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(8) as u32, slots as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "moe_gemv_bf16",
            cfg,
            &[&x, &w, &ids, &y, &(n as i32), &(k as i32), &(topk as i32), &(x_per_slot as i32)],
        )
    }

    /// `out[t] += Σ_j wts[t·k + j] · y[t·k + j]` for `tokens` rows of `width`.
    ///
    /// # Safety
    /// `y`: `tokens·k × width`, `wts`: `tokens·k`, `out`: `tokens × width` f32.
    pub unsafe fn moe_combine_add(
        &self,
        y: u64,
        wts: u64,
        out: u64,
        tokens: usize,
        k: usize,
        width: usize,
    ) -> Result<()> {
        // A block per (token, 256 columns): one block per token left a 2048-wide
        // decode row to a single SM.
        let cfg = LaunchConfig {
            grid_dim: (tokens.max(1) as u32, width.div_ceil(256).max(1) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch("moe_combine_add", cfg, &[&y, &wts, &out, &(k as i32), &(width as i32)])
    }

    /// Allocates `bytes` of pinned host memory mapped into the device's address
    /// space (zeroed), for flags and data the CPU and the GPU exchange without copies.
    pub fn alloc_mapped(&self, bytes: usize) -> Result<MappedHost> {
        use cudarc::driver::sys;
        self.ctx.bind_to_thread().map_err(drv)?;
        let bytes = bytes.max(64);
        let mut host: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: the context is current on this thread; `host` receives the allocation.
        unsafe {
            sys::cuMemHostAlloc(&mut host, bytes, sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE)
        }
        .result()
        .map_err(drv)?;
        let mut dev: sys::CUdeviceptr = 0;
        // SAFETY: `host` is a live mapped allocation of this context.
        let mapped = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, host, 0) }.result();
        if let Err(e) = mapped {
            // SAFETY: `host` came from cuMemHostAlloc above and is not used again.
            unsafe { sys::cuMemFreeHost(host) };
            return Err(drv(e));
        }
        // SAFETY: `host` points to `bytes` writable bytes that nothing else uses yet.
        unsafe { std::ptr::write_bytes(host as *mut u8, 0, bytes) };
        Ok(MappedHost { ctx: self.ctx.clone(), host: host as *mut u8, dev, bytes })
    }

    /// Enqueues a 32-bit write of `value` to `addr` (a mapped host or device
    /// address) after all prior work of the stream, with a memory fence before it
    /// (`cuStreamWriteValue32`); capturable in a CUDA graph.
    ///
    /// # Safety
    /// `addr` is a live, 4-byte aligned mapped or device address of this context.
    pub unsafe fn write_value32(&self, addr: u64, value: u32) -> Result<()> {
        use cudarc::driver::sys;
        // Raw driver calls need the context current on this thread (the engine's
        // model loop is not the thread that created it).
        self.ctx.bind_to_thread().map_err(drv)?;
        // SAFETY: the caller guarantees `addr`; the stream is this GPU's.
        unsafe { sys::cuStreamWriteValue32_v2(self.stream.cu_stream(), addr, value, 0) }.result().map_err(drv)
    }

    /// Holds the stream until the 32-bit word at `addr` equals `value`
    /// (`cuStreamWaitValue32`); capturable in a CUDA graph.
    ///
    /// # Safety
    /// `addr` is a live, 4-byte aligned mapped or device address of this context,
    /// and something will write `value` there, or the stream never proceeds.
    pub unsafe fn wait_value32(&self, addr: u64, value: u32) -> Result<()> {
        use cudarc::driver::sys;
        self.ctx.bind_to_thread().map_err(drv)?;
        let eq = sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_EQ as u32;
        // SAFETY: as above.
        unsafe { sys::cuStreamWaitValue32_v2(self.stream.cu_stream(), addr, value, eq) }.result().map_err(drv)
    }

    /// Whether the stream still has work queued (`Ok(true)`), is idle
    /// (`Ok(false)`), or has failed.
    pub fn stream_busy(&self) -> Result<bool> {
        use cudarc::driver::sys::{self, CUresult};
        self.ctx.bind_to_thread().map_err(drv)?;
        // SAFETY: the stream handle is this GPU's and alive.
        match unsafe { sys::cuStreamQuery(self.stream.cu_stream()) } {
            CUresult::CUDA_SUCCESS => Ok(false),
            CUresult::CUDA_ERROR_NOT_READY => Ok(true),
            other => Err(drv(other)),
        }
    }

    /// [`Gpu::gemv_bf16`] over up to three matrices sharing `x` in one launch:
    /// `y_i[t, :] = x[t, :] · w_iᵀ` for each `(w_i, y_i, n_i)` (`n_i = 0` skips one).
    ///
    /// # Safety
    /// `x`: `t × k` f32; each `w_i`: `n_i × k` bf16, `y_i`: `t × n_i` f32.
    pub unsafe fn gemv3_bf16(&self, x: u64, t: usize, k: usize, mats: [(u64, u64, usize); 3]) -> Result<()> {
        if t > GEMV_MAX_T {
            return Err(Error::Args(format!("gemv of {t} rows > {GEMV_MAX_T}")));
        }
        let rows_total: usize = mats.iter().map(|m| m.2).sum();
        let cfg = LaunchConfig {
            grid_dim: (rows_total.div_ceil(8).max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let [(w0, y0, n0), (w1, y1, n1), (w2, y2, n2)] = mats;
        let (n0, n1, n2) = (n0 as i32, n1 as i32, n2 as i32);
        self.launch(
            rows_variant("gemv3_bf16", t),
            cfg,
            &[&x, &(t as i32), &(k as i32), &w0, &y0, &n0, &w1, &y1, &n1, &w2, &y2, &n2],
        )
    }

    /// Decode's attention prologue in one launch: RMSNorm (`q_norm`, `k_norm`)
    /// and NeoX RoPE of the q and k heads in place, then k and v written to the
    /// paged cache at `slots` (rmsnorm + rope_neox + kv_write).
    ///
    /// # Safety
    /// `q`: `tokens × n_heads × dim`, `k`/`v`: `tokens × n_kv × dim` f32;
    /// `qw`/`kw`: `dim`; `positions`/`slots`: `tokens` i32 with slots inside
    /// `kc`/`vc` (`slots × n_kv × dim`); `inv_freq`: `dim / 2`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn qk_norm_rope_kv(
        &self,
        (q, k, v): (u64, u64, u64),
        (qw, kw): (u64, u64),
        (positions, inv_freq, scaling): (u64, u64, f32),
        (kc, vc, slots): (u64, u64, u64),
        tokens: usize,
        (n_heads, n_kv, dim): (usize, usize, usize),
        eps: f32,
    ) -> Result<()> {
        if dim > 256 || dim % 2 == 1 {
            return Err(Error::Args(format!("head_dim {dim} (even, at most 256)")));
        }
        let cfg = LaunchConfig {
            grid_dim: (tokens.max(1) as u32, (n_heads + 2 * n_kv) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (nh, nkv, d) = (n_heads as i32, n_kv as i32, dim as i32);
        self.launch(
            "qk_norm_rope_kv",
            cfg,
            &[&q, &k, &v, &qw, &kw, &positions, &inv_freq, &scaling, &kc, &vc, &slots, &nh, &nkv, &d, &eps],
        )
    }

    /// `x += y; out = RMSNorm(x) · w` per row of `width` (add_inplace then
    /// rmsnorm in one launch). `y_mapped`: `y` is mapped host memory the CPU
    /// rewrites between steps (read uncached). `wait = Some((flag, value))`: the
    /// kernel first spins until the mapped u32 at `flag` equals `value` (how a
    /// hybrid handoff's GPU side waits for the host inside a kernel).
    ///
    /// # Safety
    /// `x`, `y`, `out`: `n_rows × width` f32 (`y` mapped when `y_mapped`); `w`:
    /// `width`; `flag` a live mapped word that the host will set to `value`
    /// (the kernel traps after a minute otherwise).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn add_rmsnorm(
        &self,
        x: u64,
        y: u64,
        y_mapped: bool,
        w: u64,
        out: u64,
        n_rows: usize,
        width: usize,
        eps: f32,
        wait: Option<(u64, u32)>,
    ) -> Result<()> {
        let (flag, value) = wait.unwrap_or((0, 0));
        self.launch(
            "add_rmsnorm",
            rows(n_rows, 256),
            &[&x, &y, &(y_mapped as i32), &w, &out, &(width as i32), &eps, &flag, &value],
        )
    }

    /// `y = x · woᵀ` (as [`Gpu::gemv_bf16`]), then `res += y; out = RMSNorm(res) · nw`
    /// per row, in one launch (o_proj, the residual add and the next norm).
    ///
    /// # Safety
    /// `x`: `t × k` f32; `wo`: `n × k` bf16; `y`, `res`, `out`: `t × n` f32; `nw`: `n`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemv_add_rmsnorm(
        &self,
        (x, wo, y): (u64, u64, u64),
        (t, n, k): (usize, usize, usize),
        res: u64,
        nw: u64,
        out: u64,
        eps: f32,
    ) -> Result<()> {
        if t > GEMV_MAX_T {
            return Err(Error::Args(format!("gemv of {t} rows > {GEMV_MAX_T}")));
        }
        let cfg =
            LaunchConfig { grid_dim: (n.div_ceil(8).max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let c = self.ptr(&self.counter);
        let name = rows_variant("gemv_add_rmsnorm", t);
        let (t, n, k) = (t as i32, n as i32, k as i32);
        self.launch(name, cfg, &[&x, &wo, &y, &t, &n, &k, &res, &nw, &out, &eps, &c])
    }

    /// Router logits `a · wrᵀ` into `logits` (`t × n_experts`) and their softmax
    /// top-k into `ids`/`weights` (`t × k`), in one launch. With a
    /// [`RouterHandoff`] it also copies `a` (`t × h`) to its `hidden`, sets
    /// `*done = 0`, `*n_tokens = t` and, with a doorbell, rings it last (the GPU
    /// half of a hybrid MoE handoff).
    ///
    /// # Safety
    /// `a`: `t × h` f32; `wr`: `n_experts × h` bf16; the destinations hold the
    /// sizes named (mapped or device memory); `done`/`n_out` are u32 words.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn router_fused(
        &self,
        (a, wr, logits): (u64, u64, u64),
        (t, n_experts, k, renormalize): (usize, usize, usize, bool),
        h: usize,
        (ids, weights): (u64, u64),
        handoff: Option<RouterHandoff>,
    ) -> Result<()> {
        check_router(n_experts, k)?;
        if t > GEMV_MAX_T {
            return Err(Error::Args(format!("router of {t} rows > {GEMV_MAX_T}")));
        }
        // A row per warp. One token's top-k needs one warp of the last block, so
        // its rows are spread two per block over more SMs; a batch keeps eight
        // warps per block for its tokens' top-k.
        let warps = if t == 1 { ROUTER_T1_WARPS } else { 8 };
        let cfg = LaunchConfig {
            grid_dim: (n_experts.div_ceil(warps) as u32, 1, 1),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let hf = handoff.unwrap_or_default();
        let (bell, tag) = hf.doorbell.unwrap_or((0, 0));
        let c = self.ptr(&self.counter);
        let name = rows_variant("router_fused", t);
        let (t, e, k, r, h) = (t as i32, n_experts as i32, k as i32, renormalize as i32, h as i32);
        self.launch(
            name,
            cfg,
            &[
                &a,
                &wr,
                &logits,
                &t,
                &e,
                &k,
                &r,
                &h,
                &ids,
                &weights,
                &hf.hidden,
                &hf.done,
                &hf.n_tokens,
                &c,
                &bell,
                &tag,
            ],
        )
    }

    /// Starts capturing this GPU's stream into a CUDA graph.
    pub fn begin_capture(&self) -> Result<()> {
        self.stream
            .begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(drv)
    }

    /// Ends a capture and instantiates the graph.
    pub fn end_capture(&self) -> Result<cudarc::driver::CudaGraph> {
        self.stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
            .map_err(drv)?
            .ok_or_else(|| Error::Driver("stream capture produced no graph".into()))
    }

    /// Fills `n` bf16 values with deterministic noise in `[-scale, scale)`.
    ///
    /// # Safety
    /// `p`: `n` bf16.
    pub unsafe fn fill_random_bf16(&self, p: u64, n: usize, seed: u32, scale: f32) -> Result<()> {
        self.launch("fill_random_bf16", grid1(n, 256), &[&p, &(n as i64), &seed, &scale])
    }

    /// `y[t, n] = x[t, k] · w[n, k]ᵀ` with bf16 `x` and `w`, f32 `y`, f32 compute
    /// (cuBLAS, column-major: `yᵀ = w · xᵀ`).
    ///
    /// # Safety
    /// `x`: `t × k` bf16, `w`: `n × k` bf16, `y`: `t × n` f32.
    pub unsafe fn gemm_bf16(&self, x: u64, w: u64, y: u64, t: usize, n: usize, k: usize) -> Result<()> {
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: forwarded contract; the handle is bound to our stream.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                t as i32,
                k as i32,
                (&alpha as *const f32).cast(),
                w as *const std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                x as *const std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                (&beta as *const f32).cast(),
                y as *mut std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_32F,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::Cublas(format!("{e:?}")))
    }
}

/// A kernel argument (the value is pushed by reference; it must outlive the launch call).
trait Arg {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>);
}

macro_rules! arg {
    ($($t:ty),*) => {$(
        impl Arg for $t {
            fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
                b.arg(self);
            }
        }
    )*};
}
arg!(u64, i32, i64, u32, f32);

/// Compiles the kernels for `arch`, reusing a cached PTX file when present.
fn compile(arch: (i32, i32), cache_dir: Option<&Path>) -> Result<Ptx> {
    let (mut maj, mut min) = (0i32, 0i32);
    // SAFETY: NVRTC was found by `check_libraries`; the out-pointers are valid.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut maj, &mut min) };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (SOURCE, arch, maj, min).hash(&mut h);
    let file = cache_dir.map(|d| d.join(format!("lvllm-kernels-{:016x}-sm{}{}.ptx", h.finish(), arch.0, arch.1)));
    if let Some(f) = &file {
        if let Ok(src) = std::fs::read_to_string(f) {
            return Ok(Ptx::from_src(src));
        }
    }
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture=compute_{}{}", arch.0, arch.1), "-default-device".into()],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts).map_err(|e| Error::Compile(format!("{e:?}")))?;
    if let (Some(f), Some(dir)) = (&file, cache_dir) {
        // A cache that cannot be written only costs a recompile next time.
        let _ = std::fs::create_dir_all(dir).and_then(|_| std::fs::write(f, ptx.to_src()));
    }
    Ok(ptx)
}

/// Pinned host memory mapped into a GPU's address space: the CPU reads and
/// writes it through [`MappedHost::host_ptr`], kernels and stream memory
/// operations through [`MappedHost::dev_ptr`].
pub struct MappedHost {
    ctx: Arc<CudaContext>,
    host: *mut u8,
    dev: u64,
    bytes: usize,
}

// SAFETY: the allocation is plain pinned memory owned by this value; concurrent
// access is coordinated by its users (flags with acquire/release ordering).
unsafe impl Send for MappedHost {}
// SAFETY: as above; `&MappedHost` only hands out raw pointers.
unsafe impl Sync for MappedHost {}

impl MappedHost {
    /// The host address.
    pub fn host_ptr(&self) -> *mut u8 {
        self.host
    }

    /// The device address of the same bytes.
    pub fn dev_ptr(&self) -> u64 {
        self.dev
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// Whether it is empty (never: allocations are at least 64 bytes).
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }
}

impl std::fmt::Debug for MappedHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedHost({} bytes)", self.bytes)
    }
}

impl Drop for MappedHost {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `host` came from cuMemHostAlloc and is freed once, here.
        unsafe { cudarc::driver::sys::cuMemFreeHost(self.host as *mut std::ffi::c_void) };
    }
}
