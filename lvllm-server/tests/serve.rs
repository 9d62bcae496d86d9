//! `lvllm serve` through HTTP on a loopback port, with the bundled tiny model on
//! the CPU: chat and completions (plain and streamed), models, health, metrics,
//! tool-call and reasoning parsing, and every error case the server promises.
//! The client is a few lines of HTTP/1.1 over `TcpStream` (`Connection: close`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, OnceLock};

use lvllm_engine::{Binding, Device, Engine, SamplingParams, ThreadOptions};
use lvllm_server::parsers::{ReasoningParserKind, ToolParserKind};
use lvllm_server::server::{self, AppState, ServerOptions};
use serde_json::{json, Value};

const MODEL: &str = "tiny";
const KEY: &str = "sekret";

fn new_engine(max_num_seqs: usize) -> Arc<Engine> {
    Arc::new(
        Engine::builder()
            .embedded(lvllm_server::bundled::tiny_model())
            .device(Device::Cpu)
            .threads(ThreadOptions { count: Some(1), binding: Binding::CpuCore, power_saving: true })
            .max_num_seqs(max_num_seqs)
            .build()
            .unwrap(),
    )
}

fn engine() -> Arc<Engine> {
    static E: OnceLock<Arc<Engine>> = OnceLock::new();
    E.get_or_init(|| new_engine(64)).clone()
}

/// Starts a server on a free loopback port; it runs until the test process ends.
fn start(opts: ServerOptions) -> SocketAddr {
    start_with(engine(), opts)
}

fn start_with(engine: Arc<Engine>, opts: ServerOptions) -> SocketAddr {
    let state = AppState::new(engine, opts);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            server::serve(listener, state, std::future::pending()).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

fn options() -> ServerOptions {
    ServerOptions {
        served_model_name: MODEL.into(),
        api_key: None,
        max_queue_len: None,
        tool_call_parser: Some(ToolParserKind::Hermes),
        reasoning_parser: Some(ReasoningParserKind::Qwen3),
        enable_auto_tool_choice: true,
    }
}

fn default_server() -> SocketAddr {
    static A: OnceLock<SocketAddr> = OnceLock::new();
    *A.get_or_init(|| start(options()))
}

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// The `data:` payloads of an SSE body.
    fn events(&self) -> Vec<String> {
        self.body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
    }
}

fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("Content-Type: application/json\r\n\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.into() };
    Reply { status, headers: head.to_string(), body }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn post(addr: SocketAddr, path: &str, body: Value) -> Reply {
    http(addr, "POST", path, &[], &body.to_string())
}

fn chat_body(content: &str, extra: Value) -> Value {
    let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0,
                       "max_tokens": 40, "chat_template_kwargs": {"enable_thinking": false}});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

/// The tool schema the bundled model was trained with.
fn weather_tool() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                       "required": ["city"]}}}])
}

#[test]
fn health_models_and_metrics() {
    let a = default_server();
    assert_eq!(http(a, "GET", "/health", &[], "").status, 200);
    let m = http(a, "GET", "/v1/models", &[], "");
    assert_eq!(m.status, 200);
    let v = m.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(v["data"][0]["max_model_len"], engine().max_model_len());
    // A request, then its traces in the metrics.
    assert_eq!(
        post(a, "/v1/completions", json!({"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}))
            .status,
        200
    );
    let text = http(a, "GET", "/metrics", &[], "").body;
    for name in [
        "lvllm:kv_cache_usage_perc",
        "lvllm:prefix_cache_queries_total",
        "lvllm:prefix_cache_hits_total",
        "lvllm:num_preemptions_total",
        "lvllm:num_requests_running",
        "lvllm:num_requests_waiting",
        "lvllm:prompt_tokens_total",
        "lvllm:generation_tokens_total",
        "lvllm:request_success_total",
        "lvllm:time_to_first_token_seconds_bucket",
        "lvllm:inter_token_latency_seconds_count",
        "lvllm:e2e_request_latency_seconds_sum",
    ] {
        assert!(text.contains(name), "metrics lack {name}:\n{text}");
    }
    let generated: f64 = text
        .lines()
        .find(|l| l.starts_with("lvllm:generation_tokens_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(generated >= 3.0, "{text}");
}

#[test]
fn completions_match_the_engine_streamed_or_not() {
    let a = default_server();
    let prompt = "Once upon a time";
    let want = engine().generate(prompt, &SamplingParams::greedy().max_tokens(12)).unwrap();
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 2});
    let r = post(a, "/v1/completions", body.clone());
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want.text.clone().unwrap());
    assert_eq!(v["usage"]["prompt_tokens"], want.prompt_token_ids.len());
    assert_eq!(v["usage"]["completion_tokens"], want.token_ids.len());
    assert_eq!(v["choices"][0]["logprobs"]["tokens"].as_array().unwrap().len(), want.token_ids.len());
    assert_eq!(v["choices"][0]["logprobs"]["top_logprobs"][0].as_object().unwrap().len(), 2);
    // Token ids as the prompt give the same text.
    let ids = json!({"prompt": want.prompt_token_ids, "max_tokens": 12, "temperature": 0});
    assert_eq!(post(a, "/v1/completions", ids).json()["choices"][0]["text"], want.text.clone().unwrap());
    // Streamed: the pieces add up, usage comes last when asked, then [DONE].
    let mut sb = body;
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let r = post(a, "/v1/completions", sb);
    assert!(r.headers.to_ascii_lowercase().contains("text/event-stream"), "{}", r.headers);
    let ev = r.events();
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, want.text.unwrap());
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], want.token_ids.len());
    // n = 2 with a seed: two choices.
    let r = post(a, "/v1/completions", json!({"prompt": prompt, "max_tokens": 4, "n": 2, "seed": 7}));
    assert_eq!(r.json()["choices"].as_array().unwrap().len(), 2);
}

