//! `lvllm serve` configuration: one typed [`ServeConfig`] built from, in order of
//! precedence, command-line flags > the seed's environment variables > the
//! `config.yaml` file > defaults.
//!
//! One table ([`SETTINGS`]) knows every setting: its canonical key, its seed
//! environment variable, its default and meaning. YAML keys and flags accept `-`
//! and `_` alike (`max-model-len` = `max_model_len`), dotted keys and nested maps
//! alike (`compilation_config.cudagraph_mode: X` = `compilation_config: {cudagraph_mode: X}`).
//!
//! Strictness (SPEC.md, "Server and configuration"):
//! - an unknown key is an error naming it (with the closest known key);
//! - an invalid value is an error naming key, value and source, never a silent default;
//! - a recognised vLLM key whose feature is not built is an error when it would
//!   change results or memory ([`NOT_BUILT`] lists why) and a warning, collected in
//!   [`ServeConfig::warnings`], when it is only a tuning hint for vLLM.
//!
//! This module reads no process state: the caller passes the environment as
//! pairs and the flags as strings, so tests are hermetic. The value types are
//! plain enums of this module, mapped onto the engine's builder by the binary.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use lvllm_engine::{Binding, LayerSet, LoadFormat, MoePlacement, MoeWeight};
use yaml_rust2::{Yaml, YamlLoader};

use crate::parsers::{ReasoningParserKind, ToolParserKind};

/// Errors of configuration loading.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A key no setting has.
    #[error("unknown setting `{key}` ({origin}){}", suggestion.as_ref().map(|s| format!("; did you mean `{s}`?")).unwrap_or_default())]
    UnknownKey {
        /// The key as written.
        key: String,
        /// Where it was written.
        origin: Origin,
        /// The closest known key, if one is close.
        suggestion: Option<String>,
    },
    /// A value that does not parse as the setting's type.
    #[error("invalid value `{value}` for `{key}` ({origin}): expected {expected}")]
    InvalidValue {
        /// The key as written.
        key: String,
        /// The value as written.
        value: String,
        /// What the setting accepts.
        expected: String,
        /// Where it was written.
        origin: Origin,
    },
    /// A recognised setting whose feature is not built yet, with a value that
    /// would change results or memory.
    #[error("`{key}` = `{value}` ({origin}) is not supported yet: {reason}")]
    NotBuilt {
        /// The key as written.
        key: String,
        /// The value as written.
        value: String,
        /// Why it cannot be honoured.
        reason: String,
        /// Where it was written.
        origin: Origin,
    },
    /// The same setting twice in one source (e.g. `max-model-len` and `max_model_len`).
    #[error("setting `{key}` is given twice ({origin}): `{first}` and `{second}`")]
    Duplicate {
        /// The canonical key.
        key: String,
        /// The first spelling.
        first: String,
        /// The second spelling.
        second: String,
        /// Where.
        origin: Origin,
    },
    /// The config file is not valid YAML or not a mapping.
    #[error("config file: {0}")]
    Yaml(String),
    /// A command-line argument that is not `--key value`, `--key=value` or `--flag`.
    #[error("command line: {0}")]
    Cli(String),
    /// The config file could not be read.
    #[error("cannot read config file {path}: {message}")]
    Io {
        /// The path given with `--config`.
        path: PathBuf,
        /// The OS error.
        message: String,
    },
}

/// Where a setting's value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Built-in default.
    Default,
    /// The config file.
    File,
    /// An environment variable (its name).
    Env(String),
    /// A command-line flag.
    Cli,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File => f.write_str("config file"),
            Origin::Env(name) => write!(f, "environment variable {name}"),
            Origin::Cli => f.write_str("command line"),
        }
    }
}

/// Compute dtype of the dense parts (`dtype`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Dtype {
    /// The checkpoint's dtype (bf16 for FP8 checkpoints).
    #[default]
    Auto,
    /// bfloat16.
    Bfloat16,
    /// float16.
    Float16,
}

/// CUDA-graph use (`compilation_config.cudagraph_mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CudaGraphMode {
    /// Decode steps are captured and replayed as full graphs (lvllm's only mode).
    #[default]
    FullDecodeOnly,
    /// No graphs: every step runs eagerly.
    None,
}

