//! Operations on host tensors, dispatched by dtype to `lvllm-kernels-cpu`.

use half::bf16;
use lvllm_kernels_cpu::matmul;

use crate::{DType, Error, HostTensor, Result};

/// `out[m, n] = x[m, k] · wᵀ` for a weight `w` of shape `[n, k]` (bf16 or f32).
pub fn linear(x: &[f32], m: usize, w: &HostTensor, out: &mut [f32]) -> Result<()> {
    let (n, k) = w.shape().dims2("linear")?;
    if x.len() != m * k || out.len() != m * n {
        return Err(Error::ShapeMismatch {
            op: "linear",
            expected: format!("x [{m}, {k}] and out [{m}, {n}], got {} and {} elements", x.len(), out.len()),
            got: w.shape().clone(),
        });
    }
    match w.dtype() {
        DType::BF16 => matmul::matmul_bf16(x, &w.typed::<bf16>()?, out, m, n, k),
        DType::F32 => matmul::matmul_f32(x, &w.typed::<f32>()?, out, m, n, k),
        dtype => return Err(Error::UnsupportedDType { op: "linear", dtype }),
    }
    Ok(())
}

/// Converts a float tensor to a dtype `linear` runs on: bf16 and f32 stay as they
/// are (views stay views), f16 and fp8 widen to f32.
pub fn to_linear_dtype(w: HostTensor) -> Result<HostTensor> {
    match w.dtype() {
        DType::BF16 | DType::F32 => Ok(w.into_aligned()),
        DType::F16 | DType::F8E4M3 => HostTensor::from_slice(&w.to_f32_vec()?, w.shape().clone()),
        dtype => Err(Error::UnsupportedDType { op: "linear", dtype }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_checks_shapes_and_computes() {
        let w = HostTensor::from_slice(&[bf16::ONE, bf16::from_f32(2.0), bf16::ZERO, bf16::ONE], [2, 2]).unwrap();
        let mut out = [0f32; 2];
        linear(&[1.0, 1.0], 1, &w, &mut out).unwrap();
        assert_eq!(out, [3.0, 1.0]);
        assert!(linear(&[1.0], 1, &w, &mut out).is_err());
    }
}
