//! The scheduler: which sequences run in the next engine step, and with how
//! many tokens.
//!
//! Continuous batching with chunked prefill, as vLLM's v1 scheduler: a
//! sequence is a list of tokens (prompt, then every generated token) of which
//! the first `num_computed` have keys and values in the paged cache. Each step
//!
//! 1. serves the *running* sequences, oldest first: each gets its uncomputed
//!    tokens (one for a decoding sequence, a chunk of its prompt otherwise),
//!    capped by what is left of `max_num_batched_tokens`. When the KV cache has
//!    no block for a sequence's next tokens, the youngest running sequence is
//!    *preempted*: its blocks are released and it goes back to waiting, to be
//!    recomputed from its tokens later (its cached full blocks usually survive
//!    in the prefix cache, so the recompute is mostly cache hits);
//! 2. then, if nothing was preempted, admits *waiting* sequences, oldest first,
//!    while fewer than `max_num_seqs` run and tokens and blocks are left. An
//!    admitted sequence first takes the longest run of its full blocks found in
//!    the prefix cache ([`BlockAllocator`]), always leaving at least one token
//!    to compute so the step yields logits to sample from.
//!
//! After the forward pass, [`Scheduler::complete`] advances each sequence and
//! registers its newly full blocks in the prefix cache. A sequence whose tokens
//! are all computed needs a sampled token: the engine appends it
//! ([`Scheduler::append_token`]) or finishes the sequence
//! ([`Scheduler::remove`]). Nothing here knows about models, sampling or
//! requests: it is tested on its own.
//!
//! "Oldest" is the order of sequence ids, which the engine assigns in
//! submission order.

use std::collections::{BTreeSet, HashMap};

use crate::kv::{BlockAllocator, BlockHash};

/// Scheduling limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most tokens in one forward batch.
    pub max_num_batched_tokens: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Share full blocks between sequences with equal prefixes.
    pub enable_prefix_caching: bool,
}

/// One sequence's part of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    /// The sequence.
    pub id: u64,
    /// Position of its first token in this step (tokens before are cached).
    pub start: usize,
    /// Tokens it runs in this step.
    pub len: usize,
}

/// What one step runs, in batch order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    /// The sequences and their token ranges.
    pub seqs: Vec<Scheduled>,
    /// Sequences preempted while scheduling this step.
    pub preempted: Vec<u64>,
}

impl Step {
    /// Tokens in the step.
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.len).sum()
    }
}

/// What the scheduler knows of one sequence.
#[derive(Debug)]
pub struct Sequence {
    tokens: Vec<u32>,
    prompt_len: usize,
    num_computed: usize,
    blocks: Vec<u32>,
    /// Hashes of the leading full blocks of `tokens` (computed lazily).
    hashes: Vec<BlockHash>,
    /// Leading blocks registered in the prefix cache (or taken from it).
    registered: usize,
    /// Whether admission may take blocks from the prefix cache.
    use_cache: bool,
    /// Prompt tokens taken from the prefix cache at the first admission.
    cached_prompt_tokens: usize,
    /// Prompt tokens run through the model (recomputes included).
    computed_prompt_tokens: usize,
    admitted: bool,
    preemptions: usize,
}

impl Sequence {
    /// Every token: prompt, then generated.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Its block table (covers at least every computed token).
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Tokens whose keys and values are cached.
    pub fn num_computed(&self) -> usize {
        self.num_computed
    }

    /// Prompt tokens found in the prefix cache at the first admission.
    pub fn cached_prompt_tokens(&self) -> usize {
        self.cached_prompt_tokens
    }

    /// Prompt tokens run through the model so far (recomputes included).
    pub fn computed_prompt_tokens(&self) -> usize {
        self.computed_prompt_tokens
    }

    /// Times it was preempted.
    pub fn preemptions(&self) -> usize {
        self.preemptions
    }
}

/// Prefix-cache counters since the scheduler started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Tokens of admitted sequences looked up in the prefix cache.
    pub queried_tokens: u64,
    /// Of those, tokens found (and not computed).
    pub hit_tokens: u64,
}

/// Waiting and running sequences (see the module docs).
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    seqs: HashMap<u64, Sequence>,
    waiting: BTreeSet<u64>,
    running: BTreeSet<u64>,
    prefix: PrefixCacheStats,
    preemptions: u64,
}

