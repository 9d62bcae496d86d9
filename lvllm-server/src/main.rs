//! The `lvllm` binary: `lvllm generate` runs a model from the command line,
//! `lvllm bench` measures prefill and decode throughput against the
//! bandwidth-bound limit.
//!
//! This is the only crate that turns command-line flags (and, with the serving
//! issue, YAML files and environment variables) into the engine's typed config.

use lvllm_server::bundled;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use lvllm_engine::{
    BenchOptions, Binding, Device, Engine, Generation, LayerSet, LoadFormat, MoePlacement, MoeWeight, Prompt,
    SamplingParams, ThreadOptions, TokenLogprobs, Tokenizer,
};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(name = "lvllm", version, about = "Serve huge MoE models on one box: experts on the CPU, the rest on the GPU")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate a completion for one prompt and print it.
    Generate(GenerateArgs),
    /// Measure prefill and decode tokens/s next to the bandwidth-bound limit.
    Bench(BenchArgs),
    /// Serve the OpenAI-compatible API. Takes `--config config.yaml` and the
    /// same keys as flags (`--port 8000`, `--tool-call-parser hermes`, ...);
    /// see lvllm-server/CONFIG.md. With no model it serves the bundled one.
    Serve {
        /// Settings as `--key value` / `--key=value` / `--flag`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<String>,
    },
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Decode batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batch_sizes: Vec<usize>,
    /// Prompt tokens per sequence before decoding.
    #[arg(long, default_value_t = 64)]
    input_len: usize,
    /// Decode steps per batch size.
    #[arg(long, default_value_t = 32)]
    output_len: usize,
    /// Single-sequence prefill lengths to time, comma-separated.
    #[arg(long, value_delimiter = ',')]
    prefill_lens: Vec<usize>,
    /// MiB read by the CPU bandwidth probe (0 skips it). The default, 8 GiB, is
    /// far larger than any last-level cache (servers have up to ~0.5 GB), so the
    /// probe measures DRAM as the experts' tens of GB are read.
    #[arg(long, default_value_t = 8192)]
    probe_mib: usize,
}

