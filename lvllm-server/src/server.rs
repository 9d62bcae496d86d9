//! The OpenAI-compatible HTTP server behind `lvllm serve`: axum routes over an
//! [`Engine`], OpenAI request validation and response shapes, SSE streaming,
//! tool-call and reasoning parsing ([`crate::parsers`]), Prometheus metrics, API
//! keys, a bounded queue, and client-disconnect cancellation.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /health`, `GET /metrics`. Errors are OpenAI error objects
//! (`{"error": {"message", "type", "param", "code"}}`) with the matching status:
//! 400 for malformed JSON, wrong types, bad values and prompts over the context
//! limit, 401 for a missing or wrong API key, 404 for an unknown model, 429 when
//! the queue is full.
//!
//! Requests go to the engine's scheduler with [`Engine::submit_with`]
//! (continuous batching: no thread per request); its sink, called on the
//! model-loop thread, forwards every token to the response through a channel.
//! When the client is gone, the channel is closed, the sink returns `false` and
//! the engine cancels the request at its next step, freeing its KV blocks. With
//! `max_queue_len`, a request that would have to wait (the engine runs
//! `max_num_seqs` already) is refused once that many wait.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lvllm_engine::chat_template::ChatTemplateOptions;
use lvllm_engine::{Engine, FinishReason, Prompt, SamplingParams, StreamDelta, TokenLogprobs};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::parsers::{
    OutputParser, ParseEvent, ParsedOutput, ReasoningParser, ReasoningParserKind, ReasoningStart, ToolParser,
    ToolParserKind,
};

/// What the server adds to the engine.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// The model name clients use (`/v1/models`, the `model` field).
    pub served_model_name: String,
    /// Required bearer token for `/v1/*`, if any.
    pub api_key: Option<String>,
    /// Most requests that may wait for the engine (`None`: unbounded).
    pub max_queue_len: Option<usize>,
    /// Tool-call parser for chat requests with `tools`.
    pub tool_call_parser: Option<ToolParserKind>,
    /// Reasoning parser for chat responses.
    pub reasoning_parser: Option<ReasoningParserKind>,
    /// Parse tool calls when `tool_choice` is `auto` (vLLM's `--enable-auto-tool-choice`).
    pub enable_auto_tool_choice: bool,
}

/// Shared state of the routes.
#[derive(Debug)]
pub struct AppState {
    engine: Arc<Engine>,
    opts: ServerOptions,
    /// Shared with the engine's sinks (which must not hold the engine itself).
    metrics: Arc<Metrics>,
    created: u64,
    next_id: AtomicU64,
}

impl AppState {
    /// State serving `engine` with `opts`.
    pub fn new(engine: Arc<Engine>, opts: ServerOptions) -> Arc<Self> {
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Arc::new(AppState { engine, opts, metrics: Arc::default(), created, next_id: AtomicU64::new(1) })
    }

    fn request_id(&self, prefix: &str) -> String {
        format!("{prefix}-{:x}{:08x}", self.created, self.next_id.fetch_add(1, Ordering::Relaxed))
    }
}

/// The routes, ready for `axum::serve`.
pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    Router::new()
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route", None) })
        .with_state(state)
}

// ------------------------------------------------------------------ errors

/// An OpenAI error response.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError { status, message: message.into(), param: param.map(str::to_string) }
    }

    fn bad(message: impl Into<String>, param: &str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message, Some(param))
    }

    fn from_engine(e: &lvllm_engine::Error) -> Self {
        use lvllm_engine::Error as E;
        match e {
            E::PromptTooLong { .. } | E::InvalidRequest(_) | E::Tokenizer(_) | E::ChatTemplate(_) => {
                Self::new(StatusCode::BAD_REQUEST, e.to_string(), None)
            }
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
        }
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "internal_server_error",
            _ => "invalid_request_error",
        }
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind(), "param": self.param, "code": self.status.as_u16()}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

async fn require_api_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.opts.api_key {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let ok = given.and_then(|v| v.strip_prefix("Bearer ")).is_some_and(|v| v.trim() == key);
        if !ok {
            let msg = if given.is_none() { "missing API key (Authorization: Bearer …)" } else { "invalid API key" };
            return ApiError::new(StatusCode::UNAUTHORIZED, msg, None).into_response();
        }
    }
    next.run(req).await
}

// ------------------------------------------------------------------ request fields

/// A JSON request body with typed accessors whose errors name the field.
struct Body(Map<String, Value>);

