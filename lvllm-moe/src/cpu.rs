//! Routed experts on the CPU: load-time repacking into the kernel layout, split
//! by output rows across NUMA nodes, and a three-phase forward on the worker pool.
//!
//! **Layout.** Per layer and NUMA node there is one region ([`HostBuffer`], bound to
//! the node) holding, for every expert, the node's share of two packed matrices
//! (see `lvllm_kernels_cpu::packed`):
//! - `gate_up`: blocks of 32 rows, each = 16 rows of `gate_proj` followed by the
//!   same 16 rows of `up_proj`, so one block yields 16 activations
//!   `silu(gate)·up` without a second pass;
//! - `down`: blocks of 32 rows of `down_proj`.
//!
//! Node `n` owns a contiguous range of `gate_up` blocks and of `down` blocks of
//! every expert, proportional to its worker threads; no weight is stored twice.
//!
//! **Forward.** (1) tokens are grouped by expert and gathered; (2) `gate_up`:
//! tasks (expert, block group) run on the node that owns the blocks and write
//! activations; (3) `down`: likewise, writing each expert's output rows; (4) the
//! routing-weighted sum per token. Phases are separated by the pool's barrier.

use std::sync::{Arc, Mutex};

use half::bf16;
use lvllm_kernels_cpu::int8act::{self, QuantActs};
use lvllm_kernels_cpu::ops::silu;
use lvllm_kernels_cpu::packed::{self, WeightFormat, BLOCK_ROWS};
use lvllm_kernels_cpu::quant;
use lvllm_numa::{HostBuffer, Placement, Pool};
use lvllm_tensor::{DType, HostTensor};

use crate::{Error, Result, TopK};

/// Rows of `gate` (and of `up`) per `gate_up` block.
const HALF: usize = BLOCK_ROWS / 2;

/// Most tokens per register tile of the kernel; tokens are walked in tiles of this
/// size so a tile's activations stay in L1 while a task's blocks stream by.
const TOKEN_TILE: usize = 6;

/// Most blocks one task handles. Large enough that a task's weights (8 blocks of
/// 32 × 2048 bf16 = 1 MiB) fit L2 and are reused across token tiles, small
/// enough to balance the decode case.
const MAX_BLOCKS_PER_TASK: usize = 8;

/// Tasks per thread the block grouping aims for (load balance vs. overhead).
const TASKS_PER_THREAD: usize = 16;

/// Up to this many tokens a forward runs both phases in one pool dispatch
/// ([`CpuExperts::run_fused`]); larger batches keep the two-phase barrier.
const FUSED_MAX_TOKENS: usize = 64;

/// The runtime format of routed experts (`moe_weight`; seed env `LVLLM_MOE_USE_WEIGHT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MoeWeight {
    /// Dequantize quantized checkpoints to the model dtype; keep bf16/f16 as is.
    #[default]
    ToDtype,
    /// Keep the checkpoint's format (bf16, f16, fp8).
    Keep,
    /// Quantize to symmetric int4 with group-32 scales at load.
    Int4,
}

impl std::str::FromStr for MoeWeight {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "to_dtype" | "to-dtype" => Ok(MoeWeight::ToDtype),
            "keep" => Ok(MoeWeight::Keep),
            "int4" => Ok(MoeWeight::Int4),
            _ => Err(format!("unknown moe weight format {s:?} (expected to_dtype, keep or int4)")),
        }
    }
}

/// Load-time options of [`CpuExperts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertsOptions {
    /// Runtime weight format.
    pub weight: MoeWeight,
    /// Target of `to_dtype` (`Bf16` or `F16`).
    pub dtype: WeightFormat,
    /// Group size of `int4` scales.
    pub int4_group: usize,
    /// With int4 weights, quantize activations to int8 per group and use the
    /// VNNI kernel (`lvllm_kernels_cpu::int8act`) where the CPU has it; otherwise
    /// activations stay f32. The int8 path is several times faster at decode and
    /// adds ~2⁻⁸ relative error per activation.
    pub int8_activations: bool,
}

impl Default for ExpertsOptions {
    fn default() -> Self {
        ExpertsOptions { weight: MoeWeight::ToDtype, dtype: WeightFormat::Bf16, int4_group: 32, int8_activations: true }
    }
}

/// One projection of an expert as the checkpoint stores it.
#[derive(Debug, Clone)]
pub enum ExpertMatrix {
    /// bf16, f16 or f32 weights `[rows, cols]`.
    Dense(HostTensor),
    /// FP8-E4M3 weights `[rows, cols]` with `weight_scale_inv` `[⌈rows/128⌉, ⌈cols/128⌉]`.
    Fp8 {
        /// The FP8 weights.
        weight: HostTensor,
        /// The block scales.
        scale_inv: HostTensor,
    },
}

impl ExpertMatrix {
    fn dims(&self) -> &[usize] {
        match self {
            ExpertMatrix::Dense(t) | ExpertMatrix::Fp8 { weight: t, .. } => t.dims(),
        }
    }

    fn shape_string(&self) -> lvllm_tensor::Shape {
        match self {
            ExpertMatrix::Dense(t) | ExpertMatrix::Fp8 { weight: t, .. } => t.shape().clone(),
        }
    }

    /// The runtime format this source becomes under `opts`.
    fn target(&self, opts: &ExpertsOptions) -> Result<WeightFormat> {
        let src = match self {
            ExpertMatrix::Dense(t) => t.dtype(),
            ExpertMatrix::Fp8 { .. } => DType::F8E4M3,
        };
        Ok(match (opts.weight, src) {
            (MoeWeight::Int4, _) => WeightFormat::Int4 { group: opts.int4_group },
            (MoeWeight::Keep, DType::BF16) => WeightFormat::Bf16,
            (MoeWeight::Keep, DType::F16) => WeightFormat::F16,
            (MoeWeight::Keep, DType::F8E4M3) => WeightFormat::Fp8,
            (MoeWeight::Keep, d) => {
                return Err(Error::Input(format!(
                    "expert weights of dtype {d} cannot be kept; use moe_weight to_dtype"
                )))
            }
            (MoeWeight::ToDtype, DType::BF16) => WeightFormat::Bf16,
            (MoeWeight::ToDtype, DType::F16) => WeightFormat::F16,
            (MoeWeight::ToDtype, _) => opts.dtype,
        })
    }

    /// Row `r` as f32 (dequantized for FP8).
    fn row_f32(&self, r: usize, out: &mut [f32]) -> Result<()> {
        let cols = self.dims()[1];
        match self {
            ExpertMatrix::Dense(t) => match t.dtype() {
                DType::BF16 => {
                    let v = t.typed::<bf16>()?;
                    for (o, w) in out.iter_mut().zip(&v[r * cols..(r + 1) * cols]) {
                        *o = w.to_f32();
                    }
                }
                DType::F16 => {
                    let v = t.typed::<half::f16>()?;
                    for (o, w) in out.iter_mut().zip(&v[r * cols..(r + 1) * cols]) {
                        *o = w.to_f32();
                    }
                }
                DType::F32 => out.copy_from_slice(&t.typed::<f32>()?[r * cols..(r + 1) * cols]),
                dtype => return Err(lvllm_tensor::Error::UnsupportedDType { op: "expert weights", dtype }.into()),
            },
            ExpertMatrix::Fp8 { weight, scale_inv } => {
                let s = scale_inv.typed::<f32>()?;
                let scales = quant::fp8_row_scales(&s, cols, r);
                for (c, (o, &b)) in out.iter_mut().zip(&weight.as_bytes()[r * cols..(r + 1) * cols]).enumerate() {
                    *o = quant::fp8_e4m3_to_f32(b) * scales[c / 128];
                }
            }
        }
        Ok(())
    }

    fn check(&self, expert: usize, what: &'static str, rows: usize, cols: usize) -> Result<()> {
        let shape_err =
            || Error::ExpertShape { expert, what, got: self.shape_string(), expected: format!("[{rows}, {cols}]") };
        if self.dims() != [rows, cols] {
            return Err(shape_err());
        }
        if let ExpertMatrix::Fp8 { weight, scale_inv } = self {
            if weight.dtype() != DType::F8E4M3 || scale_inv.dtype() != DType::F32 {
                return Err(Error::Input(format!(
                    "expert {expert} {what}: fp8 weights need F8_E4M3 data and F32 scales"
                )));
            }
            if scale_inv.dims() != [rows.div_ceil(128), cols.div_ceil(128)] {
                return Err(Error::ExpertShape {
                    expert,
                    what: "weight_scale_inv",
                    got: scale_inv.shape().clone(),
                    expected: format!("[{}, {}]", rows.div_ceil(128), cols.div_ceil(128)),
                });
            }
        }
        Ok(())
    }
}

/// The three projections of one expert, as stored in Hugging Face checkpoints.
#[derive(Debug, Clone)]
pub struct ExpertWeights {
    /// `gate_proj`, `[intermediate, hidden]`.
    pub gate: ExpertMatrix,
    /// `up_proj`, `[intermediate, hidden]`.
    pub up: ExpertMatrix,
    /// `down_proj`, `[hidden, intermediate]`.
    pub down: ExpertMatrix,
}

impl ExpertWeights {
    /// Lets the OS drop the pages of memory-mapped source tensors (after packing).
    pub fn release_pages(&self) {
        for m in [&self.gate, &self.up, &self.down] {
            let (ExpertMatrix::Dense(t) | ExpertMatrix::Fp8 { weight: t, .. }) = m;
            t.release_pages();
        }
    }

