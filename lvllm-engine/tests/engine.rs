//! End-to-end engine tests on the committed tiny checkpoints (no tokenizer: token ids).

use std::path::{Path, PathBuf};

use lvllm_engine::{Device, Engine, Error, FinishReason, Prompt, SamplingParams};
use lvllm_models::{SafetensorsFile, WeightSource};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

fn reference_ids(dir: &Path, name: &str) -> Vec<u32> {
    let src = WeightSource::from_files(vec![SafetensorsFile::open(&dir.join("reference.safetensors")).unwrap()]);
    src.get(name).unwrap().to_i64_vec().unwrap().into_iter().map(|v| v as u32).collect()
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams { ignore_eos: true, ..SamplingParams::greedy().max_tokens(n) }
}

#[test]
fn greedy_generation_reproduces_hf_and_streaming_agrees() {
    let dir = fixture("qwen3_moe_sharded");
    let engine = Engine::builder().model(&dir).build().unwrap();
    let prompt = reference_ids(&dir, "prompt_ids");
    let want = reference_ids(&dir, "greedy_ids");
    let g = engine.generate(prompt.clone(), &greedy(want.len())).unwrap();
    assert_eq!(g.token_ids, want);
    assert_eq!(g.finish_reason, FinishReason::Length);
    assert_eq!(g.text, None, "no tokenizer, no text");
    assert_eq!(g.stats.prompt_tokens, prompt.len());
    assert_eq!(g.stats.generated_tokens, want.len());

    let streamed: Vec<u32> = engine.stream(prompt, &greedy(want.len())).unwrap().map(|d| d.unwrap().token_id).collect();
    assert_eq!(streamed, want);
}

#[test]
fn prompt_logprobs_and_logprobs_are_consistent() {
    let dir = fixture("qwen3_moe_dense_tied");
    let engine = Engine::builder().model(&dir).build().unwrap();
    let prompt = reference_ids(&dir, "prompt_ids")[..20].to_vec();
    let p = SamplingParams { logprobs: Some(3), prompt_logprobs: Some(2), ..greedy(4) };
    let g = engine.generate(prompt.clone(), &p).unwrap();
    let pl = g.prompt_logprobs.unwrap();
    assert_eq!(pl.len(), 20);
    assert!(pl[0].is_none());
    for (i, l) in pl.iter().enumerate().skip(1) {
        let l = l.as_ref().unwrap();
        assert_eq!(l.token_id, prompt[i]);
        assert_eq!(l.top.len(), 2);
        assert!(l.top[0].logprob >= l.top[1].logprob && l.logprob <= 0.0);
    }
    let lp = g.logprobs.unwrap();
    assert_eq!(lp.len(), 4);
    for (l, &t) in lp.iter().zip(&g.token_ids) {
        // Greedy picks the top token: rank 1, equal to the best candidate.
        assert_eq!((l.token_id, l.rank, l.top[0].id), (t, 1, t));
        assert_eq!(l.top.len(), 3);
    }
}

#[test]
fn context_limit_is_enforced() {
    let dir = fixture("qwen3_moe_sharded");
    let engine = Engine::builder().model(&dir).max_model_len(50).build().unwrap();
    let prompt = reference_ids(&dir, "prompt_ids");
    match engine.generate(prompt.clone(), &greedy(4)) {
        Err(Error::PromptTooLong { prompt_tokens: 80, max_model_len: 50 }) => {}
        other => panic!("expected PromptTooLong, got {other:?}"),
    }
    let msg = engine.generate(prompt[..50].to_vec(), &greedy(4)).unwrap_err().to_string();
    assert!(msg.contains("max_model_len") && msg.contains("50"), "{msg}");
    // Generation stops at the limit with finish reason `length`.
    let g = engine.generate(prompt[..45].to_vec(), &greedy(100)).unwrap();
    assert_eq!(g.token_ids.len(), 5);
    assert_eq!(g.finish_reason, FinishReason::Length);
    // And the engine is still usable afterwards (blocks were released).
    for _ in 0..5 {
        engine.generate(prompt[..45].to_vec(), &greedy(5)).unwrap();
    }
    let e = Engine::builder().model(&dir).max_model_len(100_000).build().unwrap_err().to_string();
    assert!(e.contains("max_model_len") && e.contains("512"), "{e}");
}