#[test]
fn chat_plain_and_streamed_agree() {
    let a = default_server();
    let r = post(a, "/v1/chat/completions", chat_body("Hello, who are you?", json!({})));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(content.starts_with("Hello! I am Tiny"), "{content}");
    assert!(v["choices"][0]["message"].get("reasoning_content").is_none(), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let r = post(
        a,
        "/v1/chat/completions",
        chat_body("Hello, who are you?", json!({"stream": true, "stream_options": {"include_usage": true}})),
    );
    let ev = r.events();
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, content);
    assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"] == "stop"));
    assert_eq!(chunks.last().unwrap()["usage"]["total_tokens"], v["usage"]["total_tokens"]);
    // Logprobs in the chat shape.
    let r = post(
        a,
        "/v1/chat/completions",
        chat_body("Hello, who are you?", json!({"logprobs": true, "top_logprobs": 3, "max_tokens": 3})),
    );
    let lp = &r.json()["choices"][0]["logprobs"]["content"];
    assert_eq!(lp.as_array().unwrap().len(), 3);
    assert_eq!(lp[0]["top_logprobs"].as_array().unwrap().len(), 3);
}

#[test]
fn reasoning_and_tool_calls_are_parsed() {
    let a = default_server();
    // Thinking on (the template's default): the model reasons, then calls the tool.
    let body = json!({"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "temperature": 0,
                      "max_tokens": 80, "tools": weather_tool()});
    let v = post(a, "/v1/chat/completions", body.clone()).json();
    let msg = &v["choices"][0]["message"];
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    assert!(msg["reasoning_content"].as_str().unwrap().contains("get_weather"), "{v}");
    let call = &msg["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string(), "{args}");
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    // Streamed: reasoning deltas, then the call's name and arguments in tool_calls deltas.
    let mut sb = body;
    sb["stream"] = json!(true);
    let ev = post(a, "/v1/chat/completions", sb).events();
    let chunks: Vec<Value> = ev[..ev.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let reasoning: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["reasoning_content"].as_str()).collect();
    assert_eq!(reasoning, msg["reasoning_content"].as_str().unwrap());
    let calls: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0)).collect();
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let streamed_args: String = calls.iter().filter_map(|c| c["function"]["arguments"].as_str()).collect();
    assert_eq!(streamed_args, call["function"]["arguments"].as_str().unwrap());
    assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"] == "tool_calls"));
    // tool_choice "none": no parsing, the raw call stays in the content.
    let v = post(
        a,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "temperature": 0,
               "max_tokens": 80, "tools": weather_tool(), "tool_choice": "none"}),
    )
    .json();
    assert!(v["choices"][0]["message"]["content"].as_str().unwrap().contains("<tool_call>"), "{v}");
}

