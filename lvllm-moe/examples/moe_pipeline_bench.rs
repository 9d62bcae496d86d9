//! Decode-like benchmark of many MoE layers' routed experts on the CPU: one
//! token (or `--m` tokens) through `--layers` distinct layers in turn, with an
//! optional idle gap between layers standing in for the GPU's part of a hybrid
//! decode step. It separates what the expert kernels cost in a real decode step
//! (a working set of all layers, idle workers between layers) from
//! `moe_layer_bench`'s one hot layer.
//!
//! ```text
//! cargo run --release -p lvllm-moe --example moe_pipeline_bench -- \
//!     [--threads N] [--format bf16|int4] [--layers 48] [--gap-us 0] [--steps 8] [--m 1]
//!     [--schedule regions,chunks] [--tasks-per-thread 16,8,4] [--max-blocks 8,32] [--prefetch 2048,0,8192l2] [--topk 8] [--probe-mib 8192]
//! ```
//! Weights are `CpuExperts::dummy` (Qwen3-30B-A3B layer shape); routing is
//! uniform random.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lvllm_kernels_cpu::packed::WeightFormat;
use lvllm_moe::{CpuExperts, DecodeSchedule, TopK};
use lvllm_numa::{bandwidth, Binding, Pool, PoolOptions, Topology};

fn main() -> anyhow::Result<()> {
    let (mut threads, mut format, mut layers, mut gap_us, mut steps, mut m) =
        (None, "bf16".to_string(), 48, 0u64, 8, 1);
    let mut tpts: Vec<usize> = vec![16];
    let mut max_blocks: Vec<usize> = vec![8];
    let mut prefetches = vec![lvllm_kernels_cpu::packed::Prefetch::default()];
    let mut topk = 8;
    let mut schedules = vec![DecodeSchedule::default()];
    let mut probe_mib = 8192usize;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--threads" => threads = Some(val()?.parse()?),
            "--format" => format = val()?,
            "--layers" => layers = val()?.parse()?,
            "--gap-us" => gap_us = val()?.parse()?,
            "--steps" => steps = val()?.parse()?,
            "--m" => m = val()?.parse()?,
            "--probe-mib" => probe_mib = val()?.parse()?,
            "--schedule" => {
                schedules = val()?
                    .split(',')
                    .map(|s| match s {
                        "chunks" => Ok(DecodeSchedule::Chunks),
                        "regions" => Ok(DecodeSchedule::Regions),
                        other => Err(anyhow::anyhow!("unknown schedule {other} (chunks or regions)")),
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            "--topk" => topk = val()?.parse()?,
            "--prefetch" => {
                prefetches = val()?.split(',').map(str::parse).collect::<Result<_, _>>().map_err(anyhow::Error::msg)?
            }
            "--max-blocks" => max_blocks = val()?.split(',').map(|v| v.parse()).collect::<Result<_, _>>()?,
            "--tasks-per-thread" => tpts = val()?.split(',').map(|v| v.parse()).collect::<Result<_, _>>()?,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    let (hidden, inter, n_experts) = (2048, 768, 128);
    let (wf, int8) = match format.as_str() {
        "bf16" => (WeightFormat::Bf16, false),
        "int4" => (WeightFormat::Int4 { group: 32 }, true),
        other => anyhow::bail!("unknown format {other} (bf16 or int4)"),
    };
    let pool = Arc::new(Pool::new(
        &Topology::detect()?,
        PoolOptions { threads, binding: Binding::CpuCore, power_saving: false },
    )?);
    // Far larger than any last-level cache, like `lvllm bench`'s probe.
    let probe = bandwidth::probe(&pool, probe_mib << 20, 5)?;
    let t0 = Instant::now();
    let mut experts: Vec<CpuExperts> = (0..layers)
        .map(|l| CpuExperts::dummy(pool.clone(), n_experts, hidden, inter, wf, int8, l as u64 + 1))
        .collect::<Result<_, _>>()?;
    let fill = t0.elapsed();
    let huge = std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("AnonHugePages"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
        })
        .unwrap_or_else(|| "?".into());
    println!("# {layers} layers filled in {:.1} s; AnonHugePages {huge} kB", fill.as_secs_f64());
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let x: Vec<f32> = (0..m * hidden).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let mut out = vec![0f32; m * hidden];
    let mut configs = Vec::new();
    for &sched in &schedules {
        for &pf in &prefetches {
            for &t in &tpts {
                for &b in &max_blocks {
                    configs.push((sched, pf, t, b));
                }
            }
        }
    }
    for &(sched, pf, tpt, mb) in &configs {
        lvllm_kernels_cpu::packed::set_prefetch(pf);
        experts = experts
            .into_iter()
            .map(|e| {
                e.with_tasks_per_thread(tpt).with_max_blocks_per_task(mb).with_decode_schedule(sched).with_stats(true)
            })
            .collect();
        let (mut busy, mut n, mut bytes) = (Duration::ZERO, 0usize, 0usize);
        let start = Instant::now();
        for step in 0..steps + 1 {
            for layer in &experts {
                let mut ids = Vec::with_capacity(m * topk);
                for _ in 0..m {
                    let mut chosen: Vec<u32> = Vec::with_capacity(topk);
                    while chosen.len() < topk {
                        let e = (next() % n_experts as u64) as u32;
                        if !chosen.contains(&e) {
                            chosen.push(e);
                        }
                    }
                    ids.extend(chosen);
                }
                let mut distinct = ids.clone();
                distinct.sort_unstable();
                distinct.dedup();
                let route = TopK { k: topk, ids, weights: vec![1.0 / topk as f32; m * topk] };
                let g = Instant::now();
                while g.elapsed() < Duration::from_micros(gap_us) {
                    std::hint::spin_loop();
                }
                let t = Instant::now();
                layer.forward(&x, &route, &mut out)?;
                if step > 0 {
                    busy += t.elapsed();
                    n += 1;
                    bytes += distinct.len() * layer.expert_bytes();
                }
            }
        }
        let per_layer = busy.as_secs_f64() / n as f64;
        let st: lvllm_moe::DecodeStats = experts.iter().map(|e| e.stats()).sum();
        let gbs = bytes as f64 / busy.as_secs_f64() / 1e9;
        println!(
        "{format} m={m} layers={layers} gap={gap_us}µs threads={} {sched:?} topk={topk} tasks/thread={tpt} max-blocks={mb} prefetch={}{}: {:.1} µs/layer, {:.1} MB/layer, {:.1} GB/s = {:.0}% of the probe's {:.1} GB/s (filled in {:.1} s, wall {:.1} s)",
        pool.num_threads(),
        pf.distance,
        if pf.l2 { "l2" } else { "" },
        per_layer * 1e6,
        bytes as f64 / n as f64 / 1e6,
        gbs,
        100.0 * gbs / probe.gb_per_s,
        probe.gb_per_s,
        fill.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
        if st.tasks > 0 {
            let per = |v: u64| v as f64 / st.tasks as f64 / 1e3;
            println!(
                "  per thread and layer (regions schedule, all steps): start {:.1} µs, gate_up {:.1}, wait {:.1}, down {:.1}, tail {:.1}; dispatch {:.1} µs, before it {:.1}",
                per(st.start_ns),
                per(st.gate_up_ns),
                per(st.wait_ns),
                per(st.down_ns),
                per(st.tail_ns),
                st.forward_ns as f64 / st.calls as f64 / 1e3,
                st.prologue_ns as f64 / st.calls as f64 / 1e3
            );
        }
    }
    Ok(())
}
