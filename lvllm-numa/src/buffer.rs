//! Node-bound host buffers: anonymous `mmap`, `mbind` to a node or interleaved
//! over all nodes, transparent-huge-page advice, zero-filled.
//!
//! Axes: *where* the pages live is the [`Placement`]; *whether the kernel agreed*
//! is [`HostBuffer::bound`] (containers often refuse `mbind` with `EPERM`: that is
//! recorded, not fatal, and the pages then follow the first-touch rule, so fill a
//! node's buffer from that node's pool threads); *how large the pages are* is
//! [`HostBuffer::huge_pages`].
//!
//! No page is touched here: a new buffer costs address space, not memory, until
//! it is written. Pages read before any write all map the kernel's shared zero
//! page, so a benchmark must write a buffer before it measures reading it.

use std::fmt;
use std::ptr::NonNull;

use crate::error::{Error, Result};
use crate::sys::{self, MemPolicy};

/// Buffers of at least this size get `MADV_HUGEPAGE` and a 2 MiB-aligned mapping:
/// a transparent huge page can only back a whole, aligned 2 MiB range, and the
/// expert weights are streamed, so 512× fewer TLB entries matter.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// Alignment of every buffer's start: a page, which is at least the 64 bytes
/// (one cache line, one AVX-512 load) the kernels need.
pub const MIN_ALIGN: usize = 4096;

/// Where a buffer's pages should live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Placement {
    /// No policy: the kernel's default (first touch).
    #[default]
    Default,
    /// Only on the NUMA node with this kernel id ([`NumaNode::id`](crate::NumaNode::id)): `MPOL_BIND`.
    Node(usize),
    /// Round-robin over every node this process may use: `MPOL_INTERLEAVE`.
    Interleave,
}

/// An owned, zero-filled, page-aligned host buffer placed per a [`Placement`].
pub struct HostBuffer {
    /// Start of the usable bytes (page aligned; 2 MiB aligned when huge).
    ptr: NonNull<u8>,
    /// Usable length in bytes.
    len: usize,
    /// Length of the mapping starting at `ptr` (`len` rounded up to the page or huge page).
    map_len: usize,
    placement: Placement,
    bound: bool,
    huge: bool,
}

// SAFETY: the buffer exclusively owns its mapping; `&HostBuffer` only hands out shared
// reads and `&mut HostBuffer` exclusive writes, exactly like `Vec<u8>`.
unsafe impl Send for HostBuffer {}
// SAFETY: see `Send`: shared references give read-only access to plain bytes.
unsafe impl Sync for HostBuffer {}

/// A page-aligned zero-sized type, for the dangling pointer of empty buffers.
#[repr(align(4096))]
struct PageAligned;

