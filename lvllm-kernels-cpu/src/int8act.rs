//! The int4 × int8 path: int4 expert weights (quad layout of [`crate::packed`])
//! times activations quantized to int8, with `vpdpbusd` (AVX512-VNNI).
//!
//! **Numerics.** Activations are quantized per token per weight group
//! (`xs = amax/127`, `q = round_half_even(x/xs)`), so each dot product over a group
//! is exact in i32: `Σ (w_q + 8)·x_q − 8·Σ x_q`; it is then scaled by
//! `w_scale · xs` and accumulated in f32. Against f32 activations this adds a
//! relative error of about 2⁻⁸ per activation: the price of feeding 64 int8
//! multiply-adds per instruction, which an int4 GEMV needs to keep up with memory
//! bandwidth. [`gemm_block_i8_ref`] is the exact scalar twin (same integer sums,
//! same f32 operations in the same order, so results match to the bit).

use crate::packed::{WeightFormat, BLOCK_ROWS};

/// Whether this CPU runs the int8-activation kernel natively.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAIL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAIL.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Row stride (in i8) of quantized activations for `k` columns: a multiple of 4.
pub fn q_stride(k: usize) -> usize {
    k.next_multiple_of(4)
}

/// Quantizes one activation row `x` (`k` values) per `group` columns into `q`
/// (`q_stride(k)` values, zero padded), `scales` and `sums` (`⌈k/group⌉` each),
/// with AVX-512 when present (the same bits as [`quantize_row_ref`], NaN and
/// infinities included).
pub fn quantize_row(x: &[f32], group: usize, q: &mut [i8], scales: &mut [f32], sums: &mut [i32]) {
    let k = x.len();
    assert!(q.len() >= q_stride(k) && scales.len() >= k.div_ceil(group) && sums.len() >= k.div_ceil(group));
    #[cfg(target_arch = "x86_64")]
    if crate::simd::Isa::detect() == crate::simd::Isa::Avx512 {
        q[k..q_stride(k)].fill(0);
        for (g, chunk) in x.chunks(group).enumerate() {
            let out = &mut q[g * group..g * group + chunk.len()];
            // SAFETY: AVX-512 F/BW are present (detected); `out` has the chunk's length.
            let (xs, sum) = unsafe { quant_avx512::group(chunk, out) };
            scales[g] = xs;
            sums[g] = sum;
        }
        return;
    }
    quantize_row_ref(x, group, q, scales, sums)
}

/// Scalar twin of [`quantize_row`]: per group, `xs = amax/127` and
/// `q = round_half_even(x/xs)` (0 when the group is all zeros).
pub fn quantize_row_ref(x: &[f32], group: usize, q: &mut [i8], scales: &mut [f32], sums: &mut [i32]) {
    let k = x.len();
    assert!(q.len() >= q_stride(k) && scales.len() >= k.div_ceil(group) && sums.len() >= k.div_ceil(group));
    q[k..q_stride(k)].fill(0);
    for (g, chunk) in x.chunks(group).enumerate() {
        let amax = chunk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let xs = amax / 127.0;
        let mut sum = 0i32;
        for (i, &v) in chunk.iter().enumerate() {
            let qi = if xs > 0.0 { round_half_even(v / xs).clamp(-127.0, 127.0) as i8 } else { 0 };
            q[g * group + i] = qi;
            sum += qi as i32;
        }
        scales[g] = xs;
        sums[g] = sum;
    }
}

#[cfg(target_arch = "x86_64")]
mod quant_avx512 {
    use std::arch::x86_64::*;

