//! Memory read-bandwidth probe: the roofline that CPU expert benchmarks quote.
//!
//! Each pool node gets one buffer bound to it; the node's workers stream it
//! read-only, chunk by chunk, into 8 independent `u64` accumulators. The loop must
//! be cheaper than memory or it measures the core instead: a serial `f32` sum
//! (one dependent add per element) reads only ~51 GB/s on the GPU box's Xeon where
//! this loop reads 128 GB/s (DEVICE.md). The buffers are written first, since
//! never-written anonymous pages all map one shared zero page and would read
//! from cache.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::buffer::{HostBuffer, Placement};
use crate::error::Result;
use crate::pool::Pool;

/// Bytes per task: large enough that claiming a task costs nothing next to
/// reading it, small enough that a node's threads share the buffer evenly.
const CHUNK_BYTES: usize = 1 << 20;

/// What [`probe`] measured.
#[derive(Clone, Debug, PartialEq)]
pub struct BandwidthReport {
    /// Worker threads that read (all of the pool's).
    pub threads: usize,
    /// Bytes read per pass, over all nodes.
    pub bytes: usize,
    /// Best read bandwidth with every node reading its own buffer at once, in GB/s (1e9 B/s).
    pub gb_per_s: f64,
    /// Best read bandwidth of each pool node alone (its threads, its buffer), in GB/s.
    pub per_node_gb_per_s: Vec<f64>,
}

/// Measures read bandwidth with `pool`: every node's threads read a
/// `bytes_per_node` buffer bound to that node (rounded up to 64 bytes), all nodes
/// at once and then each node alone; the best of `reps` passes (at least 1) counts.
///
/// Use buffers much larger than the last-level cache (≥ 1 GiB per node on a server)
/// or this measures the cache.
pub fn probe(pool: &Pool, bytes_per_node: usize, reps: usize) -> Result<BandwidthReport> {
    let words = bytes_per_node.div_ceil(64) * 8;
    let nodes = pool.num_nodes();
    if words == 0 {
        let per_node_gb_per_s = vec![0.0; nodes];
        return Ok(BandwidthReport { threads: pool.num_threads(), bytes: 0, gb_per_s: 0.0, per_node_gb_per_s });
    }
    let mut buffers = Vec::with_capacity(nodes);
    for n in 0..nodes {
        let placement = pool.node_id(n).map_or(Placement::Default, Placement::Node);
        buffers.push(HostBuffer::new(words * 8, placement)?);
    }
    let chunk_words = CHUNK_BYTES / 8;
    let tasks = words.div_ceil(chunk_words);

    // Write every page from its node's threads (first touch also places the pages
    // where `mbind` was refused).
    {
        let mut chunks: Vec<Vec<Mutex<&mut [u64]>>> = Vec::with_capacity(nodes);
        for b in &mut buffers {
            chunks.push(b.as_mut_slice_of::<u64>()?.chunks_mut(chunk_words).map(Mutex::new).collect());
        }
        pool.parallel_for_nodes(&vec![tasks; nodes], |ctx, t| {
            let mut chunk = chunks[ctx.node][t].lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (i, w) in chunk.iter_mut().enumerate() {
                *w = (t * chunk_words + i) as u64;
            }
        });
    }

    let views: Vec<&[u64]> = buffers.iter().map(|b| b.as_slice_of::<u64>()).collect::<Result<_>>()?;
    let sink = AtomicU64::new(0);
    let read_fn = sum_fn();
    let pass = |tasks_per_node: &[usize]| -> f64 {
        let start = Instant::now();
        pool.parallel_for_nodes(tasks_per_node, |ctx, t| {
            let data = &views[ctx.node];
            let chunk = &data[t * chunk_words..((t + 1) * chunk_words).min(data.len())];
            sink.fetch_xor(read_fn(black_box(chunk)), Ordering::Relaxed);
        });
        start.elapsed().as_secs_f64()
    };

    let reps = reps.max(1);
    let all = vec![tasks; nodes];
    let best_all = (0..reps).map(|_| pass(&all)).fold(f64::INFINITY, f64::min);
    let node_bytes = (words * 8) as f64;
    let per_node_gb_per_s = if nodes == 1 {
        vec![node_bytes / best_all / 1e9]
    } else {
        (0..nodes)
            .map(|n| {
                let mut only = vec![0; nodes];
                only[n] = tasks;
                node_bytes / (0..reps).map(|_| pass(&only)).fold(f64::INFINITY, f64::min) / 1e9
            })
            .collect()
    };
    black_box(sink.load(Ordering::Relaxed));
    Ok(BandwidthReport {
        threads: pool.num_threads(),
        bytes: words * 8 * nodes,
        gb_per_s: node_bytes * nodes as f64 / best_all / 1e9,
        per_node_gb_per_s,
    })
}

/// Sum of `data` with 8 independent accumulators (wrapping): no dependency chain
/// longer than one add per 8 words, so the loop runs far below memory speed.
#[inline(always)]
fn sum8(data: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let chunks = data.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] = acc[i].wrapping_add(c[i]);
        }
    }
    acc.iter().chain(tail).fold(0u64, |a, &b| a.wrapping_add(b))
}

/// `sum8` compiled for AVX2 (32-byte loads).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum8_avx2(data: &[u64]) -> u64 {
    sum8(data)
}

/// Safe wrapper of [`sum8_avx2`], only handed out when AVX2 was detected.
#[cfg(target_arch = "x86_64")]
fn sum8_avx2_checked(data: &[u64]) -> u64 {
    // SAFETY: `sum_fn` returns this function only after detecting AVX2.
    unsafe { sum8_avx2(data) }
}

/// The fastest summing loop this CPU supports, chosen once per probe.
fn sum_fn() -> fn(&[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        return sum8_avx2_checked;
    }
    sum8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PoolOptions, Topology};

    #[test]
    fn sums_agree() {
        let data: Vec<u64> = (0..1003u64).map(|i| 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i + 1)).collect();
        let want = data.iter().fold(0u64, |a, &b| a.wrapping_add(b));
        assert_eq!(sum8(&data), want);
        assert_eq!(sum_fn()(&data), want);
    }

    #[test]
    fn probe_reports_something_sane() {
        let pool =
            Pool::new(&Topology::synthetic(2, 1, 1), PoolOptions { threads: Some(2), ..Default::default() }).unwrap();
        let r = probe(&pool, (3 << 20) + 5, 2).unwrap();
        assert_eq!(r.threads, 2);
        assert_eq!(r.bytes, 2 * (((3 << 20) + 5usize).div_ceil(64) * 64));
        assert_eq!(r.per_node_gb_per_s.len(), 2);
        assert!(r.gb_per_s > 0.0 && r.gb_per_s.is_finite());
        assert!(r.per_node_gb_per_s.iter().all(|&g| g > 0.0 && g.is_finite()));
        let tiny = probe(&pool, 0, 0).unwrap();
        assert_eq!(tiny.bytes, 0);
    }
}