impl Scheduler {
    /// An empty scheduler. `config`'s limits must be at least 1.
    pub fn new(config: SchedulerConfig) -> Self {
        Scheduler {
            config,
            seqs: HashMap::new(),
            waiting: BTreeSet::new(),
            running: BTreeSet::new(),
            prefix: PrefixCacheStats::default(),
            preemptions: 0,
        }
    }

    /// The limits.
    pub fn config(&self) -> SchedulerConfig {
        self.config
    }

    /// Queues a sequence of `prompt` tokens (not empty). `use_cache: false`
    /// computes every prompt token (prompt logprobs need their logits).
    pub fn add(&mut self, id: u64, prompt: Vec<u32>, use_cache: bool) {
        debug_assert!(!prompt.is_empty() && !self.seqs.contains_key(&id));
        let seq = Sequence {
            prompt_len: prompt.len(),
            tokens: prompt,
            num_computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            registered: 0,
            use_cache,
            cached_prompt_tokens: 0,
            computed_prompt_tokens: 0,
            admitted: false,
            preemptions: 0,
        };
        self.seqs.insert(id, seq);
        self.waiting.insert(id);
    }

    /// A sequence.
    pub fn get(&self, id: u64) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    /// Whether the sequence is known.
    pub fn contains(&self, id: u64) -> bool {
        self.seqs.contains_key(&id)
    }

    /// Sequences waiting (new or preempted).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences running (holding blocks).
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Whether no sequence is known.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Prefix-cache counters.
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.prefix
    }

    /// Preemptions so far.
    pub fn num_preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Removes a sequence (finished or cancelled) and releases its blocks;
    /// `false` if it was unknown.
    pub fn remove(&mut self, id: u64, alloc: &mut BlockAllocator) -> bool {
        let Some(seq) = self.seqs.remove(&id) else { return false };
        release(alloc, &seq.blocks);
        self.waiting.remove(&id);
        self.running.remove(&id);
        true
    }

    /// Appends a sampled token to a sequence whose tokens were all computed.
    pub fn append_token(&mut self, id: u64, token: u32) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.tokens.push(token);
        }
    }

    fn preempt(&mut self, id: u64, alloc: &mut BlockAllocator) {
        let Some(seq) = self.seqs.get_mut(&id) else { return };
        release(alloc, &seq.blocks);
        seq.blocks.clear();
        seq.num_computed = 0;
        seq.registered = 0;
        seq.preemptions += 1;
        self.preemptions += 1;
        self.running.remove(&id);
        self.waiting.insert(id);
    }

    /// Picks the next step's sequences and token ranges and gives them blocks.
    /// Empty only when nothing is waiting or running.
    pub fn schedule(&mut self, alloc: &mut BlockAllocator) -> Step {
        let bs = self.config.block_size;
        let mut budget = self.config.max_num_batched_tokens;
        let mut step = Step::default();
        let running: Vec<u64> = self.running.iter().copied().collect();
        'running: for id in running {
            if budget == 0 {
                break;
            }
            if !self.running.contains(&id) {
                break; // preempted: so is every younger one
            }
            let seq = &self.seqs[&id];
            let start = seq.num_computed;
            let len = (seq.tokens.len() - start).min(budget);
            if len == 0 {
                continue;
            }
            let need = (start + len).div_ceil(bs).saturating_sub(seq.blocks.len());
            while alloc.num_free() < need {
                let Some(&victim) = self.running.last() else { break 'running };
                self.preempt(victim, alloc);
                step.preempted.push(victim);
                if victim == id {
                    break 'running;
                }
            }
            let new = alloc.allocate(need).expect("checked above");
            let seq = self.seqs.get_mut(&id).expect("running sequences are known");
            seq.blocks.extend(new);
            step.seqs.push(Scheduled { id, start, len });
            budget -= len;
        }
        if !step.preempted.is_empty() {
            return step;
        }
        while budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(&id) = self.waiting.first() else { break };
            let seq = self.seqs.get_mut(&id).expect("waiting sequences are known");
            let lookup = self.config.enable_prefix_caching && seq.use_cache;
            let mut hits = Vec::new();
            if lookup {
                // Leave at least one token to compute: its logits are sampled.
                let max_hit = (seq.tokens.len() - 1) / bs;
                ensure_hashes(seq, alloc, max_hit, bs);
                for &h in &seq.hashes[..max_hit] {
                    match alloc.lookup(h) {
                        Some(b) => hits.push(b),
                        None => break,
                    }
                }
            }
            let start = hits.len() * bs;
            let len = (seq.tokens.len() - start).min(budget);
            let need = (start + len).div_ceil(bs) - hits.len();
            // Hit blocks nobody holds are counted as free: taking them shrinks the pool.
            let revived = hits.iter().filter(|&&b| alloc.ref_count(b) == 0).count();
            if alloc.num_free() - revived < need {
                break;
            }
            for (&h, &hit) in seq.hashes.iter().zip(&hits) {
                let b = alloc.acquire_cached(h);
                debug_assert_eq!(b, Some(hit));
            }
            let new = alloc.allocate(need).expect("checked above");
            seq.blocks = hits;
            seq.blocks.extend(new);
            seq.registered = start / bs;
            seq.num_computed = start;
            if lookup {
                self.prefix.queried_tokens += seq.tokens.len() as u64;
                self.prefix.hit_tokens += start as u64;
            }
            if !seq.admitted {
                seq.admitted = true;
                seq.cached_prompt_tokens = start.min(seq.prompt_len);
            }
            self.waiting.remove(&id);
            self.running.insert(id);
            step.seqs.push(Scheduled { id, start, len });
            budget -= len;
        }
        step
    }

    /// Records that `step` ran: advances each sequence and registers its newly
    /// full blocks in the prefix cache. Returns, per scheduled sequence in
    /// order, whether all its tokens are now computed (it needs a sampled token).
    pub fn complete(&mut self, step: &Step, alloc: &mut BlockAllocator) -> Vec<bool> {
        let bs = self.config.block_size;
        step.seqs
            .iter()
            .map(|s| {
                let Some(seq) = self.seqs.get_mut(&s.id) else { return false };
                seq.num_computed = s.start + s.len;
                seq.computed_prompt_tokens += seq.prompt_len.min(s.start + s.len).saturating_sub(s.start);
                if self.config.enable_prefix_caching {
                    let full = seq.num_computed / bs;
                    ensure_hashes(seq, alloc, full, bs);
                    while seq.registered < full {
                        alloc.register(seq.blocks[seq.registered], seq.hashes[seq.registered]);
                        seq.registered += 1;
                    }
                }
                seq.num_computed == seq.tokens.len()
            })
            .collect()
    }
}

