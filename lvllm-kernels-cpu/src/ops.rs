//! Element-wise and row-wise f32 operations of the dense layers.

/// RMSNorm of each row of `x` (rows of `weight.len()`), in place:
/// `x · rsqrt(mean(x²) + eps) · weight`, as Hugging Face computes it in f32.
pub fn rms_norm_inplace(x: &mut [f32], weight: &[f32], eps: f32) {
    let h = weight.len();
    assert_eq!(x.len() % h, 0, "x must be rows of the weight's width");
    for row in x.chunks_exact_mut(h) {
        let ss: f32 = row.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = w * (*v * inv);
        }
    }
}

/// SiLU, `x · sigmoid(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `out[i] = silu(gate[i]) · up[i]`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(*g) * u;
    }
}

/// Softmax of a row in place (max-subtracted).
pub fn softmax_inplace(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Log-softmax of a row into `out` (max-subtracted, f64 sum for stability).
pub fn log_softmax(x: &[f32], out: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = x.iter().map(|&v| ((v - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    for (o, v) in out.iter_mut().zip(x) {
        *o = v - lse;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_of_constant_row_is_weight() {
        let mut x = vec![3.0f32; 4];
        rms_norm_inplace(&mut x, &[1.0, 2.0, 0.5, -1.0], 0.0);
        assert_eq!(x, vec![1.0, 2.0, 0.5, -1.0]);
    }

    #[test]
    fn softmax_sums_to_one_and_log_softmax_agrees() {
        let mut x = vec![1.0f32, 2.0, 3.0, -50.0];
        let mut l = vec![0f32; 4];
        log_softmax(&x, &mut l);
        softmax_inplace(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        for (p, lp) in x.iter().zip(&l) {
            assert!((p.ln() - lp).abs() < 1e-5 || *p == 0.0);
        }
    }

    #[test]
    fn silu_values() {
        assert_eq!(silu(0.0), 0.0);
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
        let mut o = [0f32; 2];
        silu_mul(&[0.0, 1.0], &[5.0, 2.0], &mut o);
        assert!((o[1] - 1.462_117_2).abs() < 1e-6);
    }
}