#[test]
fn bad_requests_are_openai_errors() {
    let a = default_server();
    let too_long = "word ".repeat(3000);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/chat/completions", "{not json".into(), 400, "malformed JSON"),
        ("/v1/chat/completions", "[1, 2]".into(), 400, "JSON object"),
        ("/v1/chat/completions", json!({"messages": "hi"}).to_string(), 400, "`messages`"),
        ("/v1/chat/completions", chat_body("hi", json!({"max_tokens": "ten"})).to_string(), 400, "`max_tokens`"),
        ("/v1/chat/completions", chat_body("hi", json!({"temperature": -1})).to_string(), 400, "temperature"),
        ("/v1/chat/completions", chat_body("hi", json!({"top_p": 0})).to_string(), 400, "top_p"),
        ("/v1/chat/completions", chat_body("hi", json!({"model": "gpt-4"})).to_string(), 404, "gpt-4"),
        (
            "/v1/chat/completions",
            chat_body("hi", json!({"presence_penalty": 2.5})).to_string(),
            400,
            "presence_penalty",
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", json!({"repetition_penalty": 0})).to_string(),
            400,
            "repetition_penalty",
        ),
        ("/v1/chat/completions", chat_body("hi", json!({"n": 0})).to_string(), 400, "`n`"),
        ("/v1/chat/completions", chat_body("hi", json!({"stop": 3})).to_string(), 400, "`stop`"),
        (
            "/v1/chat/completions",
            chat_body("hi", json!({"tool_choice": "required", "tools": weather_tool()})).to_string(),
            400,
            "required",
        ),
        ("/v1/chat/completions", chat_body(&too_long, json!({})).to_string(), 400, "too long"),
        ("/v1/completions", json!({"prompt": too_long}).to_string(), 400, "too long"),
        ("/v1/completions", json!({"prompt": 5}).to_string(), 400, "`prompt`"),
        ("/v1/completions", json!({"max_tokens": 3}).to_string(), 400, "`prompt` is required"),
        ("/v1/completions", json!({"prompt": [999999999]}).to_string(), 400, "vocabulary"),
        ("/v1/nothing", "{}".into(), 404, "no such route"),
    ];
    for (path, body, status, needle) in cases {
        let r = http(a, "POST", path, &[], &body);
        assert_eq!(r.status, status, "{path} {body}: {}", r.body);
        let v = r.json();
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{path} {body}: {msg:?} lacks {needle:?}");
        assert!(v["error"]["type"].is_string(), "{v}");
    }
    // A streamed request whose prompt is too long fails before the stream starts.
    let r = post(a, "/v1/completions", json!({"prompt": too_long, "stream": true}));
    assert_eq!(r.status, 400);
}

#[test]
fn api_key_and_auto_tool_choice_settings() {
    let a = start(ServerOptions { api_key: Some(KEY.into()), tool_call_parser: None, ..options() });
    let body = chat_body("hi", json!({"max_tokens": 2})).to_string();
    let r = http(a, "POST", "/v1/chat/completions", &[], &body);
    assert_eq!(r.status, 401);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("missing API key"));
    let r = http(a, "POST", "/v1/chat/completions", &[("Authorization", "Bearer nope")], &body);
    assert_eq!(r.status, 401);
    let auth = format!("Bearer {KEY}");
    assert_eq!(http(a, "POST", "/v1/chat/completions", &[("Authorization", &auth)], &body).status, 200);
    assert_eq!(http(a, "GET", "/v1/models", &[("Authorization", &auth)], "").status, 200);
    // Health and metrics stay open.
    assert_eq!(http(a, "GET", "/health", &[], "").status, 200);
    // Tools with tool_choice auto need a tool parser.
    let tools = chat_body("hi", json!({"tools": weather_tool()})).to_string();
    let r = http(a, "POST", "/v1/chat/completions", &[("Authorization", &auth)], &tools);
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("--tool-call-parser"));
}

