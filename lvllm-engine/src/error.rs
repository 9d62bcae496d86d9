//! The engine's error type, the API boundary's single error enum.

use crate::chat_template::ChatTemplateError;
use crate::tokenizer::TokenizerError;

/// Errors of `lvllm-engine`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The model could not be loaded (config, checkpoint, tensors).
    #[error("model load failed: {0}")]
    ModelLoad(lvllm_models::Error),
    /// The engine configuration is invalid.
    #[error("invalid engine configuration: {0}")]
    Config(String),
    /// The requested device is unavailable or not built yet.
    #[error("device {device}: {msg}")]
    Device {
        /// The device asked for.
        device: lvllm_tensor::Device,
        /// Why it cannot be used.
        msg: String,
    },
    /// Tokenizer files are invalid or encoding/decoding failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The chat template failed to render.
    #[error(transparent)]
    ChatTemplate(#[from] ChatTemplateError),
    /// The prompt does not fit the context.
    #[error("prompt of {prompt_tokens} tokens is too long: the context limit (max_model_len) is {max_model_len} tokens and at least one must be left to generate")]
    PromptTooLong {
        /// Prompt length.
        prompt_tokens: usize,
        /// The engine's context limit.
        max_model_len: usize,
    },
    /// A request is invalid (sampling values, empty prompt, unknown token ids...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The forward pass failed.
    #[error("inference failed: {0}")]
    Inference(lvllm_models::Error),
    /// The forward pass of a batch failed; every request in it gets this.
    #[error("inference failed: {0}")]
    StepFailed(String),
    /// The engine was dropped (or its model loop stopped) before the request ended.
    #[error("the engine has shut down")]
    Shutdown,
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
