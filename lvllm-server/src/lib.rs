//! Support library of the `lvllm` binary: the model bundled in the binary.
//!
//! The binary itself (`src/main.rs`) turns command-line flags into the engine's
//! typed configuration; this library part exists so integration tests can use
//! the same bundled model.

pub mod bundled;
