//! Expert weights in the kernel's native layout, and the kernel that multiplies
//! them with a tile of tokens.
//!
//! A matrix `W[n, k]` is cut into blocks of [`BLOCK_ROWS`] = 32 output rows. Within
//! a block the weights are stored column by column, so that for each `k` the 32
//! rows' values are adjacent: one 64-byte (bf16), 32-byte (fp8) or 16-byte
//! (int4) load feeds two 16-lane FMAs per token. Quantized formats add one scale
//! per row per group of `k` after the data. Rows past `n` are zero padding.
//!
//! | format | data per block | scales per block |
//! |---|---|---|
//! | `Bf16`, `F16` | `k × 32 × 2` bytes | none |
//! | `Fp8` (E4M3) | `k × 32` bytes | `⌈k/128⌉ × 32` f32 (× 256, see `F32x16::load_fp8_div256`) |
//! | `Int4 { group }` | `⌈k/4⌉ × 64` bytes: per quad of 4 columns, byte `4r + c` holds row `r` (low nibble) and row `r+16` (high nibble) at column `4·quad + c`, value `q + 8` | `⌈k/group⌉ × 32` bf16 |
//!
//! The int4 quad layout puts each row's four consecutive `k` values in one 32-bit
//! lane, which is what `vpdpbusd` (AVX512-VNNI) multiplies against four int8
//! activations; the f32 path shifts the wanted byte out of each lane.
//!
//! [`gemm_block`] computes `out[t, r] = Σ_k x[t, k] · W[r, k]` for one block and up
//! to any number of tokens, in register tiles of up to six tokens, accumulating in
//! f32. [`gemm_block_ref`] is its scalar twin: it dequantizes the block and sums in
//! f64.

use half::bf16;

use crate::simd::{F32x16, Isa, Scalar};

/// Output rows per packed block.
pub const BLOCK_ROWS: usize = 32;

/// How far ahead of the current column the kernels prefetch weights by
/// default. Each thread streams its blocks; the hardware prefetcher stops at
/// 4 KiB page edges, so software prefetch keeps the loads in flight across them.
/// On the 16-core Xeon of the GPU machine, a 48-layer int4 decode (15 threads)
/// averaged 272 / 265 / 268 µs per layer at 2048 / 4096 / 8192 bytes, and 15
/// threads streaming short runs of blocks read 105 / 113 / 104 GB/s
/// (`moe_pipeline_bench`, `kernel_stream`). Past the end of a block's data the
/// prefetch skips the block's scales and runs on into the next block: that
/// took the int4 decode to 226 µs per layer (the first `distance` bytes of
/// every block had been demand misses).
pub const PREFETCH_BYTES: usize = 4096;

/// Software prefetch of the block kernels ([`gemm_block`] and
/// [`crate::int8act::gemm_block_i8`]): how many bytes ahead of the column being
/// read, and into which cache. A process-wide tuning knob ([`set_prefetch`]);
/// it changes timing only, never results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefetch {
    /// Bytes ahead of the current column; 0 turns software prefetch off.
    pub distance: usize,
    /// Prefetch into L2 only (`prefetcht1`) instead of L1 (`prefetcht0`).
    pub l2: bool,
}

impl Default for Prefetch {
    fn default() -> Self {
        Prefetch { distance: PREFETCH_BYTES, l2: false }
    }
}

/// Parses `4096` (bytes ahead, into L1), `8192l2` (into L2 only) or `0` (off),
/// the spelling the benchmarks' `--prefetch` lists use.
impl std::str::FromStr for Prefetch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (d, l2) = s.strip_suffix("l2").map_or((s, false), |d| (d, true));
        let distance = d.parse().map_err(|e| format!("prefetch {s:?}: {e} (bytes ahead, optional `l2` suffix)"))?;
        Ok(Prefetch { distance, l2 })
    }
}

/// `distance << 1 | l2`.
static PREFETCH: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(PREFETCH_BYTES << 1);

