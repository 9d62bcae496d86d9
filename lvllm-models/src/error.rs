//! The crate's error type: every variant names the file, key or tensor at fault.

use std::path::PathBuf;

use lvllm_tensor::{DType, Shape};

/// Errors of `lvllm-models`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `config.json` is malformed or inconsistent.
    #[error("invalid model config ({what}): {msg}")]
    Config {
        /// Which config (usually a path).
        what: String,
        /// What is wrong, naming the key.
        msg: String,
    },
    /// The `architectures` entry names a model lvllm does not implement.
    #[error("unsupported architecture {found:?}; supported: {supported}")]
    UnsupportedArchitecture {
        /// What the config says.
        found: String,
        /// What lvllm supports.
        supported: &'static str,
    },
    /// A configuration or checkpoint feature that is recognised but not built yet.
    #[error("not supported yet: {0}")]
    NotSupported(String),
    /// A safetensors file is corrupt.
    #[error("corrupt safetensors file {file}: {msg}")]
    Safetensors {
        /// The file.
        file: String,
        /// What is wrong.
        msg: String,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor {name:?} not found in the checkpoint ({files})")]
    MissingTensor {
        /// The Hugging Face tensor name.
        name: String,
        /// The files searched.
        files: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor {name:?} has shape {got}, expected {expected}")]
    TensorShape {
        /// The tensor name.
        name: String,
        /// The shape expected from the config.
        expected: Shape,
        /// The shape in the checkpoint.
        got: Shape,
    },
    /// A tensor has a dtype the model cannot use there.
    #[error("tensor {name:?} has dtype {got}, expected a float dtype (bf16, f16, f32)")]
    TensorDType {
        /// The tensor name.
        name: String,
        /// The dtype in the checkpoint.
        got: DType,
    },
    /// The batch or cache handed to `forward` is inconsistent.
    #[error("invalid forward input: {0}")]
    Input(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] lvllm_tensor::Error),
    /// An MoE layer failed.
    #[error(transparent)]
    Moe(#[from] lvllm_moe::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
