//! [`EngineBuilder`] and [`Engine`]: load a model, then submit requests from any
//! thread, blocking, streaming or with a callback.
//!
//! The engine owns a model-loop thread (the private `worker` module) that runs the
//! [`crate::scheduler`]: every step batches the running sequences (one decode
//! token each) with chunks of waiting prompts, so concurrent requests share
//! forward passes (continuous batching, chunked prefill, prefix caching,
//! preemption by recompute). [`Engine::submit`] returns a [`RequestHandle`];
//! [`Engine::submit_with`] calls a sink instead; [`Engine::stream`] and
//! [`Engine::generate`] are wrappers over `submit`.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::sync::Arc;

use lvllm_models::{
    CacheConfig, ForwardBatch, LoadOptions, Logits, Model, ModelCache, ModelConfig, SafetensorsFile, WeightSource,
};
pub use lvllm_moe::{ExpertsOptions, MoeWeight};
pub use lvllm_numa::Binding;
use lvllm_numa::{Pool, PoolOptions, Topology};
pub use lvllm_tensor::Device;

use crate::chat_template::ChatTemplateOptions;
use crate::kv::BlockAllocator;
use crate::placement::{LayerSet, LoadFormat, MoePlacement};
use crate::request::{EngineMetrics, RequestEvent, RequestHandle, RequestId};
use crate::sampling::{SamplingParams, TokenLogprobs};
use crate::scheduler::SchedulerConfig;
use crate::tokenizer::Tokenizer;
use crate::worker::{Command, Sink, Submission};
use crate::{Error, Result};

/// Tokens per KV block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// KV cache budget when none is given: enough for one sequence of
/// `max_model_len`, capped here so a large model's 40K context does not claim
/// gigabytes by default. `max_model_len` shrinks to what fits.
pub const DEFAULT_KV_CACHE_BYTES: usize = 2 << 30;

/// Fraction of GPU memory the CUDA path may use (weights + KV cache), as vLLM.
pub const DEFAULT_GPU_MEMORY_UTILIZATION: f32 = 0.9;

/// Most sequences running at once by default (vLLM's `max_num_seqs`).
pub const DEFAULT_MAX_NUM_SEQS: usize = 256;

/// Most tokens in one forward batch by default (vLLM's `max_num_batched_tokens`
/// with chunked prefill).
pub const DEFAULT_MAX_NUM_BATCHED_TOKENS: usize = 2048;

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
    max_num_seqs: Option<usize>,
    max_num_batched_tokens: Option<usize>,
    enable_prefix_caching: Option<bool>,
    load_progress: Option<ProgressHook>,
    chat_template: Option<String>,
}

/// A load-progress callback (Debug-printable for the builder).
#[derive(Clone)]
struct ProgressHook(lvllm_models::ProgressFn);

impl std::fmt::Debug for ProgressHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressHook")
    }
}

impl EngineBuilder {
    /// Uses `source` (Jinja) as the chat template instead of the model's (the
    /// server's `chat-template` setting). A model without a tokenizer cannot take one.
    pub fn chat_template(mut self, source: impl Into<String>) -> Self {
        self.chat_template = Some(source.into());
        self
    }

    /// Calls `f` while the model loads, each time a tensor of the checkpoint is
    /// taken (from the loading thread), with the tensors and bytes so far and
    /// the totals; for progress bars and log lines.
    pub fn on_load_progress(mut self, f: impl Fn(lvllm_models::LoadProgress) + Send + Sync + 'static) -> Self {
        self.load_progress = Some(ProgressHook(std::sync::Arc::new(f)));
        self
    }

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

    /// Most sequences running at once (default [`DEFAULT_MAX_NUM_SEQS`]).
    pub fn max_num_seqs(mut self, n: usize) -> Self {
        self.max_num_seqs = Some(n);
        self
    }

    /// Most tokens in one forward batch (default
    /// [`DEFAULT_MAX_NUM_BATCHED_TOKENS`]), at least `max_num_seqs`; longer
    /// prompts are prefilled in chunks.
    pub fn max_num_batched_tokens(mut self, n: usize) -> Self {
        self.max_num_batched_tokens = Some(n);
        self
    }

