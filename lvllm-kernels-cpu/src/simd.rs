//! Runtime instruction-set dispatch and the 16-lane f32 vector the expert
//! kernels are written against.
//!
//! The pattern is memchr's: the algorithm is written once, generic over
//! `F32x16`; thin `#[target_feature]` entry points instantiate it per ISA; the
//! ISA is detected once ([`Isa::detect`], cached) and the kernel entry points
//! `match` on it. AVX-512 holds 16 lanes in one register, AVX2 in two; the
//! scalar version is portable (and what aarch64 runs for now).

use std::sync::OnceLock;

/// An instruction set the kernels have a path for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512 F + BW (+ F16C conversions, part of AVX-512F).
    Avx512,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// Portable scalar code.
    Scalar,
}

impl Isa {
    /// The best ISA this CPU supports (detected once, then cached).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                    return Isa::Avx512;
                }
                if is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
                {
                    return Isa::Avx2;
                }
            }
            Isa::Scalar
        })
    }

    /// Every ISA this CPU can run, best first (for tests and benchmarks).
    pub fn available() -> Vec<Isa> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                v.push(Isa::Avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                v.push(Isa::Avx2);
            }
        }
        v.push(Isa::Scalar);
        v
    }
}

/// Sixteen f32 lanes and the loads the weight formats need.
///
/// # Safety
/// Implementations may only be used on CPUs with their instruction set; the
/// kernel entry points guarantee this by matching on [`Isa::detect`]. Pointer
/// arguments must be valid for the bytes each method names.
pub(crate) trait F32x16: Copy {
    /// All lanes zero.
    unsafe fn zero() -> Self;
    /// All lanes `v`.
    unsafe fn splat(v: f32) -> Self;
    /// Loads 16 f32 (unaligned).
    unsafe fn load(p: *const f32) -> Self;
    /// Stores 16 f32 (unaligned).
    unsafe fn store(self, p: *mut f32);
    /// `a * b + c`.
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
    /// `a - b`.
    unsafe fn sub(a: Self, b: Self) -> Self;
    /// Widens 16 bf16 (32 bytes) to f32.
    unsafe fn load_bf16(p: *const u16) -> Self;
    /// Widens 16 IEEE f16 (32 bytes) to f32.
    unsafe fn load_f16(p: *const u16) -> Self;
    /// 16 FP8-E4M3 bytes to f32, **scaled by 2⁻⁸** (the caller folds 256 into
    /// the block scale): the bits are re-biased into f16, then widened.
    unsafe fn load_fp8_div256(p: *const u8) -> Self;
    /// Hints the cache to fetch the line at `p` (any address; never faults).
    unsafe fn prefetch(p: *const u8);
    /// Hints L2 to fetch the line at `p` (any address; never faults).
    unsafe fn prefetch_l2(p: *const u8);
    /// 64 bytes viewed as 16 u32 lanes; byte `c` (0..4) of each lane, split into
    /// its (low nibble, high nibble) as f32 in 0..=15.
    unsafe fn load_u4_lane(p: *const u8, c: usize) -> (Self, Self);
}

/// Portable lanes.
#[derive(Clone, Copy)]
pub(crate) struct Scalar([f32; 16]);

fn f16_bits_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

fn fp8_to_f16_bits(b: u8) -> u16 {
    (((b & 0x80) as u16) << 8) | (((b & 0x7f) as u16) << 7)
}

