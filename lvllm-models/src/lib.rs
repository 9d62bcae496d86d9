//! Checkpoint loading, layers and model architectures of lvllm.
//!
//! - [`config`]: typed `config.json` ([`ModelConfig`]), lenient like Hugging Face.
//! - [`safetensors`]: mmap'd safetensors, single or sharded ([`WeightSource`]).
//! - [`cache`]: the per-layer cache and the per-sequence handle the model sees.
//! - [`layers`], [`rope`]: building blocks.
//! - One module per architecture ([`qwen3_moe`]).
//!
//! A model sees token ids, positions and per-sequence cache handles
//! ([`ForwardBatch`]); it knows nothing about scheduling, sampling or HTTP.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod cache;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda_qwen3_moe;
mod error;
pub mod layers;
pub mod qwen3_moe;
pub mod rope;
pub mod safetensors;

use std::path::Path;

pub use cache::{CacheConfig, ForwardBatch, LayerCacheSpec, Logits, LogitsSelection, ModelCache, SeqSpan};
pub use config::ModelConfig;
pub use error::{Error, Result};
pub use safetensors::{LoadProgress, ProgressFn, SafetensorsFile, WeightSource};

/// How to load a model: the worker pool that runs the CPU experts and their
/// runtime format.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The pool that computes routed experts.
    pub pool: std::sync::Arc<lvllm_numa::Pool>,
    /// Runtime format of routed experts.
    pub experts: lvllm_moe::ExpertsOptions,
}

/// A loaded model of any supported architecture.
#[derive(Debug)]
#[non_exhaustive]
pub enum Model {
    /// Qwen3-MoE.
    Qwen3Moe(qwen3_moe::Qwen3Moe),
}

/// What one decode token reads from memory, for the bandwidth-bound limit of
/// DESIGN.md's performance model (benchmarks print it next to every figure).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WeightTraffic {
    /// Bytes read from host memory for every token (dense weights of a CPU model).
    pub host_fixed: usize,
    /// Bytes read from device memory for every token (dense weights on a GPU).
    pub device_fixed: usize,
    /// The routed experts of each MoE layer.
    pub moe_layers: Vec<MoeLayerTraffic>,
}

/// One MoE layer's routed experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeLayerTraffic {
    /// Decoder layer index.
    pub layer: usize,
    /// Experts in the layer.
    pub n_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Bytes of one expert's three projections as stored (scales included).
    pub expert_bytes: usize,
    /// Whether they are in host memory (computed by the CPU).
    pub on_host: bool,
}

impl WeightTraffic {
    /// (host, device) bytes of one decode step of `batch` tokens, with experts
    /// routed uniformly at random (each layer touches
    /// `E · (1 − (1 − k/E)^batch)` distinct experts).
    pub fn step_bytes(&self, batch: usize) -> (f64, f64) {
        let (mut host, mut dev) = (self.host_fixed as f64, self.device_fixed as f64);
        for m in &self.moe_layers {
            let e = m.n_experts as f64;
            let active = e * (1.0 - (1.0 - m.top_k as f64 / e).powi(batch as i32));
            let b = active * m.expert_bytes as f64;
            if m.on_host {
                host += b;
            } else {
                dev += b;
            }
        }
        (host, dev)
    }
}

impl Model {
    /// KV-cache bytes one cached token occupies (all layers, keys and values).
    pub fn kv_bytes_per_token(&self) -> usize {
        match self {
            Model::Qwen3Moe(m) => m.config().kv_bytes_per_token(),
        }
    }

    /// What one decode token reads (all from host memory).
    pub fn weight_traffic(&self) -> WeightTraffic {
        match self {
            Model::Qwen3Moe(m) => m.weight_traffic(),
        }
    }

    /// Builds the model `config` describes from the tensors of `src`.
    pub fn load(config: &ModelConfig, src: &WeightSource, opts: &LoadOptions) -> Result<Self> {
        match config {
            ModelConfig::Qwen3Moe(c) => Ok(Model::Qwen3Moe(qwen3_moe::Qwen3Moe::load(c, src, opts)?)),
        }
    }