    /// Share the KV blocks of equal prompt prefixes between requests (default on).
    pub fn enable_prefix_caching(mut self, on: bool) -> Self {
        self.enable_prefix_caching = Some(on);
        self
    }

    fn with_progress(&self, w: WeightSource) -> WeightSource {
        match &self.load_progress {
            Some(h) => w.with_progress(h.0.clone()),
            None => w,
        }
    }

    /// Loads the model and tokenizer, sizes the KV cache and starts the model loop.
    pub fn build(mut self) -> Result<Engine> {
        let source = self
            .source
            .take()
            .ok_or_else(|| Error::Config("no model given: call .model(dir) or .embedded(..)".into()))?;
        let (config, weights, tokenizer, name) = match &source {
            ModelSource::Dir(dir) => {
                let path = dir.join("config.json");
                let bytes = std::fs::read(&path)
                    .map_err(|source| Error::ModelLoad(lvllm_models::Error::Io { path: path.clone(), source }))?;
                let config = ModelConfig::from_json(&bytes, &path.display().to_string()).map_err(Error::ModelLoad)?;
                let weights = match self.load_format {
                    LoadFormat::Auto => self.with_progress(WeightSource::from_dir(dir).map_err(Error::ModelLoad)?),
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
                (config, self.with_progress(WeightSource::from_files(vec![file])), tokenizer, m.name.to_string())
            }
        };
        let tokenizer = match (tokenizer, self.chat_template.as_deref()) {
            (t, None) => t,
            (Some(t), Some(source)) => Some(t.with_chat_template(source)?),
            (None, Some(_)) => {
                return Err(Error::Config(format!("a chat template was given but model {name} has no tokenizer.json")))
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
        let max_num_seqs = self.max_num_seqs.unwrap_or(DEFAULT_MAX_NUM_SEQS);
        let max_num_batched_tokens = self.max_num_batched_tokens.unwrap_or(DEFAULT_MAX_NUM_BATCHED_TOKENS);
        if max_num_seqs == 0 || max_num_batched_tokens == 0 {
            return Err(Error::Config("max_num_seqs and max_num_batched_tokens must be at least 1".into()));
        }
        if max_num_batched_tokens < max_num_seqs {
            // Otherwise the youngest running sequences could wait for a token
            // budget the older ones always use up (vLLM refuses this too).
            return Err(Error::Config(format!(
                "max_num_batched_tokens {max_num_batched_tokens} must be at least max_num_seqs {max_num_seqs}"
            )));
        }
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
        let shared = Arc::new(Shared {
            name,
            config,
            tokenizer,
            eos_token_ids: eos,
            max_model_len,
            block_size,
            device: self.device,
            scheduler: SchedulerConfig {
                max_num_seqs,
                max_num_batched_tokens,
                block_size,
                enable_prefix_caching: self.enable_prefix_caching.unwrap_or(true),
            },
        });
        let runner = Arc::new(Mutex::new(Runner { backend, blocks: BlockAllocator::new(num_blocks), pool }));
        let metrics = Arc::new(Mutex::new(EngineMetrics { kv_blocks_total: num_blocks, ..Default::default() }));
        let (commands, rx) = mpsc::channel();
        let thread = {
            let (shared, runner, metrics) = (shared.clone(), runner.clone(), metrics.clone());
            std::thread::Builder::new()
                .name("lvllm-model-loop".into())
                .spawn(move || crate::worker::model_loop(shared, runner, rx, metrics))
                .map_err(|e| Error::Config(format!("starting the model-loop thread: {e}")))?
        };
        Ok(Engine { shared, runner, commands, metrics, next_id: AtomicU64::new(0), thread: Some(thread) })
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
    /// From the request's first step to its first token (its prompt's forward
    /// passes, shared with other requests).
    pub prefill_secs: f64,
    /// Time of the decode steps (every generated token after the first).
    pub decode_secs: f64,
    /// Prompt tokens found in the prefix cache (not computed) when the request
    /// was first scheduled.
    pub cached_prompt_tokens: usize,
    /// Prompt tokens run through the model, recomputes after preemption included.
    pub computed_prompt_tokens: usize,
    /// Times the request was preempted (its cache dropped and recomputed).
    pub preemptions: usize,
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

/// A loaded model ready to generate. `Send + Sync`: requests are submitted from
/// any thread and run together on the engine's model-loop thread (started by
/// [`EngineBuilder::build`], stopped when the engine is dropped).
pub struct Engine {
    shared: Arc<Shared>,
    runner: Arc<Mutex<Runner>>,
    commands: mpsc::Sender<Command>,
    metrics: Arc<Mutex<EngineMetrics>>,
    next_id: AtomicU64,
    thread: Option<JoinHandle<()>>,
}

/// What the engine and its model loop both read.
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) config: ModelConfig,
    pub(crate) tokenizer: Option<Tokenizer>,
    pub(crate) eos_token_ids: Vec<u32>,
    pub(crate) max_model_len: usize,
    pub(crate) block_size: usize,
    pub(crate) device: Device,
    pub(crate) scheduler: SchedulerConfig,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.shared.name)
            .field("max_model_len", &self.shared.max_model_len)
            .field("scheduler", &self.shared.scheduler)
            .finish_non_exhaustive()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            // The last `Arc<Engine>` may be dropped by a sink on the model loop
            // itself: that thread then ends on the shutdown command, and joining
            // it from itself would fail.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Engine {
    /// Starts configuring an engine.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// Tokens per KV block.
    pub fn block_size(&self) -> usize {
        self.shared.block_size
    }

    /// Vocabulary size of the model.
    pub fn vocab_size(&self) -> usize {
        self.shared.config.vocab_size()
    }

    /// The model runner, exclusively (a poisoned lock is recovered: the runner
    /// holds no invariant a panicking request could break half-way). The model
    /// loop takes it for each step.
    pub(crate) fn lock_runner(&self) -> MutexGuard<'_, Runner> {
        self.runner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The model's name (its directory or embedded name).
    pub fn model_name(&self) -> &str {
        &self.shared.name
    }

    /// The model's config.
    pub fn model_config(&self) -> &ModelConfig {
        &self.shared.config
    }

    /// The tokenizer, if the model has one.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.shared.tokenizer.as_ref()
    }

    /// The context limit (prompt + output tokens).
    pub fn max_model_len(&self) -> usize {
        self.shared.max_model_len
    }

    /// The device the model runs on.
    pub fn device(&self) -> Device {
        self.shared.device
    }

    /// End-of-sequence ids (config and tokenizer).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.shared.eos_token_ids
    }