/// The typed server configuration. Field docs give the key; [`SETTINGS`] gives
/// env vars and defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct ServeConfig {
    /// `model`: the model directory (or the single positional argument).
    pub model: Option<String>,
    /// `host`: address to bind.
    pub host: String,
    /// `port`: port to bind.
    pub port: u16,
    /// `served-model-name`: the name in `/v1/models` and responses (default: `model`).
    pub served_model_name: Option<String>,
    /// `max-model-len`: context limit in tokens (default: the model's).
    pub max_model_len: Option<usize>,
    /// `max-num-seqs`: concurrent sequences (default: the engine's).
    pub max_num_seqs: Option<usize>,
    /// `max-num-batched-tokens`: tokens per scheduler step (default: the engine's).
    pub max_num_batched_tokens: Option<usize>,
    /// `gpu-memory-utilization`: fraction of GPU memory for weights and KV cache.
    pub gpu_memory_utilization: f32,
    /// `dtype`: compute dtype of the dense parts.
    pub dtype: Dtype,
    /// `enable-prefix-caching`.
    pub enable_prefix_caching: bool,
    /// `enable-chunked-prefill`.
    pub enable_chunked_prefill: bool,
    /// `tool-call-parser`.
    pub tool_call_parser: Option<ToolParserKind>,
    /// `reasoning-parser`.
    pub reasoning_parser: Option<ReasoningParserKind>,
    /// `enable-auto-tool-choice`: parse tool calls when `tool_choice` is `auto`.
    pub enable_auto_tool_choice: bool,
    /// `compilation-config.cudagraph-mode`.
    pub cudagraph_mode: CudaGraphMode,
    /// `enforce-eager`: no CUDA graphs.
    pub enforce_eager: bool,
    /// `api-key`: required bearer token, if set.
    pub api_key: Option<String>,
    /// `max-queue-len`: waiting requests before new ones are rejected (default: unbounded).
    pub max_queue_len: Option<usize>,
    /// `chat-template`: a Jinja file overriding the model's template.
    pub chat_template: Option<String>,
    /// `load-format`.
    pub load_format: LoadFormat,
    /// `moe-placement`.
    pub moe_placement: MoePlacement,
    /// `thread-binding`.
    pub thread_binding: Binding,
    /// `threads`: expert worker threads (default: physical cores − 4, ÷ GPU processes).
    pub threads: Option<usize>,
    /// `moe-weight`.
    pub moe_weight: MoeWeight,
    /// `gpu-resident-moe-layers`.
    pub gpu_resident_moe_layers: LayerSet,
    /// `gpu-prefetch-window`: layer buffers in the GPU-prefill ring.
    pub gpu_prefetch_window: usize,
    /// `gpu-prefill-min-tokens`: prefill chunks this long run on the GPU (0 = off).
    pub gpu_prefill_min_tokens: usize,
    /// `power-saving`: idle workers sleep instead of spinning.
    pub power_saving: bool,
    /// `numa-interleave`: interleave weight pages across NUMA nodes at load.
    pub numa_interleave: bool,
    /// `moe-quant-on-gpu`: do load-time int4 quantization on the GPU.
    pub moe_quant_on_gpu: bool,
    /// Warnings about settings accepted but ignored, for the log.
    pub warnings: Vec<String>,
}

/// How a setting is typed (drives `--flag` handling and the README table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettingKind {
    /// `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`); a bare `--flag` is `true`.
    Bool,
    /// A non-negative integer.
    Int,
    /// A decimal number.
    Float,
    /// Free text.
    Text,
    /// One of a fixed list.
    Choice,
    /// A layer set (`0-5`, `0,1,8-9`).
    Layers,
    /// Accepted only to be reported (not built, or ignored).
    Any,
}

/// One row of the settings table.
#[derive(Clone, Copy, Debug)]
pub struct Setting {
    /// Canonical key, `-` spelling (YAML key and `--flag`).
    pub key: &'static str,
    /// The seed's environment variable, if any.
    pub env: Option<&'static str>,
    /// Value type.
    pub kind: SettingKind,
    /// Default, as text for the docs.
    pub default: &'static str,
    /// Meaning (one line).
    pub doc: &'static str,
}

const fn s(
    key: &'static str,
    env: Option<&'static str>,
    kind: SettingKind,
    default: &'static str,
    doc: &'static str,
) -> Setting {
    Setting { key, env, kind, default, doc }
}

use SettingKind as K;