    /// An expert from three dense (bf16/f16/f32) tensors.
    pub fn dense(gate: HostTensor, up: HostTensor, down: HostTensor) -> Self {
        ExpertWeights { gate: ExpertMatrix::Dense(gate), up: ExpertMatrix::Dense(up), down: ExpertMatrix::Dense(down) }
    }
}

/// One node's share of every expert.
struct NodeShard {
    /// `gate_up` blocks `[gu.start, gu.end)` and `down` blocks `[dn.start, dn.end)`.
    gu: std::ops::Range<usize>,
    dn: std::ops::Range<usize>,
    /// Per expert: its gate_up blocks then its down blocks.
    buf: HostBuffer,
    expert_stride: usize,
}

/// Reusable forward buffers.
#[derive(Default)]
struct Scratch {
    xg: Vec<f32>,
    act: Vec<f32>,
    y: Vec<f32>,
    slot_of: Vec<usize>,
    order: Vec<usize>,
    /// Int8 activations of each token, of each slot (`xt` gathered in
    /// expert order) and of `act` (int8 path only).
    xt: Int8Rows,
    xq: Int8Rows,
    aq: Int8Rows,
}

/// Rows of int8-quantized activations with their per-group scales and sums.
#[derive(Default)]
struct Int8Rows {
    q: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<i32>,
    stride: usize,
    groups: usize,
}

impl Int8Rows {
    /// Sizes the buffers for `rows` rows of `k` values and returns a writer that
    /// fills rows independently (from any thread, each row once).
    fn prepare(&mut self, rows: usize, k: usize, group: usize) -> Int8Writer {
        self.stride = int8act::q_stride(k);
        self.groups = k.div_ceil(group);
        self.q.resize(rows * self.stride, 0);
        self.scales.resize(rows * self.groups, 0.0);
        self.sums.resize(rows * self.groups, 0);
        Int8Writer {
            q: SharedOut(self.q.as_mut_ptr().cast()),
            scales: SharedOut(self.scales.as_mut_ptr()),
            sums: SharedOut(self.sums.as_mut_ptr().cast()),
            stride: self.stride,
            groups: self.groups,
            rows,
            k,
            group,
        }
    }

    /// Quantizes `rows` rows of `k` values, `src_stride` apart, on the pool.
    fn quantize(&mut self, pool: &Pool, src: &[f32], src_stride: usize, rows: usize, k: usize, group: usize) {
        let w = self.prepare(rows, k, group);
        // SAFETY: each row is quantized by one call, into the buffers just sized.
        let one = |r: usize| unsafe { w.quantize_row(r, &src[r * src_stride..r * src_stride + k]) };
        if rows < 64 {
            (0..rows).for_each(one);
        } else {
            pool.parallel_for(rows, |_, r| one(r));
        }
    }

    /// Makes row `i` a copy of `src`'s row `rows[i]`.
    fn gather(&mut self, src: &Int8Rows, rows: &[usize]) {
        let (stride, groups) = (src.stride, src.groups);
        self.stride = stride;
        self.groups = groups;
        self.q.resize(rows.len() * stride, 0);
        self.scales.resize(rows.len() * groups, 0.0);
        self.sums.resize(rows.len() * groups, 0);
        for (i, &r) in rows.iter().enumerate() {
            self.q[i * stride..(i + 1) * stride].copy_from_slice(&src.q[r * stride..(r + 1) * stride]);
            self.scales[i * groups..(i + 1) * groups].copy_from_slice(&src.scales[r * groups..(r + 1) * groups]);
            self.sums[i * groups..(i + 1) * groups].copy_from_slice(&src.sums[r * groups..(r + 1) * groups]);
        }
    }

    fn rows(&self, first: usize) -> QuantActs<'_> {
        QuantActs {
            q: &self.q[first * self.stride..],
            stride: self.stride,
            scales: &self.scales[first * self.groups..],
            sums: &self.sums[first * self.groups..],
            groups: self.groups,
        }
    }
}

/// Raw access to the rows of an [`Int8Rows`] sized by [`Int8Rows::prepare`],
/// so that tasks fill and read disjoint rows concurrently.
#[derive(Clone, Copy)]
struct Int8Writer {
    q: SharedOut,
    scales: SharedOut,
    sums: SharedOut,
    stride: usize,
    groups: usize,
    rows: usize,
    k: usize,
    group: usize,
}

impl Int8Writer {
    /// Quantizes `x` (`k` values) into row `r`.
    ///
    /// # Safety
    /// The buffers are still as `prepare` left them, and no other thread reads or
    /// writes row `r` during the call.
    unsafe fn quantize_row(self, r: usize, x: &[f32]) {
        assert!(r < self.rows && x.len() == self.k);
        // SAFETY: row r's ranges lie inside the sized buffers and are ours alone.
        let (q, sc, su) = unsafe {
            (
                std::slice::from_raw_parts_mut(self.q.ptr().cast::<i8>().add(r * self.stride), self.stride),
                std::slice::from_raw_parts_mut(self.scales.ptr().add(r * self.groups), self.groups),
                std::slice::from_raw_parts_mut(self.sums.ptr().cast::<i32>().add(r * self.groups), self.groups),
            )
        };
        int8act::quantize_row(x, self.group, q, sc, su);
    }

    /// Rows `first..first + n`, for reading.
    ///
    /// # Safety
    /// Those rows were written (and the writes are visible to this thread), and no
    /// thread writes them while the result lives.
    unsafe fn rows(&self, first: usize, n: usize) -> QuantActs<'_> {
        assert!(first + n <= self.rows);
        // SAFETY: the ranges lie inside the sized buffers; the caller guarantees
        // nobody writes them meanwhile.
        unsafe {
            QuantActs {
                q: std::slice::from_raw_parts(self.q.ptr().cast::<i8>().add(first * self.stride), n * self.stride),
                stride: self.stride,
                scales: std::slice::from_raw_parts(self.scales.ptr().add(first * self.groups), n * self.groups),
                sums: std::slice::from_raw_parts(
                    self.sums.ptr().cast::<i32>().add(first * self.groups),
                    n * self.groups,
                ),
                groups: self.groups,
            }
        }
    }
}

/// One MoE layer's routed experts on the CPU.
pub struct CpuExperts {
    pool: Arc<Pool>,
    shards: Vec<NodeShard>,
    n_experts: usize,
    hidden: usize,
    intermediate: usize,
    gu_format: WeightFormat,
    dn_format: WeightFormat,
    gu_blocks: usize,
    dn_blocks: usize,
    /// Int8-activation group size when that path is on.
    int8_group: Option<usize>,
    /// Tasks per thread the block grouping aims for.
    tasks_per_thread: usize,
    max_blocks_per_task: usize,
    decode_schedule: DecodeSchedule,
    stats: Option<Box<StatsCells>>,
    scratch: Mutex<Scratch>,
}

/// Where the threads' time went in decode forwards run with
/// [`DecodeSchedule::Regions`] (summed over tasks and calls, nanoseconds; other
/// forwards are not counted); see [`CpuExperts::with_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeStats {
    /// Forward calls counted.
    pub calls: u64,
    /// Region tasks counted (per call, one per thread unless a node has fewer
    /// blocks than threads).
    pub tasks: u64,
    /// From the forward's dispatch to a task's start.
    pub start_ns: u64,
    /// In gate_up blocks.
    pub gate_up_ns: u64,
    /// Waiting for an expert's gate_up to finish before its down blocks.
    pub wait_ns: u64,
    /// In down blocks.
    pub down_ns: u64,
    /// From a task's end to the last task's end (the tail).
    pub tail_ns: u64,
    /// The pool dispatch (dispatch to return), summed over calls.
    pub forward_ns: u64,
    /// Before the dispatch (routing sort, gathering and quantizing inputs).
    pub prologue_ns: u64,
}

impl std::ops::Add for DecodeStats {
    type Output = DecodeStats;
    fn add(self, o: DecodeStats) -> DecodeStats {
        DecodeStats {
            calls: self.calls + o.calls,
            tasks: self.tasks + o.tasks,
            start_ns: self.start_ns + o.start_ns,
            gate_up_ns: self.gate_up_ns + o.gate_up_ns,
            wait_ns: self.wait_ns + o.wait_ns,
            down_ns: self.down_ns + o.down_ns,
            tail_ns: self.tail_ns + o.tail_ns,
            forward_ns: self.forward_ns + o.forward_ns,
            prologue_ns: self.prologue_ns + o.prologue_ns,
        }
    }
}

/// Sums the stats of several layers.
impl std::iter::Sum for DecodeStats {
    fn sum<I: Iterator<Item = DecodeStats>>(iter: I) -> DecodeStats {
        iter.fold(DecodeStats::default(), |a, b| a + b)
    }
}

#[derive(Default)]
struct StatsCells {
    calls: std::sync::atomic::AtomicU64,
    tasks: std::sync::atomic::AtomicU64,
    start_ns: std::sync::atomic::AtomicU64,
    gate_up_ns: std::sync::atomic::AtomicU64,
    wait_ns: std::sync::atomic::AtomicU64,
    down_ns: std::sync::atomic::AtomicU64,
    tail_ns: std::sync::atomic::AtomicU64,
    forward_ns: std::sync::atomic::AtomicU64,
    prologue_ns: std::sync::atomic::AtomicU64,
}

/// How decode-sized batches (up to 64 tokens) are spread over the pool's threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DecodeSchedule {
    /// Equal contiguous chunks claimed in order from one counter per node.
    Chunks,
    /// Each thread streams its own contiguous region of the active experts'
    /// blocks one block at a time, then takes blocks from the other regions.
    #[default]
    Regions,
}

