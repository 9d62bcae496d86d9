//! The crate's one error type.
//!
//! Failures that the crate tolerates by design are not errors: a refused `mbind`
//! (common in containers) is recorded in [`HostBuffer::bound`](crate::HostBuffer::bound),
//! and a refused `sched_setaffinity` in [`Pool::pinned_threads`](crate::Pool::pinned_threads).

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in `lvllm-numa`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A sysfs file or directory could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A sysfs file had content we do not understand.
    #[error("parsing {path}: {msg}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        msg: String,
    },
    /// The topology has no CPU this process may run on.
    #[error("the topology has no usable CPU")]
    NoCpus,
    /// `mmap` refused to map a buffer.
    #[error("mmap of {len} bytes failed: {source}")]
    Mmap {
        /// Requested length in bytes.
        len: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A NUMA node id beyond what a node mask can express.
    #[error("NUMA node id {0} is out of range (max {max})", max = crate::sys::NODE_MASK_BITS - 1)]
    NodeOutOfRange(usize),
    /// A buffer cannot be viewed as a slice of the requested element type.
    #[error("a {len}-byte buffer is not a whole number of {elem_size}-byte elements")]
    BadCast {
        /// Buffer length in bytes.
        len: usize,
        /// Size of the requested element type.
        elem_size: usize,
    },
    /// `PoolOptions::threads` was `Some(0)`.
    #[error("a pool needs at least one thread")]
    ZeroThreads,
    /// A worker thread could not be spawned.
    #[error("spawning a worker thread: {0}")]
    Spawn(#[source] io::Error),
    /// `tasks_per_node` did not have one entry per pool node.
    #[error("tasks_per_node has {got} entries but the pool has {expected} nodes")]
    NodeCountMismatch {
        /// `Pool::num_nodes()`.
        expected: usize,
        /// `tasks_per_node.len()`.
        got: usize,
    },
    /// hwloc failed to build or describe the topology.
    #[cfg(feature = "hwloc")]
    #[error("hwloc: {0}")]
    Hwloc(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