/// Every setting, in README order.
pub const SETTINGS: &[Setting] = &[
    s("model", None, K::Text, "—", "model directory (HF safetensors); also the one positional argument"),
    s("host", None, K::Text, "127.0.0.1", "address to bind"),
    s("port", None, K::Int, "8000", "port to bind (0: any free port, printed at start)"),
    s("served-model-name", None, K::Text, "`model`", "model name in `/v1/models` and responses"),
    s("max-model-len", None, K::Int, "model's", "context limit in tokens; longer prompts are rejected"),
    s("max-num-seqs", None, K::Int, "engine's", "concurrent sequences"),
    s("max-num-batched-tokens", None, K::Int, "engine's", "tokens per scheduler step (chunked prefill size)"),
    s("gpu-memory-utilization", None, K::Float, "0.9", "fraction of GPU memory for weights and KV cache"),
    s("dtype", None, K::Choice, "auto", "dense compute dtype: `auto` · `bfloat16` · `float16`"),
    s("kv-cache-dtype", None, K::Choice, "auto", "KV cache dtype: `auto` (model dtype); `fp8` is not built yet"),
    s("enable-prefix-caching", None, K::Bool, "true", "reuse KV pages of shared prompt prefixes"),
    s("enable-chunked-prefill", None, K::Bool, "true", "split long prompts into chunks"),
    s("tensor-parallel-size", None, K::Int, "1", "GPUs per model; > 1 is not built yet"),
    s("pipeline-parallel-size", None, K::Int, "1", "pipeline stages; > 1 is not built yet"),
    s("data-parallel-size", None, K::Int, "1", "model replicas; > 1 is not built yet"),
    s("enable-expert-parallel", None, K::Bool, "false", "expert parallelism; `true` is not built yet"),
    s(
        "tool-call-parser",
        None,
        K::Choice,
        "none",
        "`qwen3_coder` · `glm45` · `glm47` · `minimax_m2` · `kimi_k2` · `hermes` (Qwen3-MoE)",
    ),
    s(
        "reasoning-parser",
        None,
        K::Choice,
        "none",
        "`qwen3` · `deepseek_r1` · `glm45` · `minimax_m2` · `minimax_m2_append_think` · `kimi_k2`",
    ),
    s("enable-auto-tool-choice", None, K::Bool, "false", "parse tool calls for `tool_choice: auto`"),
    s(
        "compilation-config.cudagraph-mode",
        None,
        K::Choice,
        "FULL_DECODE_ONLY",
        "`FULL_DECODE_ONLY` (decode steps as CUDA graphs) · `NONE` (eager); other vLLM modes warn",
    ),
    s("compilation-config.mode", None, K::Any, "—", "vLLM torch.compile level: accepted, ignored (warning)"),
    s("enforce-eager", None, K::Bool, "false", "no CUDA graphs"),
    s("api-key", None, K::Text, "none", "require `Authorization: Bearer KEY`"),
    s("max-queue-len", None, K::Int, "unbounded", "waiting requests before new ones get HTTP 429"),
    s("chat-template", None, K::Text, "model's", "Jinja chat template file overriding the model's"),
    s("load-format", None, K::Choice, "auto", "`auto` · `safetensors` · `dummy` (random weights)"),
    s("speculative-config", None, K::Any, "—", "speculative decoding: not built yet (error)"),
    s("hf-overrides", None, K::Any, "—", "model config overrides: not built yet (error)"),
    s("swap-space", None, K::Any, "—", "vLLM CPU swap: accepted, ignored (warning)"),
    s("tokenizer-mode", None, K::Any, "—", "vLLM tokenizer mode: accepted, ignored (warning)"),
    s("trust-remote-code", None, K::Any, "—", "no Python code runs here: accepted, ignored (warning)"),
    s("disable-log-requests", None, K::Any, "—", "accepted, ignored (warning)"),
    s("disable-log-stats", None, K::Any, "—", "accepted, ignored (warning)"),
    s("disable-cascade-attn", None, K::Any, "—", "accepted, ignored (warning)"),
    s("mm-encoder-tp-mode", None, K::Any, "—", "accepted, ignored (warning)"),
    s(
        "moe-placement",
        Some("LVLLM_MOE_NUMA_ENABLED"),
        K::Choice,
        "auto",
        "`auto` · `hybrid` (env `1`) · `gpu` (env `0`): where routed experts live",
    ),
    s(
        "thread-binding",
        Some("LK_THREAD_BINDING"),
        K::Choice,
        "cpu_core",
        "`cpu_core` (env `CPU_CORE`) · `numa_node` (env `NUMA_NODE`)",
    ),
    s("threads", Some("LK_THREADS"), K::Int, "physical cores − 4", "expert worker threads (÷ GPU processes)"),
    s(
        "moe-weight",
        Some("LVLLM_MOE_USE_WEIGHT"),
        K::Choice,
        "to_dtype",
        "routed-expert runtime format: `to_dtype` · `keep` · `int4` (env `TO_DTYPE`/`KEEP`/`INT4`)",
    ),
    s(
        "gpu-resident-moe-layers",
        Some("LVLLM_GPU_RESIDENT_MOE_LAYERS"),
        K::Layers,
        "empty",
        "hybrid placement: decoder layers whose experts stay in VRAM (`0-5`, `0,1,8-9`; absolute indices)",
    ),
    s(
        "gpu-prefetch-window",
        Some("LVLLM_GPU_PREFETCH_WINDOW"),
        K::Int,
        "1",
        "GPU-prefill ring of layer buffers; no effect until GPU prefill is built (warning)",
    ),
    s(
        "gpu-prefill-min-tokens",
        Some("LVLLM_GPU_PREFILL_MIN_BATCH_SIZE"),
        K::Int,
        "0",
        "prefill chunks of at least N tokens run on the GPU, 0 = off; > 0 not built yet",
    ),
    s("power-saving", Some("LK_POWER_SAVING"), K::Bool, "false", "idle workers sleep instead of spinning"),
    s(
        "numa-interleave",
        Some("LVLLM_ENABLE_NUMA_INTERLEAVE"),
        K::Bool,
        "false",
        "interleave pages across NUMA nodes while loading; `true` not built yet",
    ),
    s(
        "moe-quant-on-gpu",
        Some("LVLLM_MOE_QUANT_ON_GPU"),
        K::Bool,
        "false",
        "int4 quantization at load on the GPU; quantization runs on the CPU for now (warning)",
    ),
];

/// Settings that are only tuning hints for vLLM: accepted with a warning.
const IGNORED: &[(&str, &str)] = &[
    ("compilation-config.mode", "lvllm has no torch.compile; CUDA graphs are set by cudagraph_mode"),
    ("swap-space", "lvllm does not swap KV cache to CPU"),
    ("tokenizer-mode", "lvllm always uses the model's tokenizer.json (or tiktoken model)"),
    ("trust-remote-code", "lvllm runs no Python code from the model directory"),
    ("disable-log-requests", "request logging is controlled by RUST_LOG"),
    ("disable-log-stats", "stats logging is controlled by RUST_LOG"),
    ("disable-cascade-attn", "lvllm has no cascade attention"),
    ("mm-encoder-tp-mode", "vision models are not built yet and there is no tensor parallelism"),
];

