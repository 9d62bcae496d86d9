//! Thin, safe wrappers over the Linux calls this crate needs: CPU affinity
//! (`sched_getaffinity` / `sched_setaffinity`), memory policy (`mbind`,
//! `get_mempolicy`) and huge-page advice (`madvise`).
//!
//! Each wrapper reports failure as `false` / `None` instead of an error: the
//! callers treat all of these as best-effort (containers often forbid `mbind`,
//! and a synthetic topology may name CPUs that do not exist). On other operating
//! systems every wrapper is a no-op that reports failure, which gives the
//! single-node fallback.

/// Memory policy for [`mbind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MemPolicy {
    /// `MPOL_BIND`: allocate only on these nodes.
    Bind,
    /// `MPOL_INTERLEAVE`: spread pages round-robin over these nodes.
    Interleave,
}

/// Largest CPU mask we ask the kernel about, in bits.
#[cfg(target_os = "linux")]
const MAX_CPU_MASK_BITS: usize = 1 << 16;

/// Bits of a node mask (one `u64` word per 64 nodes); `Placement::Node` ids must be below this.
pub(crate) const NODE_MASK_BITS: usize = 1024;

/// Sets bit `i` of a word mask, growing it as needed.
#[cfg(target_os = "linux")]
fn set_bit(mask: &mut Vec<u64>, i: usize) {
    let word = i / 64;
    if mask.len() <= word {
        mask.resize(word + 1, 0);
    }
    mask[word] |= 1u64 << (i % 64);
}

/// Indices of the set bits of a word mask, ascending.
#[cfg(target_os = "linux")]
fn bits(mask: &[u64]) -> Vec<usize> {
    let mut out = Vec::new();
    for (w, &word) in mask.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            out.push(w * 64 + word.trailing_zeros() as usize);
            word &= word - 1;
        }
    }
    out
}

/// The CPUs the calling thread may run on (`sched_getaffinity(0)`), ascending.
#[cfg(target_os = "linux")]
pub(crate) fn allowed_cpus() -> Option<Vec<usize>> {
    let mut nbits = 1024;
    while nbits <= MAX_CPU_MASK_BITS {
        let mut mask = vec![0u64; nbits / 64];
        // SAFETY: `mask` is a writable buffer of exactly `nbits / 8` bytes, the size we
        // pass; the kernel writes at most that many bytes. `cpu_set_t` is a plain bit
        // array, so any size that is a multiple of 8 bytes is valid for the raw call.
        let rc = unsafe { libc::sched_getaffinity(0, nbits / 8, mask.as_mut_ptr().cast::<libc::cpu_set_t>()) };
        if rc == 0 {
            return Some(bits(&mask));
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return None;
        }
        nbits *= 2;
    }
    None
}

/// The CPUs the calling thread may run on; unknown on this OS.
#[cfg(not(target_os = "linux"))]
pub(crate) fn allowed_cpus() -> Option<Vec<usize>> {
    None
}

/// Pins the calling thread to `cpus`. Returns whether the kernel accepted it.
#[cfg(target_os = "linux")]
pub(crate) fn pin_current_thread(cpus: &[usize]) -> bool {
    if cpus.is_empty() || cpus.iter().any(|&c| c >= MAX_CPU_MASK_BITS) {
        return false;
    }
    let mut mask = Vec::new();
    for &c in cpus {
        set_bit(&mut mask, c);
    }
    // The glibc wrapper passes the size through; keep it at least one `cpu_set_t`.
    let min_words = std::mem::size_of::<libc::cpu_set_t>() / 8;
    if mask.len() < min_words {
        mask.resize(min_words, 0);
    }
    // SAFETY: `mask` holds `mask.len() * 8` readable bytes, the size we pass; the
    // kernel only reads it.
    let rc = unsafe { libc::sched_setaffinity(0, mask.len() * 8, mask.as_ptr().cast::<libc::cpu_set_t>()) };
    rc == 0
}

/// Pins the calling thread; not supported on this OS.
#[cfg(not(target_os = "linux"))]
pub(crate) fn pin_current_thread(_cpus: &[usize]) -> bool {
    false
}

/// `MPOL_BIND` from `<linux/mempolicy.h>`.
#[cfg(target_os = "linux")]
const MPOL_BIND: libc::c_long = 2;
/// `MPOL_INTERLEAVE` from `<linux/mempolicy.h>`.
#[cfg(target_os = "linux")]
const MPOL_INTERLEAVE: libc::c_long = 3;
/// `MPOL_F_ADDR`: `get_mempolicy` reports the policy of the mapping at `addr`.
#[cfg(all(target_os = "linux", test))]
const MPOL_F_ADDR: libc::c_ulong = 1 << 1;
/// `MPOL_F_MEMS_ALLOWED`: `get_mempolicy` reports the nodes this process may use.
#[cfg(target_os = "linux")]
const MPOL_F_MEMS_ALLOWED: libc::c_ulong = 1 << 2;

