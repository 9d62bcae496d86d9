//! The KV block allocator: the cache's physical blocks, reference counted, with
//! a prefix cache.
//!
//! Each running sequence holds a block table (its logical blocks → physical
//! blocks) allocated from here. A block whose `block_size` tokens are all in the
//! cache can be *registered* under a [`BlockHash`]: the hash of its token ids
//! chained with the hash of the block before it, so equal hashes mean equal
//! prefixes. A later sequence whose prompt starts with the same full blocks
//! [`acquires`](BlockAllocator::acquire_cached) them instead of computing them
//! again; shared blocks count their holders. A released block with a hash stays
//! in the cache, reusable, until a fresh allocation needs it: blocks without a
//! hash are handed out first, then cached ones, least recently released first
//! (LRU eviction).
//!
//! Hashes are 64-bit SipHash keyed randomly per allocator, so collisions are
//! negligible and cannot be provoked by prompts chosen without the key.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher, RandomState};

/// The hash of a full block: its token ids chained with the previous block's hash.
pub type BlockHash = u64;

#[derive(Debug, Clone, Copy, Default)]
struct Block {
    /// Sequences holding the block.
    refs: u32,
    /// Its registered hash, if it is a cached full block.
    hash: Option<BlockHash>,
    /// When it was last released (key into `evictable`).
    released_at: u64,
}

/// Physical blocks `0..num_blocks`: free, held (ref-counted) or cached.
#[derive(Debug)]
pub struct BlockAllocator {
    blocks: Vec<Block>,
    /// Free blocks without a hash (popped from the end: low ids first).
    free: Vec<u32>,
    /// Free blocks with a hash, by release time (oldest first).
    evictable: BTreeMap<u64, u32>,
    /// Registered hash → block.
    cached: HashMap<BlockHash, u32>,
    tick: u64,
    hasher: RandomState,
}

impl BlockAllocator {
    /// All `num_blocks` blocks free.
    pub fn new(num_blocks: usize) -> Self {
        BlockAllocator {
            blocks: vec![Block::default(); num_blocks],
            free: (0..num_blocks as u32).rev().collect(),
            evictable: BTreeMap::new(),
            cached: HashMap::new(),
            tick: 0,
            hasher: RandomState::new(),
        }
    }