/// Why each not-built setting is an error (the value that triggers it is in `check_not_built`).
pub const NOT_BUILT: &[(&str, &str)] = &[
    ("tensor-parallel-size", "tensor parallelism is not built; lvllm uses one GPU (set 1)"),
    ("pipeline-parallel-size", "pipeline parallelism is not built (set 1)"),
    ("data-parallel-size", "data parallelism is not built (set 1)"),
    ("enable-expert-parallel", "expert parallelism is not built (set false)"),
    ("kv-cache-dtype", "an fp8 KV cache is not built; it would change memory use and results (use auto)"),
    ("speculative-config", "speculative decoding is not built; remove the setting"),
    ("hf-overrides", "overriding the model's config.json is not built; edit config.json instead"),
    ("gpu-prefill-min-tokens", "GPU prefill is not built; set 0"),
    ("numa-interleave", "NUMA-interleaved loading is not built; set false (memory is placed per node)"),
];

/// Prefixes of dotted keys that are whole sub-configs: any sub-key is accepted
/// and reported with the parent key's rule.
const GROUPS: &[&str] = &["compilation-config", "speculative-config", "hf-overrides"];

/// Env vars with a setting, and how the seed spells values.
fn env_value(var: &str, value: &str) -> String {
    let v = value.trim();
    match (var, v) {
        ("LVLLM_MOE_NUMA_ENABLED", "1") => "hybrid".into(),
        ("LVLLM_MOE_NUMA_ENABLED", "0") => "gpu".into(),
        _ => v.to_string(),
    }
}

/// Normalizes a key: `_` → `-`, each dotted part trimmed.
fn normalize(key: &str) -> String {
    key.trim().trim_start_matches("--").split('.').map(|p| p.trim().replace('_', "-")).collect::<Vec<_>>().join(".")
}

fn find_setting(key: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.key == key)
}

/// The known setting a normalized key belongs to (group members map to their group key).
fn resolve(key: &str) -> Option<&'static str> {
    if let Some(s) = find_setting(key) {
        return Some(s.key);
    }
    let head = key.split('.').next().unwrap_or(key);
    if head == "compilation-config" {
        // Other compilation_config sub-keys, or a bare level (`compilation_config: 3`),
        // are vLLM tuning knobs.
        return Some("compilation-config.mode");
    }
    GROUPS.iter().find(|g| **g == head && **g != "compilation-config").copied()
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn suggest(key: &str) -> Option<String> {
    SETTINGS
        .iter()
        .map(|s| (levenshtein(key, s.key), s.key))
        .filter(|(d, k)| *d <= 3.max(k.len() / 4))
        .min()
        .map(|(_, k)| k.to_string())
}

/// One value given for a setting.
#[derive(Clone, Debug)]
struct Given {
    spelled: String,
    value: String,
    origin: Origin,
}

/// Values of one source, by canonical key.
#[derive(Default)]
struct Layer(BTreeMap<String, Given>);

impl Layer {
    fn insert(&mut self, spelled: &str, value: String, origin: Origin) -> Result<(), ConfigError> {
        let norm = normalize(spelled);
        // A whole sub-config given as a JSON object string (vLLM accepts this on
        // the command line): expand it into dotted keys.
        if GROUPS.contains(&norm.as_str()) {
            if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(&value) {
                for (k, v) in map {
                    let text = match v {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    self.insert(&format!("{spelled}.{k}"), text, origin.clone())?;
                }
                return Ok(());
            }
        }
        let Some(canon) = resolve(&norm) else {
            return Err(ConfigError::UnknownKey { key: spelled.to_string(), origin, suggestion: suggest(&norm) });
        };
        // Group members keep their own key so each is reported.
        let slot = if find_setting(&norm).is_some() { canon.to_string() } else { norm.clone() };
        if let Some(prev) = self.0.get(&slot) {
            return Err(ConfigError::Duplicate {
                key: slot,
                first: prev.spelled.clone(),
                second: spelled.to_string(),
                origin,
            });
        }
        self.0.insert(slot, Given { spelled: spelled.to_string(), value, origin });
        Ok(())
    }
}

fn yaml_scalar(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        Yaml::Null => Some(String::new()),
        _ => None,
    }
}

fn yaml_key(y: &Yaml) -> Option<String> {
    yaml_scalar(y).filter(|k| !k.is_empty())
}

