//! [`EngineBuilder`] and [`Engine`]: load a model, then generate, blocking or
//! streaming.
//!
//! Requests run one at a time on the calling thread for now (the engine is
//! `Send + Sync`; a request holds the model while it runs). Continuous batching,
//! the scheduler and the async API come with the serving issue and keep this
//! surface.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::sync::Arc;

use lvllm_models::{
    CacheConfig, ForwardBatch, LoadOptions, Logits, LogitsSelection, Model, ModelCache, ModelConfig, SafetensorsFile,
    SeqSpan, WeightSource,
};
pub use lvllm_moe::{ExpertsOptions, MoeWeight};
pub use lvllm_numa::Binding;
use lvllm_numa::{Pool, PoolOptions, Topology};
pub use lvllm_tensor::Device;

use crate::chat_template::ChatTemplateOptions;
use crate::kv::BlockAllocator;
use crate::placement::{LayerSet, LoadFormat, MoePlacement};
use crate::sampling::{self, Rng, SamplingParams, TokenLogprobs};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};
use crate::{Error, Result};

/// Tokens per KV block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// KV cache budget when none is given: enough for one sequence of
/// `max_model_len`, capped here so a large model's 40K context does not claim
/// gigabytes by default. `max_model_len` shrinks to what fits.
pub const DEFAULT_KV_CACHE_BYTES: usize = 2 << 30;

/// Fraction of GPU memory the CUDA path may use (weights + KV cache), as vLLM.
pub const DEFAULT_GPU_MEMORY_UTILIZATION: f32 = 0.9;

/// A model held in memory (e.g. embedded in a binary with `include_bytes!`).
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedModel {
    /// A name for messages.
    pub name: &'static str,
    /// `config.json`.
    pub config_json: &'static [u8],
    /// `model.safetensors`.
    pub safetensors: &'static [u8],
    /// `tokenizer.json`.
    pub tokenizer_json: Option<&'static [u8]>,
    /// `tokenizer_config.json`.
    pub tokenizer_config_json: Option<&'static [u8]>,
    /// `generation_config.json`.
    pub generation_config_json: Option<&'static [u8]>,
}

/// Where the model comes from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A Hugging Face model directory (`config.json`, safetensors, tokenizer files).
    Dir(PathBuf),
    /// A model in memory.
    Embedded(EmbeddedModel),
}

/// The CPU worker pool that computes routed experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadOptions {
    /// Worker threads (default: physical cores − 4, at least 1; seed env `LK_THREADS`).
    pub count: Option<usize>,
    /// Pin workers per core or per NUMA node (seed env `LK_THREAD_BINDING`).
    pub binding: Binding,
    /// Park idle workers at once instead of spinning (seed env `LK_POWER_SAVING`).
    pub power_saving: bool,
}

impl Default for ThreadOptions {
    fn default() -> Self {
        ThreadOptions { count: None, binding: Binding::CpuCore, power_saving: false }
    }
}

/// Configures and builds an [`Engine`].
#[derive(Debug, Clone, Default)]
pub struct EngineBuilder {
    source: Option<ModelSource>,
    device: Device,
    threads: ThreadOptions,
    moe_weight: MoeWeight,
    max_model_len: Option<usize>,
    kv_cache_bytes: Option<usize>,
    block_size: Option<usize>,
    kernel_cache_dir: Option<PathBuf>,
    eager: bool,
    gpu_memory_utilization: Option<f32>,
    moe_placement: MoePlacement,
    gpu_resident_moe_layers: LayerSet,
    load_format: LoadFormat,
}

impl EngineBuilder {
    /// Loads the model in a Hugging Face directory.
    pub fn model(mut self, dir: impl AsRef<Path>) -> Self {
        self.source = Some(ModelSource::Dir(dir.as_ref().to_path_buf()));
        self
    }

    /// Loads a model held in memory.
    pub fn embedded(mut self, model: EmbeddedModel) -> Self {
        self.source = Some(ModelSource::Embedded(model));
        self
    }

    /// Where to run (default: CPU).
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// The CPU worker pool.
    pub fn threads(mut self, threads: ThreadOptions) -> Self {
        self.threads = threads;
        self
    }

