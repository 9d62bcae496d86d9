//! NUMA topology, node-local host buffers and the NUMA-aware worker pool that
//! runs lvllm's routed experts on the CPU.
//!
//! - [`Topology`]: NUMA nodes, their CPUs, physical cores (SMT siblings grouped)
//!   and memory, read from sysfs ([`Topology::detect`]), from hwloc (feature
//!   `hwloc`), or made up ([`Topology::synthetic`]) for tests.
//! - [`HostBuffer`]: anonymous `mmap` bound to a node or interleaved
//!   ([`Placement`]), page aligned, huge-page advised, zero-filled.
//! - [`Pool`]: pinned workers spread over nodes; [`Pool::parallel_for_nodes`] hands
//!   each node its own tasks and lets threads steal only within their node.
//! - [`bandwidth::probe`]: the read-bandwidth roofline, measured with a pool.
//!
//! Nothing here reads environment variables or keeps global state: the topology
//! and the pool are values that callers pass down. Linux is the target; other
//! operating systems get one node, unpinned threads and unbound buffers.
//!
//! ```
//! use lvllm_numa::{Placement, Pool, PoolOptions, Topology, HostBuffer};
//! let topo = Topology::detect()?;
//! let pool = Pool::new(&topo, PoolOptions { threads: Some(2), ..Default::default() })?;
//! let buf = HostBuffer::new(1 << 20, Placement::Node(pool.node_id(0).unwrap_or(0)))?;
//! let tasks: Vec<usize> = (0..pool.num_nodes()).map(|n| 4 * pool.threads_on_node(n)).collect();
//! pool.parallel_for_nodes(&tasks, |ctx, task| {
//!     let _ = (ctx.node, task, buf.as_slice()[task]);
//! });
//! # Ok::<(), lvllm_numa::Error>(())
//! ```

pub mod bandwidth;
mod buffer;
mod error;
mod pool;
mod sys;
mod topology;

#[cfg(feature = "hwloc")]
mod hwloc;

pub use buffer::{HostBuffer, Placement, HUGE_PAGE_SIZE, MIN_ALIGN};
pub use error::{Error, Result};
pub use pool::{
    apportion, Binding, Pool, PoolOptions, WorkerCtx, RESERVED_CORES, SPIN_BEFORE_PARK, SPIN_WITHOUT_YIELD,
};
pub use topology::{Core, NumaNode, Topology};