/// Sets the block kernels' software prefetch for the whole process.
pub fn set_prefetch(p: Prefetch) {
    PREFETCH.store(p.distance << 1 | p.l2 as usize, std::sync::atomic::Ordering::Relaxed);
}

/// The block kernels' current software prefetch.
pub fn prefetch() -> Prefetch {
    let v = PREFETCH.load(std::sync::atomic::Ordering::Relaxed);
    Prefetch { distance: v >> 1, l2: v & 1 == 1 }
}

/// Group size of FP8 scales along `k` (the 128×128 block scales of
/// `weight_scale_inv` checkpoints are expanded to one scale per row per group).
pub const FP8_GROUP: usize = 128;

/// A packed weight format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
    /// FP8 E4M3 with f32 scales per row per 128 `k`.
    Fp8,
    /// Symmetric int4 (`q ∈ [-8, 7]`, stored `q + 8`) with bf16 scales per row per `group` `k`.
    Int4 {
        /// Group size along `k` (32 or 128).
        group: usize,
    },
}

impl WeightFormat {
    /// Scale group along `k`, if the format has scales.
    pub fn group(self) -> Option<usize> {
        match self {
            WeightFormat::Bf16 | WeightFormat::F16 => None,
            WeightFormat::Fp8 => Some(FP8_GROUP),
            WeightFormat::Int4 { group } => Some(group),
        }
    }

    /// Bytes of packed data (without scales) of one block.
    pub fn data_bytes(self, k: usize) -> usize {
        match self {
            WeightFormat::Bf16 | WeightFormat::F16 => k * BLOCK_ROWS * 2,
            WeightFormat::Fp8 => k * BLOCK_ROWS,
            WeightFormat::Int4 { .. } => k.div_ceil(4) * 64,
        }
    }

    /// Bytes of scales of one block.
    pub fn scale_bytes(self, k: usize) -> usize {
        match self {
            WeightFormat::Bf16 | WeightFormat::F16 => 0,
            WeightFormat::Fp8 => k.div_ceil(FP8_GROUP) * BLOCK_ROWS * 4,
            WeightFormat::Int4 { group } => k.div_ceil(group) * BLOCK_ROWS * 2,
        }
    }

    /// Bytes of one packed block, rounded up to 64 so blocks stay cache-line aligned.
    pub fn block_bytes(self, k: usize) -> usize {
        (self.data_bytes(k) + self.scale_bytes(k)).next_multiple_of(64)
    }

    /// Bytes a kernel reads per block (data + scales, without the alignment
    /// padding): what bandwidth figures count.
    pub fn bytes_read(self, k: usize) -> usize {
        self.data_bytes(k) + self.scale_bytes(k)
    }

    /// Whether this format can hold a matrix with `k` columns.
    pub fn check(self, k: usize) -> Result<(), String> {
        if k == 0 {
            return Err("k must be > 0".into());
        }
        match self {
            WeightFormat::Int4 { group } if group == 0 || group % 4 != 0 => {
                Err(format!("int4 group size {group} must be a positive multiple of 4"))
            }
            _ => Ok(()),
        }
    }
}

