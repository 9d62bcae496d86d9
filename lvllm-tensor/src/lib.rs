//! Dtypes, shapes and host storage for lvllm.
//!
//! A [`HostTensor`] is a dtype, a [`Shape`] and a [`HostStorage`]: either an owned,
//! 64-byte aligned buffer or a zero-copy view into bytes someone else keeps alive
//! (an mmap'd safetensors file, or bytes embedded in the binary). Checkpoint
//! weights are views; activations and repacked weights are owned.
//!
//! Device storage (CUDA) arrives with the CUDA backend behind the `cuda` feature.
#![deny(unsafe_op_in_unsafe_fn)]

mod dtype;
mod error;
pub mod ops;
mod shape;
mod storage;
mod tensor;

pub use dtype::DType;
pub use error::{Error, Result};
pub use shape::Shape;
pub use storage::{AlignedBuf, Backing, HostStorage};
pub use tensor::{HostTensor, WithDType};

/// Where a computation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// The host CPU.
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}
