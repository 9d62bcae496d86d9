//! Criterion bench of one MoE layer forward (a reduced Qwen3-30B-A3B layer: 32
//! experts instead of 128, so setup stays quick). The full-size table with the
//! bandwidth roofline is `examples/moe_layer_bench.rs`.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use lvllm_moe::{CpuExperts, ExpertWeights, ExpertsOptions, MoeWeight, TopK};
use lvllm_numa::{Binding, Pool, PoolOptions, Topology};
use lvllm_tensor::HostTensor;

fn bench(c: &mut Criterion) {
    let (h, i, n, k) = (2048, 768, 32, 8);
    let topo = Topology::detect().expect("topology");
    let pool = Arc::new(
        Pool::new(&topo, PoolOptions { threads: None, binding: Binding::CpuCore, power_saving: false }).expect("pool"),
    );
    let mut s = 1u64;
    let mut mat = |r: usize, cols: usize| {
        let v: Vec<bf16> = (0..r * cols)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                bf16::from_f32((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            })
            .collect();
        HostTensor::from_slice(&v, [r, cols]).expect("shape")
    };
    let experts: Vec<ExpertWeights> = (0..n).map(|_| ExpertWeights::dense(mat(i, h), mat(i, h), mat(h, i))).collect();
    let mut g = c.benchmark_group("moe_layer");
    g.sample_size(10);
    for (name, weight) in [("bf16", MoeWeight::Keep), ("int4", MoeWeight::Int4)] {
        let opts = ExpertsOptions { weight, ..Default::default() };
        let layer = CpuExperts::new(pool.clone(), experts.clone(), h, i, &opts, |_| {}).expect("layer");
        for m in [1usize, 16] {
            let hidden = vec![0.01f32; m * h];
            let ids: Vec<u32> = (0..m * k).map(|x| ((x * 5) % n) as u32).collect();
            let topk = TopK { k, ids, weights: vec![0.125; m * k] };
            let mut out = vec![0f32; m * h];
            g.throughput(Throughput::Elements(m as u64));
            g.bench_with_input(BenchmarkId::new(name, m), &m, |b, _| {
                b.iter(|| layer.forward(&hidden, &topk, &mut out).expect("forward"))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