    /// Runtime format of routed experts (`moe_weight`).
    pub fn moe_weight(mut self, weight: MoeWeight) -> Self {
        self.moe_weight = weight;
        self
    }

    /// Context limit, prompt plus output (default: the model's
    /// `max_position_embeddings`, lowered to what the KV budget holds).
    pub fn max_model_len(mut self, n: usize) -> Self {
        self.max_model_len = Some(n);
        self
    }

    /// Bytes for the KV cache (default [`DEFAULT_KV_CACHE_BYTES`] at most).
    pub fn kv_cache_bytes(mut self, bytes: usize) -> Self {
        self.kv_cache_bytes = Some(bytes);
        self
    }

    /// Where compiled CUDA kernels are cached (default: none, compile each run).
    pub fn kernel_cache_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.kernel_cache_dir = Some(dir.as_ref().to_path_buf());
        self
    }

    /// Fraction of GPU memory for weights and KV cache (default
    /// [`DEFAULT_GPU_MEMORY_UTILIZATION`]); the KV cache takes what the weights leave.
    pub fn gpu_memory_utilization(mut self, fraction: f32) -> Self {
        self.gpu_memory_utilization = Some(fraction);
        self
    }

    /// Run CUDA decode steps eagerly instead of replaying captured CUDA graphs
    /// (vLLM's `enforce_eager`; `cudagraph_mode: NONE`).
    pub fn enforce_eager(mut self, eager: bool) -> Self {
        self.eager = eager;
        self
    }

    /// Tokens per KV block (default [`DEFAULT_BLOCK_SIZE`]).
    pub fn block_size(mut self, n: usize) -> Self {
        self.block_size = Some(n);
        self
    }

    /// Where routed experts run (default [`MoePlacement::Auto`]).
    pub fn moe_placement(mut self, placement: MoePlacement) -> Self {
        self.moe_placement = placement;
        self
    }

    /// Decoder layers whose experts stay in VRAM in hybrid placement (absolute
    /// indices; dense layers in the set are ignored). They run the GPU expert
    /// path in bf16 whatever `moe_weight` says.
    pub fn gpu_resident_moe_layers(mut self, layers: LayerSet) -> Self {
        self.gpu_resident_moe_layers = layers;
        self
    }

    /// Where the weights come from (default: the checkpoint).
    pub fn load_format(mut self, format: LoadFormat) -> Self {
        self.load_format = format;
        self
    }

    /// Loads the model and tokenizer and sizes the KV cache.
    pub fn build(self) -> Result<Engine> {
        let source =
            self.source.ok_or_else(|| Error::Config("no model given: call .model(dir) or .embedded(..)".into()))?;
        let (config, weights, tokenizer, name) = match &source {
            ModelSource::Dir(dir) => {
                let path = dir.join("config.json");
                let bytes = std::fs::read(&path)
                    .map_err(|source| Error::ModelLoad(lvllm_models::Error::Io { path: path.clone(), source }))?;
                let config = ModelConfig::from_json(&bytes, &path.display().to_string()).map_err(Error::ModelLoad)?;
                let weights = match self.load_format {
                    LoadFormat::Auto => WeightSource::from_dir(dir).map_err(Error::ModelLoad)?,
                    LoadFormat::Dummy => WeightSource::from_files(Vec::new()),
                };
                (config, weights, Tokenizer::from_dir(dir)?, dir.display().to_string())
            }
            ModelSource::Embedded(m) => {
                let config = ModelConfig::from_json(m.config_json, &format!("{}/config.json", m.name))
                    .map_err(Error::ModelLoad)?;
                let file = SafetensorsFile::from_static(format!("{}/model.safetensors", m.name), m.safetensors)
                    .map_err(Error::ModelLoad)?;
                let tokenizer = match m.tokenizer_json {
                    Some(t) => Some(Tokenizer::from_bytes(t, m.tokenizer_config_json, m.generation_config_json, None)?),
                    None => None,
                };
                (config, WeightSource::from_files(vec![file]), tokenizer, m.name.to_string())
            }
        };
        let block_size = self.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
        if block_size == 0 {
            return Err(Error::Config("block_size must be at least 1".into()));
        }
        let model_max = config.max_position_embeddings();
        if let Some(n) = self.max_model_len {
            if n == 0 || n > model_max {
                return Err(Error::Config(format!(
                    "max_model_len {n} must be between 1 and the model's max_position_embeddings {model_max}"
                )));
            }
        }
        let cache_spec = config.cache_spec();
        let bytes_per_block: usize = cache_spec.iter().map(|s| s.bytes_per_block(block_size)).sum();
        let wanted_len = self.max_model_len.unwrap_or(model_max);
        let wanted_blocks = wanted_len.div_ceil(block_size);
        if self.threads.count == Some(0) {
            return Err(Error::Config("threads must be at least 1".into()));
        }
        if let Some(max) = self.gpu_resident_moe_layers.max() {
            let n = config.num_hidden_layers();
            if max >= n {
                return Err(Error::Config(format!(
                    "gpu_resident_moe_layers names layer {max} but the model has {n} layers (0-{})",
                    n - 1
                )));
            }
        }
        let (backend, num_blocks, kv_limit, pool) = match self.device {
            Device::Cpu => {
                if self.moe_placement != MoePlacement::Auto {
                    return Err(Error::Config(format!(
                        "moe_placement {} needs a CUDA device; the CPU device runs everything on the CPU",
                        self.moe_placement
                    )));
                }
                if !self.gpu_resident_moe_layers.is_empty() {
                    return Err(Error::Config("gpu_resident_moe_layers needs a CUDA device".into()));
                }
                if self.load_format == LoadFormat::Dummy {
                    return Err(Error::Config("load_format dummy is built for the CUDA device only".into()));
                }
                let budget = self.kv_cache_bytes.unwrap_or(DEFAULT_KV_CACHE_BYTES);
                let num_blocks = wanted_blocks.min(budget / bytes_per_block.max(1));
                if num_blocks == 0 {
                    return Err(Error::Config(format!(
                        "the KV cache budget of {budget} bytes holds no block of {bytes_per_block} bytes"
                    )));
                }
                let pool = Arc::new(make_pool(&self.threads)?);
                let load = LoadOptions {
                    pool: pool.clone(),
                    experts: ExpertsOptions { weight: self.moe_weight, ..ExpertsOptions::default() },
                };
                let model = Model::load(&config, &weights, &load).map_err(Error::ModelLoad)?;
                let cache = ModelCache::new(&cache_spec, CacheConfig { block_size, num_blocks });
                let kv = format!("the KV cache budget of {budget} bytes");
                (Backend::Cpu { model, cache }, num_blocks, kv, Some(pool))
            }
            Device::Cuda(ordinal) => {
                if self.moe_weight == MoeWeight::Int4 && self.moe_placement == MoePlacement::Gpu {
                    return Err(Error::Config(
                        "moe_weight int4 is not built for the all-GPU placement yet; use moe_placement hybrid".into(),
                    ));
                }
                let util = self.gpu_memory_utilization.unwrap_or(DEFAULT_GPU_MEMORY_UTILIZATION);
                let (backend, n, pool) = cuda_backend(&CudaLoad {
                    ordinal,
                    config: &config,
                    weights: &weights,
                    dummy: self.load_format == LoadFormat::Dummy,
                    block_size,
                    utilization: util,
                    max_blocks: wanted_blocks,
                    kernel_cache_dir: self.kernel_cache_dir.as_deref(),
                    cuda_graphs: !self.eager,
                    placement: self.moe_placement,
                    resident: &self.gpu_resident_moe_layers,
                    threads: &self.threads,
                    moe_weight: self.moe_weight,
                })?;
                (backend, n, format!("gpu_memory_utilization {util}"), pool)
            }
        };
        let max_model_len = match self.max_model_len {
            Some(n) if n > num_blocks * block_size => {
                return Err(Error::Config(format!(
                    "max_model_len {n} needs {} KV blocks of {bytes_per_block} bytes but {kv_limit} holds {num_blocks}: lower max_model_len or raise the KV cache size",
                    n.div_ceil(block_size)
                )))
            }
            Some(n) => n,
            None => wanted_len.min(num_blocks * block_size),
        };
        let mut eos: Vec<u32> = config.eos_token_ids().to_vec();
        if let Some(t) = &tokenizer {
            eos.extend_from_slice(t.eos_token_ids());
        }
        eos.sort_unstable();
        eos.dedup();
        Ok(Engine {
            name,
            config,
            tokenizer,
            eos_token_ids: eos,
            max_model_len,
            block_size,
            device: self.device,
            runner: Mutex::new(Runner { backend, blocks: BlockAllocator::new(num_blocks), pool }),
        })
    }
}