/// Releases a block table, last block first, so its tail is evicted before
/// its (more shareable) head.
fn release(alloc: &mut BlockAllocator, blocks: &[u32]) {
    for &b in blocks.iter().rev() {
        alloc.release(&[b]);
    }
}

/// Hashes the first `n` full blocks of `seq` (`n` ≤ full blocks of its tokens).
fn ensure_hashes(seq: &mut Sequence, alloc: &BlockAllocator, n: usize, bs: usize) {
    while seq.hashes.len() < n {
        let i = seq.hashes.len();
        let h = alloc.hash_block(seq.hashes.last().copied(), &seq.tokens[i * bs..(i + 1) * bs]);
        seq.hashes.push(h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(max_seqs: usize, max_tokens: usize, caching: bool) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            max_num_seqs: max_seqs,
            max_num_batched_tokens: max_tokens,
            block_size: 4,
            enable_prefix_caching: caching,
        })
    }

    /// Runs steps until every sequence has `gen` tokens more than its prompt,
    /// appending token 7 each time; checks the limits on every step.
    fn run_all(s: &mut Scheduler, a: &mut BlockAllocator, gen: &HashMap<u64, usize>) -> usize {
        let mut steps = 0;
        let mut want: HashMap<u64, usize> = gen.clone();
        while !s.is_empty() {
            let step = s.schedule(a);
            assert!(!step.seqs.is_empty() || !step.preempted.is_empty(), "stuck");
            assert!(step.num_tokens() <= s.config().max_num_batched_tokens);
            assert!(s.num_running() <= s.config().max_num_seqs);
            for (sc, done) in step.seqs.clone().iter().zip(s.complete(&step, a)) {
                if done {
                    let left = want.get_mut(&sc.id).unwrap();
                    *left -= 1;
                    if *left == 0 {
                        s.remove(sc.id, a);
                    } else {
                        s.append_token(sc.id, 7);
                    }
                }
            }
            steps += 1;
            assert!(steps < 10_000);
        }
        assert_eq!(a.num_used(), 0);
        steps
    }

    #[test]
    fn chunked_prefill_respects_the_token_budget() {
        let mut s = sched(8, 5, false);
        let mut a = BlockAllocator::new(64);
        s.add(1, (0..12).collect(), true);
        s.add(2, (0..3).collect(), true);
        let st = s.schedule(&mut a);
        assert_eq!(st.seqs, vec![Scheduled { id: 1, start: 0, len: 5 }]);
        assert_eq!(s.complete(&st, &mut a), vec![false]);
        let st = s.schedule(&mut a);
        assert_eq!(st.seqs, vec![Scheduled { id: 1, start: 5, len: 5 }]);
        s.complete(&st, &mut a);
        let st = s.schedule(&mut a);
        assert_eq!(st.seqs, vec![Scheduled { id: 1, start: 10, len: 2 }, Scheduled { id: 2, start: 0, len: 3 }]);
        assert_eq!(s.complete(&st, &mut a), vec![true, true]);
        s.remove(1, &mut a);
        s.remove(2, &mut a);
        assert_eq!(a.num_used(), 0);
    }

    #[test]
    fn max_num_seqs_is_respected() {
        let mut s = sched(2, 100, false);
        let mut a = BlockAllocator::new(64);
        for id in 0..5 {
            s.add(id, vec![1, 2, 3], true);
        }
        let st = s.schedule(&mut a);
        assert_eq!(st.seqs.len(), 2);
        assert_eq!((s.num_running(), s.num_waiting()), (2, 3));
        s.complete(&st, &mut a);
        let gen = (0..5).map(|id| (id, 3)).collect();
        // The first step's sequences need a token appended before run_all.
        s.append_token(0, 7);
        s.append_token(1, 7);
        run_all(&mut s, &mut a, &gen);
    }

    #[test]
    fn prefix_cache_hits_full_blocks_and_leaves_one_token() {
        let mut s = sched(8, 100, true);
        let mut a = BlockAllocator::new(16);
        let prompt: Vec<u32> = (0..10).collect();
        s.add(1, prompt.clone(), true);
        let st = s.schedule(&mut a);
        s.complete(&st, &mut a);
        s.remove(1, &mut a);
        assert_eq!(a.num_cached_free(), 2, "two full blocks cached");
        s.add(2, prompt.clone(), true);
        let st = s.schedule(&mut a);
        assert_eq!(st.seqs, vec![Scheduled { id: 2, start: 8, len: 2 }]);
        assert_eq!(s.get(2).unwrap().cached_prompt_tokens(), 8);
        // A prompt of exactly two blocks recomputes its last token.
        s.add(3, prompt[..8].to_vec(), true);
        let st3 = s.schedule(&mut a);
        assert_eq!(st3.seqs.last(), Some(&Scheduled { id: 3, start: 4, len: 4 }));
        // Shared blocks are held twice.
        assert_eq!(a.ref_count(s.get(2).unwrap().blocks()[0]), 2);
        // No lookup without `use_cache`.
        s.add(4, prompt.clone(), false);
        let st4 = s.schedule(&mut a);
        assert!(st4.seqs.contains(&Scheduled { id: 4, start: 0, len: 10 }));
        let stats = s.prefix_cache_stats();
        assert_eq!((stats.queried_tokens, stats.hit_tokens), (28, 12));
        for id in [2, 3, 4] {
            s.remove(id, &mut a);
        }
        assert_eq!(a.num_used(), 0);
    }

    #[test]
    fn preemption_frees_the_youngest_and_everything_finishes() {
        for caching in [false, true] {
            let mut s = sched(8, 64, caching);
            // 6 blocks of 4 tokens; each sequence grows to 6 + 10 = 16 tokens (4 blocks).
            let mut a = BlockAllocator::new(6);
            for id in 0..4 {
                s.add(id, (0..6).map(|t| t + id as u32 * 100).collect(), true);
            }
            let gen = (0..4).map(|id| (id, 10)).collect();
            run_all(&mut s, &mut a, &gen);
            assert!(s.num_preemptions() > 0);
        }
    }
}
