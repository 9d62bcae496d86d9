//! Host tensors: dtype + shape + storage, with typed and f32 access.

use std::borrow::Cow;
use std::sync::Arc;

use half::{bf16, f16};

use crate::dtype::f8e4m3_to_f32;
use crate::{AlignedBuf, Backing, DType, Error, HostStorage, Result, Shape};

/// Rust element types that map one-to-one onto a [`DType`].
pub trait WithDType: bytemuck::Pod {
    /// The matching dtype.
    const DTYPE: DType;
}

impl WithDType for f32 {
    const DTYPE: DType = DType::F32;
}
impl WithDType for bf16 {
    const DTYPE: DType = DType::BF16;
}
impl WithDType for f16 {
    const DTYPE: DType = DType::F16;
}
impl WithDType for u8 {
    const DTYPE: DType = DType::U8;
}
impl WithDType for i32 {
    const DTYPE: DType = DType::I32;
}
impl WithDType for i64 {
    const DTYPE: DType = DType::I64;
}

/// A row-major tensor in host memory.
#[derive(Debug, Clone)]
pub struct HostTensor {
    dtype: DType,
    shape: Shape,
    storage: HostStorage,
}

impl HostTensor {
    /// Wraps storage, checking that its length fits dtype × shape.
    pub fn new(dtype: DType, shape: impl Into<Shape>, storage: HostStorage) -> Result<Self> {
        let shape = shape.into();
        let expected = dtype.bytes_for(shape.elem_count());
        if storage.len() != expected {
            return Err(Error::ByteLength { dtype, shape, expected, got: storage.len() });
        }
        Ok(HostTensor { dtype, shape, storage })
    }

    /// A zero-copy view of `len` bytes at `offset` of `backing`.
    pub fn view(
        dtype: DType,
        shape: impl Into<Shape>,
        backing: Arc<Backing>,
        offset: usize,
        len: usize,
    ) -> Result<Self> {
        Self::new(dtype, shape, HostStorage::View { backing, offset, len })
    }

    /// An owned tensor holding a copy of `data`.
    pub fn from_slice<T: WithDType>(data: &[T], shape: impl Into<Shape>) -> Result<Self> {
        let buf = AlignedBuf::from_bytes(bytemuck::cast_slice(data));
        Self::new(T::DTYPE, shape, HostStorage::Owned(buf))
    }

    /// The dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    /// The storage.
    pub fn storage(&self) -> &HostStorage {
        &self.storage
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.storage.as_bytes()
    }

    /// The elements as `T`: borrowed when the bytes are aligned for `T`, else
    /// copied (safetensors does not promise alignment).
    pub fn typed<T: WithDType>(&self) -> Result<Cow<'_, [T]>> {
        if self.dtype != T::DTYPE {
            return Err(Error::DTypeMismatch { op: "typed", expected: T::DTYPE, got: self.dtype });
        }
        let bytes = self.as_bytes();
        Ok(match bytemuck::try_cast_slice(bytes) {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
        })
    }

    /// Makes the storage owned and 64-byte aligned if it is a misaligned view, so
    /// that [`HostTensor::typed`] borrows afterwards. Aligned views stay views.
    pub fn into_aligned(self) -> Self {
        let align = (self.dtype.size_in_bits() / 8).max(1);
        if (self.as_bytes().as_ptr() as usize).is_multiple_of(align) {
            return self;
        }
        let buf = AlignedBuf::from_bytes(self.as_bytes());
        HostTensor { dtype: self.dtype, shape: self.shape, storage: HostStorage::Owned(buf) }
    }

    /// Tells the OS it may drop the pages of a memory-mapped view (they are
    /// re-read from the file if touched again). Loaders call this once a
    /// checkpoint tensor has been repacked, so peak memory stays near the final
    /// weights' size. A no-op for owned or static storage.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        if let HostStorage::View { backing, offset, len } = &self.storage {
            if let Backing::Mmap(m) = &**backing {
                const PAGE: usize = 4096;
                let start = offset.next_multiple_of(PAGE);
                let end = (offset + len) / PAGE * PAGE;
                if end > start {
                    // SAFETY: the mapping is a read-only private file mapping that
                    // nobody writes; MADV_DONTNEED only drops its resident pages, and a
                    // later read faults the same bytes back in from the file. Only whole
                    // pages inside this tensor's range are advised (other tensors' bytes
                    // on the edge pages are untouched).
                    let _ = unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
                }
            }
        }
    }

    /// All elements converted to f32 (float dtypes only).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let b = self.as_bytes();
        Ok(match self.dtype {
            DType::F32 => bytemuck::pod_collect_to_vec(b),
            DType::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::F8E4M3 => b.iter().map(|&x| f8e4m3_to_f32(x)).collect(),
            dtype => return Err(Error::UnsupportedDType { op: "to_f32_vec", dtype }),
        })
    }

    /// All elements as i64 (integer dtypes only).
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        Ok(match self.dtype {
            DType::I64 => self.typed::<i64>()?.into_owned(),
            DType::I32 => self.typed::<i32>()?.iter().map(|&x| x as i64).collect(),
            DType::U8 => self.as_bytes().iter().map(|&x| x as i64).collect(),
            dtype => return Err(Error::UnsupportedDType { op: "to_i64_vec", dtype }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_length_is_checked() {
        let err = HostTensor::new(DType::BF16, [2, 3], HostStorage::Owned(AlignedBuf::zeroed(10))).unwrap_err();
        assert!(err.to_string().contains("needs 12 bytes"), "{err}");
    }

    #[test]
    fn misaligned_view_is_copied_then_borrowed() {
        static BYTES: [u8; 9] = [0, 0, 0, 0x80, 0x3f, 0, 0, 0, 0x40];
        let backing = Arc::new(Backing::Static(&BYTES));
        // Find an offset that is misaligned for f32.
        let base = BYTES.as_ptr() as usize;
        let off = (1..=4).find(|o| !(base + o).is_multiple_of(4)).unwrap();
        let t = HostTensor::view(DType::F32, [1], backing, off, 4).unwrap();
        assert!(matches!(t.typed::<f32>().unwrap(), Cow::Owned(_)));
        let t = t.into_aligned();
        assert!(matches!(t.typed::<f32>().unwrap(), Cow::Borrowed(_)));
    }

    #[test]
    fn converts_to_f32() {
        let t = HostTensor::from_slice(&[bf16::from_f32(1.5), bf16::from_f32(-2.0)], [2]).unwrap();
        assert_eq!(t.to_f32_vec().unwrap(), vec![1.5, -2.0]);
        assert!(t.typed::<f32>().is_err());
    }
}
