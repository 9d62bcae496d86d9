//! The per-layer cache the model reads and writes, and the per-sequence handle.
//!
//! The cache is typed per layer kind. Paged KV blocks (block tables mapping a
//! sequence's logical blocks to physical ones) are built now; MLA latent pages
//! (DeepSeek/Kimi, GLM-4.7-Flash) and fixed-size recurrent-state slots (Qwen3-Next
//! linear attention) are further kinds of [`LayerCacheSpec`] the same handle
//! serves: a [`SeqSpan`] carries a block table *and* a state slot.
//!
//! Who owns which block is the engine's business (its block allocator and,
//! later, the scheduler and prefix cache); this module only stores the pages.

/// What one layer needs cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCacheSpec {
    /// Paged keys and values.
    PagedKv {
        /// Key/value heads.
        n_kv_heads: usize,
        /// Width of one head.
        head_dim: usize,
    },
}

impl LayerCacheSpec {
    /// Bytes of one block of `block_size` tokens (f32 storage).
    pub fn bytes_per_block(&self, block_size: usize) -> usize {
        match self {
            LayerCacheSpec::PagedKv { n_kv_heads, head_dim } => 2 * block_size * n_kv_heads * head_dim * 4,
        }
    }
}

/// Size of a [`ModelCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Tokens per block.
    pub block_size: usize,
    /// Physical blocks per layer.
    pub num_blocks: usize,
}

/// Paged f32 keys and values of one layer: `[num_blocks * block_size, n_kv_heads, head_dim]`.
#[derive(Debug)]
pub struct PagedKv {
    /// Keys.
    pub k: Vec<f32>,
    /// Values.
    pub v: Vec<f32>,
    /// Floats per token slot (`n_kv_heads * head_dim`).
    pub slot_width: usize,
}

/// One layer's cache.
#[derive(Debug)]
pub enum LayerCache {
    /// Paged KV.
    PagedKv(PagedKv),
}

/// The cache of every layer of a model.
#[derive(Debug)]
pub struct ModelCache {
    layers: Vec<LayerCache>,
    config: CacheConfig,
}

impl ModelCache {
    /// Allocates zeroed storage for every layer of `specs`.
    pub fn new(specs: &[LayerCacheSpec], config: CacheConfig) -> Self {
        let slots = config.num_blocks * config.block_size;
        let layers = specs
            .iter()
            .map(|s| match *s {
                LayerCacheSpec::PagedKv { n_kv_heads, head_dim } => {
                    let w = n_kv_heads * head_dim;
                    LayerCache::PagedKv(PagedKv { k: vec![0.0; slots * w], v: vec![0.0; slots * w], slot_width: w })
                }
            })
            .collect();
        ModelCache { layers, config }
    }

    /// The size it was made with.
    pub fn config(&self) -> CacheConfig {
        self.config
    }

    /// A layer's cache.
    pub fn layer_mut(&mut self, layer: usize) -> &mut LayerCache {
        &mut self.layers[layer]
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }
}

/// One sequence's part of a forward batch.
#[derive(Debug, Clone, Copy)]
pub struct SeqSpan<'a> {
    /// Tokens of this sequence in the batch (contiguous, at consecutive positions).
    pub len: usize,
    /// Physical block of each logical block of the sequence; it covers every
    /// position up to the last one in the batch. Positions before the first one in
    /// the batch must already be cached.
    pub block_table: &'a [u32],
    /// The recurrent-state slot of the sequence, for layer kinds that have one.
    pub state_slot: Option<u32>,
}

/// Which positions to compute logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsSelection<'a> {
    /// Every token of the batch (golden tests).
    All,
    /// The last token of each sequence (sampling).
    LastPerSeq,
    /// These token indices, ascending and distinct (a scheduler step where some
    /// sequences need prompt logprobs and the others only their last row).
    Rows(&'a [usize]),
}

/// A forward batch: tokens of several sequences, back to back.
#[derive(Debug, Clone, Copy)]
pub struct ForwardBatch<'a> {
    /// Token ids.
    pub tokens: &'a [u32],
    /// Absolute position of each token.
    pub positions: &'a [usize],
    /// The sequences, in token order.
    pub seqs: &'a [SeqSpan<'a>],
    /// Which logits to return.
    pub logits: LogitsSelection<'a>,
}

impl ForwardBatch<'_> {
    /// Indices (into `tokens`) of the rows whose logits `self.logits` selects.
    pub fn logit_rows(&self) -> Vec<usize> {
        match self.logits {
            LogitsSelection::All => (0..self.tokens.len()).collect(),
            LogitsSelection::Rows(rows) => rows.to_vec(),
            LogitsSelection::LastPerSeq => self
                .seqs
                .iter()
                .scan(0usize, |end, s| {
                    *end += s.len;
                    Some(*end - 1)
                })
                .collect(),
        }
    }
}

/// Logits of the selected rows.
#[derive(Debug, Clone)]
pub struct Logits {
    /// Index into the batch's tokens of each row.
    pub rows: Vec<usize>,
    /// Vocabulary size (row width).
    pub vocab: usize,
    /// `[rows.len(), vocab]`.
    pub data: Vec<f32>,
}

impl Logits {
    /// The logits of row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }
}
