//! CPU kernels of lvllm: pure math on slices.
//!
//! Every fast kernel has a scalar `_ref` twin that is the test oracle. This first
//! version holds portable kernels written so the compiler vectorises them at the
//! baseline instruction set; the CPU expert engine issue adds the block-quantized
//! formats (fp8, int4), the repacked expert layout and runtime ISA dispatch
//! (AVX-512 BF16/VNNI, AVX2+FMA, AMX).
#![deny(unsafe_op_in_unsafe_fn)]

pub mod matmul;
pub mod ops;