impl std::fmt::Debug for CpuExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuExperts")
            .field("n_experts", &self.n_experts)
            .field("hidden", &self.hidden)
            .field("intermediate", &self.intermediate)
            .field("format", &self.gu_format)
            .field("nodes", &self.shards.len())
            .finish_non_exhaustive()
    }
}

/// Splits `n` blocks over nodes proportionally to `weights` (contiguous ranges).
fn split(n: usize, weights: &[usize]) -> Vec<std::ops::Range<usize>> {
    let total: usize = weights.iter().sum::<usize>().max(1);
    let mut out = Vec::with_capacity(weights.len());
    let mut acc = 0;
    let mut start = 0;
    for &w in weights {
        acc += w;
        let end = n * acc / total;
        out.push(start..end);
        start = end;
    }
    out
}

impl CpuExperts {
    /// Repacks a layer's experts into node-local regions of the kernel layout.
    /// Experts are consumed one by one, so the caller can release each
    /// checkpoint tensor's pages as soon as it is packed (`release` is called on
    /// every source tensor after its expert is packed).
    pub fn new(
        pool: Arc<Pool>,
        experts: Vec<ExpertWeights>,
        hidden: usize,
        intermediate: usize,
        opts: &ExpertsOptions,
        mut release: impl FnMut(&ExpertWeights),
    ) -> Result<Self> {
        let n_experts = experts.len();
        if n_experts == 0 {
            return Err(Error::Input("a MoE layer needs at least one expert".into()));
        }
        for (i, e) in experts.iter().enumerate() {
            e.gate.check(i, "gate_proj", intermediate, hidden)?;
            e.up.check(i, "up_proj", intermediate, hidden)?;
            e.down.check(i, "down_proj", hidden, intermediate)?;
        }
        let gu_format = experts[0].gate.target(opts)?;
        let dn_format = experts[0].down.target(opts)?;
        for f in [(gu_format, hidden), (dn_format, intermediate)] {
            f.0.check(f.1).map_err(Error::Input)?;
        }
        let gu_blocks = intermediate.div_ceil(HALF);
        let dn_blocks = hidden.div_ceil(BLOCK_ROWS);
        let (gu_bb, dn_bb) = (gu_format.block_bytes(hidden), dn_format.block_bytes(intermediate));
        let mut shards = alloc_shards(&pool, n_experts, (gu_blocks, gu_bb), (dn_blocks, dn_bb))?;

        let zero = vec![0f32; hidden.max(intermediate)];
        let mut gate = vec![0f32; intermediate * hidden];
        let mut up = vec![0f32; intermediate * hidden];
        let mut down = vec![0f32; hidden * intermediate];
        for (e, w) in experts.iter().enumerate() {
            let fmt_of = |m: &ExpertMatrix| m.target(opts);
            if fmt_of(&w.gate)? != gu_format || fmt_of(&w.up)? != gu_format || fmt_of(&w.down)? != dn_format {
                return Err(Error::Input(format!("expert {e} is stored in another format than expert 0")));
            }
            for r in 0..intermediate {
                w.gate.row_f32(r, &mut gate[r * hidden..(r + 1) * hidden])?;
                w.up.row_f32(r, &mut up[r * hidden..(r + 1) * hidden])?;
            }
            for r in 0..hidden {
                w.down.row_f32(r, &mut down[r * intermediate..(r + 1) * intermediate])?;
            }
            let fp8_keep = gu_format == WeightFormat::Fp8;
            for shard in &mut shards {
                let base = e * shard.expert_stride;
                let bytes = shard.buf.as_mut_slice();
                for (i, b) in shard.gu.clone().enumerate() {
                    let dst = &mut bytes[base + i * gu_bb..base + (i + 1) * gu_bb];
                    fn row<'a>(m: &'a [f32], zero: &'a [f32], r: usize, rows: usize, cols: usize) -> &'a [f32] {
                        if r < rows {
                            &m[r * cols..(r + 1) * cols]
                        } else {
                            &zero[..cols]
                        }
                    }
                    if fp8_keep {
                        pack_fp8_gate_up(w, b, hidden, intermediate, dst)?;
                    } else {
                        let rows: Vec<&[f32]> = (0..HALF)
                            .map(|i| row(&gate, &zero, b * HALF + i, intermediate, hidden))
                            .chain((0..HALF).map(|i| row(&up, &zero, b * HALF + i, intermediate, hidden)))
                            .collect();
                        packed::pack_block(gu_format, &rows, hidden, dst);
                    }
                }
                let dn_base = base + shard.gu.len() * gu_bb;
                for (i, b) in shard.dn.clone().enumerate() {
                    let dst = &mut bytes[dn_base + i * dn_bb..dn_base + (i + 1) * dn_bb];
                    let rows: Vec<usize> = (b * BLOCK_ROWS..((b + 1) * BLOCK_ROWS).min(hidden)).collect();
                    if fp8_keep {
                        let ExpertMatrix::Fp8 { weight, scale_inv } = &w.down else { unreachable!("checked format") };
                        let s = scale_inv.typed::<f32>()?;
                        let data: Vec<&[u8]> = rows
                            .iter()
                            .map(|&r| &weight.as_bytes()[r * intermediate..(r + 1) * intermediate])
                            .collect();
                        let sc: Vec<&[f32]> =
                            rows.iter().map(|&r| quant::fp8_row_scales(&s, intermediate, r)).collect();
                        packed::pack_block_fp8(&data, &sc, intermediate, dst);
                    } else {
                        let rs: Vec<&[f32]> =
                            rows.iter().map(|&r| &down[r * intermediate..(r + 1) * intermediate]).collect();
                        packed::pack_block(dn_format, &rs, intermediate, dst);
                    }
                }
            }
            release(w);
        }
        Ok(CpuExperts {
            pool,
            shards,
            n_experts,
            hidden,
            intermediate,
            gu_format,
            dn_format,
            gu_blocks,
            dn_blocks,
            int8_group: match gu_format {
                WeightFormat::Int4 { group } if opts.int8_activations && int8act::available() => Some(group),
                _ => None,
            },
            tasks_per_thread: TASKS_PER_THREAD,
            max_blocks_per_task: MAX_BLOCKS_PER_TASK,
            decode_schedule: DecodeSchedule::default(),
            stats: None,
            scratch: Mutex::new(Scratch::default()),
        })
    }