/// Flags that configure the engine (shared by `generate` and `bench`).
#[derive(clap::Args, Debug)]
struct EngineArgs {
    /// Hugging Face model directory (default: the tiny model bundled in the binary).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where weights come from: auto (the checkpoint) or dummy (random weights of
    /// the config's shapes; CUDA device; the directory needs only config.json).
    #[arg(long, default_value = "auto", value_parser = parse_load_format)]
    load_format: LoadFormat,
    /// Context limit in tokens (prompt + output).
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Where to run (default: cuda when this build has CUDA support and a driver is found, else cpu).
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
    /// Where routed experts run on a CUDA device: auto (all in VRAM if the model
    /// fits, else hybrid), hybrid (experts on the CPU) or gpu.
    #[arg(long, default_value = "auto", value_parser = parse_placement)]
    moe_placement: MoePlacement,
    /// Decoder layers whose experts stay in VRAM in hybrid placement, e.g. `0-5` or `0,1,8-9`.
    #[arg(long, default_value = "", value_parser = parse_layers)]
    gpu_resident_moe_layers: LayerSet,
    /// Runtime format of routed experts: to_dtype, keep or int4.
    #[arg(long, default_value = "to_dtype", value_parser = parse_moe_weight)]
    moe_weight: MoeWeight,
    /// CPU worker threads for the experts (default: physical cores − 4, at least 1).
    #[arg(long)]
    threads: Option<usize>,
    /// Pin expert workers per physical core or per NUMA node.
    #[arg(long, value_enum, default_value_t = BindingArg::CpuCore)]
    thread_binding: BindingArg,
    /// Park idle expert workers at once instead of spinning.
    #[arg(long)]
    power_saving: bool,
    /// Run CUDA decode steps eagerly instead of replaying captured CUDA graphs.
    #[arg(long)]
    enforce_eager: bool,
    /// Fraction of GPU memory for weights and KV cache (CUDA device).
    #[arg(long)]
    gpu_memory_utilization: Option<f32>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    /// The text as it is generated, timing on stderr.
    Text,
    /// One JSON object with token ids, text and logprobs.
    Json,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DeviceArg {
    /// Everything on the CPU.
    Cpu,
    /// GPU 0, all weights in VRAM (needs a build with `--features cuda`).
    Cuda,
}

#[derive(clap::Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Prompt text.
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids, e.g. `1,2,3`.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    prompt_ids: Option<Vec<u32>>,
    /// Treat --prompt as a user message and apply the model's chat template.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// Extra chat template variables as a JSON object, e.g. '{"enable_thinking": false}'.
    #[arg(long, requires = "chat")]
    chat_template_kwargs: Option<String>,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Keep only the K most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Drop tokens less likely than min-p × the most likely.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    min_p: f32,
    /// Random seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop strings (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Extra stop token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    stop_token_ids: Vec<u32>,
    /// Keep generating after end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Return the top K logprobs of each generated token.
    #[arg(long)]
    logprobs: Option<usize>,
    /// Return the top K logprobs of each prompt token.
    #[arg(long)]
    prompt_logprobs: Option<usize>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum BindingArg {
    /// One worker per physical core.
    CpuCore,
    /// Workers float within their NUMA node.
    NumaNode,
}

fn parse_moe_weight(s: &str) -> Result<MoeWeight, String> {
    s.parse()
}

fn parse_placement(s: &str) -> Result<MoePlacement, String> {
    s.parse()
}

fn parse_layers(s: &str) -> Result<LayerSet, String> {
    s.parse()
}

fn parse_load_format(s: &str) -> Result<LoadFormat, String> {
    s.parse()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Bench(args) => bench(args),
        Command::Serve { args } => serve(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn build_engine(args: &EngineArgs) -> anyhow::Result<Engine> {
    let threads = ThreadOptions {
        count: args.threads,
        binding: match args.thread_binding {
            BindingArg::CpuCore => Binding::CpuCore,
            BindingArg::NumaNode => Binding::NumaNode,
        },
        power_saving: args.power_saving,
    };
    let mut builder = Engine::builder()
        .device(match args.device {
            Some(DeviceArg::Cpu) => Device::Cpu,
            Some(DeviceArg::Cuda) => Device::Cuda(0),
            None if lvllm_engine::cuda_available() => Device::Cuda(0),
            None => Device::Cpu,
        })
        .threads(threads)
        .moe_weight(args.moe_weight)
        .moe_placement(args.moe_placement)
        .gpu_resident_moe_layers(args.gpu_resident_moe_layers.clone())
        .load_format(args.load_format)
        .enforce_eager(args.enforce_eager)
        .on_load_progress(load_progress_lines());
    builder = match &args.model {
        Some(dir) => builder.model(dir),
        None => builder.embedded(bundled::tiny_model()),
    };
    if let Some(n) = args.max_model_len {
        builder = builder.max_model_len(n);
    }
    if let Some(f) = args.gpu_memory_utilization {
        builder = builder.gpu_memory_utilization(f);
    }
    if let Some(dir) = kernel_cache_dir() {
        builder = builder.kernel_cache_dir(dir);
    }
    builder.build().context("loading the model")
}

fn serve(args: &[String]) -> anyhow::Result<()> {
    use lvllm_server::config::ServeConfig;
    use lvllm_server::server::{self, AppState, ServerOptions};
    let cfg = ServeConfig::load(args, std::env::vars())?;
    for w in &cfg.warnings {
        eprintln!("warning: {w}");
    }
    let mut builder = Engine::builder()
        .device(if lvllm_engine::cuda_available() { Device::Cuda(0) } else { Device::Cpu })
        .threads(ThreadOptions { count: cfg.threads, binding: cfg.thread_binding, power_saving: cfg.power_saving })
        .moe_weight(cfg.moe_weight)
        .moe_placement(cfg.moe_placement)
        .gpu_resident_moe_layers(cfg.gpu_resident_moe_layers.clone())
        .load_format(cfg.load_format)
        .enforce_eager(cfg.enforce_eager)
        .gpu_memory_utilization(cfg.gpu_memory_utilization)
        .on_load_progress(load_progress_lines());
    builder = match &cfg.model {
        Some(dir) => builder.model(dir),
        None => builder.embedded(bundled::tiny_model()),
    };
    if let Some(n) = cfg.max_model_len {
        builder = builder.max_model_len(n);
    }
    if let Some(n) = cfg.max_num_seqs {
        builder = builder.max_num_seqs(n);
    }
    if let Some(n) = cfg.max_num_batched_tokens {
        builder = builder.max_num_batched_tokens(n);
    }
    builder = builder.enable_prefix_caching(cfg.enable_prefix_caching);
    if let Some(path) = &cfg.chat_template {
        let source = std::fs::read_to_string(path).with_context(|| format!("reading the chat template {path}"))?;
        builder = builder.chat_template(source);
    }
    if let Some(dir) = kernel_cache_dir() {
        builder = builder.kernel_cache_dir(dir);
    }
    eprintln!("loading {} ...", cfg.model.as_deref().unwrap_or("the bundled tiny model"));
    let t0 = std::time::Instant::now();
    let engine = builder.build().context("loading the model")?;
    eprintln!(
        "loaded {} in {:.1} s (max_model_len {})",
        engine.model_name(),
        t0.elapsed().as_secs_f64(),
        engine.max_model_len()
    );
    let name =
        cfg.served_model_name.clone().or_else(|| cfg.model.clone()).unwrap_or_else(|| engine.model_name().to_string());
    let opts = ServerOptions {
        served_model_name: name,
        api_key: cfg.api_key.clone(),
        max_queue_len: cfg.max_queue_len,
        tool_call_parser: cfg.tool_call_parser,
        reasoning_parser: cfg.reasoning_parser,
        enable_auto_tool_choice: cfg.enable_auto_tool_choice,
    };
    let state = AppState::new(std::sync::Arc::new(engine), opts);
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let addr = format!("{}:{}", cfg.host, cfg.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
        eprintln!("serving on http://{} (SIGTERM or Ctrl-C drains and stops)", listener.local_addr()?);
        server::serve(listener, state, server::shutdown_signal()).await.context("serving")?;
        eprintln!("drained; bye");
        Ok(())
    })
}

/// Log lines while a model loads: one per tenth of the checkpoint's bytes, from
/// the first second on (small models load silently).
fn load_progress_lines() -> impl Fn(lvllm_engine::LoadProgress) + Send + Sync + 'static {
    let start = std::time::Instant::now();
    let printed = std::sync::Mutex::new(0u64);
    move |p| {
        if p.total_bytes == 0 || start.elapsed() < std::time::Duration::from_secs(1) {
            return;
        }
        let tenth = p.bytes * 10 / p.total_bytes;
        let mut last = printed.lock().unwrap_or_else(|e| e.into_inner());
        if tenth > *last {
            *last = tenth;
            eprintln!(
                "loading: {:3}% ({:.1} of {:.1} GB, {} of {} tensors, {:.0} s)",
                tenth * 10,
                p.bytes as f64 / 1e9,
                p.total_bytes as f64 / 1e9,
                p.tensors,
                p.total_tensors,
                start.elapsed().as_secs_f64()
            );
        }
    }
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let engine = build_engine(&args.engine)?;
    let opts = BenchOptions {
        batch_sizes: args.batch_sizes,
        input_len: args.input_len,
        output_len: args.output_len,
        prefill_lens: args.prefill_lens,
        probe_bytes: args.probe_mib << 20,
    };
    print!("{}", engine.bench(&opts)?);
    Ok(())
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let engine = build_engine(&args.engine)?;

    let prompt = match (&args.prompt, &args.prompt_ids) {
        (Some(text), _) if args.chat => {
            let template_kwargs = match &args.chat_template_kwargs {
                Some(s) => match serde_json::from_str(s) {
                    Ok(serde_json::Value::Object(m)) => m,
                    _ => bail!("--chat-template-kwargs must be a JSON object, got {s:?}"),
                },
                None => Default::default(),
            };
            Prompt::Chat(lvllm_engine::ChatPrompt {
                messages: json!([{"role": "user", "content": text}]),
                tools: None,
                template_kwargs,
            })
        }
        (Some(text), _) => Prompt::Text(text.clone()),
        (None, Some(ids)) => Prompt::Tokens(ids.clone()),
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    let params = SamplingParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        seed: args.seed,
        stop_token_ids: args.stop_token_ids.clone(),
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        logprobs: args.logprobs,
        prompt_logprobs: args.prompt_logprobs,
        ..SamplingParams::default()
    };

    match args.output {
        Output::Json => {
            let g = engine.generate(prompt, &params)?;
            println!("{}", serde_json::to_string(&to_json(&g, engine.tokenizer()))?);
        }
        Output::Text => {
            let mut stream = engine.stream(prompt, &params)?;
            let mut out = std::io::stdout().lock();
            let with_text = engine.tokenizer().is_some();
            let mut finish = None;
            for delta in stream.by_ref() {
                let d = delta?;
                if with_text {
                    write!(out, "{}", d.text)?;
                } else {
                    write!(out, "{} ", d.token_id)?;
                }
                out.flush()?;
                finish = d.finish_reason;
            }
            writeln!(out)?;
            let s = stream.stats();
            let decode = s.decode_tokens_per_sec().map(|t| format!("{t:.1} tok/s")).unwrap_or_else(|| "n/a".into());
            eprintln!(
                "[{} prompt tokens in {:.1} ms, {} generated, decode {decode}, finish: {:?}]",
                s.prompt_tokens,
                s.prefill_secs * 1e3,
                s.generated_tokens,
                finish
            );
        }
    }
    Ok(())
}

/// `$XDG_CACHE_HOME/lvllm/kernels`, else `$HOME/.cache/lvllm/kernels`.
fn kernel_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("lvllm").join("kernels"))
}

