//! The scheduler and the async API end to end on the bundled tiny model (a
//! trained model with peaked logits, so greedy tokens do not flip on float
//! rounding): concurrency, prefix caching, preemption, cancellation, limits.
//!
//! `load_64_concurrent_streams` is the bounded load test of the serving issue;
//! it runs with the others (`cargo test -p lvllm-engine --test scheduler`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use lvllm_engine::{
    EmbeddedModel, Engine, EngineBuilder, Error, FinishReason, Prompt, RequestEvent, SamplingParams, StreamDelta,
};

/// Forces 64-byte alignment on embedded bytes so tensor views need no copy.
#[repr(C, align(64))]
struct Aligned<B: ?Sized>(B);

static SAFETENSORS: &Aligned<[u8]> =
    &Aligned(*include_bytes!("../../lvllm-server/assets/tiny-qwen3-moe/model.safetensors"));

fn tiny() -> EmbeddedModel {
    EmbeddedModel {
        name: "lvllm-tiny-qwen3-moe",
        config_json: include_bytes!("../../lvllm-server/assets/tiny-qwen3-moe/config.json"),
        safetensors: &SAFETENSORS.0,
        tokenizer_json: Some(include_bytes!("../../lvllm-server/assets/tiny-qwen3-moe/tokenizer.json")),
        tokenizer_config_json: Some(include_bytes!("../../lvllm-server/assets/tiny-qwen3-moe/tokenizer_config.json")),
        generation_config_json: Some(include_bytes!("../../lvllm-server/assets/tiny-qwen3-moe/generation_config.json")),
    }
}

fn builder() -> EngineBuilder {
    Engine::builder().embedded(tiny())
}

/// A chat prompt whose length grows with `i`, as token ids.
fn prompt(engine: &Engine, i: usize) -> Vec<u32> {
    let words = ["small", "model", "tokens", "cache", "block", "batch", "prefix", "thread"];
    let extra: Vec<&str> = (0..i % 7).map(|k| words[(i + k) % words.len()]).collect();
    let content = format!("Question {i}: tell me about {} and {}.", extra.join(" "), i * 7 + 3);
    let messages = serde_json::json!([{"role": "user", "content": content}]);
    engine.tokenize(&Prompt::chat(messages)).unwrap()
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams { ignore_eos: true, ..SamplingParams::greedy().max_tokens(n) }
}

/// Each prompt's tokens when it runs alone on an idle engine.
fn alone(prompts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    let e = builder().build().unwrap();
    prompts.iter().map(|p| e.generate(p.clone(), &greedy(n)).unwrap().token_ids).collect()
}

/// Waits until `finished` requests have ended and the engine is idle with no
/// KV block held. (Metrics are published after each model-loop iteration,
/// which may be after a request's last event: wait for its count.)
fn wait_idle(e: &Engine, finished: u64) {
    let t0 = Instant::now();
    loop {
        let m = e.metrics();
        if m.requests_finished >= finished && m.num_waiting == 0 && m.num_running == 0 && m.kv_blocks_used == 0 {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "engine never went idle: {m:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Submits every prompt from `threads` threads at once and collects each
/// request's tokens (in prompt order), checking the deltas' shape.
fn concurrent(e: &Engine, prompts: &[Vec<u32>], n: usize, threads: usize) -> Vec<Vec<u32>> {
    let mut out = vec![Vec::new(); prompts.len()];
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    // Submit this thread's share first so they all run together, then drain.
                    let mine: Vec<usize> = (t..prompts.len()).step_by(threads).collect();
                    let hs: Vec<_> = mine.iter().map(|&i| e.submit(prompts[i].clone(), greedy(n)).unwrap()).collect();
                    mine.into_iter()
                        .zip(hs)
                        .map(|(i, h)| {
                            let deltas: Vec<StreamDelta> = h.map(|d| d.unwrap()).collect();
                            assert_eq!(deltas.last().unwrap().finish_reason, Some(FinishReason::Length));
                            (i, deltas.iter().map(|d| d.token_id).collect::<Vec<u32>>())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            for (i, toks) in h.join().unwrap() {
                out[i] = toks;
            }
        }
    });
    out
}

#[test]
fn concurrent_greedy_requests_match_running_alone() {
    let e = builder().build().unwrap();
    let prompts: Vec<Vec<u32>> = (0..20).map(|i| prompt(&e, i)).collect();
    let want = alone(&prompts, 24);
    let got = concurrent(&e, &prompts, 24, 4);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "request {i}");
    }
    wait_idle(&e, 20);
    let m = e.metrics();
    assert!(m.peak_batched_seqs > 1, "requests were batched together: {m:?}");
    assert_eq!(m.requests_finished, 20);
    assert_eq!(m.generation_tokens, 20 * 24);
}