impl HostBuffer {
    /// Maps `len` zero bytes placed per `placement`.
    ///
    /// A refused `mbind` is not an error (see [`HostBuffer::bound`]); a refused
    /// `mmap` ([`Error::Mmap`]) and a node id beyond the node-mask size
    /// ([`Error::NodeOutOfRange`]) are. `len == 0` gives an empty buffer that maps nothing.
    pub fn new(len: usize, placement: Placement) -> Result<Self> {
        if let Placement::Node(id) = placement {
            if id >= sys::NODE_MASK_BITS {
                return Err(Error::NodeOutOfRange(id));
            }
        }
        if len == 0 {
            let ptr = NonNull::<PageAligned>::dangling().cast::<u8>();
            return Ok(HostBuffer { ptr, len, map_len: 0, placement, bound: false, huge: false });
        }
        let huge_wanted = len >= HUGE_PAGE_SIZE;
        let align = if huge_wanted { HUGE_PAGE_SIZE } else { page_size() };
        let map_len = len
            .checked_next_multiple_of(align)
            .ok_or_else(|| Error::Mmap { len, source: std::io::Error::from(std::io::ErrorKind::OutOfMemory) })?;
        let ptr = map::map_aligned(map_len, align).map_err(|source| Error::Mmap { len, source })?;
        // SAFETY: `[ptr, ptr + map_len)` is the page-aligned mapping we just created and own.
        let huge = huge_wanted && unsafe { sys::advise_huge_pages(ptr.as_ptr(), map_len) };
        let bound = match placement {
            Placement::Default => false,
            // SAFETY: as above; the mapping has no pages yet, so nothing moves.
            Placement::Node(id) => unsafe { sys::mbind(ptr.as_ptr(), map_len, MemPolicy::Bind, &[id]) },
            Placement::Interleave => match sys_mems_allowed() {
                // SAFETY: as above.
                Some(nodes) => unsafe { sys::mbind(ptr.as_ptr(), map_len, MemPolicy::Interleave, &nodes) },
                None => false,
            },
        };
        Ok(HostBuffer { ptr, len, map_len, placement, bound, huge })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised (zero-filled or written) bytes
        // for as long as `self` lives, and no `&mut` can coexist with `&self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The contents as `T`s. Fails with [`Error::BadCast`] if the length is not a
    /// whole number of `T`s; alignment always holds (buffers are page aligned).
    pub fn as_slice_of<T: bytemuck::Pod>(&self) -> Result<&[T]> {
        bytemuck::try_cast_slice(self.as_slice())
            .map_err(|_| Error::BadCast { len: self.len, elem_size: std::mem::size_of::<T>() })
    }

    /// The contents as writable `T`s; see [`HostBuffer::as_slice_of`].
    pub fn as_mut_slice_of<T: bytemuck::Pod>(&mut self) -> Result<&mut [T]> {
        let len = self.len;
        bytemuck::try_cast_slice_mut(self.as_mut_slice())
            .map_err(|_| Error::BadCast { len, elem_size: std::mem::size_of::<T>() })
    }

    /// Start of the buffer (page aligned).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Start of the buffer, writable. Writing through it needs the usual care: no
    /// other reference into the buffer may be live.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The placement asked for.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// Whether the kernel accepted the memory policy of a `Node` or `Interleave`
    /// placement. Always `false` for `Placement::Default` (no policy is set) and
    /// for empty buffers; `false` also where `mbind` is refused (containers) or
    /// unsupported (non-Linux).
    pub fn bound(&self) -> bool {
        self.bound
    }

    /// Whether `MADV_HUGEPAGE` was requested and accepted (buffers of at least
    /// [`HUGE_PAGE_SIZE`] bytes, kernels with transparent huge pages).
    pub fn huge_pages(&self) -> bool {
        self.huge
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        if self.map_len > 0 {
            // SAFETY: `[ptr, ptr + map_len)` is the mapping `new` created; it is
            // unmapped once, here, and no reference to it outlives `self`.
            unsafe { map::unmap(self.ptr, self.map_len) };
        }
    }
}

impl fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostBuffer")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("placement", &self.placement)
            .field("bound", &self.bound)
            .field("huge_pages", &self.huge)
            .finish()
    }
}

/// The nodes an interleaved buffer spreads over.
#[cfg(target_os = "linux")]
fn sys_mems_allowed() -> Option<Vec<usize>> {
    sys::mems_allowed()
}

/// No NUMA policy on this OS.
#[cfg(not(target_os = "linux"))]
fn sys_mems_allowed() -> Option<Vec<usize>> {
    None
}

/// The OS page size.
fn page_size() -> usize {
    #[cfg(unix)]
    {
        // SAFETY: `sysconf` has no preconditions.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if let Ok(p) = usize::try_from(p) {
            if p.is_power_of_two() {
                return p;
            }
        }
    }
    MIN_ALIGN
}

#[cfg(unix)]
mod map {
    //! Aligned anonymous mappings through `mmap`/`munmap`.

    use std::io;
    use std::ptr::NonNull;

    /// Maps `len` zeroed bytes (a multiple of `align`) starting at an `align`-aligned
    /// address, by over-mapping and trimming the unaligned head and tail.
    pub(super) fn map_aligned(len: usize, align: usize) -> io::Result<NonNull<u8>> {
        let page = super::page_size();
        let extra = if align > page { align } else { 0 };
        let total = len.checked_add(extra).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        // SAFETY: an anonymous private mapping at an address the kernel chooses
        // aliases nothing; all arguments are valid.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(align);
        let head = aligned - start;
        let tail = total - head - len;
        // SAFETY: `[start, start + head)` and `[aligned + len, start + total)` are
        // page-aligned parts of the mapping just created, which nobody references.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
        }
        NonNull::new(aligned as *mut u8).ok_or_else(|| io::Error::from(io::ErrorKind::Other))
    }

    /// Unmaps a range returned by [`map_aligned`].
    ///
    /// # Safety
    /// `[ptr, ptr + len)` must be exactly a range `map_aligned` returned, not yet
    /// unmapped, with no live references into it.
    pub(super) unsafe fn unmap(ptr: NonNull<u8>, len: usize) {
        // SAFETY: guaranteed by the caller.
        unsafe { libc::munmap(ptr.as_ptr().cast::<libc::c_void>(), len) };
    }
}

