//! Routers: router logits to top-k expert ids and weights.
//!
//! Qwen3-MoE uses a softmax over all experts, keeps the `k` largest and, when
//! `norm_topk_prob` is set, renormalises the kept weights to sum to one. Ties
//! keep the lower expert index first, as `torch.topk` does on CPU.

/// The routing of `m` tokens: `ids[t * k + j]` is token `t`'s `j`-th expert.
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    /// Experts per token.
    pub k: usize,
    /// Expert ids, `[m, k]`, in descending weight order per token.
    pub ids: Vec<u32>,
    /// Routing weights, `[m, k]`.
    pub weights: Vec<f32>,
}

impl TopK {
    /// Number of tokens.
    pub fn tokens(&self) -> usize {
        self.ids.len().checked_div(self.k).unwrap_or(0)
    }
}

/// Softmax top-k routing of `m = logits.len() / n_experts` tokens.
///
/// # Panics
/// If `k` is 0 or larger than `n_experts`, or `logits` is not `[m, n_experts]`
/// (the model checks its config at load time).
pub fn softmax_topk(logits: &[f32], n_experts: usize, k: usize, renormalize: bool) -> TopK {
    assert!(k >= 1 && k <= n_experts, "top-k {k} of {n_experts} experts");
    assert_eq!(logits.len() % n_experts, 0, "router logits must be [m, n_experts]");
    let m = logits.len() / n_experts;
    let mut ids = Vec::with_capacity(m * k);
    let mut weights = Vec::with_capacity(m * k);
    let mut probs = vec![0f32; n_experts];
    let mut order: Vec<u32> = Vec::with_capacity(n_experts);
    for row in logits.chunks_exact(n_experts) {
        probs.copy_from_slice(row);
        lvllm_kernels_cpu::ops::softmax_inplace(&mut probs);
        order.clear();
        order.extend(0..n_experts as u32);
        // Stable sort: equal probabilities keep the lower index first.
        order.sort_by(|&a, &b| probs[b as usize].total_cmp(&probs[a as usize]));
        let top = &order[..k];
        let sum: f32 = top.iter().map(|&e| probs[e as usize]).sum();
        let scale = if renormalize { 1.0 / sum } else { 1.0 };
        for &e in top {
            ids.push(e);
            weights.push(probs[e as usize] * scale);
        }
    }
    TopK { k, ids, weights }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_largest_and_renormalises() {
        let logits = [0.0, 2.0, 1.0, 2.0, /* token 2 */ 5.0, 0.0, 0.0, 0.0];
        let r = softmax_topk(&logits, 4, 2, true);
        assert_eq!(r.ids, vec![1, 3, 0, 1]);
        assert!((r.weights[0] - 0.5).abs() < 1e-6 && (r.weights[1] - 0.5).abs() < 1e-6);
        assert!((r.weights[2] + r.weights[3] - 1.0).abs() < 1e-6);
        assert_eq!(r.tokens(), 2);

        let r = softmax_topk(&logits, 4, 2, false);
        let e = [0f32, 2.0, 1.0, 2.0].map(f32::exp);
        let z: f32 = e.iter().sum();
        assert!((r.weights[0] - e[1] / z).abs() < 1e-6);
    }
}
