//! lvllm-models (being built).