fn flatten_yaml(prefix: &str, hash: &yaml_rust2::yaml::Hash, layer: &mut Layer) -> Result<(), ConfigError> {
    for (k, v) in hash {
        let Some(key) = yaml_key(k) else {
            return Err(ConfigError::Yaml(format!("a key must be a plain name, found {k:?}")));
        };
        let full = if prefix.is_empty() { key } else { format!("{prefix}.{key}") };
        match v {
            Yaml::Hash(inner) => flatten_yaml(&full, inner, layer)?,
            other => match yaml_scalar(other) {
                Some(text) => layer.insert(&full, text, Origin::File)?,
                None => {
                    let norm = normalize(&full);
                    // Lists are only meaningful for keys reported anyway (e.g. not built).
                    if resolve(&norm).is_none() {
                        return Err(ConfigError::UnknownKey {
                            key: full.clone(),
                            origin: Origin::File,
                            suggestion: suggest(&norm),
                        });
                    }
                    return Err(ConfigError::InvalidValue {
                        key: full,
                        value: format!("{other:?}"),
                        expected: "a single value".into(),
                        origin: Origin::File,
                    });
                }
            },
        }
    }
    Ok(())
}

fn yaml_layer(text: &str) -> Result<Layer, ConfigError> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| ConfigError::Yaml(e.to_string()))?;
    let mut layer = Layer::default();
    match docs.as_slice() {
        [] => Ok(layer),
        [Yaml::Hash(h)] => {
            flatten_yaml("", h, &mut layer)?;
            Ok(layer)
        }
        [Yaml::Null] => Ok(layer),
        [_] => Err(ConfigError::Yaml("the file must be a mapping of `key: value` lines".into())),
        _ => Err(ConfigError::Yaml("the file must hold one YAML document".into())),
    }
}

/// Arguments of `lvllm serve` after the subcommand, split into flags.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CliArgs {
    /// `--config PATH`.
    pub config: Option<PathBuf>,
    /// `--key value`, `--key=value` (value `Some`) and bare `--flag` (value `None`).
    pub flags: Vec<(String, Option<String>)>,
    /// Positional arguments (at most one: the model).
    pub positional: Vec<String>,
}

fn is_bool_word(s: &str) -> bool {
    parse_bool(s).is_some()
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

impl CliArgs {
    /// Splits `--key value`, `--key=value` and bare `--flag` (boolean settings
    /// only; a boolean flag takes the next argument only when it is a boolean word).
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<CliArgs, ConfigError> {
        let mut out = CliArgs::default();
        let mut i = 0;
        while i < args.len() {
            let arg = args[i].as_ref();
            i += 1;
            let Some(body) = arg.strip_prefix("--") else {
                if arg.starts_with('-') && arg.len() > 1 {
                    return Err(ConfigError::Cli(format!("`{arg}`: use the long form `--key value`")));
                }
                out.positional.push(arg.to_string());
                continue;
            };
            let (key, inline) = match body.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (body.to_string(), None),
            };
            if key.is_empty() {
                return Err(ConfigError::Cli("`--` without a key".into()));
            }
            let norm = normalize(&key);
            let is_bool = resolve(&norm).and_then(find_setting).is_some_and(|s| s.kind == SettingKind::Bool);
            let value = match inline {
                Some(v) => Some(v),
                None if is_bool => match args.get(i).map(AsRef::as_ref) {
                    Some(next) if is_bool_word(next) => {
                        i += 1;
                        Some(next.to_string())
                    }
                    _ => None,
                },
                None => match args.get(i).map(AsRef::as_ref) {
                    Some(next) if !next.starts_with("--") => {
                        i += 1;
                        Some(next.to_string())
                    }
                    _ => None,
                },
            };
            if norm == "config" {
                let path = value.ok_or_else(|| ConfigError::Cli("`--config` needs a file path".into()))?;
                out.config = Some(PathBuf::from(path));
            } else {
                out.flags.push((key, value));
            }
        }
        if out.positional.len() > 1 {
            return Err(ConfigError::Cli(format!(
                "one positional argument (the model) is accepted, got {:?}",
                out.positional
            )));
        }
        Ok(out)
    }
}

/// The merged, not yet typed settings: highest-precedence value per key.
struct Merged {
    values: BTreeMap<String, Given>,
}

impl Merged {
    fn get(&self, key: &str) -> Option<&Given> {
        self.values.get(key)
    }

    fn invalid(g: &Given, expected: &str) -> ConfigError {
        ConfigError::InvalidValue {
            key: g.spelled.clone(),
            value: g.value.clone(),
            expected: expected.to_string(),
            origin: g.origin.clone(),
        }
    }

    fn text(&self, key: &str) -> Option<String> {
        self.get(key).map(|g| g.value.clone()).filter(|v| !v.is_empty())
    }

    fn boolean(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(g) => parse_bool(&g.value).ok_or_else(|| Self::invalid(g, "true or false")),
        }
    }

    fn int(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(g) => {
                g.value.trim().parse::<usize>().map(Some).map_err(|_| Self::invalid(g, "a non-negative integer"))
            }
        }
    }

    fn positive(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        let Some(g) = self.get(key) else { return Ok(None) };
        match g.value.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(Self::invalid(g, "an integer of at least 1")),
        }
    }

    fn choice<T: Copy>(&self, key: &str, default: T, options: &[(&str, T)]) -> Result<T, ConfigError> {
        let Some(g) = self.get(key) else { return Ok(default) };
        let v = g.value.trim().to_ascii_lowercase().replace('-', "_");
        options.iter().find(|(n, _)| *n == v).map(|(_, t)| *t).ok_or_else(|| {
            let mut names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            names.dedup();
            Self::invalid(g, &format!("one of {}", names.join(", ")))
        })
    }
}

