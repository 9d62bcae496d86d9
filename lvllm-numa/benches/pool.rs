//! Dispatch + barrier latency of the pool: an empty `parallel_for_nodes` (one
//! task per worker, each doing nothing) and an empty `parallel_for`, for 1, 2, 4,
//! 8, all − 1 and all worker threads (counts above the machine's CPUs are
//! skipped). `all` workers plus the waiting caller oversubscribe the CPUs by one.
//!
//! Two patterns: back to back (workers still spinning hot), and `after_gap`: the
//! caller first busy-waits [`GAP`] outside the timed region, as it does while the
//! GPU runs a layer's attention, so workers are in their yielding spin phase.
//!
//! Target (DESIGN.md, issue 3): < 10 µs per call on 16 threads; an MoE layer makes
//! two such calls.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use lvllm_numa::{Pool, PoolOptions, Topology};

/// Idle time before each call in the `after_gap` benches.
const GAP: Duration = Duration::from_micros(60);

fn thread_counts(topo: &Topology) -> Vec<usize> {
    let all = topo.num_cpus();
    let mut counts: Vec<usize> =
        [1, 2, 4, 8, all.saturating_sub(1), all].into_iter().filter(|&t| t >= 1 && t <= all).collect();
    counts.sort_unstable();
    counts.dedup();
    counts
}

fn busy_wait(d: Duration) {
    let start = Instant::now();
    while start.elapsed() < d {
        std::hint::spin_loop();
    }
}

fn dispatch(c: &mut Criterion) {
    let topo = Topology::detect().expect("topology");
    eprintln!("{topo}");
    let mut group = c.benchmark_group("dispatch");
    for threads in thread_counts(&topo) {
        let pool = Pool::new(&topo, PoolOptions { threads: Some(threads), ..Default::default() }).expect("pool");
        let per_node: Vec<usize> = (0..pool.num_nodes()).map(|n| pool.threads_on_node(n)).collect();
        group.bench_with_input(BenchmarkId::new("parallel_for_nodes", threads), &threads, |b, _| {
            b.iter(|| pool.parallel_for_nodes(&per_node, |ctx, t| _ = black_box((ctx, t))))
        });
        group.bench_with_input(BenchmarkId::new("parallel_for", threads), &threads, |b, &n| {
            b.iter(|| pool.parallel_for(n, |ctx, t| _ = black_box((ctx, t))))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("dispatch_after_gap");
    group.sample_size(20).measurement_time(Duration::from_millis(500)).warm_up_time(Duration::from_millis(200));
    for threads in thread_counts(&topo) {
        let pool = Pool::new(&topo, PoolOptions { threads: Some(threads), ..Default::default() }).expect("pool");
        let per_node: Vec<usize> = (0..pool.num_nodes()).map(|n| pool.threads_on_node(n)).collect();
        group.bench_with_input(BenchmarkId::new("parallel_for_nodes", threads), &threads, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    busy_wait(GAP);
                    let start = Instant::now();
                    pool.parallel_for_nodes(&per_node, |ctx, t| _ = black_box((ctx, t)));
                    total += start.elapsed();
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, dispatch);
criterion_main!(benches);
