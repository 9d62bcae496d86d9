//! Decode (and optionally prefill) throughput of Qwen3-MoE with random weights of
//! real shapes (`load_format: dummy`) on one GPU, with the routed experts either
//! all in VRAM (`--placement gpu`) or on the CPU (`--placement hybrid`, optionally
//! with `--resident 0-11` layers kept in VRAM). Prints, next to each figure, the
//! bandwidth-bound limit of DESIGN.md: `1 / (cpu_expert_bytes / cpu_bw + gpu_bytes / gpu_bw)`
//! with `cpu_bw` measured by the project's probe with the same threads and `gpu_bw`
//! by device-to-device copies.
//!
//! ```text
//! cargo run --release --features cuda -p lvllm-models --example gpu_decode_bench -- \
//!   [--config config.json] [--placement gpu|hybrid] [--resident 0-11] [--moe-weight bf16|int4]
//!   [--threads N] [--batches 1,8] [--steps 32] [--prefill 512,4096] [--eager]
//! ```

#[cfg(feature = "cuda")]
fn main() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::time::Instant;

    use lvllm_kernels_cpu::packed::WeightFormat;
    use lvllm_kernels_cuda::Gpu;
    use lvllm_models::cuda_qwen3_moe::{CudaQwen3Moe, GpuWeights, HybridOptions, KvSizing};
    use lvllm_models::{ForwardBatch, LogitsSelection, ModelConfig, SeqSpan};
    use lvllm_moe::{ExpertsOptions, MoeWeight};
    use lvllm_numa::{bandwidth, Binding, Pool, PoolOptions, Topology};

    const QWEN3_30B_A3B: &str = r#"{"architectures": ["Qwen3MoeForCausalLM"], "decoder_sparse_step": 1, "head_dim": 128,
      "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 40960,
      "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": true,
      "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
      "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": false,
      "vocab_size": 151936}"#;

    let (mut cfg_text, mut placement, mut resident, mut weight) =
        (QWEN3_30B_A3B.to_string(), "gpu".to_string(), String::new(), "bf16".to_string());
    let (mut threads, mut batches, mut steps, mut prefill, mut eager) =
        (None, vec![1usize, 8], 32usize, Vec::new(), false);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--config" => cfg_text = std::fs::read_to_string(val()?)?,
            "--placement" => placement = val()?,
            "--resident" => resident = val()?,
            "--moe-weight" => weight = val()?,
            "--threads" => threads = Some(val()?.parse::<usize>()?),
            "--batches" => batches = val()?.split(',').map(|s| s.parse()).collect::<Result<_, _>>()?,
            "--steps" => steps = val()?.parse()?,
            "--prefill" => prefill = val()?.split(',').map(|s| s.parse()).collect::<Result<_, _>>()?,
            "--eager" => eager = true,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    let ModelConfig::Qwen3Moe(cfg) = ModelConfig::from_json(cfg_text.as_bytes(), "config")? else { unreachable!() };
    let resident_layers: Vec<usize> = parse_layers(&resident)?;
    let gpu = Arc::new(Gpu::new(0, Some(&std::env::temp_dir().join("lvllm-kernels")))?);
    let gpu_bw = gpu.measure_bandwidth(1 << 30, 5)? * 1e9;
    let topo = Topology::detect()?;
    let pool = Arc::new(Pool::new(&topo, PoolOptions { threads, binding: Binding::CpuCore, power_saving: false })?);
    let hybrid = placement == "hybrid";
    let format = match weight.as_str() {
        "bf16" => WeightFormat::Bf16,
        "int4" => WeightFormat::Int4 { group: 32 },
        other => anyhow::bail!("unknown --moe-weight {other}"),
    };
    let cpu_bw = if hybrid { bandwidth::probe(&pool, 1 << 30, 5)?.gb_per_s * 1e9 } else { f64::INFINITY };
    let hy = HybridOptions {
        pool: pool.clone(),
        experts: ExpertsOptions {
            weight: if weight == "int4" { MoeWeight::Int4 } else { MoeWeight::Keep },
            ..Default::default()
        },
        gpu_resident_layers: resident_layers.clone(),
    };
    let block_size = 16;
    let max_len = steps + 2 + prefill.iter().copied().max().unwrap_or(0);
    let blocks_per_seq = max_len.div_ceil(block_size);
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let t0 = Instant::now();
    let model = CudaQwen3Moe::load(
        gpu.clone(),
        &cfg,
        GpuWeights::Dummy { seed: 1 },
        block_size,
        KvSizing::Blocks(max_batch.max(1) * blocks_per_seq),
        !eager,
        hybrid.then_some(&hy),
    )?;
    println!(
        "# {}: {:.0} GB/s measured; placement {placement}{}; experts {weight}; {} CPU threads, probe {:.1} GB/s; loaded in {:.1} s; decode {}",
        gpu.name(),
        gpu_bw / 1e9,
        if resident_layers.is_empty() { String::new() } else { format!(", resident layers {resident}") },
        pool.num_threads(),
        cpu_bw / 1e9,
        t0.elapsed().as_secs_f64(),
        if eager || model.is_hybrid() { "eager" } else { "CUDA graphs" },
    );

    // Bytes one decode step reads.
    let (h, hd, nh, nkv, i) =
        (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.moe_intermediate_size);
    let moe_layers: Vec<usize> = (0..cfg.num_hidden_layers).filter(|&l| cfg.is_moe_layer(l)).collect();
    let n_cpu = if hybrid { moe_layers.iter().filter(|l| !resident_layers.contains(l)).count() } else { 0 };
    let n_gpu_moe = moe_layers.len() - n_cpu;
    let dense_layers = cfg.num_hidden_layers - moe_layers.len();
    let fixed = 2
        * (cfg.num_hidden_layers * h * hd * (2 * nh + 2 * nkv)
            + moe_layers.len() * cfg.num_experts * h
            + dense_layers * 3 * h * cfg.intermediate_size
            + cfg.vocab_size * h);
    let expert_gpu = 2 * 3 * h * i;
    let expert_cpu = format.bytes_read(h) * i.div_ceil(16) + format.bytes_read(i) * h.div_ceil(32);
    println!("| batch | decode tok/s | ms/step | CPU expert GB/step | GPU GB/step | bandwidth-bound tok/s | ratio | handoff µs/layer |");
    println!("|---|---|---|---|---|---|---|---|");
    for &batch in &batches {
        let tables: Vec<Vec<u32>> =
            (0..batch).map(|s| ((s * blocks_per_seq) as u32..((s + 1) * blocks_per_seq) as u32).collect()).collect();
        let run = |pos: usize, tokens: &[u32]| -> anyhow::Result<Vec<u32>> {
            let positions = vec![pos; batch];
            let seqs: Vec<SeqSpan> =
                tables.iter().map(|t| SeqSpan { len: 1, block_table: t, state_slot: None }).collect();
            let b = ForwardBatch { tokens, positions: &positions, seqs: &seqs, logits: LogitsSelection::LastPerSeq };
            let l = model.forward(&b)?;
            Ok((0..batch)
                .map(|r| {
                    let row = l.row(r);
                    row.iter().enumerate().fold(0, |b, (i, &x)| if x > row[b] { i } else { b }) as u32
                })
                .collect())
        };
        let mut tokens: Vec<u32> = (0..batch as u32).map(|s| 100 + s).collect();
        tokens = run(0, &tokens)?;
        let (h0, _) = model.handoff_stats();
        let h0_us = model.handoff_stats().1 * h0 as f64;
        let start = Instant::now();
        for s in 1..=steps {
            tokens = run(s, &tokens)?;
        }
        let secs = start.elapsed().as_secs_f64();
        let (h1, mean1) = model.handoff_stats();
        let handoff = if h1 > h0 { (mean1 * h1 as f64 - h0_us) / (h1 - h0) as f64 } else { 0.0 };
        // Expected distinct experts per layer for `batch` tokens routed uniformly at random.
        let (e, k) = (cfg.num_experts as f64, cfg.num_experts_per_tok as f64);
        let active = e * (1.0 - (1.0 - k / e).powi(batch as i32));
        let cpu_bytes = n_cpu as f64 * active * expert_cpu as f64;
        let gpu_bytes = fixed as f64 + n_gpu_moe as f64 * active * expert_gpu as f64;
        let bound = batch as f64 / (cpu_bytes / cpu_bw + gpu_bytes / gpu_bw);
        let tps = (steps * batch) as f64 / secs;
        println!(
            "| {batch} | {tps:.1} | {:.2} | {:.2} | {:.2} | {bound:.1} | {:.1}% | {} |",
            secs / steps as f64 * 1e3,
            cpu_bytes / 1e9,
            gpu_bytes / 1e9,
            100.0 * tps / bound,
            if n_cpu > 0 { format!("{handoff:.1}") } else { "-".into() }
        );
    }
    for &len in &prefill {
        let tokens: Vec<u32> = (0..len as u32).map(|t| 1000 + t % 5000).collect();
        let positions: Vec<usize> = (0..len).collect();
        let table: Vec<u32> = (0..blocks_per_seq as u32).collect();
        let seqs = [SeqSpan { len, block_table: &table, state_slot: None }];
        let b =
            ForwardBatch { tokens: &tokens, positions: &positions, seqs: &seqs, logits: LogitsSelection::LastPerSeq };
        let start = Instant::now();
        model.forward(&b)?;
        let secs = start.elapsed().as_secs_f64();
        println!("# prefill {len} tokens: {:.0} tok/s ({:.2} s)", len as f64 / secs, secs);
    }
    Ok(())
}

/// `"0-5,8"` → `[0, 1, 2, 3, 4, 5, 8]`; empty → none.
#[cfg(feature = "cuda")]
fn parse_layers(s: &str) -> anyhow::Result<Vec<usize>> {
    let mut v = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => v.extend(a.trim().parse::<usize>()?..=b.trim().parse::<usize>()?),
            None => v.push(part.trim().parse()?),
        }
    }
    Ok(v)
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("gpu_decode_bench needs `--features cuda`");
    std::process::exit(1);
}
