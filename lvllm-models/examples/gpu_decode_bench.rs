//! Decode tokens/s of Qwen3-MoE on one GPU with all experts in VRAM and random
//! weights of real shapes (`load_format: dummy`), next to the GPU-bandwidth bound.
//!
//! `cargo run --release --features cuda -p lvllm-models --example gpu_decode_bench -- [config.json|-] [steps] [eager]`
//! (default: the Qwen3-30B-A3B config). Needs a CUDA GPU with room for the model.

#[cfg(feature = "cuda")]
fn main() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::time::Instant;

    use lvllm_kernels_cuda::Gpu;
    use lvllm_models::cuda_qwen3_moe::{CudaQwen3Moe, GpuWeights, KvSizing};
    use lvllm_models::{ForwardBatch, LogitsSelection, ModelConfig, SeqSpan};

    const QWEN3_30B_A3B: &str = r#"{"architectures": ["Qwen3MoeForCausalLM"], "decoder_sparse_step": 1, "head_dim": 128,
      "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 40960,
      "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": true,
      "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
      "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": false,
      "vocab_size": 151936}"#;
    let mut args = std::env::args().skip(1);
    let cfg_text = match args.next() {
        Some(p) if p != "-" => std::fs::read_to_string(p)?,
        _ => QWEN3_30B_A3B.to_string(),
    };
    let steps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(32);
    let graphs = args.next().as_deref() != Some("eager");
    let ModelConfig::Qwen3Moe(cfg) = ModelConfig::from_json(cfg_text.as_bytes(), "config")? else { unreachable!() };
    let gpu = Arc::new(Gpu::new(0, Some(&std::env::temp_dir().join("lvllm-kernels")))?);
    let block_size = 16;
    let max_batch = 8;
    let blocks_per_seq = (steps + 2).div_ceil(block_size);
    let t0 = Instant::now();
    let model = CudaQwen3Moe::load(
        gpu.clone(),
        &cfg,
        GpuWeights::Dummy { seed: 1 },
        block_size,
        KvSizing::Blocks(max_batch * blocks_per_seq),
        graphs,
    )?;
    let (free, total) = gpu.mem_info()?;
    println!(
        "# {} ({:.1} GB free of {:.1}); dummy weights uploaded in {:.1} s",
        gpu.name(),
        free as f64 / 1e9,
        total as f64 / 1e9,
        t0.elapsed().as_secs_f64()
    );

    // Bytes one decode step reads: dense + attention + lm_head + the active experts.
    let (h, hd, nh, nkv, i) =
        (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.moe_intermediate_size);
    let attn = h * hd * (2 * nh + 2 * nkv);
    let expert = 3 * h * i;
    let n_moe = (0..cfg.num_hidden_layers).filter(|&l| cfg.is_moe_layer(l)).count();
    let dense_layers = cfg.num_hidden_layers - n_moe;
    let fixed = 2
        * (cfg.num_hidden_layers * attn
            + n_moe * cfg.num_experts * h
            + dense_layers * 3 * h * cfg.intermediate_size
            + cfg.vocab_size * h);
    let gpu_bw = 3.35e12; // H100 SXM HBM3 peak; the achieved figure is printed by the roofline column.
    println!("# decode steps: {}", if graphs { "CUDA graphs" } else { "eager" });
    println!("| batch | decode tok/s | ms/step | bytes/step (GB) | bandwidth-bound tok/s | ratio |");
    println!("|---|---|---|---|---|---|");
    for batch in [1usize, 8] {
        let tables: Vec<Vec<u32>> =
            (0..batch).map(|s| ((s * blocks_per_seq) as u32..((s + 1) * blocks_per_seq) as u32).collect()).collect();
        let mut tokens: Vec<u32> = (0..batch as u32).map(|s| 100 + s).collect();
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
        tokens = run(0, &tokens)?; // warm-up (also compiles/loads cuBLAS kernels)
        let start = Instant::now();
        for s in 1..=steps {
            tokens = run(s, &tokens)?;
        }
        let secs = start.elapsed().as_secs_f64();
        // Distinct experts a step touches: at most batch × k per layer (random weights route near-uniformly).
        let active = (batch * cfg.num_experts_per_tok).min(cfg.num_experts);
        let bytes = fixed + 2 * n_moe * active * expert;
        let bound = gpu_bw / bytes as f64 * batch as f64;
        let tps = (steps * batch) as f64 / secs;
        println!(
            "| {batch} | {tps:.1} | {:.2} | {:.2} | {bound:.0} | {:.1}% |",
            secs / steps as f64 * 1e3,
            bytes as f64 / 1e9,
            100.0 * tps / bound
        );
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("gpu_decode_bench needs `--features cuda`");
    std::process::exit(1);
}