/// Starts the CPU worker pool.
pub(crate) fn make_pool(threads: &ThreadOptions) -> Result<Pool> {
    let topology = Topology::detect().map_err(|e| Error::Config(format!("reading the CPU topology: {e}")))?;
    Pool::new(
        &topology,
        PoolOptions { threads: threads.count, binding: threads.binding, power_saving: threads.power_saving },
    )
    .map_err(|e| Error::Config(format!("starting the worker pool: {e}")))
}

/// What [`cuda_backend`] needs.
#[allow(dead_code)] // fields unused without the `cuda` feature
pub(crate) struct CudaLoad<'a> {
    pub ordinal: usize,
    pub config: &'a ModelConfig,
    pub weights: &'a WeightSource,
    pub dummy: bool,
    pub block_size: usize,
    pub utilization: f32,
    pub max_blocks: usize,
    pub kernel_cache_dir: Option<&'a Path>,
    pub cuda_graphs: bool,
    pub placement: MoePlacement,
    pub resident: &'a LayerSet,
    pub threads: &'a ThreadOptions,
    pub moe_weight: MoeWeight,
}

/// Bytes of every weight of a Qwen3-MoE model in bf16.
#[cfg(feature = "cuda")]
fn bf16_model_bytes(c: &lvllm_models::config::Qwen3MoeConfig) -> usize {
    let (h, hd) = (c.hidden_size, c.head_dim);
    let attn = h * hd * (2 * c.num_attention_heads + 2 * c.num_key_value_heads);
    let layers: usize = (0..c.num_hidden_layers)
        .map(|l| {
            attn + if c.is_moe_layer(l) {
                c.num_experts * h * (1 + 3 * c.moe_intermediate_size)
            } else {
                3 * h * c.intermediate_size
            }
        })
        .sum();
    let heads = if c.tie_word_embeddings { 1 } else { 2 };
    2 * (layers + heads * c.vocab_size * h)
}

