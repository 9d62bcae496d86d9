//! Routing and expert computation of Mixture-of-Experts layers.
//!
//! Three axes, each in one place:
//! - [`router`]: from router logits to top-k expert ids and weights;
//! - [`cpu`]: the routed experts computed on the CPU ([`CpuExperts`]): repacked
//!   into the kernel layout (bf16, f16, fp8, int4), split by rows over NUMA nodes,
//!   run on the `lvllm_numa` worker pool;
//! - `hybrid` (feature `cuda`): the CPU↔GPU handoff of a hybrid MoE layer,
//!   stream memory operations on flags in mapped pinned memory, capturable in
//!   CUDA graphs.
//!
//! The MoE block does not own the gate projection's input handling or the
//! residual: the model computes router logits, calls [`router::softmax_topk`], then
//! [`CpuExperts::forward`].
#![deny(unsafe_op_in_unsafe_fn)]

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod hybrid;
pub mod router;

pub use cpu::{CpuExperts, DecodeSchedule, DecodeStats, ExpertMatrix, ExpertWeights, ExpertsOptions, MoeWeight};
pub use router::{softmax_topk, TopK};

/// Errors of `lvllm-moe`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An expert weight has the wrong shape.
    #[error("expert {expert}: {what} has shape {got}, expected {expected}")]
    ExpertShape {
        /// Expert index.
        expert: usize,
        /// Which projection.
        what: &'static str,
        /// The shape found.
        got: lvllm_tensor::Shape,
        /// The shape expected.
        expected: String,
    },
    /// Forward inputs disagree with the layer.
    #[error("moe forward: {0}")]
    Input(String),
    /// A GPU call of the hybrid handoff failed, or the GPU broke its protocol.
    #[error("hybrid MoE handoff: {0}")]
    Gpu(String),
    /// An error from a tensor operation.
    #[error(transparent)]
    Tensor(#[from] lvllm_tensor::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