#[test]
fn a_full_queue_is_429_and_a_gone_client_is_cancelled() {
    // An engine that runs one sequence at a time, and no room to wait.
    let eng = new_engine(1);
    let a = start_with(eng.clone(), ServerOptions { max_queue_len: Some(0), ..options() });
    // One long streamed request holds the engine; the client reads its first
    // bytes and then disconnects.
    let mut s = TcpStream::connect(a).unwrap();
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": true, "stream": true}).to_string();
    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .unwrap();
    let mut first = [0u8; 64];
    let n = s.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    let t = std::time::Instant::now();
    while eng.metrics().num_running == 0 {
        assert!(t.elapsed().as_secs() < 30, "the long request never ran");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Meanwhile another request would have to wait: refused.
    let r = post(a, "/v1/completions", json!({"prompt": "hi", "max_tokens": 2}));
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    drop(s);
    // The dropped stream is cancelled: the engine frees up and serves again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let r = post(a, "/v1/completions", json!({"prompt": "hi", "max_tokens": 2}));
        if r.status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the cancelled request still holds the engine");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let text = http(a, "GET", "/metrics", &[], "").body;
    assert!(text.lines().any(|l| l.starts_with("lvllm:request_cancelled_total{") && !l.ends_with(" 0")), "{text}");
}

/// Concurrent HTTP requests are batched by the engine's scheduler and each
/// returns what it returns alone.
#[test]
fn concurrent_requests_are_batched_and_equal_to_alone() {
    let engine = new_engine(16);
    let a = start_with(engine.clone(), options());
    let questions =
        ["What is the capital of France?", "Hello, who are you?", "What is 7 plus 5?", "What color is the sky?"];
    let alone: Vec<Value> = questions
        .iter()
        .map(|q| {
            post(a, "/v1/chat/completions", chat_body(q, json!({}))).json()["choices"][0]["message"]["content"].clone()
        })
        .collect();
    let handles: Vec<_> = (0..12)
        .map(|i| {
            let q = questions[i % questions.len()];
            std::thread::spawn(move || post(a, "/v1/chat/completions", chat_body(q, json!({}))).json())
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let v = h.join().unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], alone[i % questions.len()], "request {i}");
    }
    assert!(engine.metrics().peak_running > 1, "{:?}", engine.metrics());
    // The same prompt again hits the prefix cache.
    let before = engine.metrics().prefix_cache_hit_tokens;
    let long = "Tell me about the sun. ".repeat(12);
    for _ in 0..2 {
        assert_eq!(post(a, "/v1/completions", json!({"prompt": long, "max_tokens": 2})).status, 200);
    }
    assert!(engine.metrics().prefix_cache_hit_tokens > before, "{:?}", engine.metrics());
}

/// Penalties change greedy output as vLLM's do: a huge repetition penalty
/// forbids every token of the prompt and of the output so far.
#[test]
fn penalties_reach_the_sampler() {
    let a = default_server();
    let body = |extra: Value| {
        let mut b =
            json!({"prompt": "the the the the", "max_tokens": 24, "temperature": 0, "ignore_eos": true, "logprobs": 0});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let plain = post(a, "/v1/completions", body(json!({}))).json();
    let penalized = post(a, "/v1/completions", body(json!({"repetition_penalty": 1e6}))).json();
    let toks = |v: &Value| -> Vec<String> {
        v["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect()
    };
    let (p, q) = (toks(&plain), toks(&penalized));
    assert_eq!((p.len(), q.len()), (24, 24));
    let distinct = |t: &[String]| t.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(distinct(&p) < p.len(), "the plain greedy output repeats a token: {p:?}");
    assert_eq!(distinct(&q), q.len(), "no token repeats under a huge repetition penalty: {q:?}");
    assert!(!q.iter().any(|t| t.trim() == "the"), "prompt tokens are penalized too: {q:?}");
    let presence = post(a, "/v1/completions", body(json!({"presence_penalty": 2.0, "frequency_penalty": 2.0}))).json();
    assert_ne!(toks(&presence), p, "presence/frequency penalties change the greedy output");
}

/// `echo` puts the prompt (and, with `logprobs`, its logprobs; the first is
/// null) before the completion, streamed or not.
#[test]
fn echo_returns_the_prompt_first() {
    let a = default_server();
    let prompt = "Once upon a time";
    let plain = post(a, "/v1/completions", json!({"prompt": prompt, "max_tokens": 6, "temperature": 0})).json();
    let generated = plain["choices"][0]["text"].as_str().unwrap().to_string();
    let v = post(
        a,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 6, "temperature": 0, "echo": true, "logprobs": 1}),
    )
    .json();
    assert_eq!(v["choices"][0]["text"], format!("{prompt}{generated}"));
    let lp = &v["choices"][0]["logprobs"];
    let n_prompt = engine().tokenize(&lvllm_engine::Prompt::Text(prompt.into())).unwrap().len();
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n_prompt + 6, "{lp}");
    assert!(lp["token_logprobs"][0].is_null() && lp["token_logprobs"][1].is_number(), "{lp}");
    let ev = post(
        a,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 6, "temperature": 0, "echo": true, "stream": true}),
    )
    .events();
    let text: String = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, format!("{prompt}{generated}"));
}
