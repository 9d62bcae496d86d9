//! The crate's error type.

use crate::{DType, Shape};

/// Errors of `lvllm-tensor`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor had another dtype than the operation needs.
    #[error("dtype mismatch in {op}: expected {expected}, got {got}")]
    DTypeMismatch {
        /// The operation.
        op: &'static str,
        /// The dtype it needs.
        expected: DType,
        /// The dtype it got.
        got: DType,
    },
    /// A dtype this operation does not support.
    #[error("{op} does not support dtype {dtype}")]
    UnsupportedDType {
        /// The operation.
        op: &'static str,
        /// The dtype.
        dtype: DType,
    },
    /// A shape had the wrong rank or size.
    #[error("shape mismatch in {op}: expected {expected}, got {got}")]
    ShapeMismatch {
        /// The operation.
        op: &'static str,
        /// What was expected, in words or dims.
        expected: String,
        /// The shape given.
        got: Shape,
    },
    /// The byte length does not fit dtype × shape.
    #[error("{dtype} tensor of shape {shape} needs {expected} bytes, storage has {got}")]
    ByteLength {
        /// The dtype.
        dtype: DType,
        /// The shape.
        shape: Shape,
        /// Bytes needed.
        expected: usize,
        /// Bytes present.
        got: usize,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
