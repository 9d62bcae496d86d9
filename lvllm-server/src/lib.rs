//! Support library of the `lvllm` binary: the model bundled in the binary, the
//! server's typed configuration and the tool-call / reasoning output parsers.
//!
//! The binary itself (`src/main.rs`) turns command-line flags into the engine's
//! typed configuration; this library part exists so integration tests can use
//! the same pieces.

pub mod bundled;
/// `lvllm serve` settings: config.yaml, seed env vars and CLI flags merged into
/// one typed [`config::ServeConfig`].
pub mod config;
/// Tool-call and reasoning parsers turning model text into OpenAI fields.
pub mod parsers;
/// The OpenAI-compatible HTTP server (`lvllm serve`).
pub mod server;
