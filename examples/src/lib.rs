//! Examples of embedding lvllm through its public APIs only.
//!
//! Run one with `cargo run -p lvllm-examples --example generate`.