/// Loads the model onto GPU `ordinal`: all experts in VRAM, or hybrid with the
/// routed experts on the CPU pool (resolving [`MoePlacement::Auto`] by whether the
/// whole model fits the memory budget).
#[cfg(feature = "cuda")]
pub(crate) fn cuda_backend(l: &CudaLoad<'_>) -> Result<(Backend, usize, Option<Arc<Pool>>)> {
    use lvllm_models::cuda_qwen3_moe::{CudaQwen3Moe, GpuWeights, HybridOptions, KvSizing};
    let device = Device::Cuda(l.ordinal);
    let gpu = lvllm_kernels_cuda::Gpu::new(l.ordinal, l.kernel_cache_dir)
        .map_err(|e| Error::Device { device, msg: e.to_string() })?;
    match l.config {
        ModelConfig::Qwen3Moe(c) => {
            let hybrid = match l.placement {
                MoePlacement::Gpu => false,
                MoePlacement::Hybrid => true,
                MoePlacement::Auto => {
                    let (_, total) = gpu.mem_info().map_err(|e| Error::Device { device, msg: e.to_string() })?;
                    // Room for the KV cache and workspaces besides the weights.
                    const HEADROOM: usize = 2 << 30;
                    l.moe_weight == MoeWeight::Int4
                        || bf16_model_bytes(c) + HEADROOM > (total as f64 * l.utilization as f64) as usize
                }
            };
            let hy = if hybrid {
                Some(HybridOptions {
                    pool: Arc::new(make_pool(l.threads)?),
                    experts: ExpertsOptions { weight: l.moe_weight, ..ExpertsOptions::default() },
                    gpu_resident_layers: l.resident.layers().to_vec(),
                })
            } else {
                None
            };
            let kv = KvSizing::MemoryFraction { utilization: l.utilization, max_blocks: l.max_blocks };
            let weights = if l.dummy { GpuWeights::Dummy { seed: 1 } } else { GpuWeights::Checkpoint(l.weights) };
            let m = CudaQwen3Moe::load(Arc::new(gpu), c, weights, l.block_size, kv, l.cuda_graphs, hy.as_ref())
                .map_err(Error::ModelLoad)?;
            let n = m.num_blocks();
            Ok((Backend::Cuda(Box::new(m)), n, hy.map(|h| h.pool)))
        }
        #[allow(unreachable_patterns)]
        _ => Err(Error::Device { device, msg: "this architecture has no CUDA path yet".into() }),
    }
}