fn not_built(g: &Given, key: &str) -> ConfigError {
    let reason = NOT_BUILT.iter().find(|(k, _)| *k == key).map_or("not built yet", |(_, r)| r);
    ConfigError::NotBuilt {
        key: g.spelled.clone(),
        value: g.value.clone(),
        reason: reason.to_string(),
        origin: g.origin.clone(),
    }
}

impl ServeConfig {
    /// Builds the configuration from the three sources; see the module docs.
    ///
    /// `yaml` is the config file's text, `env` the process environment (only the
    /// seed's variables are read, others are ignored; an empty value counts as
    /// unset), `cli` the flags from [`CliArgs::parse`].
    pub fn from_sources<K: AsRef<str>, V: AsRef<str>>(
        yaml: Option<&str>,
        env: impl IntoIterator<Item = (K, V)>,
        cli: &CliArgs,
    ) -> Result<ServeConfig, ConfigError> {
        let file = match yaml {
            Some(text) => yaml_layer(text)?,
            None => Layer::default(),
        };
        let mut env_layer = Layer::default();
        let mut omp: Option<String> = None;
        for (k, v) in env {
            let (k, v) = (k.as_ref(), v.as_ref());
            if k == "OMP_NUM_THREADS" {
                omp = Some(v.trim().to_string()).filter(|v| !v.is_empty());
                continue;
            }
            let Some(setting) = SETTINGS.iter().find(|s| s.env == Some(k)) else { continue };
            if v.trim().is_empty() {
                continue;
            }
            // Errors name the variable as written.
            let given = Given { spelled: k.to_string(), value: env_value(k, v), origin: Origin::Env(k.to_string()) };
            env_layer.0.insert(setting.key.to_string(), given);
        }
        let mut cli_layer = Layer::default();
        if let Some(model) = cli.positional.first() {
            cli_layer.insert("model", model.clone(), Origin::Cli)?;
        }
        for (k, v) in &cli.flags {
            let norm = normalize(k);
            let value = match v {
                Some(v) => v.clone(),
                None => {
                    let is_bool = resolve(&norm).and_then(find_setting).is_some_and(|s| s.kind == SettingKind::Bool);
                    if resolve(&norm).is_some() && !is_bool {
                        return Err(ConfigError::Cli(format!("`--{k}` needs a value")));
                    }
                    "true".to_string()
                }
            };
            cli_layer.insert(&format!("--{}", k.trim_start_matches("--")), value, Origin::Cli)?;
        }
        let mut values = file.0;
        values.extend(env_layer.0);
        values.extend(cli_layer.0);
        let merged = Merged { values };
        let mut cfg = Self::build(&merged)?;
        if let Some(omp) = omp {
            if cfg.threads.map(|t| t.to_string()) != Some(omp.clone()) {
                let threads = cfg.threads.map_or("the default".to_string(), |t| t.to_string());
                cfg.warnings.push(format!(
                    "OMP_NUM_THREADS={omp} is ignored: lvllm uses no OpenMP; expert workers = threads ({threads})"
                ));
            }
        }
        Ok(cfg)
    }