impl F32x16 for Scalar {
    unsafe fn prefetch(_: *const u8) {}
    unsafe fn prefetch_l2(_: *const u8) {}
    unsafe fn zero() -> Self {
        Scalar([0.0; 16])
    }
    unsafe fn splat(v: f32) -> Self {
        Scalar([v; 16])
    }
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees 16 readable f32.
        Scalar(unsafe { p.cast::<[f32; 16]>().read_unaligned() })
    }
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees 16 writable f32.
        unsafe { p.cast::<[f32; 16]>().write_unaligned(self.0) }
    }
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        Scalar(std::array::from_fn(|i| a.0[i] * b.0[i] + c.0[i]))
    }
    unsafe fn sub(a: Self, b: Self) -> Self {
        Scalar(std::array::from_fn(|i| a.0[i] - b.0[i]))
    }
    unsafe fn load_bf16(p: *const u16) -> Self {
        // SAFETY: the caller guarantees 16 readable u16.
        let v = unsafe { p.cast::<[u16; 16]>().read_unaligned() };
        Scalar(v.map(|b| f32::from_bits((b as u32) << 16)))
    }
    unsafe fn load_f16(p: *const u16) -> Self {
        // SAFETY: the caller guarantees 16 readable u16.
        let v = unsafe { p.cast::<[u16; 16]>().read_unaligned() };
        Scalar(v.map(f16_bits_to_f32))
    }
    unsafe fn load_fp8_div256(p: *const u8) -> Self {
        // SAFETY: the caller guarantees 16 readable bytes.
        let v = unsafe { p.cast::<[u8; 16]>().read_unaligned() };
        Scalar(v.map(|b| f16_bits_to_f32(fp8_to_f16_bits(b))))
    }
    unsafe fn load_u4_lane(p: *const u8, c: usize) -> (Self, Self) {
        // SAFETY: the caller guarantees 64 readable bytes.
        let v = unsafe { p.cast::<[u8; 64]>().read_unaligned() };
        let b: [u8; 16] = std::array::from_fn(|l| v[4 * l + c]);
        (Scalar(b.map(|b| (b & 15) as f32)), Scalar(b.map(|b| (b >> 4) as f32)))
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::F32x16;

    /// One zmm register.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512(__m512);

    impl F32x16 for Avx512 {
        #[inline(always)]
        unsafe fn prefetch(p: *const u8) {
            // SAFETY: prefetch is a hint that never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
        }
        #[inline(always)]
        unsafe fn prefetch_l2(p: *const u8) {
            // SAFETY: prefetch is a hint that never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
        }
        #[inline(always)]
        unsafe fn zero() -> Self {
            // SAFETY: AVX-512F is present (trait contract).
            Avx512(unsafe { _mm512_setzero_ps() })
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            // SAFETY: AVX-512F is present.
            Avx512(unsafe { _mm512_set1_ps(v) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: AVX-512F is present; 64 readable bytes (caller).
            Avx512(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: AVX-512F is present; 64 writable bytes (caller).
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            // SAFETY: AVX-512F is present.
            Avx512(unsafe { _mm512_fmadd_ps(a.0, b.0, c.0) })
        }
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            // SAFETY: AVX-512F is present.
            Avx512(unsafe { _mm512_sub_ps(a.0, b.0) })
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const u16) -> Self {
            // SAFETY: AVX-512F is present; 32 readable bytes (caller).
            unsafe {
                let h = _mm256_loadu_si256(p.cast());
                Avx512(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h))))
            }
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> Self {
            // SAFETY: AVX-512F is present (vcvtph2ps zmm); 32 readable bytes.
            unsafe { Avx512(_mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))) }
        }
        #[inline(always)]
        unsafe fn load_fp8_div256(p: *const u8) -> Self {
            // SAFETY: AVX-512F/BW are present; 16 readable bytes.
            unsafe {
                let b = _mm256_cvtepu8_epi16(_mm_loadu_si128(p.cast()));
                let sign = _mm256_slli_epi16::<8>(_mm256_and_si256(b, _mm256_set1_epi16(0x80)));
                let rest = _mm256_slli_epi16::<7>(_mm256_and_si256(b, _mm256_set1_epi16(0x7f)));
                Avx512(_mm512_cvtph_ps(_mm256_or_si256(sign, rest)))
            }
        }
        #[inline(always)]
        unsafe fn load_u4_lane(p: *const u8, c: usize) -> (Self, Self) {
            // SAFETY: AVX-512F is present; 64 readable bytes.
            unsafe {
                let v = _mm512_srl_epi32(_mm512_loadu_si512(p.cast()), _mm_cvtsi32_si128(8 * c as i32));
                let m = _mm512_set1_epi32(15);
                let lo = _mm512_and_si512(v, m);
                let hi = _mm512_and_si512(_mm512_srli_epi32::<4>(v), m);
                (Avx512(_mm512_cvtepi32_ps(lo)), Avx512(_mm512_cvtepi32_ps(hi)))
            }
        }
    }

    /// Two ymm registers.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2(__m256, __m256);

    impl F32x16 for Avx2 {
        #[inline(always)]
        unsafe fn prefetch(p: *const u8) {
            // SAFETY: prefetch is a hint that never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
        }
        #[inline(always)]
        unsafe fn prefetch_l2(p: *const u8) {
            // SAFETY: prefetch is a hint that never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
        }
        #[inline(always)]
        unsafe fn zero() -> Self {
            // SAFETY: AVX is present (trait contract).
            unsafe { Avx2(_mm256_setzero_ps(), _mm256_setzero_ps()) }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            // SAFETY: AVX is present.
            unsafe { Avx2(_mm256_set1_ps(v), _mm256_set1_ps(v)) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: AVX is present; 64 readable bytes.
            unsafe { Avx2(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: AVX is present; 64 writable bytes.
            unsafe {
                _mm256_storeu_ps(p, self.0);
                _mm256_storeu_ps(p.add(8), self.1);
            }
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            // SAFETY: FMA is present.
            unsafe { Avx2(_mm256_fmadd_ps(a.0, b.0, c.0), _mm256_fmadd_ps(a.1, b.1, c.1)) }
        }
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            // SAFETY: AVX is present.
            unsafe { Avx2(_mm256_sub_ps(a.0, b.0), _mm256_sub_ps(a.1, b.1)) }
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const u16) -> Self {
            // SAFETY: AVX2 is present; 32 readable bytes.
            unsafe {
                let a = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
                let b = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(8).cast()));
                Avx2(_mm256_castsi256_ps(_mm256_slli_epi32::<16>(a)), _mm256_castsi256_ps(_mm256_slli_epi32::<16>(b)))
            }
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> Self {
            // SAFETY: F16C is present; 32 readable bytes.
            unsafe {
                Avx2(_mm256_cvtph_ps(_mm_loadu_si128(p.cast())), _mm256_cvtph_ps(_mm_loadu_si128(p.add(8).cast())))
            }
        }
        #[inline(always)]
        unsafe fn load_fp8_div256(p: *const u8) -> Self {
            // SAFETY: AVX2 + F16C are present; 16 readable bytes.
            unsafe {
                let b = _mm256_cvtepu8_epi16(_mm_loadu_si128(p.cast()));
                let sign = _mm256_slli_epi16::<8>(_mm256_and_si256(b, _mm256_set1_epi16(0x80)));
                let rest = _mm256_slli_epi16::<7>(_mm256_and_si256(b, _mm256_set1_epi16(0x7f)));
                let h = _mm256_or_si256(sign, rest);
                Avx2(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h)))
            }
        }
        #[inline(always)]
        unsafe fn load_u4_lane(p: *const u8, c: usize) -> (Self, Self) {
            // SAFETY: AVX2 is present; 64 readable bytes.
            unsafe {
                let m = _mm256_set1_epi32(15);
                let sh = _mm_cvtsi32_si128(8 * c as i32);
                let a = _mm256_srl_epi32(_mm256_loadu_si256(p.cast()), sh);
                let b = _mm256_srl_epi32(_mm256_loadu_si256(p.add(32).cast()), sh);
                let lo = Avx2(_mm256_cvtepi32_ps(_mm256_and_si256(a, m)), _mm256_cvtepi32_ps(_mm256_and_si256(b, m)));
                let hi = Avx2(
                    _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32::<4>(a), m)),
                    _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32::<4>(b), m)),
                );
                (lo, hi)
            }
        }
    }
}
