//! The `lvllm` command line: output formats and clear errors for bad input.

use std::process::{Command, Output};

fn lvllm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lvllm")).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn generate_json_with_logprobs() {
    let o = lvllm(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "5",
        "--ignore-eos",
        "--logprobs",
        "2",
        "--prompt-logprobs",
        "1",
        "--output",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 5);
    assert!(v["text"].is_string());
    assert_eq!(v["finish_reason"], "length");
    let lp = v["logprobs"].as_array().unwrap();
    assert_eq!(lp.len(), 5);
    // Top-2 candidates per position (the greedy token is the first), each with id and logprob.
    assert_eq!(lp[0][0]["id"], v["token_ids"][0]);
    assert!(lp[0].as_array().unwrap().len() == 2 && lp[0][0]["logprob"].as_f64().unwrap() <= 0.0);
    let plp = v["prompt_logprobs"].as_array().unwrap();
    assert!(plp[0].is_null());
    assert_eq!(plp.len(), v["prompt_token_ids"].as_array().unwrap().len());
}

#[test]
fn generate_chat_text() {
    let o = lvllm(&[
        "generate",
        "--chat",
        "--prompt",
        "Hello, who are you?",
        "--chat-template-kwargs",
        r#"{"enable_thinking": false}"#,
        "--max-tokens",
        "12",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout.clone()).unwrap();
    assert!(text.starts_with("Hello! I am Tiny"), "{text}");
    assert!(stderr(&o).contains("tok/s"));
}

#[test]
fn prompt_ids_without_tokenizer_model() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/qwen3_moe_sharded");
    let o = lvllm(&[
        "generate",
        "--model",
        dir,
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "3",
        "--ignore-eos",
        "--output",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["text"].is_null());
    assert_eq!(v["prompt_token_ids"], serde_json::json!([1, 2, 3]));
    let o = lvllm(&["generate", "--model", dir, "--prompt", "hi"]);
    assert!(!o.status.success() && stderr(&o).contains("tokenizer"), "{}", stderr(&o));
}

#[test]
fn bad_input_is_a_clear_error() {
    let cases: &[(&[&str], &str)] = &[
        (&["generate", "--prompt-ids", "1,x"], "invalid value 'x'"),
        (&["generate"], "--prompt"),
        (&["generate", "--prompt", "a", "--prompt-ids", "1"], "cannot be used with"),
        (&["generate", "--prompt", "a", "--model", "/nonexistent/model"], "/nonexistent/model/config.json"),
        (
            &["generate", "--prompt", "a", "--device", "cuda"],
            if cfg!(feature = "cuda") { "no CUDA driver found" } else { "no CUDA support" },
        ),
        (&["generate", "--prompt", "a b c d e f g h", "--max-model-len", "4"], "too long"),
        (&["generate", "--prompt", "a", "--temperature", "-1"], "temperature"),
        (&["generate", "--prompt", "a", "--top-p", "0"], "top_p"),
        (&["generate", "--prompt", "a", "--moe-weight", "int8"], "unknown moe weight format"),
        (&["generate", "--prompt", "a", "--threads", "0"], "threads"),
        (&["generate", "--chat", "--prompt", "a", "--chat-template-kwargs", "nope"], "JSON object"),
        (&["generate", "--prompt", "a", "--max-model-len", "999999"], "max_position_embeddings"),
        (&["serve", "--no-such-key", "1"], "no-such-key"),
        (&["serve", "--tensor-parallel-size", "2"], "tensor-parallel-size"),
        (&["serve", "--port", "http"], "port"),
        (&["serve", "--chat-template", "/nonexistent/t.jinja"], "/nonexistent/t.jinja"),
        (&["nonsense"], "unrecognized subcommand"),
        (&["generate", "--prompt", "a", "--moe-placement", "cpu"], "auto, hybrid or gpu"),
        (&["generate", "--prompt", "a", "--moe-placement", "hybrid", "--device", "cpu"], "needs a CUDA device"),
        (&["generate", "--prompt", "a", "--gpu-resident-moe-layers", "5-2"], "runs backwards"),
        (&["generate", "--prompt", "a", "--gpu-resident-moe-layers", "0,x"], "not a layer index"),
        (&["generate", "--prompt", "a", "--device", "cpu", "--gpu-resident-moe-layers", "0"], "needs a CUDA device"),
        (&["generate", "--prompt", "a", "--device", "cpu", "--load-format", "dummy"], "CUDA device only"),
        (&["generate", "--prompt", "a", "--load-format", "pickle"], "unknown load format"),
        (&["bench", "--device", "cpu", "--batch-sizes", "0"], "at least 1"),
        (&["bench", "--device", "cpu", "--input-len", "100000"], "max_model_len"),
    ];
    for (args, needle) in cases {
        let o = lvllm(args);
        assert!(!o.status.success(), "{args:?} should fail");
        let e = stderr(&o);
        assert!(e.contains(needle), "{args:?}: stderr lacks {needle:?}:\n{e}");
        assert!(!e.contains("panicked"), "{args:?} panicked:\n{e}");
    }
}

#[test]
fn moe_weight_int4_runs() {
    let o =
        lvllm(&["generate", "--prompt", "7 plus 5 is", "--max-tokens", "4", "--moe-weight", "int4", "--threads", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `lvllm bench` on the bundled model (CPU): a decode row per batch size with the
/// bandwidth-bound limit and ratio, and prefill rows.
#[test]
fn bench_prints_decode_rows_with_the_bound() {
    let o = lvllm(&[
        "bench",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--batch-sizes",
        "1,2",
        "--input-len",
        "8",
        "--output-len",
        "4",
        "--prefill-lens",
        "16",
        "--probe-mib",
        "16",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("CPU bandwidth") && text.contains("GB/s"), "{text}");
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("| 1 |") || l.starts_with("| 2 |")).collect();
    assert_eq!(rows.len(), 2, "{text}");
    for r in rows {
        // | batch | tok/s | ms/step | host GB | device GB | bound | ratio | ...
        let cols: Vec<&str> = r.split('|').map(str::trim).collect();
        let tps: f64 = cols[2].parse().unwrap();
        let bound: f64 = cols[6].parse().unwrap();
        assert!(tps > 0.0 && bound > 0.0, "{r}");
        assert!(cols[7].ends_with('%'), "{r}");
    }
    assert!(text.contains("# prefill 16 tokens"), "{text}");
}

/// `lvllm serve` as a process: it serves the bundled model on the port it was
/// given (0: any), answers a request, and on SIGTERM drains and exits 0.
#[cfg(unix)]
#[test]
fn serve_answers_then_drains_on_sigterm() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_lvllm"))
        .args(["serve", "--port", "0", "--threads", "1", "--served-model-name", "tiny"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut addr = None;
    let mut log = String::new();
    for _ in 0..20 {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            break;
        }
        log.push_str(&line);
        if let Some(rest) = line.strip_prefix("serving on http://") {
            addr = rest.split_whitespace().next().map(str::to_string);
            break;
        }
    }
    let addr = addr.unwrap_or_else(|| panic!("no address in:\n{log}"));
    let body = r#"{"model": "tiny", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}"#;
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200") && reply.contains("text_completion"), "{reply}");
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert!(status.success(), "exit {status:?}:\n{log}{rest}");
    assert!(rest.contains("drained"), "{rest}");
}