    /// Parses `lvllm serve` arguments, reads `--config` (the only file access) and
    /// builds the configuration with the given environment.
    pub fn load<S: AsRef<str>, K: AsRef<str>, V: AsRef<str>>(
        args: &[S],
        env: impl IntoIterator<Item = (K, V)>,
    ) -> Result<ServeConfig, ConfigError> {
        let cli = CliArgs::parse(args)?;
        let text = match &cli.config {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::Io { path: path.clone(), message: e.to_string() })?,
            ),
            None => None,
        };
        Self::from_sources(text.as_deref(), env, &cli)
    }

    fn build(m: &Merged) -> Result<ServeConfig, ConfigError> {
        let mut warnings = Vec::new();
        // Reports first: not-built errors, then ignored tuning hints.
        for (key, g) in &m.values {
            let head = key.split('.').next().unwrap_or(key);
            if head == "speculative-config" || head == "hf-overrides" {
                return Err(not_built(g, head));
            }
            if let Some((_, why)) = IGNORED.iter().find(|(k, _)| k == key) {
                warnings.push(format!("`{}` ({}) is ignored: {why}", g.spelled, g.origin));
            } else if head == "compilation-config" && key != "compilation-config.cudagraph-mode" {
                warnings.push(format!("`{}` ({}) is ignored: not a setting of lvllm", g.spelled, g.origin));
            }
        }
        for key in ["tensor-parallel-size", "pipeline-parallel-size", "data-parallel-size"] {
            if let Some(n) = m.positive(key)? {
                if n > 1 {
                    if let Some(g) = m.get(key) {
                        return Err(not_built(g, key));
                    }
                }
            }
        }
        if m.boolean("enable-expert-parallel", false)? {
            if let Some(g) = m.get("enable-expert-parallel") {
                return Err(not_built(g, "enable-expert-parallel"));
            }
        }
        #[derive(Clone, Copy, PartialEq)]
        enum Kv {
            Auto,
            Fp8,
        }
        let kv = m.choice(
            "kv-cache-dtype",
            Kv::Auto,
            &[
                ("auto", Kv::Auto),
                ("bfloat16", Kv::Auto),
                ("bf16", Kv::Auto),
                ("fp8", Kv::Fp8),
                ("fp8_e4m3", Kv::Fp8),
                ("fp8_e5m2", Kv::Fp8),
            ],
        )?;
        if kv == Kv::Fp8 {
            if let Some(g) = m.get("kv-cache-dtype") {
                return Err(not_built(g, "kv-cache-dtype"));
            }
        }

        let gpu_resident_moe_layers = match m.get("gpu-resident-moe-layers") {
            None => LayerSet::empty(),
            Some(g) => g
                .value
                .parse::<LayerSet>()
                .map_err(|_| Merged::invalid(g, "layer indices such as `0-5`, `0,1,8-9`, or empty"))?,
        };
        let gpu_prefill_min_tokens = m.int("gpu-prefill-min-tokens")?.unwrap_or(0);
        if gpu_prefill_min_tokens > 0 {
            if let Some(g) = m.get("gpu-prefill-min-tokens") {
                return Err(not_built(g, "gpu-prefill-min-tokens"));
            }
        }
        let gpu_prefetch_window = m.int("gpu-prefetch-window")?.unwrap_or(1);
        if let Some(g) = m.get("gpu-prefetch-window") {
            warnings.push(format!("`{}` ({}) has no effect: GPU prefill is not built yet", g.spelled, g.origin));
        }
        let numa_interleave = m.boolean("numa-interleave", false)?;
        if numa_interleave {
            if let Some(g) = m.get("numa-interleave") {
                return Err(not_built(g, "numa-interleave"));
            }
        }
        let moe_quant_on_gpu = m.boolean("moe-quant-on-gpu", false)?;
        if moe_quant_on_gpu {
            if let Some(g) = m.get("moe-quant-on-gpu") {
                warnings.push(format!(
                    "`{}` ({}) is ignored: load-time int4 quantization runs on the CPU (same result, slower load)",
                    g.spelled, g.origin
                ));
            }
        }

        let cudagraph_mode = match m.get("compilation-config.cudagraph-mode") {
            None => CudaGraphMode::FullDecodeOnly,
            Some(g) => match g.value.trim().to_ascii_uppercase().as_str() {
                "FULL_DECODE_ONLY" => CudaGraphMode::FullDecodeOnly,
                "NONE" => CudaGraphMode::None,
                "FULL" | "PIECEWISE" | "FULL_AND_PIECEWISE" => {
                    warnings.push(format!(
                        "`{}: {}` ({}): lvllm captures whole decode steps only; using FULL_DECODE_ONLY",
                        g.spelled, g.value, g.origin
                    ));
                    CudaGraphMode::FullDecodeOnly
                }
                _ => {
                    return Err(Merged::invalid(
                        g,
                        "one of FULL_DECODE_ONLY, NONE, FULL, PIECEWISE, FULL_AND_PIECEWISE",
                    ))
                }
            },
        };

        let gpu_memory_utilization = match m.get("gpu-memory-utilization") {
            None => 0.9,
            Some(g) => g
                .value
                .trim()
                .parse::<f32>()
                .ok()
                .filter(|f| *f > 0.0 && *f <= 1.0)
                .ok_or_else(|| Merged::invalid(g, "a fraction in (0, 1]"))?,
        };
        let port = match m.get("port") {
            None => 8000,
            Some(g) => g
                .value
                .trim()
                .parse::<u16>()
                .ok()
                .ok_or_else(|| Merged::invalid(g, "a port 0-65535 (0: any free port)"))?,
        };
        let tool_call_parser = match m.get("tool-call-parser") {
            None => None,
            Some(g) if g.value.trim().is_empty() => None,
            Some(g) => Some(
                ToolParserKind::from_name(&g.value)
                    .map_err(|_| Merged::invalid(g, &format!("one of {}", ToolParserKind::names().join(", "))))?,
            ),
        };
        let reasoning_parser = match m.get("reasoning-parser") {
            None => None,
            Some(g) if g.value.trim().is_empty() => None,
            Some(g) => Some(
                ReasoningParserKind::from_name(&g.value)
                    .map_err(|_| Merged::invalid(g, &format!("one of {}", ReasoningParserKind::names().join(", "))))?,
            ),
        };
        let enable_auto_tool_choice = m.boolean("enable-auto-tool-choice", false)?;
        if enable_auto_tool_choice && tool_call_parser.is_none() {
            if let Some(g) = m.get("enable-auto-tool-choice") {
                return Err(ConfigError::InvalidValue {
                    key: g.spelled.clone(),
                    value: g.value.clone(),
                    expected: "a `tool-call-parser` as well (auto tool choice needs one)".into(),
                    origin: g.origin.clone(),
                });
            }
        }

        Ok(ServeConfig {
            model: m.text("model"),
            host: m.text("host").unwrap_or_else(|| "127.0.0.1".into()),
            port,
            served_model_name: m.text("served-model-name"),
            max_model_len: m.positive("max-model-len")?,
            max_num_seqs: m.positive("max-num-seqs")?,
            max_num_batched_tokens: m.positive("max-num-batched-tokens")?,
            gpu_memory_utilization,
            dtype: m.choice(
                "dtype",
                Dtype::Auto,
                &[
                    ("auto", Dtype::Auto),
                    ("bfloat16", Dtype::Bfloat16),
                    ("bf16", Dtype::Bfloat16),
                    ("float16", Dtype::Float16),
                    ("fp16", Dtype::Float16),
                    ("half", Dtype::Float16),
                ],
            )?,
            enable_prefix_caching: m.boolean("enable-prefix-caching", true)?,
            enable_chunked_prefill: m.boolean("enable-chunked-prefill", true)?,
            tool_call_parser,
            reasoning_parser,
            enable_auto_tool_choice,
            cudagraph_mode,
            enforce_eager: m.boolean("enforce-eager", false)?,
            api_key: m.text("api-key"),
            max_queue_len: m.positive("max-queue-len")?,
            chat_template: m.text("chat-template"),
            load_format: m.choice(
                "load-format",
                LoadFormat::Auto,
                &[("auto", LoadFormat::Auto), ("safetensors", LoadFormat::Auto), ("dummy", LoadFormat::Dummy)],
            )?,
            moe_placement: m.choice(
                "moe-placement",
                MoePlacement::Auto,
                &[("auto", MoePlacement::Auto), ("hybrid", MoePlacement::Hybrid), ("gpu", MoePlacement::Gpu)],
            )?,
            thread_binding: m.choice(
                "thread-binding",
                Binding::CpuCore,
                &[("cpu_core", Binding::CpuCore), ("numa_node", Binding::NumaNode)],
            )?,
            threads: m.positive("threads")?,
            moe_weight: m.choice(
                "moe-weight",
                MoeWeight::ToDtype,
                &[("to_dtype", MoeWeight::ToDtype), ("keep", MoeWeight::Keep), ("int4", MoeWeight::Int4)],
            )?,
            gpu_resident_moe_layers,
            gpu_prefetch_window,
            gpu_prefill_min_tokens,
            power_saving: m.boolean("power-saving", false)?,
            numa_interleave,
            moe_quant_on_gpu,
            warnings,
        })
    }
}