    /// A layer of `n_experts` experts filled with deterministic random weights in
    /// `format`, directly in the packed layout (`load_format: dummy`, for
    /// benchmarks of real sizes without a checkpoint). Filled in parallel on the pool,
    /// each node writing its own region.
    pub fn dummy(
        pool: Arc<Pool>,
        n_experts: usize,
        hidden: usize,
        intermediate: usize,
        format: WeightFormat,
        int8_activations: bool,
        seed: u64,
    ) -> Result<Self> {
        format.check(hidden).map_err(Error::Input)?;
        format.check(intermediate).map_err(Error::Input)?;
        let gu_blocks = intermediate.div_ceil(HALF);
        let dn_blocks = hidden.div_ceil(BLOCK_ROWS);
        let (gu_bb, dn_bb) = (format.block_bytes(hidden), format.block_bytes(intermediate));
        let mut shards = alloc_shards(&pool, n_experts, (gu_blocks, gu_bb), (dn_blocks, dn_bb))?;
        // One task per (node, expert): fill that expert's bytes of the node's region.
        let tasks: Vec<usize> = shards.iter().map(|_| n_experts).collect();
        let ptrs: Vec<(SharedOut, usize, usize, usize)> = shards
            .iter_mut()
            .map(|sh| (SharedOut(sh.buf.as_mut_ptr().cast()), sh.expert_stride, sh.gu.len(), sh.dn.len()))
            .collect();
        pool.parallel_for_nodes(&tasks, |ctx, e| {
            let (base, stride, ngu, ndn) = ptrs[ctx.node];
            // SAFETY: task (node, e) alone writes bytes [e·stride, (e+1)·stride) of
            // its node's region, which lives until this call returns.
            let bytes = unsafe { std::slice::from_raw_parts_mut(base.ptr().cast::<u8>().add(e * stride), stride) };
            let mut state = seed ^ ((ctx.node as u64) << 48) ^ (e as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut fill = |blk: &mut [u8], k: usize| fill_dummy_block(format, blk, k, &mut state);
            for blk in bytes[..ngu * gu_bb].chunks_exact_mut(gu_bb) {
                fill(blk, hidden);
            }
            for blk in bytes[ngu * gu_bb..ngu * gu_bb + ndn * dn_bb].chunks_exact_mut(dn_bb) {
                fill(blk, intermediate);
            }
        });
        Ok(CpuExperts {
            pool,
            shards,
            n_experts,
            hidden,
            intermediate,
            gu_format: format,
            dn_format: format,
            gu_blocks,
            dn_blocks,
            int8_group: match format {
                WeightFormat::Int4 { group } if int8_activations && int8act::available() => Some(group),
                _ => None,
            },
            tasks_per_thread: TASKS_PER_THREAD,
            max_blocks_per_task: MAX_BLOCKS_PER_TASK,
            decode_schedule: DecodeSchedule::default(),
            stats: None,
            scratch: Mutex::new(Scratch::default()),
        })
    }

    /// Number of experts.
    pub fn n_experts(&self) -> usize {
        self.n_experts
    }

    /// The runtime format of `gate_up` and `down`.
    pub fn formats(&self) -> (WeightFormat, WeightFormat) {
        (self.gu_format, self.dn_format)
    }

    /// Whether the int4 × int8 (VNNI) kernel runs this layer.
    pub fn uses_int8_activations(&self) -> bool {
        self.int8_group.is_some()
    }

    /// Sets how many tasks per worker thread a phase's blocks are grouped into
    /// (default 16, at least 1): fewer, longer tasks stream more bytes per task
    /// start; more, shorter ones balance better. A tuning knob for benchmarks.
    pub fn with_tasks_per_thread(mut self, n: usize) -> Self {
        self.tasks_per_thread = n.max(1);
        self
    }

    /// Sets how decode-sized batches are spread over the threads (a tuning knob
    /// for benchmarks; results do not depend on it).
    pub fn with_decode_schedule(mut self, schedule: DecodeSchedule) -> Self {
        self.decode_schedule = schedule;
        self
    }

    /// Records where the threads' time goes in decode-sized forwards with
    /// [`DecodeSchedule::Regions`] (a few clock reads per thread and call); read
    /// with [`CpuExperts::stats`]. For benchmarks.
    pub fn with_stats(mut self, on: bool) -> Self {
        self.stats = on.then(Box::default);
        self
    }

    /// The counters [`CpuExperts::with_stats`] turned on (zero when off).
    pub fn stats(&self) -> DecodeStats {
        use std::sync::atomic::Ordering::Relaxed;
        self.stats.as_ref().map_or_else(DecodeStats::default, |c| DecodeStats {
            calls: c.calls.load(Relaxed),
            tasks: c.tasks.load(Relaxed),
            start_ns: c.start_ns.load(Relaxed),
            gate_up_ns: c.gate_up_ns.load(Relaxed),
            wait_ns: c.wait_ns.load(Relaxed),
            down_ns: c.down_ns.load(Relaxed),
            tail_ns: c.tail_ns.load(Relaxed),
            forward_ns: c.forward_ns.load(Relaxed),
            prologue_ns: c.prologue_ns.load(Relaxed),
        })
    }

    /// Caps the blocks one task handles (default 8, at least 1). A tuning knob
    /// for benchmarks, like [`CpuExperts::with_tasks_per_thread`].
    pub fn with_max_blocks_per_task(mut self, n: usize) -> Self {
        self.max_blocks_per_task = n.max(1);
        self
    }

    /// Bytes the kernels read for one expert (data + scales, all three projections).
    pub fn expert_bytes(&self) -> usize {
        self.gu_blocks * self.gu_format.bytes_read(self.hidden)
            + self.dn_blocks * self.dn_format.bytes_read(self.intermediate)
    }

    /// The node-local regions (pointer, length), e.g. for `cuMemHostRegister`.
    pub fn regions(&self) -> Vec<(*const u8, usize)> {
        self.shards.iter().map(|s| (s.buf.as_ptr(), s.buf.len())).collect()
    }

    fn gu_block<'a>(&'a self, shard: &'a NodeShard, e: usize, i: usize) -> &'a [u8] {
        let bb = self.gu_format.block_bytes(self.hidden);
        let off = e * shard.expert_stride + i * bb;
        &shard.buf.as_slice()[off..off + bb]
    }

    fn dn_block<'a>(&'a self, shard: &'a NodeShard, e: usize, i: usize) -> &'a [u8] {
        let bb = self.dn_format.block_bytes(self.intermediate);
        let off = e * shard.expert_stride + shard.gu.len() * self.gu_format.block_bytes(self.hidden) + i * bb;
        &shard.buf.as_slice()[off..off + bb]
    }

    /// `out[m, hidden] = Σ_j topk.weights[t, j] · expert_{topk.ids[t, j]}(hidden[t])`.
    pub fn forward(&self, hidden: &[f32], topk: &TopK, out: &mut [f32]) -> Result<()> {
        self.forward_signal(hidden, topk, out, &|| {})
    }

    /// [`CpuExperts::forward`] that calls `done()` once `out` is complete: for
    /// decode-sized batches from the worker thread that writes its last part,
    /// before the pool's threads have all checked in and this call returns
    /// (the hybrid handoff releases the GPU there). On `Ok`, `done` was called
    /// exactly once; on `Err` (bad input, detected before any work) never.
    pub fn forward_signal(&self, hidden: &[f32], topk: &TopK, out: &mut [f32], done: &(dyn Fn() + Sync)) -> Result<()> {
        let t_enter = self.stats.is_some().then(std::time::Instant::now);
        let (h, m, k) = (self.hidden, topk.tokens(), topk.k);
        if hidden.len() != m * h || out.len() != m * h || topk.weights.len() != topk.ids.len() {
            return Err(Error::Input(format!(
                "{m} routed tokens need hidden and out of {} elements, got {} and {}",
                m * h,
                hidden.len(),
                out.len()
            )));
        }
        if let Some(&bad) = topk.ids.iter().find(|&&e| e as usize >= self.n_experts) {
            return Err(Error::Input(format!("expert id {bad} out of range (layer has {})", self.n_experts)));
        }
        if m == 0 {
            done();
            return Ok(());
        }
        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;
        let n_slots = m * k;
        // Group slots (token, j) by expert: counting sort.
        let mut offsets = vec![0usize; self.n_experts + 1];
        for &e in &topk.ids {
            offsets[e as usize + 1] += 1;
        }
        for e in 0..self.n_experts {
            offsets[e + 1] += offsets[e];
        }
        let mut fill = offsets.clone();
        s.order.clear();
        s.order.resize(n_slots, 0);
        s.slot_of.clear();
        s.slot_of.resize(n_slots, 0);
        for (slot, &e) in topk.ids.iter().enumerate() {
            let pos = fill[e as usize];
            fill[e as usize] += 1;
            s.order[pos] = slot / k;
            s.slot_of[slot] = pos;
        }
        let active: Vec<(usize, usize, usize)> = (0..self.n_experts)
            .filter(|&e| offsets[e + 1] > offsets[e])
            .map(|e| (e, offsets[e], offsets[e + 1] - offsets[e]))
            .collect();
        // Gather inputs in expert order.
        let i_pad = self.gu_blocks * HALF;
        let h_pad = self.dn_blocks * BLOCK_ROWS;
        s.act.resize(n_slots * i_pad, 0.0);
        s.y.resize(n_slots * h_pad, 0.0);
        if let Some(group) = self.int8_group {
            // Each token is quantized once (a token has k slots), then its row
            // is copied to its slots.
            s.xt.quantize(&self.pool, hidden, h, m, h, group);
            if active.iter().any(|&(_, _, count)| count > 1) {
                s.xq.gather(&s.xt, &s.order);
            }
        } else {
            s.xg.resize(n_slots * h, 0.0);
            for (pos, &t) in s.order.iter().enumerate() {
                s.xg[pos * h..(pos + 1) * h].copy_from_slice(&hidden[t * h..(t + 1) * h]);
            }
        }
        let inter = self.intermediate;
        let aq = self.int8_group.map(|group| s.aq.prepare(n_slots, inter, group));
        let act = SharedOut(s.act.as_mut_ptr());
        let act_rows = |first: usize, n: usize| {
            // SAFETY: rows first..first+n of `act` were completed by gate_up tasks
            // that happen-before this read (the phase barrier, or the expert's
            // readiness flag), and no task writes them any more.
            unsafe { std::slice::from_raw_parts(act.ptr().add(first * i_pad), (n - 1) * i_pad + inter) }
        };
        let (xg, xq, xt, order) = (&s.xg, &s.xq, &s.xt, &s.order);
        // gate_up of one task → SiLU·mul activations.
        let gate_up = |shard: &NodeShard, (e, start, count): (usize, usize, usize), blocks: std::ops::Range<usize>| {
            let mut tmp = [0f32; TOKEN_TILE * BLOCK_ROWS];
            for t0 in (0..count).step_by(TOKEN_TILE) {
                let n = (count - t0).min(TOKEN_TILE);
                for i in blocks.clone() {
                    let block = self.gu_block(shard, e, i);
                    let out = &mut tmp[..n * BLOCK_ROWS];
                    if self.int8_group.is_some() {
                        // An expert with one slot reads its token's row directly
                        // (`xq` holds the gathered rows only when some expert has more).
                        let x = if count == 1 { xt.rows(order[start]) } else { xq.rows(start + t0) };
                        int8act::gemm_block_i8(self.gu_format, block, h, &x, n, out, BLOCK_ROWS);
                    } else {
                        let x = &xg[(start + t0) * h..(start + t0 + n) * h];
                        packed::gemm_block(self.gu_format, block, h, x, h, n, out, BLOCK_ROWS);
                    }
                    let col = (shard.gu.start + i) * HALF;
                    for t in 0..n {
                        let g = &tmp[t * BLOCK_ROWS..t * BLOCK_ROWS + HALF];
                        let u = &tmp[t * BLOCK_ROWS + HALF..(t + 1) * BLOCK_ROWS];
                        let row = (start + t0 + t) * i_pad + col;
                        for c in 0..HALF {
                            // SAFETY: this task alone writes columns col..col+16 of the
                            // rows of its expert's slots; the buffer outlives the phase.
                            unsafe { act.write(row + c, silu(g[c]) * u[c]) };
                        }
                    }
                }
            }
        };
        // After all of an expert's gate_up tasks: quantize its activation rows.
        let finish_expert = |(_, start, count): (usize, usize, usize)| {
            if let Some(w) = aq {
                for r in start..start + count {
                    // SAFETY: row r belongs to this expert alone; see `act_rows`.
                    unsafe { w.quantize_row(r, &act_rows(r, 1)[..inter]) };
                }
            }
        };
        // down of one task → per-slot expert outputs.
        let y = SharedOut(s.y.as_mut_ptr());
        let down = |shard: &NodeShard, (e, start, count): (usize, usize, usize), blocks: std::ops::Range<usize>| {
            let mut tmp = [0f32; TOKEN_TILE * BLOCK_ROWS];
            for t0 in (0..count).step_by(TOKEN_TILE) {
                let n = (count - t0).min(TOKEN_TILE);
                let x = act_rows(start + t0, n);
                for i in blocks.clone() {
                    let block = self.dn_block(shard, e, i);
                    let out = &mut tmp[..n * BLOCK_ROWS];
                    match &aq {
                        Some(w) => {
                            // SAFETY: the expert's rows were quantized before its down
                            // tasks start and are not written again.
                            let rows = unsafe { w.rows(start + t0, n) };
                            int8act::gemm_block_i8(self.dn_format, block, inter, &rows, n, out, BLOCK_ROWS);
                        }
                        None => packed::gemm_block(self.dn_format, block, inter, x, i_pad, n, out, BLOCK_ROWS),
                    }
                    let col = (shard.dn.start + i) * BLOCK_ROWS;
                    for t in 0..n {
                        let row = (start + t0 + t) * h_pad + col;
                        for c in 0..BLOCK_ROWS {
                            // SAFETY: this task alone writes columns col..col+32 of its
                            // expert's slot rows; the buffer outlives the phase.
                            unsafe { y.write(row + c, tmp[t * BLOCK_ROWS + c]) };
                        }
                    }
                }
            }
        };
        if m <= FUSED_MAX_TOKENS && !self.pool.is_worker_thread() {
            // Decode-sized batches: one dispatch, down tasks start per expert.
            match self.decode_schedule {
                DecodeSchedule::Chunks => self.run_fused(&active, gate_up, finish_expert, down),
                DecodeSchedule::Regions if !active.is_empty() => {
                    if let (Some(c), Some(t_enter)) = (&self.stats, t_enter) {
                        let ns = t_enter.elapsed().as_nanos() as u64;
                        c.prologue_ns.fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
                    }
                    // The weighted sum per token runs per 32-column block, by the
                    // thread that finishes the block's last expert; the thread
                    // that finishes the last column block calls `done`.
                    use std::sync::atomic::{AtomicUsize, Ordering};
                    let col_left: Vec<AtomicUsize> =
                        (0..self.dn_blocks).map(|_| AtomicUsize::new(active.len())).collect();
                    let cols_left = AtomicUsize::new(self.dn_blocks);
                    let outp = SharedOut(out.as_mut_ptr());
                    let slot_of = &s.slot_of;
                    let after_down = |gb: usize| {
                        if col_left[gb].fetch_sub(1, Ordering::AcqRel) != 1 {
                            return;
                        }
                        let (c0, c1) = (gb * BLOCK_ROWS, ((gb + 1) * BLOCK_ROWS).min(h));
                        for t in 0..m {
                            for c in c0..c1 {
                                let mut acc = 0f32;
                                for j in 0..k {
                                    let pos = slot_of[t * k + j];
                                    // SAFETY: every expert's down block `gb` (all the
                                    // slots' columns c0..c1) was written before its
                                    // `col_left` decrement, which happens-before this
                                    // read (AcqRel); nothing writes them any more.
                                    acc += topk.weights[t * k + j] * unsafe { *y.ptr().add(pos * h_pad + c) };
                                }
                                // SAFETY: column block gb of row t is written by this
                                // call alone; `out` outlives the dispatch.
                                unsafe { outp.write(t * h + c, acc) };
                            }
                        }
                        if cols_left.fetch_sub(1, Ordering::AcqRel) == 1 {
                            done();
                        }
                    };
                    self.run_regions(&active, gate_up, finish_expert, down, after_down);
                    return Ok(());
                }
                DecodeSchedule::Regions => self.run_fused(&active, gate_up, finish_expert, down),
            }
        } else {
            self.run_phase(&active, |shard| shard.gu.len(), gate_up);
            match aq {
                Some(w) if n_slots >= 64 => {
                    // SAFETY: one call per row, after the gate_up phase completed.
                    self.pool.parallel_for(n_slots, |_, r| unsafe { w.quantize_row(r, &act_rows(r, 1)[..inter]) })
                }
                _ => active.iter().for_each(|&a| finish_expert(a)),
            }
            self.run_phase(&active, |shard| shard.dn.len(), down);
        }

        // Phase 3: weighted sum per token.
        let yv = &s.y;
        let slot_of = &s.slot_of;
        let combine = |t: usize, o: &mut [f32]| {
            o.fill(0.0);
            for j in 0..k {
                let w = topk.weights[t * k + j];
                let pos = slot_of[t * k + j];
                for (ov, yv) in o.iter_mut().zip(&yv[pos * h_pad..pos * h_pad + h]) {
                    *ov += w * yv;
                }
            }
        };
        if m < self.pool.num_threads() * 4 {
            for (t, o) in out.chunks_exact_mut(h).enumerate() {
                combine(t, o);
            }
        } else {
            let outp = SharedOut(out.as_mut_ptr());
            self.pool.parallel_for(m, |_, t| {
                let mut row = vec![0f32; h];
                combine(t, &mut row);
                for (c, v) in row.into_iter().enumerate() {
                    // SAFETY: task t alone writes row t of `out`, which outlives the call.
                    unsafe { outp.write(t * h + c, v) };
                }
            });
        }
        done();
        Ok(())
    }

    /// Per node, how a phase's blocks are cut into tasks: the active experts'
    /// node blocks laid end to end (expert order) and cut into equal contiguous
    /// chunks, `threads × tasks_per_thread` of them or more so that none exceeds
    /// `max_blocks_per_task`. A chunk may span two or more experts, so a
    /// thread streams long runs of consecutive memory even at batch 1.
    fn chunking(&self, n_active: usize, node_blocks: impl Fn(&NodeShard) -> usize) -> Vec<Chunks> {
        self.shards
            .iter()
            .enumerate()
            .map(|(n, shard)| {
                let per_expert = node_blocks(shard);
                let total = per_expert * n_active;
                let threads = self.pool.threads_on_node(n).max(1);
                let tasks = (threads * self.tasks_per_thread).max(total.div_ceil(self.max_blocks_per_task)).min(total);
                Chunks { per_expert, total, tasks }
            })
            .collect()
    }

    /// Runs one phase: for every node, its chunks of the active experts' blocks
    /// ([`CpuExperts::chunking`]); `f(shard, expert, block range)` runs on that
    /// node's threads for every piece of a chunk.
    fn run_phase(
        &self,
        active: &[(usize, usize, usize)],
        node_blocks: impl Fn(&NodeShard) -> usize + Sync,
        f: impl Fn(&NodeShard, (usize, usize, usize), std::ops::Range<usize>) + Sync,
    ) {
        let chunks = self.chunking(active.len(), &node_blocks);
        let tasks: Vec<usize> = chunks.iter().map(|c| c.tasks).collect();
        self.pool.parallel_for_nodes(&tasks, |ctx, task| {
            let shard = &self.shards[ctx.node];
            chunks[ctx.node].pieces(task, |a, blocks| f(shard, active[a], blocks));
        });
    }

    /// Both phases in one dispatch: every node's tasks are its gate_up chunks
    /// followed by its down chunks. The last gate_up piece of an expert (over
    /// all nodes) runs `finish(expert)` and marks the expert ready; a down piece
    /// waits for its expert to be ready. Workers claim a node's tasks in order,
    /// so when a down task starts, every gate_up task of its node has been
    /// claimed and the wait is for tasks already running (no deadlock); the
    /// phase barrier and the second dispatch of [`CpuExperts::run_phase`]
    /// disappear. Must not run nested on a pool worker (the pool then runs tasks
    /// inline, node after node).
    fn run_fused(
        &self,
        active: &[(usize, usize, usize)],
        gate_up: impl Fn(&NodeShard, (usize, usize, usize), std::ops::Range<usize>) + Sync,
        finish: impl Fn((usize, usize, usize)) + Sync,
        down: impl Fn(&NodeShard, (usize, usize, usize), std::ops::Range<usize>) + Sync,
    ) {
        let gu = self.chunking(active.len(), |s| s.gu.len());
        let dn = self.chunking(active.len(), |s| s.dn.len());
        // gate_up pieces per expert, over all nodes.
        let mut pieces = vec![0usize; active.len()];
        for c in &gu {
            for t in 0..c.tasks {
                c.pieces(t, |a, _| pieces[a] += 1);
            }
        }
        let rd = Readiness::new(active, &pieces, &finish);
        let tasks: Vec<usize> = gu.iter().zip(&dn).map(|(g, d)| g.tasks + d.tasks).collect();
        self.pool.parallel_for_nodes(&tasks, |ctx, task| {
            let shard = &self.shards[ctx.node];
            let (g, d) = (&gu[ctx.node], &dn[ctx.node]);
            if task < g.tasks {
                g.pieces(task, |a, blocks| {
                    let _done = rd.count_on_drop(a, 1);
                    if !rd.failed() {
                        gate_up(shard, active[a], blocks);
                    }
                });
            } else {
                d.pieces(task - g.tasks, |a, blocks| {
                    if rd.wait(a) {
                        down(shard, active[a], blocks);
                    }
                });
            }
        });
    }
}

impl CpuExperts {
    /// Both phases in one dispatch, one task per thread: each node's gate_up
    /// blocks (active experts end to end) are cut into one contiguous region per
    /// thread, and so are its down blocks. A task drains its own region one
    /// block at a time, then takes blocks from the other regions of its node
    /// (from their fronts, round robin), then does the same for the down
    /// regions; a down block waits until its expert's gate_up blocks (over all
    /// nodes) are done. A thread thus streams long runs of consecutive memory,
    /// and a slow thread's leftovers go to the others. `after_down(b)` runs
    /// after every expert's down block `b` (global index) is written, once per
    /// expert. No deadlock: a task turns
    /// to down blocks only once every gate_up block of its node has been
    /// claimed, and claimed gate_up blocks never wait.
    fn run_regions(
        &self,
        active: &[(usize, usize, usize)],
        gate_up: impl Fn(&NodeShard, (usize, usize, usize), std::ops::Range<usize>) + Sync,
        finish: impl Fn((usize, usize, usize)) + Sync,
        down: impl Fn(&NodeShard, (usize, usize, usize), std::ops::Range<usize>) + Sync,
        after_down: impl Fn(usize) + Sync,
    ) {
        let n_active = active.len();
        let regions = |node_blocks: fn(&NodeShard) -> usize| -> Vec<Regions> {
            self.shards
                .iter()
                .enumerate()
                .map(|(n, shard)| Regions::new(node_blocks(shard), n_active, self.pool.threads_on_node(n).max(1)))
                .collect()
        };
        let gu = regions(|s| s.gu.len());
        let dn = regions(|s| s.dn.len());
        // gate_up blocks per expert, over all nodes.
        let total_gu: usize = self.shards.iter().map(|s| s.gu.len()).sum();
        let rd = Readiness::new(active, &vec![total_gu; n_active], &finish);
        let tasks: Vec<usize> = gu.iter().zip(&dn).map(|(g, d)| g.regions().max(d.regions())).collect();
        let t0 = std::time::Instant::now();
        let ends: Mutex<Vec<u64>> = Mutex::new(Vec::new());
        let ns = |t: std::time::Instant| t.duration_since(t0).as_nanos() as u64;
        // Clock reads only when stats are on: a down block would otherwise pay two.
        let now = || self.stats.is_some().then(std::time::Instant::now);
        self.pool.parallel_for_nodes(&tasks, |ctx, r| {
            let shard = &self.shards[ctx.node];
            let start = now();
            gu[ctx.node].drain(r, |a, blocks| {
                let _done = rd.count_on_drop(a, blocks.len());
                if !rd.failed() {
                    gate_up(shard, active[a], blocks);
                }
            });
            let gu_end = now();
            let mut wait = std::time::Duration::ZERO;
            dn[ctx.node].drain(r, |a, blocks| {
                let w = now();
                if !rd.wait(a) {
                    return;
                }
                if let Some(w) = w {
                    wait += w.elapsed();
                }
                down(shard, active[a], blocks.clone());
                for i in blocks {
                    after_down(shard.dn.start + i);
                }
            });
            if let (Some(c), Some(start), Some(gu_end)) = (&self.stats, start, gu_end) {
                use std::sync::atomic::Ordering::Relaxed;
                let end = std::time::Instant::now();
                c.tasks.fetch_add(1, Relaxed);
                c.start_ns.fetch_add(ns(start), Relaxed);
                c.gate_up_ns.fetch_add((gu_end - start).as_nanos() as u64, Relaxed);
                c.wait_ns.fetch_add(wait.as_nanos() as u64, Relaxed);
                c.down_ns.fetch_add(((end - gu_end).saturating_sub(wait)).as_nanos() as u64, Relaxed);
                ends.lock().unwrap_or_else(|e| e.into_inner()).push(ns(end));
            }
        });
        if let Some(c) = &self.stats {
            use std::sync::atomic::Ordering::Relaxed;
            let ends = ends.into_inner().unwrap_or_else(|e| e.into_inner());
            let last = ends.iter().copied().max().unwrap_or(0);
            c.tail_ns.fetch_add(ends.iter().map(|&e| last - e).sum(), Relaxed);
            c.calls.fetch_add(1, Relaxed);
            c.forward_ns.fetch_add(ns(std::time::Instant::now()), Relaxed);
        }
    }
}

/// Which active experts' gate_up outputs are complete, in a one-dispatch
/// decode schedule: a down block of expert `a` runs once every gate_up unit of
/// `a` (over all nodes) has been counted. The last unit of an expert runs
/// `finish(expert)` first. A panicking unit (or `finish`) marks the forward
/// failed and its expert ready anyway, so waiters stop instead of spinning
/// forever (the pool then re-raises the panic; nodes whose tasks the pool
/// skipped after it are waited for by nobody).
struct Readiness<'a, F: Fn((usize, usize, usize))> {
    active: &'a [(usize, usize, usize)],
    left: Vec<std::sync::atomic::AtomicUsize>,
    ready: Vec<std::sync::atomic::AtomicBool>,
    failed: std::sync::atomic::AtomicBool,
    finish: &'a F,
}