impl Body {
    fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(m)) => Ok(Body(m)),
            Ok(_) => Err(ApiError::new(StatusCode::BAD_REQUEST, "the request body must be a JSON object", None)),
            Err(e) => Err(ApiError::new(StatusCode::BAD_REQUEST, format!("malformed JSON body: {e}"), None)),
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    /// `key` as a `T`, when present (and not null); otherwise an error naming the
    /// key and the type (`what`).
    fn typed<'a, T>(&'a self, key: &str, get: fn(&'a Value) -> Option<T>, what: &str) -> Result<Option<T>, ApiError> {
        self.get(key).map(|v| get(v).ok_or_else(|| ApiError::bad(format!("`{key}` must be {what}"), key))).transpose()
    }

    fn f64(&self, key: &str) -> Result<Option<f64>, ApiError> {
        self.typed(key, Value::as_f64, "a number")
    }

    fn u64(&self, key: &str) -> Result<Option<u64>, ApiError> {
        self.typed(key, Value::as_u64, "a non-negative integer")
    }

    fn i64(&self, key: &str) -> Result<Option<i64>, ApiError> {
        self.typed(key, Value::as_i64, "an integer")
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        self.typed(key, Value::as_bool, "a boolean")
    }

    fn str(&self, key: &str) -> Result<Option<&str>, ApiError> {
        self.typed(key, Value::as_str, "a string")
    }
}

/// What every completion request shares.
struct Common {
    params: SamplingParams,
    n: usize,
    stream: bool,
    include_usage: bool,
}

fn common(body: &Body, state: &AppState, max_tokens_keys: &[&str]) -> Result<Common, ApiError> {
    if let Some(model) = body.str("model")? {
        if model != state.opts.served_model_name {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("the model `{model}` does not exist; this server serves `{}`", state.opts.served_model_name),
                Some("model"),
            ));
        }
    }
    let mut p = SamplingParams { max_tokens: state.engine.max_model_len(), ..SamplingParams::default() };
    for key in max_tokens_keys {
        if let Some(v) = body.u64(key)? {
            if v == 0 {
                return Err(ApiError::bad(format!("`{key}` must be at least 1"), key));
            }
            p.max_tokens = v as usize;
        }
    }
    if let Some(t) = body.f64("temperature")? {
        p.temperature = t as f32;
    }
    if let Some(v) = body.f64("top_p")? {
        p.top_p = v as f32;
    }
    if let Some(k) = body.i64("top_k")? {
        // vLLM: -1 (or 0) disables top-k.
        p.top_k = match k {
            -1 | 0 => None,
            k if k > 0 => Some(k as usize),
            _ => return Err(ApiError::bad("`top_k` must be -1 (off) or a positive integer", "top_k")),
        };
    }
    if let Some(v) = body.f64("min_p")? {
        p.min_p = v as f32;
    }
    p.seed = body.u64("seed")?;
    p.ignore_eos = body.bool("ignore_eos")?.unwrap_or(false);
    p.skip_special_tokens = body.bool("skip_special_tokens")?.unwrap_or(true);
    match body.get("stop") {
        None => {}
        Some(Value::String(s)) => p.stop = vec![s.clone()],
        Some(Value::Array(a)) => {
            p.stop = a
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| ApiError::bad("`stop` must be a string or an array of strings", "stop"))?
        }
        Some(_) => return Err(ApiError::bad("`stop` must be a string or an array of strings", "stop")),
    }
    if let Some(ids) = body.get("stop_token_ids") {
        p.stop_token_ids = ids
            .as_array()
            .and_then(|a| a.iter().map(|v| v.as_u64().map(|x| x as u32)).collect())
            .ok_or_else(|| ApiError::bad("`stop_token_ids` must be an array of token ids", "stop_token_ids"))?;
    }
    if let Some(v) = body.f64("presence_penalty")? {
        p.presence_penalty = v as f32;
    }
    if let Some(v) = body.f64("frequency_penalty")? {
        p.frequency_penalty = v as f32;
    }
    if let Some(v) = body.f64("repetition_penalty")? {
        p.repetition_penalty = v as f32;
    }
    p.validate().map_err(|e| ApiError::from_engine(&e))?;
    let n = body.u64("n")?.unwrap_or(1);
    if !(1..=16).contains(&n) {
        return Err(ApiError::bad("`n` must be between 1 and 16", "n"));
    }
    let stream = body.bool("stream")?.unwrap_or(false);
    let include_usage = match body.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => o.get("include_usage").and_then(Value::as_bool).unwrap_or(false),
        Some(_) => return Err(ApiError::bad("`stream_options` must be an object", "stream_options")),
    };
    Ok(Common { params: p, n: n as usize, stream, include_usage })
}

