//! The KV block allocator: a free list of the cache's physical blocks.
//!
//! Each running sequence holds a block table (its logical blocks → physical
//! blocks) allocated from here. Sharing blocks between sequences (reference
//! counts, prefix-cache hashes) comes with the scheduler.

/// A free list over `0..num_blocks`.
#[derive(Debug)]
pub struct BlockAllocator {
    free: Vec<u32>,
    num_blocks: usize,
}

impl BlockAllocator {
    /// All `num_blocks` blocks free.
    pub fn new(num_blocks: usize) -> Self {
        // Pop from the end: low block ids go out first.
        BlockAllocator { free: (0..num_blocks as u32).rev().collect(), num_blocks }
    }

    /// Free blocks.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Total blocks.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Takes `n` blocks, or none if fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        Some(self.free.split_off(self.free.len() - n).into_iter().rev().collect())
    }

    /// Returns blocks to the free list.
    ///
    /// # Panics
    /// In debug builds, on a block out of range or already free (a double free
    /// is an engine bug).
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks {
            debug_assert!((b as usize) < self.num_blocks && !self.free.contains(&b), "bad release of block {b}");
            self.free.push(b);
        }
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
}