#[test]
fn load_64_concurrent_streams() {
    let e = builder().build().unwrap();
    let prompts: Vec<Vec<u32>> = (0..64).map(|i| prompt(&e, i)).collect();
    let want = alone(&prompts, 16);
    let got = concurrent(&e, &prompts, 16, 8);
    assert_eq!(got, want);
    wait_idle(&e, 64);
    assert_eq!(e.metrics().requests_finished, 64);
}

#[test]
fn repeated_prompt_skips_its_cached_blocks() {
    let e = builder().build().unwrap();
    let bs = e.block_size();
    let mut p = prompt(&e, 5);
    while p.len() < 6 * bs + 5 {
        p.extend_from_within(..p.len().min(20));
    }
    let first = e.generate(p.clone(), &greedy(8)).unwrap();
    assert_eq!((first.stats.computed_prompt_tokens, first.stats.cached_prompt_tokens), (p.len(), 0));
    let second = e.generate(p.clone(), &greedy(8)).unwrap();
    let full = p.len() / bs * bs;
    assert_eq!(second.stats.cached_prompt_tokens, full, "every full block is cached");
    assert_eq!(second.stats.computed_prompt_tokens, p.len() - full);
    assert_eq!(second.token_ids, first.token_ids);
    wait_idle(&e, 2);
    let m = e.metrics();
    assert_eq!(m.prefix_cache_hit_tokens, full as u64);
    assert_eq!(m.prefix_cache_queried_tokens, 2 * p.len() as u64);
    assert_eq!(m.prompt_tokens_computed, (2 * p.len() - full) as u64);
    assert_eq!(m.kv_blocks_used, 0);
    assert!(m.kv_blocks_cached >= full / bs);

    // A prompt sharing only the first blocks reuses those.
    let mut q = p[..2 * bs + 3].to_vec();
    q.extend_from_slice(&prompt(&e, 9));
    let g = e.generate(q.clone(), &greedy(4)).unwrap();
    assert_eq!(g.stats.cached_prompt_tokens, 2 * bs);
    assert_eq!(g.token_ids, alone(&[q], 4)[0]);
    wait_idle(&e, 3);
    assert_eq!(e.metrics().prefix_cache_hit_tokens, (full + 2 * bs) as u64);

    // Without prefix caching nothing is skipped.
    let off = builder().enable_prefix_caching(false).build().unwrap();
    for _ in 0..2 {
        let g = off.generate(p.clone(), &greedy(8)).unwrap();
        assert_eq!((g.stats.computed_prompt_tokens, g.stats.cached_prompt_tokens), (p.len(), 0));
        assert_eq!(g.token_ids, first.token_ids);
    }
    wait_idle(&off, 2);
    assert_eq!(off.metrics().prefix_cache_hit_tokens, 0);
}

#[test]
fn tiny_kv_budget_preempts_and_still_completes() {
    let probe = builder().build().unwrap();
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| prompt(&probe, i + 20)).collect();
    let longest = prompts.iter().map(Vec::len).max().unwrap();
    let n = 40;
    let want = alone(&prompts, n);
    // Bytes of one block: K and V, 4 layers, 2 KV heads of 32 floats, 16 tokens.
    let block_bytes = 4 * 2 * 16 * 2 * 32 * 4;
    let blocks = (longest + n).div_ceil(16) + 2; // room for about one sequence
    for caching in [true, false] {
        let e = builder()
            .max_model_len(blocks * 16)
            .kv_cache_bytes(blocks * block_bytes)
            .enable_prefix_caching(caching)
            .build()
            .unwrap();
        assert_eq!(e.metrics().kv_blocks_total, blocks);
        let got = concurrent(&e, &prompts, n, 4);
        assert_eq!(got, want, "prefix caching {caching}");
        wait_idle(&e, 8);
        let m = e.metrics();
        assert!(m.num_preemptions > 0, "{m:?}");
        assert_eq!(m.requests_finished, 8);
    }
}

#[test]
fn cancelled_requests_free_their_blocks() {
    let e = builder().build().unwrap();
    let p = prompt(&e, 3);
    // Dropping a handle mid-stream.
    let mut h = e.submit(p.clone(), greedy(1500)).unwrap();
    h.recv().unwrap().unwrap();
    h.recv().unwrap().unwrap();
    assert!(e.metrics().kv_blocks_used > 0 || e.metrics().num_running > 0);
    drop(h);
    wait_idle(&e, 1);

    // Explicit cancel: the handle ends at once.
    let mut h = e.submit(p.clone(), greedy(1500)).unwrap();
    h.recv().unwrap().unwrap();
    h.cancel();
    assert!(h.is_finished() && h.recv().is_none());
    wait_idle(&e, 2);

    // A sink returning false after three events is not called again.
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    e.submit_with(p.clone(), greedy(1500), move |_| c.fetch_add(1, Ordering::SeqCst) < 2).unwrap();
    wait_idle(&e, 3);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // Engine::cancel stops a sink's request.
    let (tx, rx) = mpsc::channel();
    let id = e
        .submit_with(p.clone(), greedy(1500), move |ev| {
            let _ = tx.send(ev);
            true // keeps going until Engine::cancel
        })
        .unwrap();
    assert!(matches!(rx.recv().unwrap(), RequestEvent::Delta(_)));
    e.cancel(id);
    wait_idle(&e, 4);
    let m = e.metrics();
    assert_eq!(m.requests_finished, 4);
    assert!(m.generation_tokens < 1500, "cancelled requests stopped early: {m:?}");
    // The engine still works.
    assert_eq!(e.generate(p.clone(), &greedy(5)).unwrap().token_ids, alone(&[p], 5)[0]);
}