fn logprob_entries(l: &TokenLogprobs, tok: Option<&Tokenizer>) -> serde_json::Value {
    let entry = |id: u32, logprob: f32, rank: usize| {
        let mut e = json!({"id": id, "logprob": logprob, "rank": rank});
        if let Some(t) = tok {
            e["token"] = json!(t.decode(&[id], false).unwrap_or_default());
        }
        e
    };
    let mut v: Vec<serde_json::Value> = l.top.iter().enumerate().map(|(i, t)| entry(t.id, t.logprob, i + 1)).collect();
    if !l.top.iter().any(|t| t.id == l.token_id) {
        v.push(entry(l.token_id, l.logprob, l.rank));
    }
    serde_json::Value::Array(v)
}

fn to_json(g: &Generation, tok: Option<&Tokenizer>) -> serde_json::Value {
    json!({
        "prompt_token_ids": g.prompt_token_ids,
        "token_ids": g.token_ids,
        "text": g.text,
        "finish_reason": g.finish_reason,
        "logprobs": g.logprobs.as_ref().map(|v| v.iter().map(|l| logprob_entries(l, tok)).collect::<Vec<_>>()),
        "prompt_logprobs": g.prompt_logprobs.as_ref().map(|v| v.iter().map(|l| l.as_ref().map(|l| logprob_entries(l, tok))).collect::<Vec<_>>()),
        "usage": {
            "prompt_tokens": g.stats.prompt_tokens,
            "completion_tokens": g.stats.generated_tokens,
            "prefill_secs": g.stats.prefill_secs,
            "decode_secs": g.stats.decode_secs,
            "decode_tokens_per_sec": g.stats.decode_tokens_per_sec(),
        },
    })
}