/// The NUMA nodes this process may allocate on (`get_mempolicy(MPOL_F_MEMS_ALLOWED)`).
#[cfg(target_os = "linux")]
pub(crate) fn mems_allowed() -> Option<Vec<usize>> {
    let mut mask = [0u64; NODE_MASK_BITS / 64];
    let mut mode: libc::c_int = 0;
    // SAFETY: `mode` is a valid `int` out-pointer and `mask` holds NODE_MASK_BITS
    // writable bits, matching `maxnode`; with MPOL_F_MEMS_ALLOWED the address
    // argument is ignored.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut mode as *mut libc::c_int,
            mask.as_mut_ptr(),
            NODE_MASK_BITS as libc::c_ulong,
            std::ptr::null_mut::<libc::c_void>(),
            MPOL_F_MEMS_ALLOWED,
        )
    };
    let nodes = bits(&mask);
    (rc == 0 && !nodes.is_empty()).then_some(nodes)
}

/// Applies a memory policy over `nodes` to `[addr, addr + len)`. Returns whether
/// the kernel accepted it.
///
/// # Safety
/// `[addr, addr + len)` must be a page-aligned range of a mapping owned by the
/// caller (changing its policy must not affect memory anyone else relies on).
#[cfg(target_os = "linux")]
pub(crate) unsafe fn mbind(addr: *mut u8, len: usize, policy: MemPolicy, nodes: &[usize]) -> bool {
    if nodes.is_empty() || nodes.iter().any(|&n| n >= NODE_MASK_BITS) {
        return false;
    }
    let mut mask = [0u64; NODE_MASK_BITS / 64];
    for &n in nodes {
        mask[n / 64] |= 1u64 << (n % 64);
    }
    let mode = match policy {
        MemPolicy::Bind => MPOL_BIND,
        MemPolicy::Interleave => MPOL_INTERLEAVE,
    };
    // SAFETY: the caller guarantees the range is theirs; `mask` holds NODE_MASK_BITS
    // readable bits and the kernel reads `maxnode - 1` of them (libnuma passes
    // size + 1 for the same reason). Flags 0: the fresh mapping has no pages to move.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr.cast::<libc::c_void>(),
            len as libc::c_ulong,
            mode,
            mask.as_ptr(),
            (NODE_MASK_BITS + 1) as libc::c_ulong,
            0 as libc::c_uint,
        )
    };
    rc == 0
}

/// Memory policy is not supported on this OS.
///
/// # Safety
/// Always safe; `unsafe` only to match the Linux signature.
#[cfg(not(target_os = "linux"))]
pub(crate) unsafe fn mbind(_addr: *mut u8, _len: usize, _policy: MemPolicy, _nodes: &[usize]) -> bool {
    false
}

/// The memory policy mode and node list of the mapping containing `addr`.
#[cfg(all(target_os = "linux", test))]
pub(crate) fn policy_of(addr: *const u8) -> Option<(MemPolicy, Vec<usize>)> {
    let mut mask = [0u64; NODE_MASK_BITS / 64];
    let mut mode: libc::c_int = 0;
    // SAFETY: out-pointers as in `mems_allowed`; with MPOL_F_ADDR the kernel only
    // looks up the mapping containing `addr`, it does not dereference it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut mode as *mut libc::c_int,
            mask.as_mut_ptr(),
            NODE_MASK_BITS as libc::c_ulong,
            addr as *mut libc::c_void,
            MPOL_F_ADDR,
        )
    };
    if rc != 0 {
        return None;
    }
    let policy = match libc::c_long::from(mode) {
        MPOL_BIND => MemPolicy::Bind,
        MPOL_INTERLEAVE => MemPolicy::Interleave,
        _ => return None,
    };
    Some((policy, bits(&mask)))
}

/// Advises the kernel to back `[addr, addr + len)` with transparent huge pages.
/// Returns whether the advice was accepted.
///
/// # Safety
/// `[addr, addr + len)` must be a page-aligned range of a mapping owned by the caller.
#[cfg(target_os = "linux")]
pub(crate) unsafe fn advise_huge_pages(addr: *mut u8, len: usize) -> bool {
    // SAFETY: the caller guarantees the range; MADV_HUGEPAGE never changes contents.
    unsafe { libc::madvise(addr.cast::<libc::c_void>(), len, libc::MADV_HUGEPAGE) == 0 }
}

/// Huge-page advice is not supported on this OS.
///
/// # Safety
/// Always safe; `unsafe` only to match the Linux signature.
#[cfg(not(target_os = "linux"))]
pub(crate) unsafe fn advise_huge_pages(_addr: *mut u8, _len: usize) -> bool {
    false
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn bit_helpers_round_trip() {
        let mut m = Vec::new();
        for i in [0, 3, 63, 64, 130] {
            set_bit(&mut m, i);
        }
        assert_eq!(bits(&m), vec![0, 3, 63, 64, 130]);
    }

    #[test]
    fn affinity_is_readable_and_pinning_to_it_works() {
        let cpus = allowed_cpus().expect("sched_getaffinity");
        assert!(!cpus.is_empty());
        // Pinning to the set we already have changes nothing and must succeed.
        std::thread::spawn(move || assert!(pin_current_thread(&cpus))).join().unwrap();
        // CPUs that cannot exist are refused, not a crash.
        assert!(!pin_current_thread(&[MAX_CPU_MASK_BITS + 5]));
        assert!(!pin_current_thread(&[]));
    }

    #[test]
    fn mems_allowed_lists_node_zero_or_nothing() {
        if let Some(nodes) = mems_allowed() {
            assert!(!nodes.is_empty());
        }
    }
}
