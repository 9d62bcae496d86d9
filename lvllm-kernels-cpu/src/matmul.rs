//! Dense matrix products against row-major weights: `out[m, n] = x[m, k] · w[n, k]ᵀ`.
//!
//! Activations are f32; weights are bf16 (widened to f32 one row at a time) or f32;
//! accumulation is f32. The weight row is the outer loop so each weight byte is
//! read once per call, whatever `m` is: the decode case (`m` = 1) is a GEMV that
//! streams the weights.

use half::bf16;

/// Lanes of independent partial sums in [`dot`]; 16 keeps two AVX registers or four
/// SSE registers busy and lets the compiler vectorise without reassociation.
const LANES: usize = 16;

/// Dot product of two equal-length f32 slices with `LANES` partial sums.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let chunks = a.len() / LANES;
    for c in 0..chunks {
        let a = &a[c * LANES..(c + 1) * LANES];
        let b = &b[c * LANES..(c + 1) * LANES];
        for l in 0..LANES {
            acc[l] += a[l] * b[l];
        }
    }
    let mut tail = 0f32;
    for i in chunks * LANES..a.len() {
        tail += a[i] * b[i];
    }
    // Pairwise reduction of the lanes.
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0] + tail
}

/// Widens bf16 values to f32 (exact).
#[inline]
pub fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s.to_bits() as u32) << 16);
    }
}

fn check_shapes(x: usize, w: usize, out: usize, m: usize, n: usize, k: usize) {
    assert_eq!(x, m * k, "x must be [m, k]");
    assert_eq!(w, n * k, "w must be [n, k]");
    assert_eq!(out, m * n, "out must be [m, n]");
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` with bf16 weights.
///
/// # Panics
/// If the slice lengths do not match `m`, `n`, `k` (callers check shapes first).
pub fn matmul_bf16(x: &[f32], w: &[bf16], out: &mut [f32], m: usize, n: usize, k: usize) {
    check_shapes(x.len(), w.len(), out.len(), m, n, k);
    let mut row = vec![0f32; k];
    for j in 0..n {
        bf16_to_f32(&w[j * k..(j + 1) * k], &mut row);
        for i in 0..m {
            out[i * n + j] = dot(&x[i * k..(i + 1) * k], &row);
        }
    }
}

/// Scalar twin of [`matmul_bf16`]: the test oracle.
pub fn matmul_bf16_ref(x: &[f32], w: &[bf16], out: &mut [f32], m: usize, n: usize, k: usize) {
    check_shapes(x.len(), w.len(), out.len(), m, n, k);
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for p in 0..k {
                s += x[i * k + p] as f64 * w[j * k + p].to_f64();
            }
            out[i * n + j] = s as f32;
        }
    }
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` with f32 weights.
///
/// # Panics
/// If the slice lengths do not match `m`, `n`, `k`.
pub fn matmul_f32(x: &[f32], w: &[f32], out: &mut [f32], m: usize, n: usize, k: usize) {
    check_shapes(x.len(), w.len(), out.len(), m, n, k);
    for j in 0..n {
        let row = &w[j * k..(j + 1) * k];
        for i in 0..m {
            out[i * n + j] = dot(&x[i * k..(i + 1) * k], row);
        }
    }
}

/// Scalar twin of [`matmul_f32`].
pub fn matmul_f32_ref(x: &[f32], w: &[f32], out: &mut [f32], m: usize, n: usize, k: usize) {
    check_shapes(x.len(), w.len(), out.len(), m, n, k);
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for p in 0..k {
                s += x[i * k + p] as f64 * w[j * k + p] as f64;
            }
            out[i * n + j] = s as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// f32 accumulation against an f64 reference: relative to the sum of |terms|.
    fn close(a: &[f32], b: &[f32], x: &[f32], w: &[f32], m: usize, n: usize, k: usize) {
        for i in 0..m {
            for j in 0..n {
                let mag: f32 = (0..k).map(|p| (x[i * k + p] * w[j * k + p]).abs()).sum();
                let d = (a[i * n + j] - b[i * n + j]).abs();
                assert!(d <= 1e-6 * (k as f32).sqrt() * mag + 1e-30, "[{i},{j}] {} vs {}", a[i * n + j], b[i * n + j]);
            }
        }
    }

    proptest! {
        #[test]
        fn bf16_matches_ref(m in 1usize..6, n in 1usize..20, k in 1usize..90, seed in any::<u64>()) {
            let mut s = seed | 1;
            let mut rnd = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0 };
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(rnd())).collect();
            let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
            matmul_bf16(&x, &w, &mut a, m, n, k);
            matmul_bf16_ref(&x, &w, &mut b, m, n, k);
            close(&a, &b, &x, &wf, m, n, k);
            let (mut c, mut d) = (vec![0f32; m * n], vec![0f32; m * n]);
            matmul_f32(&x, &wf, &mut c, m, n, k);
            matmul_f32_ref(&x, &wf, &mut d, m, n, k);
            close(&c, &d, &x, &wf, m, n, k);
            prop_assert_eq!(a, c);
        }
    }
}