// ------------------------------------------------------------------ generation

/// What a generation sends to its response (`usize`: the choice).
#[derive(Debug)]
enum Gen {
    /// The prompt's logprobs (asked for by `echo` with `logprobs`).
    Prompt(usize, Vec<Option<TokenLogprobs>>),
    Delta(usize, StreamDelta),
    /// One choice ended: (choice, prompt tokens, generated tokens).
    Done(usize, usize, usize),
    Failed(ApiError),
}

/// Submits `n` generations of `ids` (seeds `seed + i`) to the engine's
/// scheduler; their events arrive on the returned channel, tagged with the
/// choice. A closed channel cancels them.
fn spawn_generation(
    state: &Arc<AppState>,
    ids: Vec<u32>,
    params: SamplingParams,
    n: usize,
) -> Result<mpsc::UnboundedReceiver<Gen>, ApiError> {
    if let Some(limit) = state.opts.max_queue_len {
        let em = state.engine.metrics();
        let full = em.num_running + em.num_waiting + n > state.engine.scheduler_config().max_num_seqs;
        if full && em.num_waiting >= limit {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("the queue is full ({} waiting requests, max-queue-len {limit}); retry later", em.num_waiting),
                None,
            ));
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let start = Instant::now();
    let mut submitted = Vec::with_capacity(n);
    for i in 0..n {
        let mut p = params.clone();
        p.seed = params.seed.map(|s| s.wrapping_add(i as u64));
        let (tx, m) = (tx.clone(), state.metrics.clone());
        let mut last: Option<Instant> = None;
        let sink = move |ev: lvllm_engine::RequestEvent| -> bool {
            use lvllm_engine::RequestEvent as E;
            match ev {
                E::PromptLogprobs(v) => tx.send(Gen::Prompt(i, v)).is_ok(),
                E::Delta(d) => {
                    let now = Instant::now();
                    match last {
                        None => m.ttft.observe((now - start).as_secs_f64()),
                        Some(t) => m.itl.observe((now - t).as_secs_f64()),
                    }
                    last = Some(now);
                    if let Some(f) = d.finish_reason {
                        m.finished(f);
                        m.e2e.observe(start.elapsed().as_secs_f64());
                    }
                    let ok = tx.send(Gen::Delta(i, d)).is_ok();
                    if !ok {
                        m.cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                    ok
                }
                E::Finished(stats) => {
                    m.prompt_tokens.fetch_add(stats.prompt_tokens as u64, Ordering::Relaxed);
                    m.generation_tokens.fetch_add(stats.generated_tokens as u64, Ordering::Relaxed);
                    tx.send(Gen::Done(i, stats.prompt_tokens, stats.generated_tokens)).is_ok()
                }
                E::Failed(e) => {
                    m.failed.fetch_add(1, Ordering::Relaxed);
                    let _ = tx.send(Gen::Failed(ApiError::from_engine(&e)));
                    false
                }
            }
        };
        match state.engine.submit_with(Prompt::Tokens(ids.clone()), p, sink) {
            Ok(id) => submitted.push(id),
            Err(e) => {
                for id in submitted {
                    state.engine.cancel(id);
                }
                return Err(ApiError::from_engine(&e));
            }
        }
    }
    Ok(rx)
}

fn finish_str(f: Option<FinishReason>) -> &'static str {
    match f {
        Some(FinishReason::Stop) => "stop",
        _ => "length",
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn token_text(engine: &Engine, id: u32) -> String {
    engine.tokenizer().and_then(|t| t.decode(&[id], false).ok()).unwrap_or_default()
}

fn sse_json(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

fn sse_response(rx: mpsc::UnboundedReceiver<Result<Event, Infallible>>) -> Response {
    Sse::new(UnboundedReceiverStream::new(rx)).into_response()
}

// ------------------------------------------------------------------ /v1/completions

async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    match completions_inner(state, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completions_inner(state: Arc<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let body = Body::parse(&body)?;
    let c = common(&body, &state, &["max_tokens"])?;
    let mut params = c.params;
    if let Some(k) = body.u64("logprobs")? {
        params.logprobs = Some(k as usize);
    }
    let echo = body.bool("echo")?.unwrap_or(false);
    if echo {
        params.prompt_logprobs = params.logprobs;
    }
    let engine = &state.engine;
    let ids = match body.get("prompt") {
        Some(Value::String(s)) => engine.tokenize(&Prompt::Text(s.clone())).map_err(|e| ApiError::from_engine(&e))?,
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => {
            a.iter().map(|v| v.as_u64().unwrap_or(0) as u32).collect()
        }
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => engine
            .tokenize(&Prompt::Text(a[0].as_str().unwrap_or_default().to_string()))
            .map_err(|e| ApiError::from_engine(&e))?,
        Some(_) => {
            return Err(ApiError::bad(
                "`prompt` must be a string, a list of one string, or a list of token ids",
                "prompt",
            ))
        }
        None => return Err(ApiError::bad("`prompt` is required", "prompt")),
    };
    check_prompt(&state, &ids)?;
    // `echo`: the prompt's text (and logprobs) come before the completion.
    let prompt_text = match (echo, body.get("prompt")) {
        (false, _) => String::new(),
        (true, Some(Value::String(s))) => s.clone(),
        (true, Some(Value::Array(a))) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or_default().into(),
        (true, _) => engine.tokenizer().and_then(|t| t.decode(&ids, false).ok()).unwrap_or_default(),
    };
    let id = state.request_id("cmpl");
    let model = state.opts.served_model_name.clone();
    let created = now();
    let want_logprobs = params.logprobs;
    let prompt_ids = ids.clone();
    let mut rx = spawn_generation(&state, ids, params, c.n)?;
    if c.stream {
        let (etx, erx) = mpsc::unbounded_channel();
        let st = state.clone();
        tokio::spawn(async move {
            let (mut prompt_tokens, mut completion_tokens) = (0usize, 0usize);
            let mut echoed = vec![!echo; c.n];
            let echo_chunk = |index: usize, lp: Option<Value>| {
                json!({"id": id, "object": "text_completion", "created": created, "model": model,
                       "choices": [{"index": index, "text": prompt_text, "logprobs": lp, "finish_reason": null}]})
            };
            while let Some(ev) = rx.recv().await {
                let chunk = match ev {
                    Gen::Prompt(index, v) => {
                        echoed[index] = true;
                        echo_chunk(index, Some(completion_logprobs(&st.engine, &prompt_entries(&prompt_ids, &v))))
                    }
                    Gen::Delta(index, d) => {
                        if !echoed[index] {
                            echoed[index] = true;
                            if etx.send(sse_json(&echo_chunk(index, None))).is_err() {
                                return;
                            }
                        }
                        let lp = d
                            .logprobs
                            .as_ref()
                            .map(|l| completion_logprobs(&st.engine, &generated_entries(std::slice::from_ref(l))));
                        json!({"id": id, "object": "text_completion", "created": created, "model": model,
                               "choices": [{"index": index, "text": d.text, "logprobs": lp,
                                            "finish_reason": d.finish_reason.map(|f| finish_str(Some(f)))}]})
                    }
                    Gen::Done(_, p, g) => {
                        prompt_tokens = p;
                        completion_tokens += g;
                        continue;
                    }
                    Gen::Failed(e) => e.body(),
                };
                if etx.send(sse_json(&chunk)).is_err() {
                    return;
                }
            }
            if c.include_usage {
                let u = json!({"id": id, "object": "text_completion", "created": created, "model": model,
                               "choices": [], "usage": usage(prompt_tokens, completion_tokens)});
                let _ = etx.send(sse_json(&u));
            }
            let _ = etx.send(Ok(Event::default().data("[DONE]")));
        });
        return Ok(sse_response(erx));
    }
    let outs = collect(&mut rx, c.n).await?;
    let (prompt_tokens, completion_tokens) = (outs[0].prompt_tokens, outs.iter().map(|o| o.generated).sum());
    let choices: Vec<Value> = outs
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            let logprobs = want_logprobs.map(|_| {
                let mut entries = if echo { prompt_entries(&prompt_ids, &o.prompt_logprobs) } else { Vec::new() };
                entries.extend(generated_entries(&o.logprobs));
                completion_logprobs(&state.engine, &entries)
            });
            let text = format!("{prompt_text}{}", o.text);
            json!({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_str(o.finish)})
        })
        .collect();
    Ok(Json(json!({"id": id, "object": "text_completion", "created": created, "model": model,
                   "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}))
    .into_response())
}

/// The legacy completions `logprobs` object over `(token, logprobs)` entries
/// (`None`: the first prompt token, which has none; `null` in the JSON).
fn completion_logprobs(engine: &Engine, entries: &[(u32, Option<&TokenLogprobs>)]) -> Value {
    let tokens: Vec<String> = entries.iter().map(|(id, _)| token_text(engine, *id)).collect();
    let logprobs: Vec<Option<f32>> = entries.iter().map(|(_, l)| l.map(|l| l.logprob)).collect();
    let top: Vec<Option<Map<String, Value>>> = entries
        .iter()
        .map(|(_, l)| l.map(|l| l.top.iter().map(|t| (token_text(engine, t.id), json!(t.logprob))).collect()))
        .collect();
    let mut offset = 0;
    let offsets: Vec<usize> = tokens
        .iter()
        .map(|t| {
            let o = offset;
            offset += t.len();
            o
        })
        .collect();
    json!({"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets})
}

/// Entries of generated tokens for [`completion_logprobs`].
fn generated_entries(lps: &[TokenLogprobs]) -> Vec<(u32, Option<&TokenLogprobs>)> {
    lps.iter().map(|l| (l.token_id, Some(l))).collect()
}

/// Entries of the prompt for [`completion_logprobs`] (`echo` with `logprobs`).
fn prompt_entries<'a>(ids: &[u32], lps: &'a [Option<TokenLogprobs>]) -> Vec<(u32, Option<&'a TokenLogprobs>)> {
    ids.iter().enumerate().map(|(i, &id)| (id, lps.get(i).and_then(Option::as_ref))).collect()
}

fn check_prompt(state: &AppState, ids: &[u32]) -> Result<(), ApiError> {
    let max = state.engine.max_model_len();
    if ids.is_empty() {
        return Err(ApiError::bad("the prompt is empty", "prompt"));
    }
    if ids.len() >= max {
        let e = lvllm_engine::Error::PromptTooLong { prompt_tokens: ids.len(), max_model_len: max };
        return Err(ApiError::from_engine(&e));
    }
    Ok(())
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

// ------------------------------------------------------------------ /v1/chat/completions

async fn chat_completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    match chat_inner(state, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// The parser a chat response goes through, rebuilt per choice.
#[derive(Clone)]
struct ParserSpec {
    reasoning: Option<(ReasoningParserKind, ReasoningStart)>,
    tools: Option<(ToolParserKind, Vec<Value>)>,
}

impl ParserSpec {
    fn build(&self) -> OutputParser {
        OutputParser::new(
            self.reasoning.map(|(k, s)| ReasoningParser::new(k, s)),
            self.tools.as_ref().map(|(k, t)| ToolParser::new(*k, t)),
        )
    }
}

async fn chat_inner(state: Arc<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let body = Body::parse(&body)?;
    let c = common(&body, &state, &["max_tokens", "max_completion_tokens"])?;
    let mut params = c.params;
    if body.bool("logprobs")?.unwrap_or(false) {
        let k = body.u64("top_logprobs")?.unwrap_or(0);
        if k > 20 {
            return Err(ApiError::bad("`top_logprobs` must be at most 20", "top_logprobs"));
        }
        params.logprobs = Some(k as usize);
    } else if body.get("top_logprobs").is_some() {
        return Err(ApiError::bad("`top_logprobs` needs `logprobs: true`", "top_logprobs"));
    }
    let messages = match body.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => Value::Array(a.clone()),
        Some(_) => return Err(ApiError::bad("`messages` must be a non-empty array", "messages")),
        None => return Err(ApiError::bad("`messages` is required", "messages")),
    };
    let tools = match body.get("tools") {
        None => None,
        Some(Value::Array(a)) => Some(a.clone()),
        Some(_) => return Err(ApiError::bad("`tools` must be an array", "tools")),
    };
    let tool_choice = match body.get("tool_choice") {
        None => if tools.is_some() { "auto" } else { "none" }.to_string(),
        Some(Value::String(s)) if ["none", "auto", "required"].contains(&s.as_str()) => s.clone(),
        Some(Value::Object(_)) => {
            return Err(ApiError::bad("a named `tool_choice` is not supported yet (no guided decoding)", "tool_choice"))
        }
        Some(_) => {
            return Err(ApiError::bad("`tool_choice` must be \"none\", \"auto\" or \"required\"", "tool_choice"))
        }
    };
    if tool_choice == "required" {
        return Err(ApiError::bad(
            "`tool_choice: \"required\"` is not supported yet (no guided decoding)",
            "tool_choice",
        ));
    }
    let template_kwargs = match body.get("chat_template_kwargs") {
        None => Map::new(),
        Some(Value::Object(o)) => o.clone(),
        Some(_) => return Err(ApiError::bad("`chat_template_kwargs` must be an object", "chat_template_kwargs")),
    };
    let parse_tools = tools.is_some() && tool_choice == "auto";
    let tool_parser = match (parse_tools, state.opts.tool_call_parser, state.opts.enable_auto_tool_choice) {
        (false, _, _) => None,
        (true, Some(k), true) => Some(k),
        (true, _, _) => return Err(ApiError::bad(
            "`tool_choice: \"auto\"` needs the server started with --enable-auto-tool-choice and --tool-call-parser",
            "tool_choice",
        )),
    };
    // Render the template here (not in the engine) to see how the prompt ends:
    // a template that opens `<think>` makes the output start inside reasoning.
    let engine = &state.engine;
    let tok = engine.tokenizer().ok_or_else(|| ApiError::bad("this model has no tokenizer", "messages"))?;
    let tmpl = tok.chat_template().ok_or_else(|| ApiError::bad("this model has no chat template", "messages"))?;
    let tools_value = tools.clone().map(Value::Array);
    let opts = ChatTemplateOptions { add_generation_prompt: true, tools: tools_value.as_ref(), extra: template_kwargs };
    let text = tmpl.apply(&messages, &opts).map_err(|e| ApiError::from_engine(&lvllm_engine::Error::from(e)))?;
    let ids = tok.encode(&text, false).map_err(|e| ApiError::from_engine(&lvllm_engine::Error::from(e)))?;
    check_prompt(&state, &ids)?;
    let spec = ParserSpec {
        reasoning: state.opts.reasoning_parser.map(|k| (k, ReasoningStart::from_prompt(&text))),
        tools: tool_parser.map(|k| (k, tools.clone().unwrap_or_default())),
    };
    let id = state.request_id("chatcmpl");
    let model = state.opts.served_model_name.clone();
    let created = now();
    let want_logprobs = params.logprobs;
    let mut rx = spawn_generation(&state, ids, params, c.n)?;
    if c.stream {
        let (etx, erx) = mpsc::unbounded_channel();
        let st = state.clone();
        tokio::spawn(async move {
            let chunk = |choices: Value| {
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": choices})
            };
            let send = |v: Value| etx.send(sse_json(&v)).is_ok();
            let (mut prompt_tokens, mut completion_tokens) = (0usize, 0usize);
            let mut parsers: Vec<OutputParser> = (0..c.n).map(|_| spec.build()).collect();
            let mut called = vec![false; c.n];
            let mut started = vec![false; c.n];
            while let Some(ev) = rx.recv().await {
                match ev {
                    // Chat requests never ask for prompt logprobs.
                    Gen::Prompt(..) => {}
                    Gen::Delta(index, d) => {
                        if !started[index] {
                            started[index] = true;
                            if !send(chunk(json!([{"index": index, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": null, "finish_reason": null}])))
                            {
                                return;
                            }
                        }
                        let mut events = parsers[index].push(&d.text);
                        if d.finish_reason.is_some() {
                            events.extend(parsers[index].finish());
                        }
                        called[index] |= events.iter().any(|e| matches!(e, ParseEvent::ToolCallStart { .. }));
                        let lp = d.logprobs.as_ref().map(|l| chat_logprobs(&st.engine, std::slice::from_ref(l)));
                        let mut deltas: Vec<Value> = events.iter().map(delta_of).collect();
                        if deltas.is_empty() && lp.is_some() {
                            deltas.push(json!({}));
                        }
                        let n = deltas.len();
                        for (i, delta) in deltas.into_iter().enumerate() {
                            let lp = if i + 1 == n { lp.clone() } else { None };
                            if !send(chunk(
                                json!([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": null}]),
                            )) {
                                return;
                            }
                        }
                        if let Some(f) = d.finish_reason {
                            let reason = if called[index] { "tool_calls" } else { finish_str(Some(f)) };
                            if !send(chunk(
                                json!([{"index": index, "delta": {}, "logprobs": null, "finish_reason": reason}]),
                            )) {
                                return;
                            }
                        }
                    }
                    Gen::Done(_, p, g) => {
                        prompt_tokens = p;
                        completion_tokens += g;
                    }
                    Gen::Failed(e) => {
                        if !send(e.body()) {
                            return;
                        }
                    }
                }
            }
            if c.include_usage {
                let mut u = chunk(json!([]));
                u["usage"] = usage(prompt_tokens, completion_tokens);
                let _ = send(u);
            }
            let _ = etx.send(Ok(Event::default().data("[DONE]")));
        });
        return Ok(sse_response(erx));
    }
    let outs = collect(&mut rx, c.n).await?;
    let (prompt_tokens, completion_tokens) = (outs[0].prompt_tokens, outs.iter().map(|o| o.generated).sum());
    let choices: Vec<Value> = outs
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            let out: ParsedOutput = spec.build().parse(&o.text);
            let mut message = json!({"role": "assistant", "content": out.content});
            if let Some(r) = out.reasoning_content {
                message["reasoning_content"] = json!(r);
            }
            let reason = if out.tool_calls.is_empty() { finish_str(o.finish) } else { "tool_calls" };
            if !out.tool_calls.is_empty() {
                message["tool_calls"] = json!(out.tool_calls);
            }
            let logprobs = want_logprobs.map(|_| chat_logprobs(&state.engine, &o.logprobs));
            json!({"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason})
        })
        .collect();
    Ok(Json(json!({"id": id, "object": "chat.completion", "created": created, "model": model,
                   "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}))
    .into_response())
}

/// One finished choice.
#[derive(Default)]
struct ChoiceOut {
    prompt_logprobs: Vec<Option<TokenLogprobs>>,
    text: String,
    logprobs: Vec<TokenLogprobs>,
    finish: Option<FinishReason>,
    prompt_tokens: usize,
    generated: usize,
}

/// Gathers the `n` choices of a non-streaming request.
async fn collect(rx: &mut mpsc::UnboundedReceiver<Gen>, n: usize) -> Result<Vec<ChoiceOut>, ApiError> {
    let mut outs: Vec<ChoiceOut> = (0..n).map(|_| ChoiceOut::default()).collect();
    let mut done = 0;
    while done < n {
        match rx.recv().await {
            Some(Gen::Prompt(i, v)) => outs[i].prompt_logprobs = v,
            Some(Gen::Delta(i, d)) => {
                let o = &mut outs[i];
                o.text.push_str(&d.text);
                o.logprobs.extend(d.logprobs);
                o.finish = d.finish_reason.or(o.finish);
            }
            Some(Gen::Done(i, p, g)) => {
                outs[i].prompt_tokens = p;
                outs[i].generated = g;
                done += 1;
            }
            Some(Gen::Failed(e)) => return Err(e),
            None => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the engine dropped the request", None))
            }
        }
    }
    Ok(outs)
}

/// One streamed chat `delta` for a parser event.
fn delta_of(e: &ParseEvent) -> Value {
    match e {
        ParseEvent::Content(s) => json!({"content": s}),
        ParseEvent::Reasoning(s) => json!({"reasoning_content": s}),
        ParseEvent::ToolCallStart { index, id, name } => json!({"tool_calls": [{"index": index, "id": id,
            "type": "function", "function": {"name": name, "arguments": ""}}]}),
        ParseEvent::ToolCallArguments { index, delta } => {
            json!({"tool_calls": [{"index": index, "function": {"arguments": delta}}]})
        }
    }
}

/// The chat `logprobs` object.
fn chat_logprobs(engine: &Engine, lps: &[TokenLogprobs]) -> Value {
    let entry = |id: u32, logprob: f32| {
        let t = token_text(engine, id);
        json!({"token": t, "logprob": logprob, "bytes": t.as_bytes()})
    };
    let content: Vec<Value> = lps
        .iter()
        .map(|l| {
            let mut e = entry(l.token_id, l.logprob);
            e["top_logprobs"] = Value::Array(l.top.iter().map(|t| entry(t.id, t.logprob)).collect());
            e
        })
        .collect();
    json!({"content": content})
}

// ------------------------------------------------------------------ /v1/models, /metrics

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": state.opts.served_model_name, "object": "model", "created": state.created, "owned_by": "lvllm",
        "root": state.engine.model_name(), "max_model_len": state.engine.max_model_len()}]}))
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; version=0.0.4"));
    (h, state.metrics.render(&state.opts.served_model_name, &state.engine.metrics()))
}

/// A Prometheus histogram with fixed buckets.
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, inner: Mutex::new((vec![0; bounds.len()], 0.0, 0)) }
    }

    fn observe(&self, v: f64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                g.0[i] += 1;
            }
        }
        g.1 += v;
        g.2 += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        for (b, c) in self.bounds.iter().zip(&g.0) {
            out.push_str(&format!("{name}_bucket{{{labels},le=\"{b}\"}} {c}\n"));
        }
        out.push_str(&format!("{name}_bucket{{{labels},le=\"+Inf\"}} {}\n", g.2));
        out.push_str(&format!("{name}_sum{{{labels}}} {}\n{name}_count{{{labels}}} {}\n", g.1, g.2));
    }
}

const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0];
const E2E_BUCKETS: &[f64] = &[0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0];

/// Server metrics, rendered with vLLM's names under an `lvllm:` prefix.
#[derive(Debug)]
struct Metrics {
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    finished: Mutex<BTreeMap<&'static str, u64>>,
    failed: AtomicU64,
    cancelled: AtomicU64,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            finished: Mutex::new(BTreeMap::new()),
            failed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            ttft: Histogram::new(LATENCY_BUCKETS),
            itl: Histogram::new(LATENCY_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
        }
    }
}

impl Metrics {
    fn finished(&self, f: FinishReason) {
        *self.finished.lock().unwrap_or_else(|e| e.into_inner()).entry(finish_str(Some(f))).or_default() += 1;
    }

    fn render(&self, model: &str, em: &lvllm_engine::EngineMetrics) -> String {
        let labels = format!("model_name=\"{}\"", model.replace('\\', "\\\\").replace('"', "\\\""));
        let mut out = String::new();
        let mut one = |name: &str, kind: &str, help: &str, v: String| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {v}\n"));
        };
        one(
            "lvllm:num_requests_running",
            "gauge",
            "Requests in the engine's running batch.",
            em.num_running.to_string(),
        );
        one("lvllm:num_requests_waiting", "gauge", "Requests waiting to be scheduled.", em.num_waiting.to_string());
        let usage = if em.kv_blocks_total == 0 { 0.0 } else { em.kv_blocks_used as f64 / em.kv_blocks_total as f64 };
        one("lvllm:kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (0-1).", usage.to_string());
        one(
            "lvllm:prefix_cache_queries_total",
            "counter",
            "Prompt tokens looked up in the prefix cache.",
            em.prefix_cache_queried_tokens.to_string(),
        );
        one(
            "lvllm:prefix_cache_hits_total",
            "counter",
            "Prompt tokens found in the prefix cache.",
            em.prefix_cache_hit_tokens.to_string(),
        );
        one(
            "lvllm:num_preemptions_total",
            "counter",
            "Requests preempted (recomputed) for lack of KV blocks.",
            em.num_preemptions.to_string(),
        );
        one(
            "lvllm:prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
            self.prompt_tokens.load(Ordering::Relaxed).to_string(),
        );
        one(
            "lvllm:generation_tokens_total",
            "counter",
            "Tokens generated.",
            self.generation_tokens.load(Ordering::Relaxed).to_string(),
        );
        one(
            "lvllm:request_failure_total",
            "counter",
            "Requests that failed in the engine.",
            self.failed.load(Ordering::Relaxed).to_string(),
        );
        one(
            "lvllm:request_cancelled_total",
            "counter",
            "Requests cancelled by a client disconnect.",
            self.cancelled.load(Ordering::Relaxed).to_string(),
        );
        out.push_str("# HELP lvllm:request_success_total Finished requests by finish reason.\n# TYPE lvllm:request_success_total counter\n");
        for (reason, n) in self.finished.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            out.push_str(&format!("lvllm:request_success_total{{{labels},finished_reason=\"{reason}\"}} {n}\n"));
        }
        self.ttft.render(&mut out, "lvllm:time_to_first_token_seconds", "Time to first token.", &labels);
        self.itl.render(&mut out, "lvllm:inter_token_latency_seconds", "Time between tokens.", &labels);
        self.e2e.render(&mut out, "lvllm:e2e_request_latency_seconds", "Request latency.", &labels);
        out
    }
}

/// Serves `router(state)` on `listener` until `shutdown` completes, then lets
/// the requests in flight finish (graceful drain).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
