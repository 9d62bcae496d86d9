//! lvllm-engine (being built).