#[test]
fn max_num_seqs_and_max_num_batched_tokens_are_respected() {
    let e = builder().max_num_seqs(2).max_num_batched_tokens(8).build().unwrap();
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(&e, i + 40)).collect();
    assert!(prompts.iter().all(|p| p.len() > 8), "prompts are prefilled in chunks");
    let want = alone(&prompts, 10);
    let got = concurrent(&e, &prompts, 10, 3);
    assert_eq!(got, want);
    wait_idle(&e, 6);
    let m = e.metrics();
    assert_eq!(m.peak_running, 2, "{m:?}");
    assert_eq!(m.peak_batched_tokens, 8, "{m:?}");
    assert!(m.peak_batched_seqs <= 2);
    assert_eq!(e.scheduler_config().max_num_seqs, 2);

    let err = builder().max_num_seqs(0).build().unwrap_err().to_string();
    assert!(err.contains("max_num_seqs"), "{err}");
    let err = builder().max_num_batched_tokens(16).build().unwrap_err().to_string();
    assert!(err.contains("max_num_batched_tokens 16") && err.contains("256"), "{err}");
}

#[test]
fn handle_api_and_sink_events() {
    let e = builder().build().unwrap();
    let p = prompt(&e, 1);
    // Prompt logprobs through a handle while another request runs beside it.
    let other = e.submit(prompt(&e, 2), greedy(30)).unwrap();
    let params = SamplingParams { prompt_logprobs: Some(1), logprobs: Some(2), ..greedy(6) };
    let mut h = e.submit(p.clone(), params.clone()).unwrap();
    assert_eq!(h.prompt_token_ids(), &p[..]);
    let mut toks = Vec::new();
    while let Some(d) = h.recv_timeout(Duration::from_secs(30)) {
        toks.push(d.unwrap().token_id);
    }
    assert!(h.is_finished() && h.try_recv().is_none());
    let s = h.stats();
    assert_eq!((s.prompt_tokens, s.generated_tokens, s.computed_prompt_tokens), (p.len(), 6, p.len()));
    let pl = h.prompt_logprobs().unwrap();
    assert_eq!(pl.len(), p.len());
    assert!(pl[0].is_none() && pl[1..].iter().all(Option::is_some));
    let g = builder().build().unwrap().generate(p.clone(), &params).unwrap();
    assert_eq!(toks, g.token_ids);
    for (a, b) in pl.iter().zip(g.prompt_logprobs.as_ref().unwrap()).skip(1) {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        assert_eq!(a.token_id, b.token_id);
        assert!((a.logprob - b.logprob).abs() < 1e-4, "{} vs {}", a.logprob, b.logprob);
    }
    drop(other);

    // The sink sees prompt logprobs, deltas, then Finished.
    let (tx, rx) = mpsc::channel();
    e.submit_with(p.clone(), params, move |ev| tx.send(ev).is_ok()).unwrap();
    let events: Vec<RequestEvent> = rx.iter().collect();
    assert!(matches!(events[0], RequestEvent::PromptLogprobs(ref v) if v.len() == p.len()));
    assert!(events[1..7].iter().all(|e| matches!(e, RequestEvent::Delta(_))));
    assert!(matches!(events[7], RequestEvent::Finished(s) if s.generated_tokens == 6));
    assert_eq!(events.len(), 8);

    // Validation errors are synchronous.
    assert!(matches!(
        e.submit(vec![1; 5000], greedy(2)),
        Err(Error::PromptTooLong { prompt_tokens: 5000, max_model_len: 2048 })
    ));
    let e2 = e.submit(p.clone(), SamplingParams { top_p: 0.0, ..greedy(2) }).unwrap_err().to_string();
    assert!(e2.contains("top_p"), "{e2}");

    // A handle outliving its engine ends with an error, not a hang.
    let mut h = e.submit(p, greedy(1000)).unwrap();
    drop(e);
    let mut last = None;
    while let Some(r) = h.recv() {
        last = Some(r);
    }
    assert!(matches!(last, Some(Err(Error::Shutdown))), "{last:?}");
}
