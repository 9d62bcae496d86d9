//! A bounded load test of `lvllm serve`: N concurrent streaming greedy chat
//! requests over loopback HTTP. Every response must be complete and equal to
//! the same prompt sent alone; none may be lost. Prints requests/s and the
//! p50/p99 time to first token.
//!
//! ```text
//! cargo run --release -p lvllm-server --example load_test -- [--requests 64] [--max-tokens 32] [--addr 127.0.0.1:8000]
//!     [--device cpu|cuda] [--moe-placement auto|hybrid|gpu]
//! ```
//! `--device cuda` (a build with `--features cuda`) serves the bundled model on
//! GPU 0, so decode batches of every size run as captured CUDA graphs;
//! `--moe-placement hybrid` puts its routed experts on the CPU pool.
//! Without `--addr` it starts its own server with the bundled tiny model on a
//! free loopback port. It only ever connects to the loopback address it serves
//! or is given, and stops after the requests it sends.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lvllm_engine::{Binding, Device, Engine, MoePlacement, ThreadOptions};
use lvllm_server::server::{self, AppState, ServerOptions};
use serde_json::{json, Value};

const QUESTIONS: &[&str] = &[
    "What is the capital of France?",
    "Hello, who are you?",
    "What is 7 plus 5?",
    "What color is the sky?",
    "Tell me about the sun.",
    "What is the capital of Japan?",
    "Name a big animal.",
    "What do fish live in?",
];

/// One streamed chat request: (text, seconds to the first content byte, chunks).
fn stream_chat(addr: SocketAddr, question: &str, max_tokens: usize) -> anyhow::Result<(String, f64, usize)> {
    let body = json!({"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": max_tokens,
                      "stream": true, "chat_template_kwargs": {"enable_thinking": false}})
    .to_string();
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut text = String::new();
    let (mut ttft, mut chunks, mut done) = (None, 0, false);
    for line in BufReader::new(s).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = serde_json::from_str(data)?;
        if let Some(e) = v.get("error") {
            anyhow::bail!("server error: {e}");
        }
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            if !c.is_empty() && ttft.is_none() {
                ttft = Some(t0.elapsed().as_secs_f64());
            }
            text.push_str(c);
        }
        chunks += 1;
    }
    anyhow::ensure!(done, "the stream ended without [DONE] after {chunks} chunks");
    Ok((text, ttft.unwrap_or_else(|| t0.elapsed().as_secs_f64()), chunks))
}

fn main() -> anyhow::Result<()> {
    let (mut requests, mut max_tokens, mut addr, mut device) = (64usize, 32usize, None::<SocketAddr>, Device::Cpu);
    let mut placement = MoePlacement::Auto;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--requests" => requests = val()?.parse()?,
            "--max-tokens" => max_tokens = val()?.parse()?,
            "--addr" => addr = Some(val()?.parse()?),
            "--moe-placement" => placement = val()?.parse().map_err(anyhow::Error::msg)?,
            "--device" => {
                device = match val()?.as_str() {
                    "cpu" => Device::Cpu,
                    "cuda" => Device::Cuda(0),
                    other => anyhow::bail!("unknown device {other} (cpu or cuda)"),
                }
            }
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    if let Some(a) = addr {
        anyhow::ensure!(a.ip().is_loopback(), "the load test only targets loopback addresses, not {a}");
    }
    let addr = match addr {
        Some(a) => a,
        None => {
            let engine = Engine::builder()
                .embedded(lvllm_server::bundled::tiny_model())
                .device(device)
                .moe_placement(placement)
                .threads(ThreadOptions {
                    count: Some(if device == Device::Cpu { 1 } else { 4 }),
                    binding: Binding::CpuCore,
                    power_saving: true,
                })
                .build()?;
            let state = AppState::new(
                Arc::new(engine),
                ServerOptions { served_model_name: "tiny".into(), ..ServerOptions::default() },
            );
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Runtime::new().expect("runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
                    tx.send(listener.local_addr().expect("addr")).expect("send");
                    server::serve(listener, state, std::future::pending()).await.expect("serve");
                });
            });
            rx.recv()?
        }
    };
    // The reference: each distinct question alone.
    let alone: Vec<String> =
        QUESTIONS.iter().map(|q| stream_chat(addr, q, max_tokens).map(|r| r.0)).collect::<anyhow::Result<_>>()?;
    let t0 = Instant::now();
    let handles: Vec<_> = (0..requests)
        .map(|i| {
            let q = QUESTIONS[i % QUESTIONS.len()];
            std::thread::spawn(move || stream_chat(addr, q, max_tokens))
        })
        .collect();
    let mut ttfts = Vec::with_capacity(requests);
    let (mut ok, mut mismatched, mut failed) = (0, 0, 0);
    for (i, h) in handles.into_iter().enumerate() {
        match h.join().map_err(|_| anyhow::anyhow!("request thread panicked"))? {
            Ok((text, ttft, _)) => {
                ttfts.push(ttft);
                if text == alone[i % QUESTIONS.len()] {
                    ok += 1;
                } else {
                    mismatched += 1;
                    eprintln!(
                        "request {i}: {text:?} differs from the same prompt alone: {:?}",
                        alone[i % QUESTIONS.len()]
                    );
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("request {i} failed: {e}");
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    ttfts.sort_by(f64::total_cmp);
    let pct = |p: f64| ttfts.get(((ttfts.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
    println!(
        "{device:?} {placement:?}: {requests} concurrent streaming requests ({max_tokens} tokens max): {ok} complete and equal to alone, {mismatched} different, {failed} failed; {:.2} requests/s; time to first token p50 {:.3} s, p99 {:.3} s",
        requests as f64 / secs,
        pct(0.5),
        pct(0.99)
    );
    anyhow::ensure!(ok == requests, "{} of {requests} requests were not complete and equal", requests - ok);
    Ok(())
}