/// Packs up to 32 rows of f32 weights (each of length `k`) into `dst`
/// (`format.block_bytes(k)` bytes), quantizing for `Fp8`/`Int4`. Missing rows are
/// zero. Exact for bf16/f16 inputs packed as `Bf16`/`F16`.
///
/// # Panics
/// If a row is not `k` long, more than 32 rows are given, or `dst` has the wrong size.
pub fn pack_block(format: WeightFormat, rows: &[&[f32]], k: usize, dst: &mut [u8]) {
    assert!(rows.len() <= BLOCK_ROWS && rows.iter().all(|r| r.len() == k), "rows must be ≤ 32 of length k");
    assert_eq!(dst.len(), format.block_bytes(k), "dst must be one block");
    dst.fill(0);
    let w = |r: usize, kk: usize| rows.get(r).map_or(0.0, |row| row[kk]);
    let (data, scales) = dst.split_at_mut(format.data_bytes(k));
    match format {
        WeightFormat::Bf16 => {
            for kk in 0..k {
                for r in 0..BLOCK_ROWS {
                    let b = bf16::from_f32(w(r, kk)).to_le_bytes();
                    data[(kk * BLOCK_ROWS + r) * 2..][..2].copy_from_slice(&b);
                }
            }
        }
        WeightFormat::F16 => {
            for kk in 0..k {
                for r in 0..BLOCK_ROWS {
                    let b = half::f16::from_f32(w(r, kk)).to_le_bytes();
                    data[(kk * BLOCK_ROWS + r) * 2..][..2].copy_from_slice(&b);
                }
            }
        }
        WeightFormat::Fp8 => {
            for g in 0..k.div_ceil(FP8_GROUP) {
                let ks = g * FP8_GROUP..((g + 1) * FP8_GROUP).min(k);
                for r in 0..BLOCK_ROWS {
                    let amax = ks.clone().map(|kk| w(r, kk).abs()).fold(0f32, f32::max);
                    let scale = if amax > 0.0 { amax / 448.0 } else { 1.0 };
                    for kk in ks.clone() {
                        data[kk * BLOCK_ROWS + r] = crate::quant::f32_to_fp8_e4m3(w(r, kk) / scale);
                    }
                    scales[(g * BLOCK_ROWS + r) * 4..][..4].copy_from_slice(&(scale * 256.0).to_le_bytes());
                }
            }
        }
        WeightFormat::Int4 { group } => {
            for g in 0..k.div_ceil(group) {
                let ks = g * group..((g + 1) * group).min(k);
                for r in 0..BLOCK_ROWS {
                    let amax = ks.clone().map(|kk| w(r, kk).abs()).fold(0f32, f32::max);
                    let scale = bf16::from_f32(amax / 7.0);
                    let s = scale.to_f32();
                    for kk in ks.clone() {
                        let q = if s > 0.0 { (w(r, kk) / s).round_ties_even().clamp(-8.0, 7.0) as i32 } else { 0 };
                        let nib = (q + 8) as u8;
                        let byte = &mut data[int4_byte(kk, r)];
                        *byte |= if r < 16 { nib } else { nib << 4 };
                    }
                    scales[(g * BLOCK_ROWS + r) * 2..][..2].copy_from_slice(&scale.to_le_bytes());
                }
            }
        }
    }
}

/// Byte of the int4 quad layout holding row `r` at column `kk`.
#[inline]
fn int4_byte(kk: usize, r: usize) -> usize {
    (kk / 4) * 64 + (r % 16) * 4 + kk % 4
}

/// Packs up to 32 rows of an FP8-E4M3 checkpoint as `Fp8` without requantizing:
/// `rows[r]` are the row's `k` bytes and `row_scales[r]` its scale per
/// [`FP8_GROUP`] columns (from `weight_scale_inv`).
///
/// # Panics
/// On inconsistent lengths.
pub fn pack_block_fp8(rows: &[&[u8]], row_scales: &[&[f32]], k: usize, dst: &mut [u8]) {
    let f = WeightFormat::Fp8;
    assert!(rows.len() <= BLOCK_ROWS && rows.len() == row_scales.len());
    assert_eq!(dst.len(), f.block_bytes(k));
    dst.fill(0);
    let groups = k.div_ceil(FP8_GROUP);
    let (data, scales) = dst.split_at_mut(f.data_bytes(k));
    for (r, (row, sc)) in rows.iter().zip(row_scales).enumerate() {
        assert!(row.len() == k && sc.len() == groups);
        for (kk, &b) in row.iter().enumerate() {
            data[kk * BLOCK_ROWS + r] = b;
        }
        for (g, &s) in sc.iter().enumerate() {
            scales[(g * BLOCK_ROWS + r) * 4..][..4].copy_from_slice(&(s * 256.0).to_le_bytes());
        }
    }
}

