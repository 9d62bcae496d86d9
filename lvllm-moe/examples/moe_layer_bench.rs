//! Benchmark of one MoE layer's routed experts on the CPU, against the machine's
//! own memory bandwidth measured by `lvllm_numa::bandwidth::probe` with the same
//! threads.
//!
//! ```text
//! cargo run --release -p lvllm-moe --example moe_layer_bench -- \
//!     [--threads N] [--formats bf16,fp8,int4] [--m 1,4,16,256,2048] [--secs 1.0]
//!     [--hidden 2048] [--inter 768] [--experts 128] [--topk 8] [--binding cpu_core|numa_node]
//! ```
//! Defaults are the Qwen3-30B-A3B layer shape. Routing is uniform random and
//! changes every iteration, so the active experts come from DRAM.

use std::sync::Arc;
use std::time::Instant;

use half::bf16;
use lvllm_kernels_cpu::packed::WeightFormat;
use lvllm_moe::{CpuExperts, ExpertMatrix, ExpertWeights, ExpertsOptions, MoeWeight, TopK};
use lvllm_numa::{bandwidth, Binding, Pool, PoolOptions, Topology};
use lvllm_tensor::{DType, HostTensor};

struct Args {
    threads: Option<usize>,
    formats: Vec<String>,
    ms: Vec<usize>,
    secs: f64,
    hidden: usize,
    inter: usize,
    experts: usize,
    topk: usize,
    binding: Binding,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args {
        threads: None,
        formats: vec!["bf16".into(), "fp8".into(), "int4".into()],
        ms: vec![1, 4, 16, 256, 2048],
        secs: 1.0,
        hidden: 2048,
        inter: 768,
        experts: 128,
        topk: 8,
        binding: Binding::CpuCore,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--threads" => a.threads = Some(val()?.parse()?),
            "--formats" => a.formats = val()?.split(',').map(String::from).collect(),
            "--m" => a.ms = val()?.split(',').map(|s| s.parse()).collect::<Result<_, _>>()?,
            "--secs" => a.secs = val()?.parse()?,
            "--hidden" => a.hidden = val()?.parse()?,
            "--inter" => a.inter = val()?.parse()?,
            "--experts" => a.experts = val()?.parse()?,
            "--topk" => a.topk = val()?.parse()?,
            "--binding" => {
                a.binding = match val()?.as_str() {
                    "cpu_core" => Binding::CpuCore,
                    "numa_node" => Binding::NumaNode,
                    other => anyhow::bail!("unknown binding {other}"),
                }
            }
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

/// xorshift for weights and routing.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

fn random_bf16(rows: usize, cols: usize, rng: &mut Rng) -> HostTensor {
    let v: Vec<bf16> = (0..rows * cols).map(|_| bf16::from_f32(rng.f32() * 0.1)).collect();
    HostTensor::from_slice(&v, [rows, cols]).expect("shape")
}

fn random_fp8(rows: usize, cols: usize, rng: &mut Rng) -> ExpertMatrix {
    let w: Vec<u8> = (0..rows * cols).map(|_| (rng.next() >> 56) as u8 & 0x77).collect();
    let s: Vec<f32> = (0..rows.div_ceil(128) * cols.div_ceil(128)).map(|_| 1e-3).collect();
    let weight = HostTensor::new(
        DType::F8E4M3,
        [rows, cols],
        lvllm_tensor::HostStorage::Owned(lvllm_tensor::AlignedBuf::from_bytes(&w)),
    )
    .expect("shape");
    ExpertMatrix::Fp8 {
        weight,
        scale_inv: HostTensor::from_slice(&s, [rows.div_ceil(128), cols.div_ceil(128)]).expect("shape"),
    }
}

fn main() -> anyhow::Result<()> {
    let a = parse()?;
    let topo = Topology::detect()?;
    let pool = Arc::new(Pool::new(&topo, PoolOptions { threads: a.threads, binding: a.binding, power_saving: false })?);
    let threads = pool.num_threads();
    let probe = bandwidth::probe(&pool, 1 << 30, 5)?;
    println!(
        "# MoE layer: hidden {}, expert width {}, {} experts, top-{}; {} threads on {} node(s); probe read bandwidth {:.1} GB/s",
        a.hidden,
        a.inter,
        a.experts,
        a.topk,
        threads,
        pool.num_nodes(),
        probe.gb_per_s
    );
    println!("| format | m | time/layer | weights read | GB/s | probe GB/s | ratio | GFLOP/s |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for fname in &a.formats {
        let t0 = Instant::now();
        let (opts, fp8) = match fname.as_str() {
            "bf16" => (ExpertsOptions { weight: MoeWeight::Keep, ..Default::default() }, false),
            "fp8" => (ExpertsOptions { weight: MoeWeight::Keep, ..Default::default() }, true),
            "int4" => (ExpertsOptions { weight: MoeWeight::Int4, int4_group: 32, ..Default::default() }, false),
            "int4-f32act" => (
                ExpertsOptions {
                    weight: MoeWeight::Int4,
                    int4_group: 32,
                    int8_activations: false,
                    ..Default::default()
                },
                false,
            ),
            "int4g128" => (ExpertsOptions { weight: MoeWeight::Int4, int4_group: 128, ..Default::default() }, false),
            "f16" => {
                (ExpertsOptions { weight: MoeWeight::ToDtype, dtype: WeightFormat::F16, ..Default::default() }, false)
            }
            other => anyhow::bail!("unknown format {other}"),
        };
        // Build the layer expert by expert so the f32/bf16 sources never all live at once.
        let mut layer_experts = Vec::with_capacity(a.experts);
        for _ in 0..a.experts {
            layer_experts.push(if fp8 {
                ExpertWeights {
                    gate: random_fp8(a.inter, a.hidden, &mut rng),
                    up: random_fp8(a.inter, a.hidden, &mut rng),
                    down: random_fp8(a.hidden, a.inter, &mut rng),
                }
            } else {
                ExpertWeights::dense(
                    random_bf16(a.inter, a.hidden, &mut rng),
                    random_bf16(a.inter, a.hidden, &mut rng),
                    random_bf16(a.hidden, a.inter, &mut rng),
                )
            });
        }
        let layer = CpuExperts::new(pool.clone(), layer_experts, a.hidden, a.inter, &opts, |_| {})?;
        eprintln!(
            "# {fname}: packed in {:.1} s, {:?}, int8 activations: {}",
            t0.elapsed().as_secs_f64(),
            layer.formats(),
            layer.uses_int8_activations()
        );
        let expert_bytes = layer.expert_bytes();
        for &m in &a.ms {
            let hidden: Vec<f32> = (0..m * a.hidden).map(|_| rng.f32()).collect();
            let mut out = vec![0f32; m * a.hidden];
            let routes: Vec<TopK> = (0..16)
                .map(|_| {
                    let mut ids = Vec::with_capacity(m * a.topk);
                    for _ in 0..m {
                        let mut chosen: Vec<u32> = Vec::with_capacity(a.topk);
                        while chosen.len() < a.topk {
                            let e = (rng.next() % a.experts as u64) as u32;
                            if !chosen.contains(&e) {
                                chosen.push(e);
                            }
                        }
                        ids.extend(chosen);
                    }
                    TopK { k: a.topk, ids, weights: vec![1.0 / a.topk as f32; m * a.topk] }
                })
                .collect();
            // Warm-up, then as many iterations as fit the time budget.
            layer.forward(&hidden, &routes[0], &mut out)?;
            let (mut iters, mut bytes, mut flops) = (0usize, 0f64, 0f64);
            let start = Instant::now();
            while start.elapsed().as_secs_f64() < a.secs || iters < 3 {
                let r = &routes[iters % routes.len()];
                layer.forward(&hidden, r, &mut out)?;
                let mut active = vec![false; a.experts];
                for &e in &r.ids {
                    active[e as usize] = true;
                }
                bytes += (active.iter().filter(|&&x| x).count() * expert_bytes) as f64;
                flops += (m * a.topk) as f64 * 2.0 * 3.0 * (a.hidden * a.inter) as f64;
                iters += 1;
            }
            let secs = start.elapsed().as_secs_f64();
            let gbs = bytes / secs / 1e9;
            println!(
                "| {fname} | {m} | {:.1} µs | {:.1} MB | {:.1} | {:.1} | {:.0}% | {:.0} |",
                secs / iters as f64 * 1e6,
                bytes / iters as f64 / 1e6,
                gbs,
                probe.gb_per_s,
                100.0 * gbs / probe.gb_per_s,
                flops / secs / 1e9
            );
        }
    }
    Ok(())
}
