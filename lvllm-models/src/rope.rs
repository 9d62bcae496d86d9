//! Rotary position embeddings: frequencies (plain, linear, YaRN) and the NeoX
//! (rotate-half) application Qwen3 uses.
//!
//! Frequencies follow Hugging Face's `modeling_rope_utils` so that the f32
//! reference logits are reproduced; `attention_scaling` multiplies cos and sin.

use crate::config::RopeScaling;

/// Precomputed inverse frequencies of one RoPE configuration.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    attention_scaling: f32,
}

impl Rope {
    /// RoPE over `dim` rotated dimensions with base `theta`.
    ///
    /// `max_position_embeddings` is the config's value (YaRN derives its factor
    /// from it when `original_max_position_embeddings` is given, as transformers does).
    pub fn new(dim: usize, theta: f64, scaling: &RopeScaling, max_position_embeddings: usize) -> Self {
        let half = dim / 2;
        let pos_freqs: Vec<f64> = (0..half).map(|i| theta.powf((2 * i) as f64 / dim as f64)).collect();
        let (inv_freq, attention_scaling): (Vec<f64>, f64) = match scaling {
            RopeScaling::None => (pos_freqs.iter().map(|p| 1.0 / p).collect(), 1.0),
            RopeScaling::Linear { factor } => (pos_freqs.iter().map(|p| 1.0 / (p * factor)).collect(), 1.0),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let (factor, orig_max) = match original_max_position_embeddings {
                    Some(o) => (max_position_embeddings as f64 / *o as f64, *o),
                    None => (*factor, max_position_embeddings),
                };
                let get_mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
                let attn = match (attention_factor, mscale, mscale_all_dim) {
                    (Some(a), _, _) => *a,
                    (None, Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => {
                        get_mscale(factor, *m) / get_mscale(factor, *ma)
                    }
                    _ => get_mscale(factor, 1.0),
                };
                let beta_fast = beta_fast.unwrap_or(32.0);
                let beta_slow = beta_slow.unwrap_or(1.0);
                let correction_dim = |rot: f64| {
                    (dim as f64 * (orig_max as f64 / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
                if truncate.unwrap_or(true) {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let high = high.min(dim as f64 - 1.0);
                let high = if low == high { high + 0.001 } else { high };
                let inv = (0..half)
                    .map(|i| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        let p = pos_freqs[i];
                        (1.0 / (factor * p)) * (1.0 - extrapolation) + (1.0 / p) * extrapolation
                    })
                    .collect();
                (inv, attn)
            }
        };
        Rope { inv_freq: inv_freq.into_iter().map(|v| v as f32).collect(), attention_scaling: attention_scaling as f32 }
    }

    /// The inverse frequencies (`dim / 2` of them).
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// The factor applied to cos and sin.
    pub fn attention_scaling(&self) -> f32 {
        self.attention_scaling
    }

    /// Fills `cos` and `sin` (each `dim / 2`) for a position.
    pub fn cos_sin(&self, position: usize, cos: &mut [f32], sin: &mut [f32]) {
        let p = position as f32;
        for ((c, s), f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let a = p * f;
            *c = a.cos() * self.attention_scaling;
            *s = a.sin() * self.attention_scaling;
        }
    }

    /// Rotates each head of `x` (`heads × dim`) in place, NeoX style: the first
    /// half of a head pairs with the second half.
    pub fn apply_neox(x: &mut [f32], dim: usize, cos: &[f32], sin: &[f32]) {
        let half = dim / 2;
        for head in x.chunks_exact_mut(dim) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * cos[i] - x2 * sin[i];
                b[i] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_frequencies_and_rotation() {
        let r = Rope::new(4, 10000.0, &RopeScaling::None, 128);
        assert_eq!(r.inv_freq(), &[1.0, 0.01]);
        let (mut c, mut s) = ([0f32; 2], [0f32; 2]);
        r.cos_sin(0, &mut c, &mut s);
        let mut x = [1.0, 2.0, 3.0, 4.0];
        Rope::apply_neox(&mut x, 4, &c, &s);
        assert_eq!(x, [1.0, 2.0, 3.0, 4.0]);
        r.cos_sin(1, &mut c, &mut s);
        Rope::apply_neox(&mut x, 4, &c, &s);
        let (c0, s0) = (1f32.cos(), 1f32.sin());
        assert!((x[0] - (c0 - 3.0 * s0)).abs() < 1e-6 && (x[2] - (3.0 * c0 + s0)).abs() < 1e-6);
    }

    #[test]
    fn rotation_preserves_norm() {
        let r = Rope::new(8, 1e6, &RopeScaling::Linear { factor: 2.0 }, 128);
        let (mut c, mut s) = ([0f32; 4], [0f32; 4]);
        r.cos_sin(37, &mut c, &mut s);
        let mut x = [0.3, -1.0, 2.0, 0.5, 1.5, -0.7, 0.1, 0.9];
        let n0: f32 = x.iter().map(|v| v * v).sum();
        Rope::apply_neox(&mut x, 8, &c, &s);
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-5);
    }
}