/// Without the `cuda` feature there is no GPU path.
#[cfg(not(feature = "cuda"))]
pub(crate) fn cuda_backend(l: &CudaLoad<'_>) -> Result<(Backend, usize, Option<Arc<Pool>>)> {
    Err(Error::Device {
        device: Device::Cuda(l.ordinal),
        msg: "this build has no CUDA support; rebuild with `--features cuda` or use the CPU device".into(),
    })
}

/// Whether a CUDA device can be used by this build (driver, NVRTC, cuBLAS and a GPU present).
pub fn cuda_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        lvllm_kernels_cuda::check_libraries().is_ok()
    }
    #[cfg(not(feature = "cuda"))]
    false
}

/// Where the model runs (one per engine, so variant sizes do not matter).
#[allow(clippy::large_enum_variant)]
pub(crate) enum Backend {
    /// Everything on the CPU.
    Cpu { model: Model, cache: ModelCache },
    /// Everything on a GPU (the model owns its device KV cache).
    #[cfg(feature = "cuda")]
    Cuda(Box<lvllm_models::cuda_qwen3_moe::CudaQwen3Moe>),
}

impl Backend {
    /// Runs one forward batch.
    pub(crate) fn forward(&mut self, batch: &ForwardBatch<'_>) -> Result<Logits> {
        match self {
            Backend::Cpu { model, cache } => model.forward(batch, cache).map_err(Error::Inference),
            #[cfg(feature = "cuda")]
            Backend::Cuda(m) => m.forward(batch).map_err(Error::Inference),
        }
    }
}

pub(crate) struct Runner {
    pub(crate) backend: Backend,
    pub(crate) blocks: BlockAllocator,
    /// The pool computing CPU experts (CPU device, or hybrid placement).
    pub(crate) pool: Option<Arc<Pool>>,
}

/// A prompt: text, token ids, or chat messages for the chat template.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Raw text, tokenized with the tokenizer's special-token settings.
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
    /// OpenAI-style chat messages rendered by the chat template.
    Chat(ChatPrompt),
}

/// Chat messages and the template's options.
#[derive(Debug, Clone)]
pub struct ChatPrompt {
    /// JSON array of messages (`role`, `content`, ...).
    pub messages: serde_json::Value,
    /// OpenAI `tools`.
    pub tools: Option<serde_json::Value>,
    /// Extra template variables (`chat_template_kwargs`, e.g. `enable_thinking`).
    pub template_kwargs: serde_json::Map<String, serde_json::Value>,
}

impl Prompt {
    /// A chat prompt with default template options.
    pub fn chat(messages: serde_json::Value) -> Self {
        Prompt::Chat(ChatPrompt { messages, tools: None, template_kwargs: Default::default() })
    }
}

