//! Load a model directory and stream a greedy completion, using only the public
//! `lvllm_engine` API.
//!
//! `cargo run -p lvllm-examples --example generate -- [MODEL_DIR] [PROMPT]`
//!
//! Without arguments it runs the committed tiny test checkpoint from token ids.

use lvllm_engine::{Engine, Prompt, SamplingParams};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/qwen3_moe_sharded").into());
    let engine = Engine::builder().model(&dir).build()?;
    let prompt = match args.next() {
        Some(text) => Prompt::Text(text),
        None => Prompt::Tokens(vec![1, 2, 3, 4, 5]),
    };
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy().max_tokens(16) };
    let mut stream = engine.stream(prompt, &params)?;
    for delta in stream.by_ref() {
        let d = delta?;
        if engine.tokenizer().is_some() {
            print!("{}", d.text);
        } else {
            print!("{} ", d.token_id);
        }
    }
    println!();
    let s = stream.stats();
    eprintln!(
        "{} prompt tokens, {} generated, decode {:.1} tok/s",
        s.prompt_tokens,
        s.generated_tokens,
        s.decode_tokens_per_sec().unwrap_or(0.0)
    );
    Ok(())
}
