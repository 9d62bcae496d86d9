//! Support library of the `lvllm` binary: the model bundled in the binary, the
//! server's typed configuration and the tool-call / reasoning output parsers.
//!
//! The binary itself (`src/main.rs`) turns command-line flags into the engine's
//! typed configuration; this library part exists so integration tests can use
//! the same pieces.

pub mod bundled;
pub mod config;
pub mod parsers;
pub mod server;