impl<'a, F: Fn((usize, usize, usize))> Readiness<'a, F> {
    /// `units[a]` gate_up units of active expert `a` will be counted; experts
    /// with none are finished and ready at once.
    fn new(active: &'a [(usize, usize, usize)], units: &[usize], finish: &'a F) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        for (a, &n) in units.iter().enumerate() {
            if n == 0 {
                finish(active[a]);
            }
        }
        Readiness {
            active,
            left: units.iter().map(|&n| AtomicUsize::new(n)).collect(),
            ready: units.iter().map(|&n| AtomicBool::new(n == 0)).collect(),
            failed: std::sync::atomic::AtomicBool::new(false),
            finish,
        }
    }

    /// A guard that counts `n` gate_up units of expert `a` when dropped (also
    /// while unwinding).
    fn count_on_drop(&self, a: usize, n: usize) -> UnitsDone<'_, 'a, F> {
        UnitsDone { rd: self, a, n }
    }

    fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits until expert `a` is ready; false when the forward failed (skip
    /// the work). Yields the core now and then, so a waiter never holds up the
    /// thread it waits for on an oversubscribed machine for long.
    fn wait(&self, a: usize) -> bool {
        use std::sync::atomic::Ordering;
        let mut spins = 0u32;
        while !self.ready[a].load(Ordering::Acquire) {
            if self.failed() {
                return false;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        !self.failed()
    }
}

struct UnitsDone<'r, 'a, F: Fn((usize, usize, usize))> {
    rd: &'r Readiness<'a, F>,
    a: usize,
    n: usize,
}

impl<F: Fn((usize, usize, usize))> Drop for UnitsDone<'_, '_, F> {
    fn drop(&mut self) {
        use std::sync::atomic::{AtomicBool, Ordering};
        let rd = self.rd;
        if std::thread::panicking() {
            rd.failed.store(true, Ordering::Release);
        }
        if rd.left[self.a].fetch_sub(self.n, Ordering::AcqRel) != self.n {
            return;
        }
        /// Marks the expert ready when dropped, and the forward failed if
        /// that happens while `finish` unwinds.
        struct MarkReady<'x>(&'x AtomicBool, &'x AtomicBool);
        impl Drop for MarkReady<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.1.store(true, Ordering::Release);
                }
                self.0.store(true, Ordering::Release);
            }
        }
        let _mark = MarkReady(&rd.ready[self.a], &rd.failed);
        if !std::thread::panicking() && !rd.failed() {
            (rd.finish)(rd.active[self.a]);
        }
    }
}

