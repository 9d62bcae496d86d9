//! Dispatch + barrier latency of the pool: an empty `parallel_for_nodes` (one
//! task per worker, each doing nothing) and an empty `parallel_for`, for 1, 2, 4
//! and all worker threads (counts above the machine's CPUs are skipped: spinning
//! workers on shared cores measure the scheduler, not the pool).
//!
//! Target (DESIGN.md, issue 3): < 10 µs per call on 16 threads; an MoE layer makes
//! two such calls.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use lvllm_numa::{Pool, PoolOptions, Topology};

fn thread_counts(topo: &Topology) -> Vec<usize> {
    let all = topo.num_cpus();
    let mut counts: Vec<usize> = [1, 2, 4, all].into_iter().filter(|&t| t <= all).collect();
    counts.dedup();
    counts
}

fn dispatch(c: &mut Criterion) {
    let topo = Topology::detect().expect("topology");
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
}

criterion_group!(benches, dispatch);
criterion_main!(benches);
