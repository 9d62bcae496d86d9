//! The lvllm binary.
fn main() {}
