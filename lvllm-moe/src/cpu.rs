//! Routed experts computed on the CPU.
//!
//! For each expert, the tokens routed to it are gathered, run through
//! `down(silu(gate(x)) · up(x))`, scaled by their routing weight and added into the
//! output. This is the correct, straightforward version; the CPU expert engine
//! issue replaces its inner loops with repacked, NUMA-split, multi-threaded kernels
//! behind the same `forward`.

use lvllm_tensor::{ops, HostTensor};

use crate::{Error, Result, TopK};

/// The three projections of one expert, as stored in Hugging Face checkpoints.
#[derive(Debug, Clone)]
pub struct ExpertWeights {
    /// `gate_proj`, `[intermediate, hidden]`.
    pub gate: HostTensor,
    /// `up_proj`, `[intermediate, hidden]`.
    pub up: HostTensor,
    /// `down_proj`, `[hidden, intermediate]`.
    pub down: HostTensor,
}

/// One MoE layer's routed experts on the CPU.
#[derive(Debug)]
pub struct CpuExperts {
    experts: Vec<ExpertWeights>,
    hidden: usize,
    intermediate: usize,
}

impl CpuExperts {
    /// Checks every expert's shapes against `hidden` × `intermediate` and converts
    /// weights to a dtype the kernels run on.
    pub fn new(experts: Vec<ExpertWeights>, hidden: usize, intermediate: usize) -> Result<Self> {
        let mut out = Vec::with_capacity(experts.len());
        for (i, e) in experts.into_iter().enumerate() {
            let check = |t: &HostTensor, what: &'static str, rows: usize, cols: usize| {
                if t.dims() != [rows, cols] {
                    return Err(Error::ExpertShape {
                        expert: i,
                        what,
                        got: t.shape().clone(),
                        expected: format!("[{rows}, {cols}]"),
                    });
                }
                Ok(())
            };
            check(&e.gate, "gate_proj", intermediate, hidden)?;
            check(&e.up, "up_proj", intermediate, hidden)?;
            check(&e.down, "down_proj", hidden, intermediate)?;
            out.push(ExpertWeights {
                gate: ops::to_linear_dtype(e.gate)?,
                up: ops::to_linear_dtype(e.up)?,
                down: ops::to_linear_dtype(e.down)?,
            });
        }
        Ok(CpuExperts { experts: out, hidden, intermediate })
    }

    /// Number of experts.
    pub fn n_experts(&self) -> usize {
        self.experts.len()
    }

    /// `out[m, hidden] = Σ_j topk.weights[t, j] · expert_{topk.ids[t, j]}(hidden[t])`.
    pub fn forward(&self, hidden: &[f32], topk: &TopK, out: &mut [f32]) -> Result<()> {
        let (h, m) = (self.hidden, topk.tokens());
        if hidden.len() != m * h || out.len() != m * h {
            return Err(Error::Input(format!(
                "{m} routed tokens need hidden and out of {} elements, got {} and {}",
                m * h,
                hidden.len(),
                out.len()
            )));
        }
        if let Some(&bad) = topk.ids.iter().find(|&&e| e as usize >= self.experts.len()) {
            return Err(Error::Input(format!("expert id {bad} out of range (layer has {})", self.experts.len())));
        }
        out.fill(0.0);
        // Group (token, weight) pairs by expert, in expert order.
        let mut groups: Vec<Vec<(usize, f32)>> = vec![Vec::new(); self.experts.len()];
        for (slot, (&e, &w)) in topk.ids.iter().zip(&topk.weights).enumerate() {
            groups[e as usize].push((slot / topk.k, w));
        }
        let i = self.intermediate;
        let mut x = Vec::new();
        let (mut g, mut u, mut y) = (Vec::new(), Vec::new(), Vec::new());
        for (expert, group) in self.experts.iter().zip(&groups) {
            let me = group.len();
            if me == 0 {
                continue;
            }
            x.clear();
            for &(t, _) in group {
                x.extend_from_slice(&hidden[t * h..(t + 1) * h]);
            }
            g.resize(me * i, 0.0);
            u.resize(me * i, 0.0);
            y.resize(me * h, 0.0);
            ops::linear(&x, me, &expert.gate, &mut g)?;
            ops::linear(&x, me, &expert.up, &mut u)?;
            for (gv, uv) in g.iter_mut().zip(&u) {
                *gv = lvllm_kernels_cpu::ops::silu(*gv) * uv;
            }
            ops::linear(&g, me, &expert.down, &mut y)?;
            for (r, &(t, w)) in group.iter().enumerate() {
                for (o, v) in out[t * h..(t + 1) * h].iter_mut().zip(&y[r * h..(r + 1) * h]) {
                    *o += w * v;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mat(rows: usize, cols: usize, f: impl Fn(usize, usize) -> f32) -> HostTensor {
        let v: Vec<f32> = (0..rows * cols).map(|i| f(i / cols, i % cols)).collect();
        HostTensor::from_slice(&v, [rows, cols]).unwrap()
    }

    #[test]
    fn weighted_sum_of_experts_matches_direct_computation() {
        let (h, i) = (3, 2);
        let experts: Vec<ExpertWeights> = (0..3)
            .map(|e| ExpertWeights {
                gate: mat(i, h, |r, c| 0.1 * (e + r + c) as f32),
                up: mat(i, h, |r, c| 0.2 * (e as f32 - r as f32 + c as f32)),
                down: mat(h, i, |r, c| 0.3 * (r * 2 + c + e) as f32 - 0.5),
            })
            .collect();
        let layer = CpuExperts::new(experts.clone(), h, i).unwrap();
        let hidden = [0.5, -1.0, 2.0, 1.0, 0.0, -0.5];
        let topk = TopK { k: 2, ids: vec![2, 0, 1, 2], weights: vec![0.7, 0.3, 0.6, 0.4] };
        let mut out = vec![0f32; 6];
        layer.forward(&hidden, &topk, &mut out).unwrap();

        let expert = |e: &ExpertWeights, x: &[f32]| -> Vec<f32> {
            let (gw, uw, dw) = (e.gate.to_f32_vec().unwrap(), e.up.to_f32_vec().unwrap(), e.down.to_f32_vec().unwrap());
            let a: Vec<f32> = (0..i)
                .map(|r| {
                    let g: f32 = (0..h).map(|c| gw[r * h + c] * x[c]).sum();
                    let u: f32 = (0..h).map(|c| uw[r * h + c] * x[c]).sum();
                    g / (1.0 + (-g).exp()) * u
                })
                .collect();
            (0..h).map(|r| (0..i).map(|c| dw[r * i + c] * a[c]).sum()).collect()
        };
        for t in 0..2 {
            let x = &hidden[t * h..(t + 1) * h];
            for d in 0..h {
                let want: f32 = (0..2)
                    .map(|j| topk.weights[t * 2 + j] * expert(&experts[topk.ids[t * 2 + j] as usize], x)[d])
                    .sum();
                assert!((out[t * h + d] - want).abs() < 1e-5, "token {t} dim {d}: {} vs {want}", out[t * h + d]);
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let e = ExpertWeights { gate: mat(2, 3, |_, _| 0.0), up: mat(2, 3, |_, _| 0.0), down: mat(2, 3, |_, _| 0.0) };
        let err = CpuExperts::new(vec![e], 3, 2).unwrap_err();
        assert!(err.to_string().contains("down_proj"), "{err}");
        let ok = ExpertWeights { gate: mat(2, 3, |_, _| 0.0), up: mat(2, 3, |_, _| 0.0), down: mat(3, 2, |_, _| 0.0) };
        let layer = CpuExperts::new(vec![ok], 3, 2).unwrap();
        let topk = TopK { k: 1, ids: vec![5], weights: vec![1.0] };
        let mut out = vec![0f32; 3];
        assert!(layer.forward(&[0.0; 3], &topk, &mut out).is_err());
    }
}