    /// Blocks no sequence holds (cached ones included: they can be evicted).
    pub fn num_free(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks held by at least one sequence.
    pub fn num_used(&self) -> usize {
        self.blocks.len() - self.num_free()
    }

    /// Free blocks that still hold a cached prefix.
    pub fn num_cached_free(&self) -> usize {
        self.evictable.len()
    }

    /// Total blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The hash of a full block of `tokens` after a block hashed `parent`
    /// (`None` for the first block).
    pub fn hash_block(&self, parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        let mut h = self.hasher.build_hasher();
        h.write_u8(parent.is_some() as u8);
        h.write_u64(parent.unwrap_or(0));
        h.write_usize(tokens.len());
        for &t in tokens {
            h.write_u32(t);
        }
        h.finish()
    }

    /// Takes `n` blocks (each held once), or none if fewer are free. Blocks
    /// without a hash go first, then cached blocks, least recently released
    /// first; an evicted block loses its hash.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.num_free() {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let b = match self.free.pop() {
                Some(b) => b,
                None => {
                    let (_, b) = self.evictable.pop_first()?;
                    if let Some(h) = self.blocks[b as usize].hash.take() {
                        self.cached.remove(&h);
                    }
                    b
                }
            };
            self.blocks[b as usize].refs = 1;
            out.push(b);
        }
        Some(out)
    }

    /// Sequences holding `block` (0 when free).
    pub fn ref_count(&self, block: u32) -> u32 {
        self.blocks.get(block as usize).map_or(0, |b| b.refs)
    }

    /// The cached block registered under `hash`, if any (without taking it).
    pub fn lookup(&self, hash: BlockHash) -> Option<u32> {
        self.cached.get(&hash).copied()
    }

    /// Takes one more reference to the cached block registered under `hash`
    /// (reviving it if it was free), or `None` if no block has that hash.
    pub fn acquire_cached(&mut self, hash: BlockHash) -> Option<u32> {
        let b = *self.cached.get(&hash)?;
        let blk = &mut self.blocks[b as usize];
        if blk.refs == 0 {
            self.evictable.remove(&blk.released_at);
        }
        blk.refs += 1;
        Some(b)
    }

    /// Registers held block `block`, now full, under `hash` so later sequences
    /// can share it. A block already registered, or a hash another block holds,
    /// leaves everything as it is.
    pub fn register(&mut self, block: u32, hash: BlockHash) {
        let blk = &mut self.blocks[block as usize];
        debug_assert!(blk.refs > 0, "register of free block {block}");
        if blk.hash.is_some() || self.cached.contains_key(&hash) {
            return;
        }
        blk.hash = Some(hash);
        self.cached.insert(hash, block);
    }

    /// Drops one reference to each block; a block nobody holds becomes free
    /// (and stays cached if it has a hash).
    ///
    /// # Panics
    /// In debug builds, on a block out of range or already free (a double free
    /// is an engine bug).
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks {
            let blk = &mut self.blocks[b as usize];
            debug_assert!(blk.refs > 0, "bad release of block {b}");
            if blk.refs == 0 {
                // Already free: listing it again would hand one block to two
                // sequences. Ignore the double release (an engine bug).
                continue;
            }
            blk.refs -= 1;
            if blk.refs > 0 {
                continue;
            }
            if blk.hash.is_some() {
                self.tick += 1;
                blk.released_at = self.tick;
                self.evictable.insert(self.tick, b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// Forgets every cached hash (free cached blocks become plain free blocks).
    pub fn clear_cache(&mut self) {
        for (_, b) in std::mem::take(&mut self.evictable) {
            self.free.push(b);
        }
        for blk in &mut self.blocks {
            blk.hash = None;
        }
        self.cached.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_distinct_blocks_and_refuses_overcommit() {
        let mut a = BlockAllocator::new(4);
        let x = a.allocate(3).unwrap();
        assert_eq!(x, vec![0, 1, 2]);
        assert!(a.allocate(2).is_none());
        let y = a.allocate(1).unwrap();
        assert_eq!(y, vec![3]);
        a.release(&x);
        assert_eq!(a.num_free(), 3);
        let z = a.allocate(3).unwrap();
        let mut all: Vec<u32> = z.iter().chain(&y).copied().collect();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3]);
    }

    #[test]
    fn cached_blocks_are_shared_and_evicted_lru() {
        let mut a = BlockAllocator::new(4);
        let h0 = a.hash_block(None, &[1, 2]);
        let h1 = a.hash_block(Some(h0), &[3, 4]);
        assert_ne!(h0, a.hash_block(None, &[1, 3]));
        assert_ne!(h1, a.hash_block(Some(h0 ^ 1), &[3, 4]), "the parent is part of the hash");
        let s = a.allocate(2).unwrap();
        a.register(s[0], h0);
        a.register(s[1], h1);
        // A second holder shares block 0.
        assert_eq!(a.acquire_cached(h0), Some(s[0]));
        assert_eq!(a.num_used(), 2);
        a.release(&s);
        assert_eq!(a.num_used(), 1, "block 0 is still held once");
        assert_eq!(a.num_cached_free(), 1);
        a.release(&[s[0]]);
        assert_eq!((a.num_used(), a.num_cached_free()), (0, 2));
        // Plain free blocks go first; then the least recently released cached one.
        let p = a.allocate(2).unwrap();
        assert!(!p.contains(&s[0]) && !p.contains(&s[1]));
        let e = a.allocate(1).unwrap();
        assert_eq!(e, vec![s[1]], "block 1 was released before block 0");
        assert_eq!(a.lookup(h1), None, "evicted");
        assert_eq!(a.acquire_cached(h0), Some(s[0]), "still cached");
        assert_eq!(a.num_free(), 0);
        a.release(&p);
        a.release(&e);
        a.release(&[s[0]]);
        a.clear_cache();
        assert_eq!((a.num_free(), a.num_cached_free()), (4, 0));
        assert_eq!(a.lookup(h0), None);
    }
}