/// A cursor on its own cache lines (threads bump different cursors).
#[repr(align(128))]
struct Cursor(std::sync::atomic::AtomicUsize);

/// One node's blocks of one phase (`per_expert × active` blocks end to end, in
/// expert order) cut into one contiguous region per thread, each with a cursor
/// that blocks are claimed from one at a time.
struct Regions {
    per_expert: usize,
    total: usize,
    cursors: Vec<Cursor>,
}

impl Regions {
    fn new(per_expert: usize, n_active: usize, threads: usize) -> Self {
        let total = per_expert * n_active;
        let n = threads.min(total).max(1);
        let cursors = (0..n).map(|r| Cursor(std::sync::atomic::AtomicUsize::new(r * total / n))).collect();
        Regions { per_expert, total, cursors }
    }

    fn regions(&self) -> usize {
        self.cursors.len()
    }

    /// Claims the blocks of region `r`, then of the other regions in turn, one
    /// block at a time, calling `f(active index, block range)` for each.
    fn drain(&self, r: usize, mut f: impl FnMut(usize, std::ops::Range<usize>)) {
        use std::sync::atomic::Ordering;
        if self.total == 0 {
            return;
        }
        let n = self.cursors.len();
        for i in 0..n {
            let rr = (r + i) % n;
            let end = (rr + 1) * self.total / n;
            loop {
                let b = self.cursors[rr].0.fetch_add(1, Ordering::Relaxed);
                if b >= end {
                    break;
                }
                let a = b / self.per_expert;
                let i = b - a * self.per_expert;
                f(a, i..i + 1);
            }
        }
    }
}

/// One node's blocks of one phase, cut into tasks: `total = per_expert × active`
/// blocks laid end to end in expert order, task `t` covering
/// `[t·total/tasks, (t+1)·total/tasks)`.
struct Chunks {
    per_expert: usize,
    total: usize,
    tasks: usize,
}

impl Chunks {
    /// Calls `f(active index, block range within that expert)` for each piece of
    /// task `t`, in order.
    fn pieces(&self, t: usize, mut f: impl FnMut(usize, std::ops::Range<usize>)) {
        let (mut s, e) = (t * self.total / self.tasks, (t + 1) * self.total / self.tasks);
        while s < e {
            let a = s / self.per_expert;
            let end = e.min((a + 1) * self.per_expert);
            f(a, s - a * self.per_expert..end - a * self.per_expert);
            s = end;
        }
    }
}

