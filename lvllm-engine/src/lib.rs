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
//! | concurrent requests from any thread | [`Engine::submit`] → [`RequestHandle`] | `lvllm-engine/tests/scheduler.rs` |
//! | callbacks for async servers | [`Engine::submit_with`] → [`RequestEvent`]s | `lvllm-engine/tests/scheduler.rs` |
//! | scheduler and KV cache counters | [`Engine::metrics`] → [`EngineMetrics`] | `lvllm-engine/tests/scheduler.rs` |
//! | chat templates | [`Prompt::chat`] | `lvllm generate --chat` |
//! | model in memory | [`EngineBuilder::embedded`] | the `lvllm` binary's bundled model |
//!
//! Modules: [`engine`] (builder, submission, streams), [`request`] (handles,
//! events, metrics), [`scheduler`] (continuous batching, chunked prefill,
//! preemption), [`kv`] (KV blocks and the prefix cache), [`sampling`],
//! [`tokenizer`], [`chat_template`]. A private `worker` module is the model
//! loop that runs the scheduler's steps on the engine's thread.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod bench;
pub mod chat_template;
pub mod engine;
mod error;
pub mod kv;
pub mod placement;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod tokenizer;
mod worker;

pub use bench::{BenchOptions, BenchReport};
pub use engine::{
    cuda_available, Binding, ChatPrompt, Device, EmbeddedModel, Engine, EngineBuilder, FinishReason, Generation,
    GenerationStats, GenerationStream, ModelSource, MoeWeight, Prompt, StreamDelta, ThreadOptions,
};
pub use error::{Error, Result};
pub use lvllm_models::LoadProgress;
pub use placement::{LayerSet, LoadFormat, MoePlacement};
pub use request::{EngineMetrics, RequestEvent, RequestHandle, RequestId};
pub use sampling::{SamplingParams, TokenLogprobs, TopLogprob};
pub use scheduler::SchedulerConfig;
pub use tokenizer::Tokenizer;