impl From<&str> for Prompt {
    fn from(s: &str) -> Self {
        Prompt::Text(s.to_string())
    }
}
impl From<String> for Prompt {
    fn from(s: String) -> Self {
        Prompt::Text(s)
    }
}
impl From<Vec<u32>> for Prompt {
    fn from(v: Vec<u32>) -> Self {
        Prompt::Tokens(v)
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token id or a stop string.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
}

/// New output of one streaming step.
#[derive(Debug, Clone)]
pub struct StreamDelta {
    /// The token generated in this step.
    pub token_id: u32,
    /// Text that became final in this step (may be empty).
    pub text: String,
    /// Logprobs of the token, when asked for.
    pub logprobs: Option<TokenLogprobs>,
    /// Set on the last delta.
    pub finish_reason: Option<FinishReason>,
}

/// Timing of a finished request.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct GenerationStats {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub generated_tokens: usize,
    /// Time of the prompt's forward pass.
    pub prefill_secs: f64,
    /// Time of the decode steps (every generated token after the first).
    pub decode_secs: f64,
}

impl GenerationStats {
    /// Decode tokens per second (tokens after the first ÷ decode time).
    pub fn decode_tokens_per_sec(&self) -> Option<f64> {
        let n = self.generated_tokens.saturating_sub(1);
        (n > 0 && self.decode_secs > 0.0).then(|| n as f64 / self.decode_secs)
    }
}

/// A finished request.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The prompt as token ids.
    pub prompt_token_ids: Vec<u32>,
    /// Generated ids (including a final stop/eos token).
    pub token_ids: Vec<u32>,
    /// Generated text (`None` without a tokenizer).
    pub text: Option<String>,
    /// Per generated token, when asked for.
    pub logprobs: Option<Vec<TokenLogprobs>>,
    /// Per prompt token (the first is `None`), when asked for.
    pub prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Timing.
    pub stats: GenerationStats,
}

/// A loaded model ready to generate. `Send + Sync`.
pub struct Engine {
    name: String,
    config: ModelConfig,
    tokenizer: Option<Tokenizer>,
    eos_token_ids: Vec<u32>,
    max_model_len: usize,
    block_size: usize,
    device: Device,
    runner: Mutex<Runner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.name)
            .field("max_model_len", &self.max_model_len)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Starts configuring an engine.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// Tokens per KV block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Vocabulary size of the model.
    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size()
    }

    /// The model runner, exclusively (a poisoned lock is recovered: the runner
    /// holds no invariant a panicking request could break half-way).
    pub(crate) fn lock_runner(&self) -> MutexGuard<'_, Runner> {
        self.runner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The model's name (its directory or embedded name).
    pub fn model_name(&self) -> &str {
        &self.name
    }

    /// The model's config.
    pub fn model_config(&self) -> &ModelConfig {
        &self.config
    }

    /// The tokenizer, if the model has one.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// The context limit (prompt + output tokens).
    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    /// The device the model runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// End-of-sequence ids (config and tokenizer).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Turns a prompt into token ids.
    pub fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let need_tok = || {
            self.tokenizer.as_ref().ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "model {} has no tokenizer.json: give the prompt as token ids",
                    self.name
                ))
            })
        };
        Ok(match prompt {
            Prompt::Tokens(ids) => ids.clone(),
            Prompt::Text(s) => need_tok()?.encode(s, true)?,
            Prompt::Chat(c) => {
                let tok = need_tok()?;
                let tmpl = tok
                    .chat_template()
                    .ok_or_else(|| Error::InvalidRequest(format!("model {} has no chat template", self.name)))?;
                let opts = ChatTemplateOptions {
                    add_generation_prompt: true,
                    tools: c.tools.as_ref(),
                    extra: c.template_kwargs.clone(),
                };
                let text = tmpl.apply(&c.messages, &opts)?;
                tok.encode(&text, false)?
            }
        })
    }

    /// Generates to the end and returns everything at once.
    pub fn generate(&self, prompt: impl Into<Prompt>, params: &SamplingParams) -> Result<Generation> {
        let mut s = self.stream(prompt, params)?;
        let mut token_ids = Vec::new();
        let mut text = String::new();
        let mut logprobs = params.logprobs.map(|_| Vec::new());
        let mut finish = FinishReason::Length;
        for d in s.by_ref() {
            let d = d?;
            token_ids.push(d.token_id);
            text.push_str(&d.text);
            if let (Some(v), Some(l)) = (logprobs.as_mut(), d.logprobs) {
                v.push(l);
            }
            if let Some(f) = d.finish_reason {
                finish = f;
            }
        }
        Ok(Generation {
            prompt_token_ids: s.prompt_token_ids.clone(),
            token_ids,
            text: self.tokenizer.is_some().then_some(text),
            logprobs,
            prompt_logprobs: s.prompt_logprobs.take(),
            finish_reason: finish,
            stats: s.stats,
        })
    }

    /// Starts a request and returns an iterator over its tokens. The prompt is
    /// processed here, so prompt errors surface at once; each `next()` yields one
    /// token. The request holds the model until the stream is dropped.
    pub fn stream(&self, prompt: impl Into<Prompt>, params: &SamplingParams) -> Result<GenerationStream<'_>> {
        params.validate()?;
        let prompt = prompt.into();
        let ids = self.tokenize(&prompt)?;
        if ids.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        let vocab = self.config.vocab_size();
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidRequest(format!("prompt token id {bad} is outside the vocabulary of {vocab}")));
        }
        if ids.len() >= self.max_model_len {
            return Err(Error::PromptTooLong { prompt_tokens: ids.len(), max_model_len: self.max_model_len });
        }
        let mut runner = self.runner.lock().unwrap_or_else(|e| e.into_inner());
        let max_new = params.max_tokens.min(self.max_model_len - ids.len());
        let block_size = self.block_size;
        // The last generated token is never fed back, so the cache holds at most
        // prompt + max_new - 1 positions.
        let need = (ids.len() + max_new - 1).div_ceil(block_size);
        let blocks = runner.blocks.allocate(need).ok_or_else(|| {
            Error::InvalidRequest(format!(
                "the KV cache has {} free blocks, this request needs {need}",
                runner.blocks.num_free()
            ))
        })?;
        let mut stream = GenerationStream {
            engine: self,
            runner,
            blocks,
            params: params.clone(),
            rng: params.seed.map(Rng::new).unwrap_or_else(Rng::from_entropy),
            decoder: self.tokenizer.as_ref().map(|t| t.incremental_decoder_after(&ids, params.skip_special_tokens)),
            prompt_token_ids: ids,
            prompt_logprobs: None,
            generated: 0,
            max_new,
            logits: Vec::new(),
            pending_text: String::new(),
            unfed: None,
            done: false,
            stats: GenerationStats::default(),
        };
        stream.prefill()?;
        Ok(stream)
    }
}