/// A pointer into a buffer that tasks write disjoint parts of.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: tasks write disjoint elements (each call site documents its partition)
// and the buffer outlives the parallel phase that writes it.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the field).
    fn ptr(self) -> *mut f32 {
        self.0
    }

    /// # Safety
    /// `i` is in bounds and no other thread accesses element `i` concurrently.
    unsafe fn write(self, i: usize, v: f32) {
        // SAFETY: forwarded contract.
        unsafe { *self.0.add(i) = v }
    }
}

/// One zeroed, node-bound region per pool node, holding that node's share of
/// `gate_up` and `down` blocks (counts and block bytes given) for every expert.
fn alloc_shards(
    pool: &Pool,
    n_experts: usize,
    (gu_blocks, gu_bb): (usize, usize),
    (dn_blocks, dn_bb): (usize, usize),
) -> Result<Vec<NodeShard>> {
    let threads: Vec<usize> = (0..pool.num_nodes()).map(|n| pool.threads_on_node(n).max(1)).collect();
    let mut shards = Vec::with_capacity(threads.len());
    for (node, (gu, dn)) in split(gu_blocks, &threads).into_iter().zip(split(dn_blocks, &threads)).enumerate() {
        let expert_stride = gu.len() * gu_bb + dn.len() * dn_bb;
        let placement =
            if pool.num_nodes() > 1 { Placement::Node(pool.node_id(node).unwrap_or(node)) } else { Placement::Default };
        let buf = HostBuffer::new((expert_stride * n_experts).max(1), placement)
            .map_err(|e| Error::Input(format!("allocating expert memory on node {node}: {e}")))?;
        shards.push(NodeShard { gu, dn, buf, expert_stride });
    }
    Ok(shards)
}

/// Fills one packed block with deterministic noise: weights of magnitude ~1/√k
/// (so activations stay O(1) through a model), plausible scales.
fn fill_dummy_block(format: WeightFormat, blk: &mut [u8], k: usize, state: &mut u64) {
    let mut next = || {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    };
    let amp = 1.0 / (k as f32).sqrt();
    let data_bytes = format.data_bytes(k);
    let (data, scales) = blk.split_at_mut(data_bytes);
    match format {
        WeightFormat::Bf16 | WeightFormat::F16 => {
            for c in data.chunks_exact_mut(8) {
                let r = next();
                for (j, pair) in c.chunks_exact_mut(2).enumerate() {
                    let v = ((r >> (16 * j)) as u16 as f32 / 32768.0 - 1.0) * amp;
                    let bits = if format == WeightFormat::Bf16 {
                        bf16::from_f32(v).to_bits()
                    } else {
                        half::f16::from_f32(v).to_bits()
                    };
                    pair.copy_from_slice(&bits.to_le_bytes());
                }
            }
        }
        WeightFormat::Fp8 => {
            for c in data.chunks_exact_mut(8) {
                c.copy_from_slice(&(next() & 0x7777_7777_7777_7777).to_le_bytes());
            }
            let s = (amp / 448.0 * 256.0 * 4.0).to_le_bytes();
            for c in scales[..format.scale_bytes(k)].chunks_exact_mut(4) {
                c.copy_from_slice(&s);
            }
        }
        WeightFormat::Int4 { .. } => {
            for c in data.chunks_exact_mut(8) {
                c.copy_from_slice(&next().to_le_bytes());
            }
            let s = bf16::from_f32(amp / 4.0).to_le_bytes();
            for c in scales[..format.scale_bytes(k)].chunks_exact_mut(2) {
                c.copy_from_slice(&s);
            }
        }
    }
}

