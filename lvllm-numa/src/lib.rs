//! NUMA topology, node-local host buffers and the NUMA-aware worker pool.
//!
//! This crate will own (see the CPU expert engine issue and `DESIGN.md`):
//! - topology discovery from sysfs (NUMA nodes, their CPUs and memory, physical
//!   cores versus SMT siblings, the node nearest each GPU), and through `hwlocality`
//!   behind the `hwloc` feature;
//! - node-bound host buffers (anonymous `mmap` + `mbind`, interleave-all option,
//!   huge-page advice, 64-byte alignment);
//! - a worker pool pinned per core or per node whose parallel-for lets threads
//!   steal work only within their own node;
//! - a memory-bandwidth probe that benchmarks report as the roofline.
//!
//! Nothing is built here yet: the CPU-only path of the foundation runs on the
//! calling thread.