/// The defaults (no file, no environment, no flags); a test checks they equal
/// what [`ServeConfig::from_sources`] builds from nothing.
impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            model: None,
            host: "127.0.0.1".into(),
            port: 8000,
            served_model_name: None,
            max_model_len: None,
            max_num_seqs: None,
            max_num_batched_tokens: None,
            gpu_memory_utilization: 0.9,
            dtype: Dtype::Auto,
            enable_prefix_caching: true,
            enable_chunked_prefill: true,
            tool_call_parser: None,
            reasoning_parser: None,
            enable_auto_tool_choice: false,
            cudagraph_mode: CudaGraphMode::FullDecodeOnly,
            enforce_eager: false,
            api_key: None,
            max_queue_len: None,
            chat_template: None,
            load_format: LoadFormat::Auto,
            moe_placement: MoePlacement::Auto,
            thread_binding: Binding::CpuCore,
            threads: None,
            moe_weight: MoeWeight::ToDtype,
            gpu_resident_moe_layers: LayerSet::empty(),
            gpu_prefetch_window: 1,
            gpu_prefill_min_tokens: 0,
            power_saving: false,
            numa_interleave: false,
            moe_quant_on_gpu: false,
            warnings: Vec::new(),
        }
    }
}

/// The README table of settings (Markdown), generated from [`SETTINGS`]. YAML keys
/// and flags accept `_` for `-` everywhere; the table shows the `-` spelling.
pub fn settings_table() -> String {
    let mut out = String::from(
        "| YAML key | CLI flag | seed env var | `EngineBuilder` method | default | meaning |\n|---|---|---|---|---|---|\n",
    );
    for s in SETTINGS {
        let env = s.env.map_or("—".to_string(), |e| format!("`{e}`"));
        let builder = builder_method(s.key).map_or("—".to_string(), |m| format!("`{m}`"));
        out.push_str(&format!("| `{}` | `--{}` | {env} | {builder} | {} | {} |\n", s.key, s.key, s.default, s.doc));
    }
    out
}

/// The `lvllm_engine::EngineBuilder` method that takes a setting, for the
/// settings table (`None`: a setting of the server itself, or one not built).
pub fn builder_method(key: &str) -> Option<&'static str> {
    Some(match key {
        "model" => ".model(dir)",
        "max-model-len" => ".max_model_len(n)",
        "max-num-seqs" => ".max_num_seqs(n)",
        "max-num-batched-tokens" => ".max_num_batched_tokens(n)",
        "gpu-memory-utilization" => ".gpu_memory_utilization(f)",
        "enable-prefix-caching" => ".enable_prefix_caching(b)",
        "enforce-eager" => ".enforce_eager(b)",
        "load-format" => ".load_format(LoadFormat)",
        "moe-placement" => ".moe_placement(MoePlacement)",
        "moe-weight" => ".moe_weight(MoeWeight)",
        "gpu-resident-moe-layers" => ".gpu_resident_moe_layers(LayerSet)",
        "threads" => ".threads(ThreadOptions { count, .. })",
        "thread-binding" => ".threads(ThreadOptions { binding, .. })",
        "power-saving" => ".threads(ThreadOptions { power_saving, .. })",
        "chat-template" => ".chat_template(file contents)",
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