/// Packs `gate_up` block `b` of an FP8 expert without requantizing.
fn pack_fp8_gate_up(w: &ExpertWeights, b: usize, hidden: usize, intermediate: usize, dst: &mut [u8]) -> Result<()> {
    let (ExpertMatrix::Fp8 { weight: gw, scale_inv: gs }, ExpertMatrix::Fp8 { weight: uw, scale_inv: us }) =
        (&w.gate, &w.up)
    else {
        return Err(Error::Input("fp8 format needs fp8 gate and up projections".into()));
    };
    let (gs, us) = (gs.typed::<f32>()?, us.typed::<f32>()?);
    let zeros = vec![0u8; hidden];
    let zero_scales = vec![0f32; hidden.div_ceil(128)];
    let mut data: Vec<&[u8]> = Vec::with_capacity(BLOCK_ROWS);
    let mut sc: Vec<&[f32]> = Vec::with_capacity(BLOCK_ROWS);
    for (m, s) in [(gw, &gs), (uw, &us)] {
        for i in 0..HALF {
            let r = b * HALF + i;
            if r < intermediate {
                data.push(&m.as_bytes()[r * hidden..(r + 1) * hidden]);
                sc.push(quant::fp8_row_scales(s, hidden, r));
            } else {
                data.push(&zeros);
                sc.push(&zero_scales);
            }
        }
    }
    packed::pack_block_fp8(&data, &sc, hidden, dst);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lvllm_numa::{Binding, PoolOptions, Topology};

    fn pool(nodes: usize, cores: usize) -> Arc<Pool> {
        let topo = Topology::synthetic(nodes, cores, 1);
        Arc::new(
            Pool::new(
                &topo,
                PoolOptions { threads: Some(nodes * cores), binding: Binding::NumaNode, power_saving: false },
            )
            .unwrap(),
        )
    }

    fn mat(rows: usize, cols: usize, seed: u64) -> HostTensor {
        let mut s = seed * 2654435761 + 1;
        let v: Vec<bf16> = (0..rows * cols)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5)
            })
            .collect();
        HostTensor::from_slice(&v, [rows, cols]).unwrap()
    }

    fn experts(n: usize, h: usize, i: usize) -> Vec<ExpertWeights> {
        (0..n as u64)
            .map(|e| ExpertWeights::dense(mat(i, h, 3 * e), mat(i, h, 3 * e + 1), mat(h, i, 3 * e + 2)))
            .collect()
    }

    /// Direct f64 evaluation from the dense tensors.
    fn reference(ex: &[ExpertWeights], hidden: &[f32], topk: &TopK, h: usize, i: usize) -> Vec<f32> {
        let dense = |m: &ExpertMatrix| match m {
            ExpertMatrix::Dense(t) => t.to_f32_vec().unwrap(),
            _ => unreachable!(),
        };
        let mut out = vec![0f32; hidden.len()];
        for t in 0..topk.tokens() {
            let x = &hidden[t * h..(t + 1) * h];
            for j in 0..topk.k {
                let e = &ex[topk.ids[t * topk.k + j] as usize];
                let (g, u, d) = (dense(&e.gate), dense(&e.up), dense(&e.down));
                let a: Vec<f64> = (0..i)
                    .map(|r| {
                        let gv: f64 = (0..h).map(|c| g[r * h + c] as f64 * x[c] as f64).sum();
                        let uv: f64 = (0..h).map(|c| u[r * h + c] as f64 * x[c] as f64).sum();
                        gv / (1.0 + (-gv).exp()) * uv
                    })
                    .collect();
                for r in 0..h {
                    let y: f64 = (0..i).map(|c| d[r * i + c] as f64 * a[c]).sum();
                    out[t * h + r] += (topk.weights[t * topk.k + j] as f64 * y) as f32;
                }
            }
        }
        out
    }

    fn routing(m: usize, n: usize, k: usize) -> TopK {
        let mut ids = Vec::new();
        let mut weights = Vec::new();
        for t in 0..m {
            for j in 0..k {
                ids.push(((t * 7 + j * 3) % n) as u32);
                weights.push(0.1 + 0.2 * j as f32);
            }
        }
        TopK { k, ids, weights }
    }

    #[test]
    fn matches_direct_computation_on_one_and_several_nodes() {
        let (h, i, n, k) = (96, 40, 6, 2);
        let ex = experts(n, h, i);
        let m = 9;
        let hidden: Vec<f32> = (0..m * h).map(|v| ((v * 37 % 101) as f32 / 50.0) - 1.0).collect();
        let topk = routing(m, n, k);
        let want = reference(&ex, &hidden, &topk, h, i);
        let mut results = Vec::new();
        for (nodes, cores) in [(1, 1), (1, 3), (2, 2), (3, 1)] {
            let layer =
                CpuExperts::new(pool(nodes, cores), ex.clone(), h, i, &ExpertsOptions::default(), |_| {}).unwrap();
            // Every block is owned by exactly one node.
            let gu: Vec<usize> = layer.shards.iter().flat_map(|s| s.gu.clone()).collect();
            let dn: Vec<usize> = layer.shards.iter().flat_map(|s| s.dn.clone()).collect();
            assert_eq!(gu, (0..layer.gu_blocks).collect::<Vec<_>>());
            assert_eq!(dn, (0..layer.dn_blocks).collect::<Vec<_>>());
            let mut out = vec![f32::NAN; m * h];
            layer.forward(&hidden, &topk, &mut out).unwrap();
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{nodes}x{cores}: {a} vs {b}");
            }
            results.push(out);
        }
        // Node splits change who computes a block, not what it computes.
        for r in &results[1..] {
            assert_eq!(r, &results[0]);
        }
    }

    /// `layer.forward` nested on a pool worker, which takes the two-phase path
    /// whatever the batch size.
    fn two_phase(pool: &Pool, layer: &CpuExperts, hidden: &[f32], topk: &TopK) -> Vec<f32> {
        let out = std::sync::Mutex::new(vec![f32::NAN; hidden.len()]);
        pool.parallel_for(1, |_, _| layer.forward(hidden, topk, &mut out.lock().unwrap()).unwrap());
        out.into_inner().unwrap()
    }

    /// One dispatch with per-expert readiness (decode-sized batches) computes
    /// exactly what the two phases with a barrier compute: a forward nested on a
    /// pool worker takes the two-phase path, so compare it with a plain call, on
    /// one and two nodes, for f32 and int8 activations, below and above the
    /// fused-batch limit.
    #[test]
    fn fused_phases_equal_two_phases() {
        let (h, i, n, k) = (96, 64, 8, 3);
        let ex = experts(n, h, i);
        for (nodes, cores) in [(1, 3), (2, 2)] {
            for (weight, int8) in [(MoeWeight::Keep, false), (MoeWeight::Int4, true)] {
                let opts = ExpertsOptions { weight, int8_activations: int8, ..Default::default() };
                let pool = pool(nodes, cores);
                let layer = CpuExperts::new(pool.clone(), ex.clone(), h, i, &opts, |_| {}).unwrap();
                for m in [1, 5, FUSED_MAX_TOKENS + 6] {
                    let hidden: Vec<f32> = (0..m * h).map(|v| ((v * 37 % 101) as f32 / 50.0) - 1.0).collect();
                    let topk = routing(m, n, k);
                    let mut fused = vec![f32::NAN; m * h];
                    layer.forward(&hidden, &topk, &mut fused).unwrap();
                    let nested = two_phase(&pool, &layer, &hidden, &topk);
                    assert!(fused.iter().all(|v| v.is_finite()));
                    assert_eq!(fused, nested, "{nodes}x{cores} {weight:?} int8 {int8} m {m}");
                }
            }
        }
    }

    /// Both decode schedules give the bits of the two-phase path; the signal
    /// fires once, when `out` is already complete.
    #[test]
    fn decode_schedules_agree_and_signal_once_out_is_complete() {
        let (h, i, n, k) = (96, 64, 8, 3);
        let ex = experts(n, h, i);
        for (nodes, cores) in [(1, 3), (2, 2)] {
            for (weight, int8) in [(MoeWeight::Keep, false), (MoeWeight::Int4, true)] {
                let opts = ExpertsOptions { weight, int8_activations: int8, ..Default::default() };
                let pool = pool(nodes, cores);
                let layer = CpuExperts::new(pool.clone(), ex.clone(), h, i, &opts, |_| {}).unwrap();
                for m in [1, 5, 40] {
                    let hidden: Vec<f32> = (0..m * h).map(|v| ((v * 37 % 101) as f32 / 50.0) - 1.0).collect();
                    let topk = routing(m, n, k);
                    let two_phase = two_phase(&pool, &layer, &hidden, &topk);
                    for schedule in [DecodeSchedule::Chunks, DecodeSchedule::Regions] {
                        let layer = CpuExperts::new(pool.clone(), ex.clone(), h, i, &opts, |_| {})
                            .unwrap()
                            .with_decode_schedule(schedule);
                        let mut buf = vec![f32::NAN; m * h];
                        // `out` is derived from `ptr`, so `done` may read through
                        // the parent pointer (no write follows it).
                        let ptr = SharedOut(buf.as_mut_ptr());
                        let seen = std::sync::Mutex::new(Vec::new());
                        let calls = std::sync::atomic::AtomicUsize::new(0);
                        let done = || {
                            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            // SAFETY: `done` runs once every write to `out` has
                            // happened (the contract under test); nothing writes after.
                            let snap = unsafe { std::slice::from_raw_parts(ptr.ptr(), m * h) }.to_vec();
                            *seen.lock().unwrap() = snap;
                        };
                        // SAFETY: `ptr` covers `buf`'s m × h values; `buf` is not
                        // used directly while `out` lives.
                        let out = unsafe { std::slice::from_raw_parts_mut(ptr.ptr(), m * h) };
                        layer.forward_signal(&hidden, &topk, out, &done).unwrap();
                        let out = buf;
                        let what = format!("{nodes}x{cores} {weight:?} {schedule:?} m {m}");
                        assert_eq!(calls.into_inner(), 1, "{what}");
                        assert_eq!(out, two_phase, "{what}");
                        assert_eq!(seen.into_inner().unwrap(), out, "{what}: out incomplete when signalled");
                    }
                }
            }
        }
    }

    /// A panicking gate_up unit, or a panicking `finish`, leaves its expert
    /// ready and the forward failed: down blocks stop waiting instead of
    /// spinning forever.
    #[test]
    fn readiness_survives_panics() {
        use std::panic::{catch_unwind, AssertUnwindSafe};
        let active = [(3, 0, 1), (5, 1, 1)];
        let finished = std::sync::Mutex::new(Vec::new());
        let finish = |e: (usize, usize, usize)| finished.lock().unwrap().push(e.0);
        let rd = Readiness::new(&active, &[2, 1], &finish);
        // Expert 1 completes normally: finished, ready, not failed.
        drop(rd.count_on_drop(1, 1));
        assert!(rd.wait(1));
        // Expert 0: one unit completes, the other panics.
        drop(rd.count_on_drop(0, 1));
        let r = catch_unwind(AssertUnwindSafe(|| {
            let _done = rd.count_on_drop(0, 1);
            panic!("gate_up failed");
        }));
        assert!(r.is_err());
        assert!(!rd.wait(0), "a waiter must see the failure, not the expert as done");
        assert!(rd.failed());
        assert_eq!(*finished.lock().unwrap(), vec![5], "finish must not run for the failed expert");

        // A panicking `finish` marks its expert ready and the forward failed.
        let bad_finish = |_: (usize, usize, usize)| panic!("finish failed");
        let rd = Readiness::new(&active, &[1, 1], &bad_finish);
        let r = catch_unwind(AssertUnwindSafe(|| drop(rd.count_on_drop(0, 1))));
        assert!(r.is_err());
        assert!(!rd.wait(0));
        assert!(!rd.wait(1), "every waiter stops once the forward failed");
    }

    #[test]
    fn int4_and_fp8_formats_track_the_dense_result() {
        let (h, i, n, k) = (128, 64, 4, 2);
        let ex = experts(n, h, i);
        let m = 3;
        let hidden: Vec<f32> = (0..m * h).map(|v| ((v * 13 % 29) as f32 / 14.0) - 1.0).collect();
        let topk = routing(m, n, k);
        let want = reference(&ex, &hidden, &topk, h, i);
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let run = |weight, int8| {
            let opts = ExpertsOptions { weight, int8_activations: int8, ..Default::default() };
            let layer = CpuExperts::new(pool(1, 2), ex.clone(), h, i, &opts, |_| {}).unwrap();
            let mut out = vec![0f32; m * h];
            layer.forward(&hidden, &topk, &mut out).unwrap();
            out
        };
        let max_err = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        // bf16 kept: f32 accumulation error only.
        assert!(max_err(&run(MoeWeight::Keep, false), &want) <= 1e-5 * scale);
        // int4 with f32 activations: weight quantization error (random weights, so large).
        let int4 = run(MoeWeight::Int4, false);
        assert!(max_err(&int4, &want) <= 0.2 * scale, "int4 vs dense {}", max_err(&int4, &want));
        // int8 activations on top: a further ~2⁻⁸ relative per activation.
        let int8 = run(MoeWeight::Int4, true);
        assert!(max_err(&int8, &int4) <= 0.02 * scale, "int8 vs f32 activations {}", max_err(&int8, &int4));
    }

    #[test]
    fn dummy_layers_run_in_every_format() {
        for format in [WeightFormat::Bf16, WeightFormat::Fp8, WeightFormat::Int4 { group: 32 }] {
            let layer = CpuExperts::dummy(pool(2, 1), 4, 64, 96, format, true, 7).unwrap();
            let hidden: Vec<f32> = (0..2 * 64).map(|v| (v as f32 / 64.0).sin()).collect();
            let topk = routing(2, 4, 2);
            let mut out = vec![f32::NAN; 2 * 64];
            layer.forward(&hidden, &topk, &mut out).unwrap();
            assert!(out.iter().all(|v| v.is_finite()) && out.iter().any(|&v| v != 0.0), "{format:?}");
            assert!(out.iter().all(|v| v.abs() < 10.0), "{format:?}: dummy weights keep activations O(1)");
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let (h, i) = (8, 4);
        let mut ex = experts(2, h, i);
        ex[1].down = ExpertMatrix::Dense(mat(i, h, 9));
        let e = CpuExperts::new(pool(1, 1), ex, h, i, &ExpertsOptions::default(), |_| {}).unwrap_err();
        assert!(e.to_string().contains("expert 1") && e.to_string().contains("down_proj"), "{e}");
        let layer = CpuExperts::new(pool(1, 1), experts(2, h, i), h, i, &ExpertsOptions::default(), |_| {}).unwrap();
        let topk = TopK { k: 1, ids: vec![5], weights: vec![1.0] };
        let mut out = vec![0f32; h];
        assert!(layer.forward(&[0.0; 8], &topk, &mut out).unwrap_err().to_string().contains("out of range"));
        let f32_keep = ExpertsOptions { weight: MoeWeight::Keep, ..Default::default() };
        let f32_experts: Vec<ExpertWeights> = (0..2)
            .map(|_| {
                let t = |r, c| HostTensor::from_slice(&vec![0f32; r * c], [r, c]).unwrap();
                ExpertWeights::dense(t(i, h), t(i, h), t(h, i))
            })
            .collect();
        let e = CpuExperts::new(pool(1, 1), f32_experts, h, i, &f32_keep, |_| {}).unwrap_err();
        assert!(e.to_string().contains("to_dtype"), "{e}");
        assert!("INT4".parse::<MoeWeight>().is_ok() && "int8".parse::<MoeWeight>().is_err());
    }
}