    /// Loads `config.json` and the safetensors of a Hugging Face model directory.
    pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<(ModelConfig, Self)> {
        let path = dir.join("config.json");
        let bytes = std::fs::read(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        let config = ModelConfig::from_json(&bytes, &path.display().to_string())?;
        let src = WeightSource::from_dir(dir)?;
        let model = Self::load(&config, &src, opts)?;
        Ok((config, model))
    }

    /// What each layer caches.
    pub fn cache_spec(&self) -> Vec<LayerCacheSpec> {
        match self {
            Model::Qwen3Moe(m) => m.cache_spec(),
        }
    }

    /// Runs a batch, writing its keys/values into `cache`; returns the selected logits.
    pub fn forward(&self, batch: &ForwardBatch<'_>, cache: &mut ModelCache) -> Result<Logits> {
        match self {
            Model::Qwen3Moe(m) => m.forward(batch, cache),
        }
    }
}

/// Checks a batch against itself and the cache before any layer runs.
fn validate_batch(batch: &ForwardBatch<'_>, cache: &ModelCache, max_positions: usize) -> Result<()> {
    validate_batch_shape(batch, cache.config(), max_positions)
}

/// Checks a batch against itself and a cache of the given size.
fn validate_batch_shape(batch: &ForwardBatch<'_>, cfg: CacheConfig, max_positions: usize) -> Result<()> {
    let n = batch.tokens.len();
    if n == 0 {
        return Err(Error::Input("empty batch".into()));
    }
    if batch.positions.len() != n {
        return Err(Error::Input(format!("{n} tokens but {} positions", batch.positions.len())));
    }
    let total: usize = batch.seqs.iter().map(|s| s.len).sum();
    if total != n {
        return Err(Error::Input(format!("sequences cover {total} tokens, the batch has {n}")));
    }
    if let LogitsSelection::Rows(rows) = batch.logits {
        if rows.is_empty() || rows.windows(2).any(|w| w[1] <= w[0]) || rows.last().is_some_and(|&r| r >= n) {
            return Err(Error::Input(format!("logit rows must be ascending, distinct and below {n}")));
        }
    }
    let mut start = 0;
    for (i, s) in batch.seqs.iter().enumerate() {
        if s.len == 0 {
            return Err(Error::Input(format!("sequence {i} has no tokens")));
        }
        let pos = &batch.positions[start..start + s.len];
        if pos.windows(2).any(|w| w[1] != w[0] + 1) {
            return Err(Error::Input(format!("sequence {i}: positions are not consecutive")));
        }
        let last = pos[pos.len() - 1];
        if last >= max_positions {
            return Err(Error::Input(format!(
                "sequence {i}: position {last} is beyond the model's {max_positions} positions"
            )));
        }
        if last / cfg.block_size >= s.block_table.len() {
            return Err(Error::Input(format!(
                "sequence {i}: block table of {} blocks does not cover position {last}",
                s.block_table.len()
            )));
        }
        if let Some(&b) = s.block_table.iter().find(|&&b| b as usize >= cfg.num_blocks) {
            return Err(Error::Input(format!(
                "sequence {i}: block {b} is outside the cache's {} blocks",
                cfg.num_blocks
            )));
        }
        start += s.len;
    }
    Ok(())
}

#[cfg(test)]
mod traffic_tests {
    use super::*;

    #[test]
    fn step_bytes_counts_distinct_experts_per_side() {
        let layer = |layer, on_host| MoeLayerTraffic { layer, n_experts: 128, top_k: 8, expert_bytes: 1000, on_host };
        let t = WeightTraffic { host_fixed: 5, device_fixed: 7, moe_layers: vec![layer(0, true), layer(1, false)] };
        // One token touches exactly top_k experts per layer.
        let (host, dev) = t.step_bytes(1);
        assert!((host - 8005.0).abs() < 1e-6 && (dev - 8007.0).abs() < 1e-6, "{host} {dev}");
        // More tokens touch more distinct experts, never more than all of them.
        let (h4, _) = t.step_bytes(4);
        let want = 128.0 * (1.0 - (1.0f64 - 8.0 / 128.0).powi(4)) * 1000.0 + 5.0;
        assert!((h4 - want).abs() < 1e-6 && h4 < 4.0 * 8000.0 + 5.0);
        let (hmax, _) = t.step_bytes(100_000);
        assert!((hmax - 128_005.0).abs() < 1e-3);
    }
}
