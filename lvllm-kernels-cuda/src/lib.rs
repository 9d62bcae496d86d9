//! CUDA kernels and launchers for lvllm.
//!
//! This crate will own (see the CUDA backend issue and `DESIGN.md`): CUDA C sources
//! embedded as strings, compiled by NVRTC for the device's architecture on first
//! use and cached on disk; typed Rust launchers; cuBLAS/cuBLASLt GEMMs; streams,
//! events, graphs and pinned host memory, all loaded at run time through `cudarc`
//! so that building needs no CUDA toolkit.
//!
//! Nothing is built here yet. The engine reports a clear "CUDA backend not built
//! yet" error when a CUDA device is requested.
