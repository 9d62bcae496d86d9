//! CPU kernels of lvllm: pure math on slices.
//!
//! - [`matmul`]: dense `x·wᵀ` with f32 or bf16 weights (the dense layers).
//! - [`packed`]: expert weights in the kernel's row-block layout (bf16, f16,
//!   fp8-e4m3 with block scales, int4 with group scales) and the block kernel.
//! - [`int8act`]: int4 weights × int8 activations with AVX512-VNNI (the fast int4 decode path).
//! - [`quant`]: FP8 conversions and quantizer helpers.
//! - [`ops`]: RMSNorm, SiLU, softmax.
//! - [`simd`]: runtime ISA detection ([`simd::Isa`]) and the vector trait the
//!   kernels are written against.
//!
//! Every fast kernel has a scalar `_ref` twin that is its test oracle. SIMD is
//! chosen at run time (`is_x86_feature_detected!`, cached), never by
//! `target-cpu=native`.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod int8act;
pub mod matmul;
pub mod ops;
pub mod packed;
pub mod quant;
pub mod simd;