    /// The scheduler's limits.
    pub fn scheduler_config(&self) -> SchedulerConfig {
        self.shared.scheduler
    }

    /// Counters of the scheduler and the KV cache, as of the model loop's last
    /// step (for metrics endpoints and tests).
    pub fn metrics(&self) -> EngineMetrics {
        *self.metrics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Turns a prompt into token ids.
    pub fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let name = &self.shared.name;
        let need_tok = || {
            self.shared.tokenizer.as_ref().ok_or_else(|| {
                Error::InvalidRequest(format!("model {name} has no tokenizer.json: give the prompt as token ids"))
            })
        };
        Ok(match prompt {
            Prompt::Tokens(ids) => ids.clone(),
            Prompt::Text(s) => need_tok()?.encode(s, true)?,
            Prompt::Chat(c) => {
                let tok = need_tok()?;
                let tmpl = tok
                    .chat_template()
                    .ok_or_else(|| Error::InvalidRequest(format!("model {name} has no chat template")))?;
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

    /// Generates to the end and returns everything at once (blocks the calling
    /// thread; other requests keep running beside it).
    pub fn generate(&self, prompt: impl Into<Prompt>, params: &SamplingParams) -> Result<Generation> {
        let mut h = self.submit(prompt, params.clone())?;
        let mut token_ids = Vec::new();
        let mut text = String::new();
        let mut logprobs = params.logprobs.map(|_| Vec::new());
        let mut finish = FinishReason::Length;
        while let Some(d) = h.recv() {
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
            prompt_token_ids: h.prompt_token_ids().to_vec(),
            token_ids,
            text: self.shared.tokenizer.is_some().then_some(text),
            logprobs,
            prompt_logprobs: h.take_prompt_logprobs(),
            finish_reason: finish,
            stats: h.stats(),
        })
    }

    /// Starts a request and returns an iterator over its tokens, each `next()`
    /// blocking until the model loop produced the next one. Prompt and parameter
    /// errors surface here. Dropping the stream cancels the request.
    pub fn stream(&self, prompt: impl Into<Prompt>, params: &SamplingParams) -> Result<GenerationStream<'_>> {
        Ok(GenerationStream { handle: self.submit(prompt, params.clone())?, _engine: PhantomData })
    }

    /// Submits a request to the model loop and returns its handle, which
    /// receives the request's [`StreamDelta`]s and cancels it when dropped.
    /// Prompt and parameter errors are returned here, synchronously.
    pub fn submit(&self, prompt: impl Into<Prompt>, params: SamplingParams) -> Result<RequestHandle> {
        let prompt = self.tokenize(&prompt.into())?;
        let (tx, rx) = mpsc::channel();
        let ids = prompt.clone();
        let id = self.enqueue(prompt, params, Box::new(move |ev| tx.send(ev).is_ok()))?;
        Ok(RequestHandle::new(id, rx, self.commands.clone(), ids))
    }

    /// Submits a request whose events go to `sink`, called on the model-loop
    /// thread (keep it short: it delays every request); returning `false`, or
    /// panicking, cancels the request. For async servers that must not park a thread per
    /// request. The last event is [`RequestEvent::Finished`] or
    /// [`RequestEvent::Failed`]. Prompt and parameter errors are returned here;
    /// to know the prompt's token ids, [`tokenize`](Self::tokenize) first and
    /// submit [`Prompt::Tokens`].
    pub fn submit_with(
        &self,
        prompt: impl Into<Prompt>,
        params: SamplingParams,
        sink: impl FnMut(RequestEvent) -> bool + Send + 'static,
    ) -> Result<RequestId> {
        let prompt = self.tokenize(&prompt.into())?;
        self.enqueue(prompt, params, Box::new(sink))
    }

    /// Cancels a request submitted with [`submit_with`](Self::submit_with) (its
    /// blocks are freed at the model loop's next step; its sink hears nothing
    /// more). Unknown or finished requests are ignored. For a
    /// [`submit`](Self::submit) handle, use [`RequestHandle::cancel`] (or drop
    /// it): through this method its `recv` would end with `Error::Shutdown`.
    pub fn cancel(&self, id: RequestId) {
        let _ = self.commands.send(Command::Cancel(id.0));
    }

    fn enqueue(&self, prompt: Vec<u32>, params: SamplingParams, sink: Sink) -> Result<RequestId> {
        params.validate()?;
        if prompt.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        let vocab = self.shared.config.vocab_size();
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidRequest(format!("prompt token id {bad} is outside the vocabulary of {vocab}")));
        }
        let max_model_len = self.shared.max_model_len;
        if prompt.len() >= max_model_len {
            return Err(Error::PromptTooLong { prompt_tokens: prompt.len(), max_model_len });
        }
        let max_new = params.max_tokens.min(max_model_len - prompt.len());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let sub = Submission { id, prompt, params, max_new, sink };
        self.commands.send(Command::Submit(Box::new(sub))).map_err(|_| Error::Shutdown)?;
        Ok(RequestId(id))
    }
}

/// An active request borrowed from its engine; iterate it for [`StreamDelta`]s.
/// A thin wrapper over [`RequestHandle`].
#[derive(Debug)]
pub struct GenerationStream<'a> {
    handle: RequestHandle,
    _engine: PhantomData<&'a Engine>,
}

impl GenerationStream<'_> {
    /// The prompt as token ids.
    pub fn prompt_token_ids(&self) -> &[u32] {
        self.handle.prompt_token_ids()
    }

    /// Prompt logprobs, when asked for, once the prompt is computed (the first
    /// position has none).
    pub fn prompt_logprobs(&self) -> Option<&[Option<TokenLogprobs>]> {
        self.handle.prompt_logprobs()
    }

    /// Timing so far (complete once the stream has ended).
    pub fn stats(&self) -> GenerationStats {
        self.handle.stats()
    }

    /// The underlying handle.
    pub fn into_handle(self) -> RequestHandle {
        self.handle
    }
}

impl Iterator for GenerationStream<'_> {
    type Item = Result<StreamDelta>;

    fn next(&mut self) -> Option<Self::Item> {
        self.handle.recv()
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of a stop string.
pub(crate) fn stop_prefix_len(text: &str, stops: &[String]) -> usize {
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