#[test]
fn stop_tokens_seeds_and_request_errors() {
    let dir = fixture("qwen3_moe_sharded");
    let engine = Engine::builder().model(&dir).build().unwrap();
    let prompt = reference_ids(&dir, "prompt_ids");
    let want = reference_ids(&dir, "greedy_ids");
    let p = SamplingParams { stop_token_ids: vec![want[2]], ..greedy(16) };
    let g = engine.generate(prompt.clone(), &p).unwrap();
    let first = want.iter().position(|&t| t == want[2]).unwrap();
    assert_eq!(g.token_ids, want[..=first]);
    assert_eq!(g.finish_reason, FinishReason::Stop);

    let sampled = |seed| {
        let p = SamplingParams {
            seed: Some(seed),
            temperature: 1.5,
            ignore_eos: true,
            max_tokens: 12,
            ..Default::default()
        };
        engine.generate(prompt.clone(), &p).unwrap().token_ids
    };
    assert_eq!(sampled(1), sampled(1));
    assert_ne!(sampled(1), sampled(2));

    let e = engine.generate("hello", &greedy(2)).unwrap_err().to_string();
    assert!(e.contains("no tokenizer.json"), "{e}");
    let e = engine.generate(Vec::<u32>::new(), &greedy(2)).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
    let e = engine.generate(vec![1, 99999], &greedy(2)).unwrap_err().to_string();
    assert!(e.contains("99999") && e.contains("vocabulary"), "{e}");
    let bad = SamplingParams { top_p: 1.5, ..greedy(2) };
    let e = engine.generate(vec![1, 2], &bad).unwrap_err().to_string();
    assert!(e.contains("top_p"), "{e}");
    let e = engine.generate(Prompt::chat(serde_json::json!([])), &greedy(2)).unwrap_err().to_string();
    assert!(e.contains("tokenizer"), "{e}");
}

#[test]
fn cuda_device_is_a_clear_error() {
    let e = Engine::builder().model(fixture("qwen3_moe_sharded")).device(Device::Cuda(0)).build().unwrap_err();
    let want = if cfg!(feature = "cuda") { "no CUDA driver found" } else { "no CUDA support" };
    assert!(e.to_string().contains(want), "{e}");
}

/// Copies a fixture into a temp dir so a test can damage it.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, d.path().join(p.file_name().unwrap())).unwrap();
    }
    d
}

fn load_err(dir: &Path) -> String {
    format!("{}", Engine::builder().model(dir).build().unwrap_err())
}

#[test]
fn bad_checkpoints_are_clear_errors() {
    // No config.json.
    let d = tempfile::tempdir().unwrap();
    let e = load_err(d.path());
    assert!(e.contains("config.json"), "{e}");

    // Unknown architecture.
    let d = copy_fixture("qwen3_moe_dense_tied");
    let cfg = d.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("Qwen3MoeForCausalLM", "MysteryForCausalLM")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("MysteryForCausalLM") && e.contains("Qwen3MoeForCausalLM"), "{e}");

    // A config whose dimensions disagree with the tensors.
    std::fs::write(&cfg, text.replace("\"moe_intermediate_size\": 64", "\"moe_intermediate_size\": 65")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("experts.0.gate_proj.weight") && e.contains("65"), "{e}");

    // Malformed config.
    std::fs::write(&cfg, "{\"architectures\": [\"Qwen3MoeForCausalLM\"], \"hidden_size\": 128").unwrap();
    let e = load_err(d.path());
    assert!(e.contains("config.json") && e.contains("JSON"), "{e}");
    std::fs::write(&cfg, &text).unwrap();

    // A truncated weights file.
    let w = d.path().join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors") && e.contains("corrupt"), "{e}");

    // A missing shard named by the index.
    let d = copy_fixture("qwen3_moe_sharded");
    std::fs::remove_file(d.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let d = copy_fixture("qwen3_moe_dense_tied");
    let w = d.path().join("model.safetensors");
    let f = SafetensorsFile::open(&w).unwrap();
    let names: Vec<String> =
        f.names().filter(|n| *n != "model.layers.2.self_attn.k_norm.weight").map(String::from).collect();
    let tensors: Vec<(String, lvllm_tensor::HostTensor)> =
        names.iter().map(|n| (n.clone(), f.get(n).unwrap().unwrap())).collect();
    let refs: Vec<(&str, &lvllm_tensor::HostTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let bytes = lvllm_models::safetensors::serialize(&refs);
    drop(tensors);
    drop(f);
    std::fs::write(&w, bytes).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.layers.2.self_attn.k_norm.weight") && e.contains("not found"), "{e}");
}

/// `on_load_progress` reports every tensor of the checkpoint once, in growing
/// counts that end at the totals.
#[test]
fn load_progress_counts_tensors_and_bytes() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let _engine = Engine::builder()
        .model(fixture("qwen3_moe_sharded"))
        .on_load_progress(move |p| s.lock().unwrap().push(p))
        .build()
        .unwrap();
    let seen = seen.lock().unwrap();
    let last = *seen.last().expect("progress was reported");
    assert_eq!((last.tensors, last.bytes), (last.total_tensors, last.total_bytes), "{last:?}");
    assert_eq!(seen.len(), last.total_tensors);
    assert!(seen.windows(2).all(|w| w[1].tensors == w[0].tensors + 1 && w[1].bytes > w[0].bytes));
    let files: u64 = std::fs::read_dir(fixture("qwen3_moe_sharded"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && !p.ends_with("reference.safetensors"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(last.total_bytes <= files && last.total_bytes * 10 > files * 9, "{last:?} vs {files} bytes of files");
}