#[cfg(not(unix))]
mod map {
    //! Aligned zeroed allocations through the global allocator (non-Unix fallback).

    use std::alloc::{alloc_zeroed, dealloc, Layout};
    use std::io;
    use std::ptr::NonNull;

    /// Allocates `len` zeroed bytes aligned to `align`.
    pub(super) fn map_aligned(len: usize, align: usize) -> io::Result<NonNull<u8>> {
        let layout = Layout::from_size_align(len, align).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `layout` has a non-zero size (callers never map 0 bytes).
        let p = unsafe { alloc_zeroed(layout) };
        NonNull::new(p).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))
    }

    /// Frees an allocation made by [`map_aligned`].
    ///
    /// # Safety
    /// `ptr`/`len` must come from `map_aligned` (with the same alignment rule:
    /// huge when `len >= HUGE_PAGE_SIZE`), not yet freed.
    pub(super) unsafe fn unmap(ptr: NonNull<u8>, len: usize) {
        let align = if len >= super::HUGE_PAGE_SIZE { super::HUGE_PAGE_SIZE } else { super::page_size() };
        // SAFETY: the layout is the one used to allocate (guaranteed by the caller).
        unsafe { dealloc(ptr.as_ptr(), Layout::from_size_align_unchecked(len, align)) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_writable() {
        for len in [1usize, 63, 4096, 10_000, HUGE_PAGE_SIZE, HUGE_PAGE_SIZE + 4097] {
            let mut b = HostBuffer::new(len, Placement::Default).unwrap();
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % MIN_ALIGN, 0);
            if len >= HUGE_PAGE_SIZE {
                assert_eq!(b.as_ptr() as usize % HUGE_PAGE_SIZE, 0);
            }
            assert!(b.as_slice().iter().step_by(511).all(|&x| x == 0));
            assert_eq!(b.as_slice()[len - 1], 0);
            b.as_mut_slice()[len - 1] = 7;
            assert_eq!(b.as_slice()[len - 1], 7);
            assert!(!b.bound());
        }
    }

    #[test]
    fn empty_buffer_is_fine() {
        let b = HostBuffer::new(0, Placement::Node(0)).unwrap();
        assert!(b.is_empty());
        assert_eq!(b.as_slice_of::<f64>().unwrap().len(), 0);
        assert!(!b.bound());
    }

    #[test]
    fn typed_views() {
        let mut b = HostBuffer::new(64, Placement::Default).unwrap();
        b.as_mut_slice_of::<u32>().unwrap()[3] = 0xdead_beef;
        assert_eq!(b.as_slice_of::<u32>().unwrap()[3], 0xdead_beef);
        assert_eq!(b.as_slice_of::<u64>().unwrap().len(), 8);
        let odd = HostBuffer::new(6, Placement::Default).unwrap();
        assert!(matches!(odd.as_slice_of::<u32>(), Err(Error::BadCast { len: 6, elem_size: 4 })));
    }

    #[test]
    fn placements_never_fail_on_a_real_node() {
        // Node 0 exists on every Linux machine; whether mbind is allowed depends on
        // the container, so only check the recorded result is consistent.
        for placement in [Placement::Node(0), Placement::Interleave] {
            let mut b = HostBuffer::new(3 * HUGE_PAGE_SIZE, placement).unwrap();
            b.as_mut_slice().fill(1);
            assert_eq!(b.placement(), placement);
            #[cfg(target_os = "linux")]
            if b.bound() {
                let (policy, nodes) = sys::policy_of(b.as_ptr()).expect("get_mempolicy");
                let want = if placement == Placement::Interleave { MemPolicy::Interleave } else { MemPolicy::Bind };
                assert_eq!(policy, want);
                assert!(nodes.contains(&0));
            }
        }
        // A node that does not exist is refused by the kernel: recorded, not an error.
        let b = HostBuffer::new(4096, Placement::Node(1000)).unwrap();
        assert!(!b.bound());
        assert!(matches!(HostBuffer::new(4096, Placement::Node(5000)), Err(Error::NodeOutOfRange(5000))));
    }

    #[test]
    fn absurd_lengths_are_errors() {
        assert!(matches!(HostBuffer::new(usize::MAX, Placement::Default), Err(Error::Mmap { .. })));
        assert!(matches!(HostBuffer::new(usize::MAX / 2, Placement::Default), Err(Error::Mmap { .. })));
    }
}