/// An active request; iterate it for [`StreamDelta`]s.
pub struct GenerationStream<'a> {
    engine: &'a Engine,
    runner: MutexGuard<'a, Runner>,
    blocks: Vec<u32>,
    params: SamplingParams,
    rng: Rng,
    decoder: Option<IncrementalDecoder<'a>>,
    prompt_token_ids: Vec<u32>,
    prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    generated: usize,
    max_new: usize,
    /// Logits of the next position.
    logits: Vec<f32>,
    /// Decoded text held back because it may be the start of a stop string.
    pending_text: String,
    /// The last sampled token, not yet fed through the model.
    unfed: Option<u32>,
    done: bool,
    stats: GenerationStats,
}

impl std::fmt::Debug for GenerationStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerationStream")
            .field("generated", &self.generated)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl GenerationStream<'_> {
    /// The prompt as token ids.
    pub fn prompt_token_ids(&self) -> &[u32] {
        &self.prompt_token_ids
    }

    /// Prompt logprobs, when asked for (the first position has none).
    pub fn prompt_logprobs(&self) -> Option<&[Option<TokenLogprobs>]> {
        self.prompt_logprobs.as_deref()
    }

    /// Timing so far.
    pub fn stats(&self) -> GenerationStats {
        self.stats
    }

    fn run(&mut self, tokens: &[u32], first_pos: usize, logits: LogitsSelection) -> Result<Logits> {
        let positions: Vec<usize> = (first_pos..first_pos + tokens.len()).collect();
        let seqs = [SeqSpan { len: tokens.len(), block_table: &self.blocks, state_slot: None }];
        let batch = ForwardBatch { tokens, positions: &positions, seqs: &seqs, logits };
        self.runner.backend.forward(&batch)
    }

    fn prefill(&mut self) -> Result<()> {
        let t0 = Instant::now();
        let ids = std::mem::take(&mut self.prompt_token_ids);
        let sel =
            if self.params.prompt_logprobs.is_some() { LogitsSelection::All } else { LogitsSelection::LastPerSeq };
        let out = self.run(&ids, 0, sel);
        self.prompt_token_ids = ids;
        let out = out?;
        if let Some(k) = self.params.prompt_logprobs {
            let mut v = vec![None];
            for i in 1..self.prompt_token_ids.len() {
                v.push(Some(sampling::logprobs_of(out.row(i - 1), self.prompt_token_ids[i], k)));
            }
            self.prompt_logprobs = Some(v);
        }
        self.logits = out.row(out.rows.len() - 1).to_vec();
        self.stats.prompt_tokens = self.prompt_token_ids.len();
        self.stats.prefill_secs = t0.elapsed().as_secs_f64();
        Ok(())
    }

    fn step(&mut self) -> Result<StreamDelta> {
        if let Some(tok) = self.unfed.take() {
            let t0 = Instant::now();
            let pos = self.prompt_token_ids.len() + self.generated - 1;
            let out = self.run(&[tok], pos, LogitsSelection::LastPerSeq)?;
            self.logits = out.data;
            self.stats.decode_secs += t0.elapsed().as_secs_f64();
        }
        let token = sampling::sample(&self.logits, &self.params, &mut self.rng);
        let logprobs = self.params.logprobs.map(|k| sampling::logprobs_of(&self.logits, token, k));
        self.generated += 1;
        self.stats.generated_tokens = self.generated;

        let mut finish = None;
        let is_eos = !self.params.ignore_eos && self.engine.eos_token_ids.contains(&token);
        if is_eos || self.params.stop_token_ids.contains(&token) {
            finish = Some(FinishReason::Stop);
        }
        let mut text = String::new();
        if let Some(dec) = self.decoder.as_mut() {
            self.pending_text.push_str(&dec.push(token)?);
            if finish.is_some() || self.generated == self.max_new {
                self.pending_text.push_str(&dec.finish()?);
            }
            if let Some(cut) = self.params.stop.iter().filter_map(|s| self.pending_text.find(s.as_str())).min() {
                self.pending_text.truncate(cut);
                finish = Some(FinishReason::Stop);
            }
        }
        if finish.is_none() && self.generated >= self.max_new {
            finish = Some(FinishReason::Length);
        }
        // Emit all text that can no longer become part of a stop string.
        let keep = if finish.is_some() { 0 } else { stop_prefix_len(&self.pending_text, &self.params.stop) };
        let emit = self.pending_text.len() - keep;
        text.push_str(&self.pending_text[..emit]);
        self.pending_text.drain(..emit);
        if finish.is_some() {
            self.done = true;
        } else {
            self.unfed = Some(token);
        }
        Ok(StreamDelta { token_id: token, text, logprobs, finish_reason: finish })
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of a stop string.
fn stop_prefix_len(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if i > best && text.ends_with(&s[..i]) {
                best = i;
            }
        }
    }
    best
}

impl Iterator for GenerationStream<'_> {
    type Item = Result<StreamDelta>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.step();
        if r.is_err() {
            self.done = true;
        }
        Some(r)
    }
}

impl Drop for GenerationStream<'_> {
    fn drop(&mut self) {
        let blocks = std::mem::take(&mut self.blocks);
        self.runner.blocks.release(&blocks);
    }
}

/// Measures wall time of a closure (for examples and the CLI).
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t0 = Instant::now();
    let r = f();
    (r, t0.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_prefix_holds_back_partial_matches() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(stop_prefix_len("hello EN", &stops), 2);
        assert_eq!(stop_prefix_len("hello E", &stops), 1);
        assert_eq!(stop_prefix_len("hello\n", &stops), 1);
        assert_eq!(stop_prefix_len("hello", &stops), 0);
    }

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn engine_is_send_sync() {
        assert_send_sync::<Engine>();
    }
}