/// Dequantizes a packed block to `[32][k]` f32.
pub fn dequant_block(format: WeightFormat, block: &[u8], k: usize) -> Vec<f32> {
    assert_eq!(block.len(), format.block_bytes(k));
    let (data, scales) = block.split_at(format.data_bytes(k));
    let mut out = vec![0f32; BLOCK_ROWS * k];
    for r in 0..BLOCK_ROWS {
        for kk in 0..k {
            out[r * k + kk] = match format {
                WeightFormat::Bf16 => {
                    bf16::from_le_bytes([data[(kk * 32 + r) * 2], data[(kk * 32 + r) * 2 + 1]]).to_f32()
                }
                WeightFormat::F16 => {
                    half::f16::from_le_bytes([data[(kk * 32 + r) * 2], data[(kk * 32 + r) * 2 + 1]]).to_f32()
                }
                WeightFormat::Fp8 => {
                    let g = kk / FP8_GROUP;
                    let s = f32::from_le_bytes(scales[(g * 32 + r) * 4..][..4].try_into().expect("4 bytes"));
                    crate::quant::fp8_e4m3_to_f32(data[kk * 32 + r]) * s / 256.0
                }
                WeightFormat::Int4 { group } => {
                    let g = kk / group;
                    let s = bf16::from_le_bytes([scales[(g * 32 + r) * 2], scales[(g * 32 + r) * 2 + 1]]).to_f32();
                    let b = data[int4_byte(kk, r)];
                    let nib = if r < 16 { b & 15 } else { b >> 4 };
                    (nib as i32 - 8) as f32 * s
                }
            };
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn check_gemm_args(
    format: WeightFormat,
    block: &[u8],
    k: usize,
    x: &[f32],
    x_stride: usize,
    m: usize,
    out: &[f32],
    out_stride: usize,
) {
    assert_eq!(block.len(), format.block_bytes(k), "block size");
    assert!(x_stride >= k && out_stride >= BLOCK_ROWS, "strides");
    if m > 0 {
        assert!(x.len() >= (m - 1) * x_stride + k, "x too short");
        assert!(out.len() >= (m - 1) * out_stride + BLOCK_ROWS, "out too short");
    }
}

/// Scalar twin of [`gemm_block`]: dequantize, then sum in f64.
#[allow(clippy::too_many_arguments)]
pub fn gemm_block_ref(
    format: WeightFormat,
    block: &[u8],
    k: usize,
    x: &[f32],
    x_stride: usize,
    m: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    check_gemm_args(format, block, k, x, x_stride, m, out, out_stride);
    let w = dequant_block(format, block, k);
    for t in 0..m {
        for r in 0..BLOCK_ROWS {
            let s: f64 = (0..k).map(|kk| x[t * x_stride + kk] as f64 * w[r * k + kk] as f64).sum();
            out[t * out_stride + r] = s as f32;
        }
    }
}

/// `out[t, r] = Σ_k x[t, k] · W[r, k]` for the 32 rows of one packed block and
/// `m` tokens (`x` rows `x_stride` apart, `out` rows `out_stride` apart), on the
/// best ISA of this CPU.
///
/// # Panics
/// If the slices are too short for `m`, `k` and the strides.
#[allow(clippy::too_many_arguments)]
pub fn gemm_block(
    format: WeightFormat,
    block: &[u8],
    k: usize,
    x: &[f32],
    x_stride: usize,
    m: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    gemm_block_isa(Isa::detect(), format, block, k, x, x_stride, m, out, out_stride)
}

/// [`gemm_block`] on a given ISA (tests and benchmarks compare ISAs).
///
/// # Panics
/// If the slices are too short, or `isa` is not supported by this CPU.
#[allow(clippy::too_many_arguments)]
pub fn gemm_block_isa(
    isa: Isa,
    format: WeightFormat,
    block: &[u8],
    k: usize,
    x: &[f32],
    x_stride: usize,
    m: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    check_gemm_args(format, block, k, x, x_stride, m, out, out_stride);
    assert!(Isa::available().contains(&isa), "{isa:?} is not available on this CPU");
    let a = Args { block: block.as_ptr(), k, x: x.as_ptr(), x_stride, m, out: out.as_mut_ptr(), out_stride };
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 F/BW are present (checked above); `check_gemm_args`
        // proved every pointer range the kernel touches is in bounds.
        Isa::Avx512 => unsafe { x86_entry::gemm_avx512(format, &a) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2/FMA/F16C are present; bounds as above.
        Isa::Avx2 => unsafe { x86_entry::gemm_avx2(format, &a) },
        // SAFETY: scalar code needs no CPU feature; bounds as above.
        _ => unsafe { gemm_generic::<Scalar, 4>(format, &a) },
    }
}

/// Raw arguments of one block product (bounds checked by the caller).
pub(crate) struct Args {
    pub block: *const u8,
    pub k: usize,
    pub x: *const f32,
    pub x_stride: usize,
    pub m: usize,
    pub out: *mut f32,
    pub out_stride: usize,
}

#[cfg(target_arch = "x86_64")]
mod x86_entry {
    use super::{gemm_generic, Args, WeightFormat};
    use crate::simd::{Avx2, Avx512};

    /// # Safety
    /// AVX-512 F/BW must be present and `a` in bounds.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub(super) unsafe fn gemm_avx512(format: WeightFormat, a: &Args) {
        // SAFETY: forwarded contract.
        unsafe { gemm_generic::<Avx512, 6>(format, a) }
    }

    /// # Safety
    /// AVX2/FMA/F16C must be present and `a` in bounds.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemm_avx2(format: WeightFormat, a: &Args) {
        // SAFETY: forwarded contract.
        unsafe { gemm_generic::<Avx2, 2>(format, a) }
    }
}

/// Where the two 16-row halves of column `kk` live, per format.
trait Layout {
    /// Group size along k, 0 for unscaled formats.
    const GROUP: usize;
    /// Bytes of packed data per column (fractional for int4: 64 per 4 columns).
    const COL_BYTES_X4: usize;
    /// The two half-columns (rows 0..16, 16..32) of column `kk` as f32.
    unsafe fn column<V: F32x16>(data: *const u8, kk: usize) -> (V, V);
    /// The scales of group `g` for rows 0..16 and 16..32.
    unsafe fn scales<V: F32x16>(scales: *const u8, g: usize) -> (V, V);
}

struct Bf16L;
struct F16L;
struct Fp8L;
struct Int4L<const G: usize>;

impl Layout for Bf16L {
    const GROUP: usize = 0;
    const COL_BYTES_X4: usize = 256;
    #[inline(always)]
    unsafe fn column<V: F32x16>(data: *const u8, kk: usize) -> (V, V) {
        // SAFETY: column kk is 64 bytes at kk * 64 inside the block.
        unsafe {
            let p = data.add(kk * 64).cast::<u16>();
            (V::load_bf16(p), V::load_bf16(p.add(16)))
        }
    }
    #[inline(always)]
    unsafe fn scales<V: F32x16>(_: *const u8, _: usize) -> (V, V) {
        unreachable!("unscaled format")
    }
}

impl Layout for F16L {
    const GROUP: usize = 0;
    const COL_BYTES_X4: usize = 256;
    #[inline(always)]
    unsafe fn column<V: F32x16>(data: *const u8, kk: usize) -> (V, V) {
        // SAFETY: column kk is 64 bytes at kk * 64 inside the block.
        unsafe {
            let p = data.add(kk * 64).cast::<u16>();
            (V::load_f16(p), V::load_f16(p.add(16)))
        }
    }
    #[inline(always)]
    unsafe fn scales<V: F32x16>(_: *const u8, _: usize) -> (V, V) {
        unreachable!("unscaled format")
    }
}

impl Layout for Fp8L {
    const GROUP: usize = super::packed::FP8_GROUP;
    const COL_BYTES_X4: usize = 128;
    #[inline(always)]
    unsafe fn column<V: F32x16>(data: *const u8, kk: usize) -> (V, V) {
        // SAFETY: column kk is 32 bytes at kk * 32 inside the block.
        unsafe {
            let p = data.add(kk * 32);
            (V::load_fp8_div256(p), V::load_fp8_div256(p.add(16)))
        }
    }
    #[inline(always)]
    unsafe fn scales<V: F32x16>(scales: *const u8, g: usize) -> (V, V) {
        // SAFETY: group g's 32 f32 scales are at g * 128 inside the scale area.
        unsafe {
            let p = scales.add(g * 128).cast::<f32>();
            (V::load(p), V::load(p.add(16)))
        }
    }
}

impl<const G: usize> Layout for Int4L<G> {
    const GROUP: usize = G;
    const COL_BYTES_X4: usize = 64;
    #[inline(always)]
    unsafe fn column<V: F32x16>(data: *const u8, kk: usize) -> (V, V) {
        // SAFETY: the quad holding column kk is 64 bytes at (kk / 4) * 64 inside the block.
        unsafe {
            let (lo, hi) = V::load_u4_lane(data.add((kk / 4) * 64), kk % 4);
            let eight = V::splat(8.0);
            (V::sub(lo, eight), V::sub(hi, eight))
        }
    }
    #[inline(always)]
    unsafe fn scales<V: F32x16>(scales: *const u8, g: usize) -> (V, V) {
        // SAFETY: group g's 32 bf16 scales are at g * 64 inside the scale area.
        unsafe {
            let p = scales.add(g * 64).cast::<u16>();
            (V::load_bf16(p), V::load_bf16(p.add(16)))
        }
    }
}

/// Dispatches on the format; `TMAX` is the widest token tile the ISA's
/// registers hold.
#[inline(always)]
unsafe fn gemm_generic<V: F32x16, const TMAX: usize>(format: WeightFormat, a: &Args) {
    // SAFETY: all arms forward the caller's contract (ISA present, bounds checked).
    unsafe {
        match format {
            WeightFormat::Bf16 => tiles::<V, Bf16L, TMAX>(format, a),
            WeightFormat::F16 => tiles::<V, F16L, TMAX>(format, a),
            WeightFormat::Fp8 => tiles::<V, Fp8L, TMAX>(format, a),
            WeightFormat::Int4 { group: 32 } => tiles::<V, Int4L<32>, TMAX>(format, a),
            WeightFormat::Int4 { group: 128 } => tiles::<V, Int4L<128>, TMAX>(format, a),
            WeightFormat::Int4 { group: 64 } => tiles::<V, Int4L<64>, TMAX>(format, a),
            WeightFormat::Int4 { .. } => {
                // Uncommon group sizes: the scalar reference path.
                let len = a.block_len(format);
                let block = std::slice::from_raw_parts(a.block, len);
                let x = std::slice::from_raw_parts(a.x, a.x_len());
                let out = std::slice::from_raw_parts_mut(a.out, a.out_len());
                gemm_block_ref(format, block, a.k, x, a.x_stride, a.m, out, a.out_stride)
            }
        }
    }
}

impl Args {
    fn block_len(&self, f: WeightFormat) -> usize {
        f.block_bytes(self.k)
    }
    fn x_len(&self) -> usize {
        if self.m == 0 {
            0
        } else {
            (self.m - 1) * self.x_stride + self.k
        }
    }
    fn out_len(&self) -> usize {
        if self.m == 0 {
            0
        } else {
            (self.m - 1) * self.out_stride + BLOCK_ROWS
        }
    }
}

#[inline(always)]
unsafe fn tiles<V: F32x16, L: Layout, const TMAX: usize>(format: WeightFormat, a: &Args) {
    let mut t0 = 0;
    while t0 < a.m {
        let n = (a.m - t0).min(TMAX);
        // SAFETY: tokens t0..t0+n are within m; forwarded bounds.
        unsafe {
            match n {
                1 => tile::<V, L, 1>(format, a, t0),
                2 => tile::<V, L, 2>(format, a, t0),
                3 => tile::<V, L, 3>(format, a, t0),
                4 => tile::<V, L, 4>(format, a, t0),
                5 => tile::<V, L, 5>(format, a, t0),
                _ => tile::<V, L, 6>(format, a, t0),
            }
        }
        t0 += n;
    }
}

/// One register tile: `T` tokens × 32 rows over all of `k`.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn tile<V: F32x16, L: Layout, const T: usize>(format: WeightFormat, a: &Args, t0: usize) {
    // SAFETY: every pointer offset below stays inside the ranges checked by
    // `check_gemm_args`: columns < k, tokens t0..t0+T ≤ m, groups < ⌈k/G⌉.
    unsafe {
        let data = a.block;
        let scales = a.block.add(format.data_bytes(a.k));
        let x = |t: usize, kk: usize| *a.x.add((t0 + t) * a.x_stride + kk);
        let mut acc = [[V::zero(); 2]; T];
        // Prefetch one line per 64 bytes consumed.
        let pf_every = 256 / L::COL_BYTES_X4;
        let pf = prefetch();
        let (data_bytes, block_bytes) = (format.data_bytes(a.k), format.block_bytes(a.k));
        let prefetch = |kk: usize| {
            if pf.distance > 0 && kk.is_multiple_of(pf_every) {
                // Past the data, skip the scales and run on into the next
                // block's data (a thread usually streams consecutive blocks).
                let off = kk * L::COL_BYTES_X4 / 4 + pf.distance;
                let off = if off < data_bytes { off } else { off + (block_bytes - data_bytes) };
                let p = data.wrapping_add(off);
                if pf.l2 {
                    V::prefetch_l2(p)
                } else {
                    V::prefetch(p)
                }
            }
        };
        if L::GROUP == 0 {
            for kk in 0..a.k {
                prefetch(kk);
                let (w0, w1) = L::column::<V>(data, kk);
                for t in 0..T {
                    let xv = V::splat(x(t, kk));
                    acc[t][0] = V::fma(xv, w0, acc[t][0]);
                    acc[t][1] = V::fma(xv, w1, acc[t][1]);
                }
            }
        } else {
            let g_size = L::GROUP;
            for g in 0..a.k.div_ceil(g_size) {
                let mut ag = [[V::zero(); 2]; T];
                for kk in g * g_size..((g + 1) * g_size).min(a.k) {
                    prefetch(kk);
                    let (w0, w1) = L::column::<V>(data, kk);
                    for t in 0..T {
                        let xv = V::splat(x(t, kk));
                        ag[t][0] = V::fma(xv, w0, ag[t][0]);
                        ag[t][1] = V::fma(xv, w1, ag[t][1]);
                    }
                }
                let (s0, s1) = L::scales::<V>(scales, g);
                for t in 0..T {
                    acc[t][0] = V::fma(ag[t][0], s0, acc[t][0]);
                    acc[t][1] = V::fma(ag[t][1], s1, acc[t][1]);
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            let o = a.out.add((t0 + t) * a.out_stride);
            acc[0].store(o);
            acc[1].store(o.add(16));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rnd(seed: &mut u64) -> f32 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    const FORMATS: [WeightFormat; 6] = [
        WeightFormat::Bf16,
        WeightFormat::F16,
        WeightFormat::Fp8,
        WeightFormat::Int4 { group: 32 },
        WeightFormat::Int4 { group: 128 },
        WeightFormat::Int4 { group: 44 },
    ];

    /// Max |error| allowed relative to Σ|x·w| of a row: f32 accumulation only,
    /// since the reference uses the same dequantized weights.
    const REL_TOL: f32 = 2e-6;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn fast_kernels_match_ref(k in 1usize..300, m in 1usize..14, rows in 1usize..=32, seed in any::<u64>(), fi in 0usize..6) {
            let format = FORMATS[fi];
            let mut s = seed | 1;
            let w: Vec<Vec<f32>> = (0..rows).map(|_| (0..k).map(|_| rnd(&mut s) * 3.0).collect()).collect();
            let refs: Vec<&[f32]> = w.iter().map(|r| r.as_slice()).collect();
            let mut block = vec![0u8; format.block_bytes(k)];
            pack_block(format, &refs, k, &mut block);
            let x_stride = k + 3;
            let x: Vec<f32> = (0..m * x_stride).map(|_| rnd(&mut s)).collect();
            let out_stride = 40;
            let mut want = vec![0f32; m * out_stride];
            gemm_block_ref(format, &block, k, &x, x_stride, m, &mut want, out_stride);
            let deq = dequant_block(format, &block, k);
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; m * out_stride];
                gemm_block_isa(isa, format, &block, k, &x, x_stride, m, &mut got, out_stride);
                for t in 0..m {
                    for r in 0..BLOCK_ROWS {
                        let mag: f32 = (0..k).map(|kk| (x[t * x_stride + kk] * deq[r * k + kk]).abs()).sum();
                        let (g, e) = (got[t * out_stride + r], want[t * out_stride + r]);
                        prop_assert!((g - e).abs() <= REL_TOL * (k as f32).sqrt() * mag + 1e-6,
                            "{isa:?} {format:?} t{t} r{r}: {g} vs {e}");
                    }
                }
            }
        }

        #[test]
        fn quantization_error_is_bounded(k in 1usize..200, seed in any::<u64>()) {
            let mut s = seed | 1;
            let w: Vec<f32> = (0..k).map(|_| rnd(&mut s)).collect();
            for format in FORMATS {
                let mut block = vec![0u8; format.block_bytes(k)];
                pack_block(format, &[&w], k, &mut block);
                let d = dequant_block(format, &block, k);
                for (kk, (&a, &b)) in w.iter().zip(&d[..k]).enumerate() {
                    // Per-group amax bounds the step: int4 half a step of amax/7,
                    // fp8 3 mantissa bits, bf16 8 bits, f16 11 bits.
                    let g = format.group().unwrap_or(k);
                    let gs = (kk / g) * g;
                    let amax = w[gs..(gs + g).min(k)].iter().fold(0f32, |m, v| m.max(v.abs()));
                    let tol = match format {
                        WeightFormat::Int4 { .. } => amax / 7.0 * 0.5 * 1.01,
                        WeightFormat::Fp8 => a.abs() / 16.0 + amax / 448.0 * 2f32.powi(-9),
                        WeightFormat::Bf16 => a.abs() / 256.0,
                        WeightFormat::F16 => a.abs() / 2048.0 + 1e-7,
                    };
                    prop_assert!((a - b).abs() <= tol + 1e-9, "{format:?} k{kk}: {a} -> {b}");
                }
                // Padding rows are zero.
                prop_assert!(d[k..].iter().all(|&v| v == 0.0));
            }
        }
    }

    #[test]
    fn fp8_checkpoint_bytes_pack_exactly() {
        let k = 130;
        let bytes: Vec<u8> = (0..k).map(|i| (i * 7 % 256) as u8 & 0x7e).collect();
        let scales = [0.5f32, 2.0];
        let mut block = vec![0u8; WeightFormat::Fp8.block_bytes(k)];
        pack_block_fp8(&[&bytes], &[&scales], k, &mut block);
        let d = dequant_block(WeightFormat::Fp8, &block, k);
        for (kk, &b) in bytes.iter().enumerate() {
            assert_eq!(d[kk], crate::quant::fp8_e4m3_to_f32(b) * scales[kk / 128]);
        }
    }
}
