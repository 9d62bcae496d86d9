//! Tests of configuration loading: precedence, spellings, strictness, seed values.

use super::*;

const NO_ENV: [(&str, &str); 0] = [];

fn cli(args: &[&str]) -> CliArgs {
    CliArgs::parse(args).expect("valid flags")
}

fn from_yaml(yaml: &str) -> Result<ServeConfig, ConfigError> {
    ServeConfig::from_sources(Some(yaml), NO_ENV, &CliArgs::default())
}

fn from_env(env: &[(&str, &str)]) -> Result<ServeConfig, ConfigError> {
    ServeConfig::from_sources(None, env.iter().copied(), &CliArgs::default())
}

fn err(r: Result<ServeConfig, ConfigError>) -> String {
    match r {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

/// The seed's example config.yaml, with its comments.
const SEED_YAML: &str = r#"
model: "/home/guqiong/Models/Models/MiniMax-M2.5"  #模型目录
host: "0.0.0.0"                                       # 服务绑定IP地址
port: 8070                                            # 服务绑定端口号
tensor-parallel-size: 1
#pipeline-parallel-size: 2
max-model-len: 18000
gpu-memory-utilization: 0.92
trust-remote-code: true
tokenizer-mode: "auto"
swap-space: 0
served-model-name: "Models/MiniMax-M2.5"
compilation_config.cudagraph_mode: "FULL_DECODE_ONLY"
enable_prefix_caching: true
enable-chunked-prefill: true
max_num_batched_tokens: 18000
dtype: "bfloat16"
max_num_seqs: 4
compilation_config.mode: "VLLM_COMPILE"
enable-auto-tool-choice: true
tool-call-parser: "minimax_m2"
reasoning-parser: "minimax_m2_append_think"
"#;

#[test]
fn defaults_equal_the_default_impl() {
    let built = ServeConfig::from_sources(None, NO_ENV, &CliArgs::default()).expect("defaults are valid");
    assert_eq!(built, ServeConfig::default());
}

#[test]
fn seed_example_config() {
    let c = from_yaml(SEED_YAML).expect("the seed's config loads");
    assert_eq!(c.model.as_deref(), Some("/home/guqiong/Models/Models/MiniMax-M2.5"));
    assert_eq!((c.host.as_str(), c.port), ("0.0.0.0", 8070));
    assert_eq!(c.max_model_len, Some(18000));
    assert_eq!(c.gpu_memory_utilization, 0.92);
    assert_eq!(c.served_model_name.as_deref(), Some("Models/MiniMax-M2.5"));
    assert_eq!(c.cudagraph_mode, CudaGraphMode::FullDecodeOnly);
    assert!(c.enable_prefix_caching && c.enable_chunked_prefill && c.enable_auto_tool_choice);
    assert_eq!(c.max_num_batched_tokens, Some(18000));
    assert_eq!(c.max_num_seqs, Some(4));
    assert_eq!(c.dtype, Dtype::Bfloat16);
    assert_eq!(c.tool_call_parser, Some(ToolParserKind::MinimaxM2));
    assert_eq!(c.reasoning_parser, Some(ReasoningParserKind::MinimaxM2AppendThink));
    // Four vLLM tuning hints, each one warning naming the key as written.
    assert_eq!(c.warnings.len(), 4, "{:?}", c.warnings);
    for key in ["trust-remote-code", "tokenizer-mode", "swap-space", "compilation_config.mode"] {
        assert!(c.warnings.iter().any(|w| w.contains(&format!("`{key}`"))), "{key}: {:?}", c.warnings);
    }
    // The seed's own value, tensor-parallel-size: 2, is not built.
    let e = err(from_yaml(&SEED_YAML.replace("tensor-parallel-size: 1", "tensor-parallel-size: 2")));
    assert_eq!(
        e,
        "`tensor-parallel-size` = `2` (config file) is not supported yet: tensor parallelism is not built; \
         lvllm uses one GPU (set 1)"
    );
}

#[test]
fn precedence_cli_over_env_over_file_over_default() {
    let yaml = "threads: 10\nmoe_weight: keep\nport: 9000\n";
    let env = [("LK_THREADS", "20"), ("LVLLM_MOE_USE_WEIGHT", "INT4")];
    let flags = cli(&["--threads", "30"]);
    let c = ServeConfig::from_sources(Some(yaml), env, &flags).expect("valid");
    assert_eq!(c.threads, Some(30));
    assert_eq!(c.moe_weight, MoeWeight::Int4);
    assert_eq!(c.port, 9000);
    let c = ServeConfig::from_sources(Some(yaml), env, &CliArgs::default()).expect("valid");
    assert_eq!(c.threads, Some(20));
    let c = ServeConfig::from_sources(Some(yaml), NO_ENV, &CliArgs::default()).expect("valid");
    assert_eq!((c.threads, c.moe_weight), (Some(10), MoeWeight::Keep));
    let c = ServeConfig::from_sources(None, NO_ENV, &CliArgs::default()).expect("valid");
    assert_eq!((c.threads, c.moe_weight, c.port), (None, MoeWeight::ToDtype, 8000));
    // Only the winning value is typed, so a flag can override a bad file value
    // (unknown keys are errors in every source).
    let c = ServeConfig::from_sources(Some("port: nope"), NO_ENV, &cli(&["--port=1234"])).expect("overridden");
    assert_eq!(c.port, 1234);
}

#[test]
fn both_spellings_and_duplicates() {
    for yaml in ["max-model-len: 4096", "max_model_len: 4096"] {
        assert_eq!(from_yaml(yaml).expect("valid").max_model_len, Some(4096));
    }
    for flag in ["--max-model-len", "--max_model_len"] {
        let c = ServeConfig::from_sources(None, NO_ENV, &cli(&[flag, "4096"])).expect("valid");
        assert_eq!(c.max_model_len, Some(4096));
    }
    let e = err(from_yaml("max-model-len: 1\nmax_model_len: 2"));
    assert_eq!(e, "setting `max-model-len` is given twice (config file): `max-model-len` and `max_model_len`");
}

#[test]
fn dotted_and_nested_keys() {
    let dotted = from_yaml("compilation_config.cudagraph_mode: NONE").expect("valid");
    let nested = from_yaml("compilation_config:\n  cudagraph_mode: NONE\n  mode: VLLM_COMPILE\n").expect("valid");
    assert_eq!(dotted.cudagraph_mode, CudaGraphMode::None);
    assert_eq!(nested.cudagraph_mode, CudaGraphMode::None);
    assert_eq!(nested.warnings.len(), 1);
    let flags = cli(&["--compilation-config", r#"{"cudagraph_mode": "NONE"}"#]);
    assert_eq!(ServeConfig::from_sources(None, NO_ENV, &flags).expect("valid").cudagraph_mode, CudaGraphMode::None);
    let flags = cli(&["--compilation_config.cudagraph_mode=FULL"]);
    let c = ServeConfig::from_sources(None, NO_ENV, &flags).expect("valid");
    assert_eq!(c.cudagraph_mode, CudaGraphMode::FullDecodeOnly);
    assert!(c.warnings[0].contains("FULL_DECODE_ONLY"), "{:?}", c.warnings);
    let e = err(from_yaml("compilation_config.cudagraph_mode: NONE\ncompilation_config:\n  cudagraph_mode: FULL\n"));
    assert!(e.contains("given twice"), "{e}");
    assert!(err(from_yaml("compilation_config.cudagraph_mode: SOMETIMES")).contains("expected one of FULL_DECODE_ONLY"));
    // Other compilation_config knobs are vLLM tuning: a warning each.
    let c = from_yaml("compilation_config:\n  level: 3\n").expect("valid");
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    let c = from_yaml("compilation_config: 3").expect("valid");
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
}

#[test]
fn unknown_keys() {
    assert_eq!(
        err(from_yaml("max_model_length: 4096")),
        "unknown setting `max_model_length` (config file); did you mean `max-model-len`?"
    );
    assert_eq!(
        err(ServeConfig::from_sources(None, NO_ENV, &cli(&["--tread-binding", "cpu_core"]))),
        "unknown setting `--tread-binding` (command line); did you mean `thread-binding`?"
    );
    assert_eq!(err(from_yaml("frobnicate: 1")), "unknown setting `frobnicate` (config file)");
    assert!(err(from_yaml("served-model-nam: [a, b]")).contains("did you mean `served-model-name`"));
    // Unrelated environment variables are not settings and are ignored.
    assert!(from_env(&[("PATH", "/bin"), ("LVLLM_SOMETHING_ELSE", "x")]).is_ok());
}

#[test]
fn invalid_values() {
    assert_eq!(
        err(from_yaml("port: abc")),
        "invalid value `abc` for `port` (config file): expected a port 0-65535 (0: any free port)"
    );
    assert_eq!(
        err(from_env(&[("LK_THREAD_BINDING", "CORE")])),
        "invalid value `CORE` for `LK_THREAD_BINDING` (environment variable LK_THREAD_BINDING): \
         expected one of cpu_core, numa_node"
    );
    assert!(err(from_yaml("gpu-memory-utilization: 1.5")).contains("a fraction in (0, 1]"));
    assert!(err(from_yaml("enable_prefix_caching: maybe")).contains("expected true or false"));
    assert!(err(from_yaml("threads: 0")).contains("at least 1"));
    assert!(err(from_yaml("dtype: float32")).contains("expected one of auto, bfloat16, bf16, float16"));
    assert!(err(from_yaml("load-format: gguf")).contains("`load-format`"));
    assert!(err(from_yaml("gpu-resident-moe-layers: 5-1")).contains("layer indices"));
    let e = err(from_yaml("tool-call-parser: pythonic"));
    assert!(e.contains("expected one of qwen3_coder, glm45, glm47, minimax_m2, kimi_k2, hermes"), "{e}");
    assert_eq!(from_yaml("tool-call-parser: hermes").expect("valid").tool_call_parser, Some(ToolParserKind::Hermes));
    assert!(err(from_yaml("reasoning-parser: step3p5")).contains("minimax_m2_append_think"));
    assert!(err(from_yaml("enable-auto-tool-choice: true")).contains("tool-call-parser"));
    assert!(err(from_yaml("- a\n- b")).starts_with("config file:"));
    assert!(err(from_yaml("port: [1")).starts_with("config file:"));
}

#[test]
fn not_built_is_an_error_and_tuning_hints_warn() {
    for yaml in [
        "kv_cache_dtype: fp8",
        "enable_expert_parallel: true",
        "pipeline-parallel-size: 2",
        "speculative-config: '{\"method\":\"qwen3_next_mtp\",\"num_speculative_tokens\":2}'",
        "speculative_config.method: step3p5_mtp",
        "hf-overrides.num_nextn_predict_layers: 1",
        "gpu-prefill-min-tokens: 4096",
        "numa-interleave: true",
    ] {
        assert!(err(from_yaml(yaml)).contains("is not supported yet"), "{yaml}");
    }
    // Values that change nothing are accepted.
    for yaml in ["kv_cache_dtype: auto", "enable_expert_parallel: false", "gpu-prefill-min-tokens: 0"] {
        assert!(from_yaml(yaml).is_ok(), "{yaml}");
    }
    for yaml in ["moe-quant-on-gpu: true", "gpu-prefetch-window: 2", "trust-remote-code: true", "swap-space: 4"] {
        let c = from_yaml(yaml).expect("a warning, not an error");
        assert_eq!(c.warnings.len(), 1, "{yaml}: {:?}", c.warnings);
    }
    assert_eq!(from_yaml("gpu-prefetch-window: 2").expect("valid").gpu_prefetch_window, 2);
}

#[test]
fn seed_environment_values() {
    let c = from_env(&[
        ("LVLLM_MOE_NUMA_ENABLED", "1"),
        ("LK_THREAD_BINDING", "NUMA_NODE"),
        ("LK_THREADS", "88"),
        ("OMP_NUM_THREADS", "88"),
        ("LVLLM_MOE_USE_WEIGHT", "INT4"),
        ("LK_POWER_SAVING", "1"),
        ("LVLLM_GPU_RESIDENT_MOE_LAYERS", ""),
        ("LVLLM_GPU_PREFILL_MIN_BATCH_SIZE", "0"),
        ("LVLLM_ENABLE_NUMA_INTERLEAVE", "0"),
        ("LVLLM_MOE_QUANT_ON_GPU", "0"),
    ])
    .expect("the seed's documented command line loads");
    assert_eq!(c.moe_placement, MoePlacement::Hybrid);
    assert_eq!(c.thread_binding, Binding::NumaNode);
    assert_eq!(c.threads, Some(88));
    assert_eq!(c.moe_weight, MoeWeight::Int4);
    assert!(c.power_saving);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert_eq!(from_env(&[("LVLLM_MOE_NUMA_ENABLED", "0")]).expect("valid").moe_placement, MoePlacement::Gpu);
    assert_eq!(from_env(&[("LVLLM_MOE_USE_WEIGHT", "TO_DTYPE")]).expect("valid").moe_weight, MoeWeight::ToDtype);
    assert_eq!(from_env(&[("LVLLM_MOE_USE_WEIGHT", "KEEP")]).expect("valid").moe_weight, MoeWeight::Keep);
    assert!(err(from_env(&[("LVLLM_MOE_NUMA_ENABLED", "2")])).contains("LVLLM_MOE_NUMA_ENABLED"));
    assert!(err(from_env(&[("LK_THREADS", "many")])).contains("`LK_THREADS`"));
    // The seed's GPU-prefill command line asks for what is not built.
    let e = err(from_env(&[("LVLLM_GPU_PREFILL_MIN_BATCH_SIZE", "4096")]));
    assert!(e.contains("GPU prefill is not built") && e.contains("LVLLM_GPU_PREFILL_MIN_BATCH_SIZE"), "{e}");
    assert_eq!(
        from_env(&[("LVLLM_GPU_RESIDENT_MOE_LAYERS", "0-1,8")]).expect("valid").gpu_resident_moe_layers.layers(),
        [0, 1, 8]
    );
    assert!(err(from_env(&[("LVLLM_ENABLE_NUMA_INTERLEAVE", "1")])).contains("not supported yet"));
    assert_eq!(from_env(&[("LVLLM_MOE_QUANT_ON_GPU", "1")]).expect("a warning").warnings.len(), 1);
    assert_eq!(from_env(&[("LVLLM_GPU_PREFETCH_WINDOW", "1")]).expect("a warning").warnings.len(), 1);
}

#[test]
fn omp_num_threads_warns_when_it_differs() {
    let c = from_env(&[("LK_THREADS", "44"), ("OMP_NUM_THREADS", "88")]).expect("valid");
    assert_eq!(c.warnings, ["OMP_NUM_THREADS=88 is ignored: lvllm uses no OpenMP; expert workers = threads (44)"]);
    assert!(from_env(&[("LK_THREADS", "44"), ("OMP_NUM_THREADS", "44")]).expect("valid").warnings.is_empty());
    assert_eq!(from_env(&[("OMP_NUM_THREADS", "8")]).expect("valid").warnings.len(), 1);
}

#[test]
fn cli_parsing() {
    let a = CliArgs::parse(&[
        "/models/qwen",
        "--port",
        "9000",
        "--enforce-eager",
        "--host=0.0.0.0",
        "--power-saving",
        "false",
        "--config",
        "c.yaml",
        "--enable-prefix-caching",
    ])
    .expect("valid");
    assert_eq!(a.config, Some(PathBuf::from("c.yaml")));
    assert_eq!(a.positional, ["/models/qwen"]);
    let c = ServeConfig::from_sources(None, NO_ENV, &a).expect("valid");
    assert_eq!(c.model.as_deref(), Some("/models/qwen"));
    assert_eq!((c.port, c.host.as_str()), (9000, "0.0.0.0"));
    assert!(c.enforce_eager && !c.power_saving && c.enable_prefix_caching);
    // A boolean flag does not swallow a positional argument.
    let a = CliArgs::parse(&["--enforce-eager", "/models/x"]).expect("valid");
    assert_eq!(a.positional, ["/models/x"]);
    assert!(matches!(CliArgs::parse(&["a", "b"]), Err(ConfigError::Cli(_))));
    assert!(matches!(CliArgs::parse(&["-p", "1"]), Err(ConfigError::Cli(_))));
    assert!(matches!(CliArgs::parse(&["--config"]), Err(ConfigError::Cli(_))));
    let e = err(ServeConfig::from_sources(None, NO_ENV, &cli(&["--port", "--enforce-eager"])));
    assert_eq!(e, "command line: `--port` needs a value");
}

#[test]
fn load_reads_the_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, "port: 7000\nthreads: 4\n").expect("write");
    let p = path.to_string_lossy().to_string();
    let c = ServeConfig::load(&["--config", p.as_str(), "--threads", "6"], NO_ENV).expect("valid");
    assert_eq!((c.port, c.threads), (7000, Some(6)));
    let missing = dir.path().join("missing.yaml").to_string_lossy().to_string();
    assert!(matches!(ServeConfig::load(&["--config", missing.as_str()], NO_ENV), Err(ConfigError::Io { .. })));
}

#[test]
fn layer_sets() {
    // The syntax itself is the engine's `LayerSet` (tested there); here: every
    // source reaches it, and a bad set names the key.
    let layers = |yaml: &str| from_yaml(yaml).expect("valid").gpu_resident_moe_layers.layers().to_vec();
    assert_eq!(layers("gpu-resident-moe-layers: 0-5"), [0, 1, 2, 3, 4, 5]);
    assert_eq!(layers("gpu_resident_moe_layers: '0,1,8-9'"), [0, 1, 8, 9]);
    assert_eq!(layers("gpu-resident-moe-layers: ''"), Vec::<usize>::new());
    for bad in ["a", "4-2", "1-"] {
        let e = err(from_yaml(&format!("gpu-resident-moe-layers: '{bad}'")));
        assert!(e.contains("gpu-resident-moe-layers") && e.contains("layer indices"), "{bad}: {e}");
    }
}

#[test]
fn config_md_holds_the_generated_table() {
    // `LVLLM_REGEN_DOCS=1 cargo test -p lvllm-server --lib config_md` rewrites the
    // tables between the markers of CONFIG.md and the README.
    const BEGIN: &str = "<!-- settings-table:begin -->\n";
    const END: &str = "<!-- settings-table:end -->";
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let table = settings_table();
    for path in [root.join("CONFIG.md"), root.join("../README.md")] {
        let mut doc = std::fs::read_to_string(&path).expect("read doc");
        let (Some(a), Some(b)) = (doc.find(BEGIN), doc.find(END)) else {
            panic!("{}: no table markers", path.display())
        };
        if std::env::var_os("LVLLM_REGEN_DOCS").is_some() {
            doc.replace_range(a + BEGIN.len()..b, &table);
            std::fs::write(&path, &doc).expect("write doc");
        }
        let b = doc.find(END).expect("end marker");
        assert_eq!(&doc[a + BEGIN.len()..b], table, "{}: rerun with LVLLM_REGEN_DOCS=1", path.display());
        for s in SETTINGS {
            assert!(doc.contains(&format!("`--{}`", s.key)), "{}: {}", path.display(), s.key);
        }
    }
}
