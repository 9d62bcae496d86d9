//! The lvllm inference engine.
//!
//! ```no_run
//! use lvllm_engine::{Engine, SamplingParams};
//! let engine = Engine::builder().model("path/to/Qwen3-30B-A3B").build()?;
//! let out = engine.generate("Hello", &SamplingParams::greedy().max_tokens(32))?;
//! println!("{}", out.text.unwrap_or_default());
//! # Ok::<(), lvllm_engine::Error>(())
//! ```
//!
//! | capability | API | example |
//! |---|---|---|
//! | blocking generation | [`Engine::generate`] | `examples/generate.rs` |
//! | streaming tokens | [`Engine::stream`] | `examples/generate.rs` |
//! | chat templates | [`Prompt::chat`] | `lvllm generate --chat` |
//! | model in memory | [`EngineBuilder::embedded`] | the `lvllm` binary's bundled model |
//!
//! Modules: [`engine`] (builder, requests, streams), [`sampling`], [`tokenizer`],
//! [`chat_template`], [`kv`] (KV block allocation).
#![deny(unsafe_op_in_unsafe_fn)]

pub mod bench;
pub mod chat_template;
pub mod engine;
mod error;
pub mod kv;
pub mod placement;
pub mod sampling;
pub mod tokenizer;

pub use bench::{BenchOptions, BenchReport};
pub use engine::{
    cuda_available, Binding, ChatPrompt, Device, EmbeddedModel, Engine, EngineBuilder, FinishReason, Generation,
    GenerationStats, GenerationStream, ModelSource, MoeWeight, Prompt, StreamDelta, ThreadOptions,
};
pub use error::{Error, Result};
pub use placement::{LayerSet, LoadFormat, MoePlacement};
pub use sampling::{SamplingParams, TokenLogprobs, TopLogprob};
pub use tokenizer::Tokenizer;
