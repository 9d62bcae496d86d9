//! Host storage: owned aligned buffers and zero-copy views into kept-alive bytes.

use std::sync::Arc;

/// Alignment of owned buffers, one cache line (and one AVX-512 register).
pub const ALIGN: usize = 64;

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; ALIGN]);

// SAFETY: `Line` is a plain byte array with no padding (size 64 = alignment 64),
// so every bit pattern is valid and all-zero is a valid value.
unsafe impl bytemuck::Zeroable for Line {}
// SAFETY: see above; `Line` is `Copy`, `repr(C)`, has no padding and no pointers.
unsafe impl bytemuck::Pod for Line {}

/// An owned, zero-initialised, 64-byte aligned byte buffer.
#[derive(Clone)]
pub struct AlignedBuf {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        AlignedBuf { lines: vec![Line([0; ALIGN]); len.div_ceil(ALIGN)], len }
    }

    /// A buffer holding a copy of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut b = Self::zeroed(bytes.len());
        b.as_bytes_mut().copy_from_slice(bytes);
        b
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.lines)[..self.len]
    }

    /// The bytes, mutably.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.lines)[..self.len]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// Bytes owned elsewhere that views borrow from.
pub enum Backing {
    /// A memory-mapped file.
    Mmap(memmap2::Mmap),
    /// Bytes that live for the whole program (e.g. `include_bytes!`).
    Static(&'static [u8]),
    /// An owned buffer shared by several views.
    Owned(AlignedBuf),
}

impl Backing {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Static(s) => s,
            Backing::Owned(b) => b.as_bytes(),
        }
    }
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backing::Mmap(m) => write!(f, "Mmap({} bytes)", m.len()),
            Backing::Static(s) => write!(f, "Static({} bytes)", s.len()),
            Backing::Owned(b) => write!(f, "Owned({} bytes)", b.len()),
        }
    }
}

/// The bytes of a host tensor.
#[derive(Debug, Clone)]
pub enum HostStorage {
    /// An owned buffer.
    Owned(AlignedBuf),
    /// A range of a shared backing.
    View {
        /// What keeps the bytes alive.
        backing: Arc<Backing>,
        /// Start of the range.
        offset: usize,
        /// Length of the range.
        len: usize,
    },
}

impl HostStorage {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            HostStorage::Owned(b) => b.as_bytes(),
            HostStorage::View { backing, offset, len } => &backing.as_bytes()[*offset..*offset + *len],
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            HostStorage::Owned(b) => b.len(),
            HostStorage::View { len, .. } => *len,
        }
    }

    /// Whether the storage is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether this is a zero-copy view.
    pub fn is_view(&self) -> bool {
        matches!(self, HostStorage::View { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_and_sized() {
        for len in [0, 1, 63, 64, 65, 1000] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_bytes().as_ptr() as usize % ALIGN, 0);
        }
        let b = AlignedBuf::from_bytes(&[1, 2, 3]);
        assert_eq!(b.as_bytes(), &[1, 2, 3]);
    }

    #[test]
    fn view_reads_its_range() {
        let backing = Arc::new(Backing::Static(b"hello world"));
        let v = HostStorage::View { backing, offset: 6, len: 5 };
        assert_eq!(v.as_bytes(), b"world");
        assert!(v.is_view());
    }
}