    /// Quantizes one group: returns `(xs, Σq)` and writes `q` (same length as `x`).
    /// Division and round-half-even as in the scalar twin, so the bits agree
    /// (max and the integer sum do not depend on the order).
    ///
    /// # Safety
    /// AVX-512 F/BW must be present; `q.len() == x.len()`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn group(x: &[f32], q: &mut [i8]) -> (f32, i32) {
        let n = x.len();
        let full = n / 16 * 16;
        // SAFETY: loads and stores stay within x[..full] / q[..full] (16 at a time).
        unsafe {
            let abs_mask = _mm512_set1_epi32(0x7fff_ffff);
            let mut vmax = _mm512_setzero_ps();
            for i in (0..full).step_by(16) {
                let v = _mm512_castsi512_ps(_mm512_and_si512(
                    _mm512_castps_si512(_mm512_loadu_ps(x.as_ptr().add(i))),
                    abs_mask,
                ));
                // `max(v, vmax)` returns `vmax` when `v` is NaN: NaN is ignored,
                // as `f32::max` does in the scalar twin.
                vmax = _mm512_max_ps(v, vmax);
            }
            let amax = x[full..].iter().fold(_mm512_reduce_max_ps(vmax), |a, v| a.max(v.abs()));
            let xs = amax / 127.0;
            if xs <= 0.0 {
                q.fill(0);
                return (xs, 0);
            }
            let vxs = _mm512_set1_ps(xs);
            let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
            let mut vsum = _mm512_setzero_si512();
            for i in (0..full).step_by(16) {
                let v = _mm512_div_ps(_mm512_loadu_ps(x.as_ptr().add(i)), vxs);
                // Round to nearest even (the default MXCSR mode), then clamp; a
                // NaN quotient (NaN input, or inf / inf) gives 0 like the scalar
                // `NaN as i8`.
                let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v);
                let r = _mm512_maskz_mov_epi32(ordered, _mm512_cvtps_epi32(v));
                let r = _mm512_min_epi32(_mm512_max_epi32(r, lo), hi);
                vsum = _mm512_add_epi32(vsum, r);
                _mm_storeu_si128(q.as_mut_ptr().add(i).cast(), _mm512_cvtepi32_epi8(r));
            }
            let mut sum = _mm512_reduce_add_epi32(vsum);
            for i in full..n {
                let qi = super::round_half_even(x[i] / xs).clamp(-127.0, 127.0) as i8;
                q[i] = qi;
                sum += qi as i32;
            }
            (xs, sum)
        }
    }
}

/// Rounds half to even for |v| < 2²², without a libm call: adding and
/// subtracting 1.5·2²³ leaves the nearest integer under the default rounding
/// mode (baseline x86-64 has no SSE4.1 `roundps`, and `f32::round_ties_even`
/// becomes a call to `rintf` there).
#[inline(always)]
fn round_half_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// Quantized activations of `m` tokens.
#[derive(Debug, Clone, Copy)]
pub struct QuantActs<'a> {
    /// `[m, stride]` int8 values.
    pub q: &'a [i8],
    /// Row stride of `q` (≥ `q_stride(k)`).
    pub stride: usize,
    /// `[m, groups]` scales.
    pub scales: &'a [f32],
    /// `[m, groups]` sums of `q` per group.
    pub sums: &'a [i32],
    /// Groups per row (row stride of `scales` and `sums`).
    pub groups: usize,
}

fn check(
    format: WeightFormat,
    block: &[u8],
    k: usize,
    x: &QuantActs<'_>,
    m: usize,
    out: &[f32],
    out_stride: usize,
) -> usize {
    let WeightFormat::Int4 { group } = format else { panic!("the int8-activation kernel takes int4 weights") };
    assert_eq!(block.len(), format.block_bytes(k), "block size");
    let groups = k.div_ceil(group);
    assert!(x.groups >= groups && x.stride >= q_stride(k) && out_stride >= BLOCK_ROWS);
    if m > 0 {
        assert!(x.q.len() >= (m - 1) * x.stride + q_stride(k), "q too short");
        assert!(x.scales.len() >= (m - 1) * x.groups + groups && x.sums.len() >= (m - 1) * x.groups + groups);
        assert!(out.len() >= (m - 1) * out_stride + BLOCK_ROWS, "out too short");
    }
    group
}

/// Scalar twin of [`gemm_block_i8`].
pub fn gemm_block_i8_ref(
    format: WeightFormat,
    block: &[u8],
    k: usize,
    x: &QuantActs<'_>,
    m: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let group = check(format, block, k, x, m, out, out_stride);
    let data_bytes = format.data_bytes(k);
    let (data, scales) = block.split_at(data_bytes);
    for t in 0..m {
        for r in 0..BLOCK_ROWS {
            let mut acc = 0f32;
            for g in 0..k.div_ceil(group) {
                let mut dot = 0i32;
                for kk in g * group..((g + 1) * group).min(k.next_multiple_of(4)) {
                    let b = data[(kk / 4) * 64 + (r % 16) * 4 + kk % 4];
                    let nib = if r < 16 { b & 15 } else { b >> 4 };
                    dot += nib as i32 * x.q[t * x.stride + kk] as i32;
                }
                let ws = half::bf16::from_le_bytes([scales[(g * 32 + r) * 2], scales[(g * 32 + r) * 2 + 1]]).to_f32();
                let f = (dot - 8 * x.sums[t * x.groups + g]) as f32;
                acc = f.mul_add(ws * x.scales[t * x.groups + g], acc);
            }
            out[t * out_stride + r] = acc;
        }
    }
}

