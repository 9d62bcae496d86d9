//! lvllm-kernels-cpu (being built).
