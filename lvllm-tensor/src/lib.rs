//! lvllm-tensor (being built).