/// `out[t, r] ≈ Σ_k x[t, k] · W[r, k]` for one int4 block and int8 activations,
/// with AVX512-VNNI when [`available`], else the scalar twin.
///
/// # Panics
/// If `format` is not int4 or the slices are too short.
pub fn gemm_block_i8(
    format: WeightFormat,
    block: &[u8],
    k: usize,
    x: &QuantActs<'_>,
    m: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let group = check(format, block, k, x, m, out, out_stride);
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX-512 F/BW/VNNI are present (checked); `check` proved every
        // range the kernel reads and writes is in bounds.
        unsafe {
            vnni::gemm(
                block.as_ptr(),
                (format.data_bytes(k), format.block_bytes(k)),
                k,
                group,
                x,
                m,
                out.as_mut_ptr(),
                out_stride,
            )
        };
        return;
    }
    gemm_block_i8_ref(format, block, k, x, m, out, out_stride)
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::QuantActs;

    /// Most tokens per register tile (4 zmm per token: two i32 and two f32 accumulators).
    const TMAX: usize = 6;

    /// # Safety
    /// AVX-512 F/BW/VNNI present; pointers in bounds for `k`, `m` (see `check`).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn gemm(
        block: *const u8,
        (data_bytes, block_bytes): (usize, usize),
        k: usize,
        group: usize,
        x: &QuantActs<'_>,
        m: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        let mut t0 = 0;
        while t0 < m {
            let n = (m - t0).min(TMAX);
            // SAFETY: forwarded contract; tokens t0..t0+n are within m.
            unsafe {
                match n {
                    1 => tile::<1>(block, (data_bytes, block_bytes), k, group, x, t0, out, out_stride),
                    2 => tile::<2>(block, (data_bytes, block_bytes), k, group, x, t0, out, out_stride),
                    3 => tile::<3>(block, (data_bytes, block_bytes), k, group, x, t0, out, out_stride),
                    4 => tile::<4>(block, (data_bytes, block_bytes), k, group, x, t0, out, out_stride),
                    5 => tile::<5>(block, (data_bytes, block_bytes), k, group, x, t0, out, out_stride),
                    _ => tile::<6>(block, (data_bytes, block_bytes), k, group, x, t0, out, out_stride),
                }
            }
            t0 += n;
        }
    }

    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile<const T: usize>(
        block: *const u8,
        (data_bytes, block_bytes): (usize, usize),
        k: usize,
        group: usize,
        x: &QuantActs<'_>,
        t0: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        // SAFETY: quads < ⌈k/4⌉ lie in the data area, groups < ⌈k/group⌉ in the
        // scale area, tokens t0..t0+T in the activations (caller's contract).
        unsafe {
            let nib = _mm512_set1_epi8(0x0f);
            let scales = block.add(data_bytes).cast::<u16>();
            let quads = k.div_ceil(4);
            let qpg = group / 4;
            let mut acc = [[_mm512_setzero_ps(); 2]; T];
            let pf = crate::packed::prefetch();
            // The scales are a second stream (one line per group, after the
            // data): prefetch them as many groups ahead as the data.
            let pf_groups = pf.distance.div_ceil(group * 16);
            if pf.distance > 0 {
                for g in 0..pf_groups.min(k.div_ceil(group)) {
                    _mm_prefetch::<_MM_HINT_T0>(scales.cast::<u8>().add(g * 64).cast());
                }
            }
            for g in 0..k.div_ceil(group) {
                if pf.distance > 0 {
                    _mm_prefetch::<_MM_HINT_T0>(scales.cast::<u8>().wrapping_add((g + pf_groups) * 64).cast());
                }
                let mut ai = [[_mm512_setzero_si512(); 2]; T];
                for quad in g * qpg..((g + 1) * qpg).min(quads) {
                    if pf.distance > 0 {
                        // Past the data, skip this block's scales (prefetched
                        // above) and run on into the next block's data: a thread
                        // usually streams consecutive blocks, and otherwise the
                        // first `distance` bytes of each block would be demand
                        // misses with nothing else in flight.
                        let off = quad * 64 + pf.distance;
                        let off = if off < data_bytes { off } else { off + (block_bytes - data_bytes) };
                        let p = block.wrapping_add(off).cast();
                        if pf.l2 {
                            _mm_prefetch::<_MM_HINT_T1>(p)
                        } else {
                            _mm_prefetch::<_MM_HINT_T0>(p)
                        }
                    }
                    let v = _mm512_loadu_si512(block.add(quad * 64).cast());
                    let lo = _mm512_and_si512(v, nib);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib);
                    for t in 0..T {
                        let xp = x.q.as_ptr().add((t0 + t) * x.stride + quad * 4).cast::<i32>();
                        let xb = _mm512_set1_epi32(xp.read_unaligned());
                        ai[t][0] = _mm512_dpbusd_epi32(ai[t][0], lo, xb);
                        ai[t][1] = _mm512_dpbusd_epi32(ai[t][1], hi, xb);
                    }
                }
                let s = scales.add(g * 32);
                let s0 =
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(s.cast()))));
                let s1 = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                    s.add(16).cast(),
                ))));
                for t in 0..T {
                    let gi = (t0 + t) * x.groups + g;
                    let corr = _mm512_set1_epi32(8 * *x.sums.get_unchecked(gi));
                    let xs = _mm512_set1_ps(*x.scales.get_unchecked(gi));
                    let f0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(ai[t][0], corr));
                    let f1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(ai[t][1], corr));
                    acc[t][0] = _mm512_fmadd_ps(f0, _mm512_mul_ps(s0, xs), acc[t][0]);
                    acc[t][1] = _mm512_fmadd_ps(f1, _mm512_mul_ps(s1, xs), acc[t][1]);
                }
            }
            for t in 0..T {
                let o = out.add((t0 + t) * out_stride);
                _mm512_storeu_ps(o, acc[t][0]);
                _mm512_storeu_ps(o.add(16), acc[t][1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed::{gemm_block_ref, pack_block};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn quantize_row_matches_ref(k in 1usize..400, g128 in any::<bool>(), seed in any::<u64>(), zeros in any::<bool>()) {
            let group = if g128 { 128 } else { 32 };
            let mut s = seed | 1;
            let x: Vec<f32> = (0..k).map(|i| {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                // An all-zero first group, and now and then NaN or ±inf.
                if zeros && i < group { 0.0 } else {
                    match s % 97 {
                        0 => f32::NAN,
                        1 => f32::INFINITY,
                        2 => f32::NEG_INFINITY,
                        _ => ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0,
                    }
                }
            }).collect();
            let groups = k.div_ceil(group);
            let (mut q1, mut q2) = (vec![5i8; q_stride(k)], vec![5i8; q_stride(k)]);
            let (mut s1, mut s2) = (vec![0f32; groups], vec![0f32; groups]);
            let (mut u1, mut u2) = (vec![0i32; groups], vec![0i32; groups]);
            quantize_row(&x, group, &mut q1, &mut s1, &mut u1);
            quantize_row_ref(&x, group, &mut q2, &mut s2, &mut u2);
            prop_assert_eq!(q1, q2);
            prop_assert_eq!(s1, s2);
            prop_assert_eq!(u1, u2);
        }
    }

    #[test]
    fn magic_rounding_is_half_even() {
        for v in [-127.5f32, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 126.5, 3.4999, -3.5001, 0.0, 100.2] {
            assert_eq!(round_half_even(v), v.round_ties_even(), "{v}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        #[test]
        fn vnni_matches_exact_ref_and_tracks_f32(k in 1usize..300, m in 1usize..14, seed in any::<u64>(), g128 in any::<bool>()) {
            let group = if g128 { 128 } else { 32 };
            let format = WeightFormat::Int4 { group };
            let mut s = seed | 1;
            let mut rnd = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5 };
            let w: Vec<Vec<f32>> = (0..32).map(|_| (0..k).map(|_| rnd()).collect()).collect();
            let refs: Vec<&[f32]> = w.iter().map(|r| r.as_slice()).collect();
            let mut block = vec![0u8; format.block_bytes(k)];
            pack_block(format, &refs, k, &mut block);
            let x: Vec<f32> = (0..m * k).map(|_| rnd() * 4.0).collect();
            let (stride, groups) = (q_stride(k) + 4, k.div_ceil(group));
            let mut q = vec![0i8; m * stride];
            let mut sc = vec![0f32; m * groups];
            let mut su = vec![0i32; m * groups];
            for t in 0..m {
                quantize_row(&x[t * k..(t + 1) * k], group, &mut q[t * stride..(t + 1) * stride], &mut sc[t * groups..(t + 1) * groups], &mut su[t * groups..(t + 1) * groups]);
            }
            let xa = QuantActs { q: &q, stride, scales: &sc, sums: &su, groups };
            let (mut got, mut want, mut f32out) = (vec![0f32; m * 32], vec![0f32; m * 32], vec![0f32; m * 32]);
            gemm_block_i8(format, &block, k, &xa, m, &mut got, 32);
            gemm_block_i8_ref(format, &block, k, &xa, m, &mut want, 32);
            prop_assert_eq!(&got, &want);
            // Against f32 activations: the int8 rounding error, at most half a step
            // (amax/254) per activation times Σ|w| of the group.
            gemm_block_ref(format, &block, k, &x, k, m, &mut f32out, 32);
            let deq = crate::packed::dequant_block(format, &block, k);
            for t in 0..m {
                for r in 0..32 {
                    let bound: f32 = (0..k).map(|kk| {
                        let g = kk / group;
                        let amax = x[t * k + g * group..(t * k + ((g + 1) * group).min(k))].iter().fold(0f32, |a, v| a.max(v.abs()));
                        deq[r * k + kk].abs() * amax / 254.0
                    }).sum();
                    prop_assert!((got[t * 32 + r] - f32out[t * 32 + r]).abs() <= bound * 1.01 + 1e-4);
                }
            }
        }
    }
}
