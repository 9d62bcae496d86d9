//! lvllm-moe (being built).
