//! CUDA kernels and launchers for lvllm.
//!
//! - CUDA C sources (`kernels.cu`) are embedded as a string and compiled by NVRTC
//!   for the device's architecture on first use, then cached on disk (directory
//!   from the caller) keyed by a hash of source, architecture and NVRTC version.
//!   The kernels are self-contained (bf16 as bit operations), so no CUDA headers
//!   are needed: the driver and NVRTC libraries suffice.
//! - `cudarc` loads `libcuda`, `libnvrtc` and `libcublas` at run time
//!   (`dynamic-loading`): building needs no CUDA toolkit. Its loader panics when a
//!   library is missing, so [`Gpu::new`] checks each one first and returns a typed
//!   [`Error`] ("no CUDA driver found", ...). CUDA 13 sonames are searched first,
//!   then 12.x.
//! - [`Gpu`] owns a context, one stream, a cuBLAS handle and the compiled module;
//!   its methods are typed launchers over device pointers.

mod gpu;

pub use cudarc::driver::CudaGraph;
pub use gpu::{DevBuf, Gpu, MappedHost, RouterHandoff, GEMV_MAX_T, ROUTER_MAX_EXPERTS};

/// Errors of `lvllm-kernels-cuda`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No CUDA driver library (`libcuda.so.1`) could be loaded.
    #[error("no CUDA driver found (libcuda could not be loaded); install the NVIDIA driver or use the CPU device")]
    NoDriver,
    /// No NVRTC library could be loaded.
    #[error("no NVRTC found (libnvrtc.so.13 or .12); install the CUDA runtime libraries (cuda-nvrtc)")]
    NoNvrtc,
    /// No cuBLAS library could be loaded.
    #[error("no cuBLAS found (libcublas.so.13 or .12); install the CUDA runtime libraries (libcublas)")]
    NoCublas,
    /// The driver reports no device with this ordinal.
    #[error("no CUDA device {ordinal} ({count} found)")]
    NoDevice {
        /// Requested ordinal.
        ordinal: usize,
        /// Devices present.
        count: usize,
    },
    /// A driver call failed.
    #[error("CUDA driver error: {0}")]
    Driver(String),
    /// NVRTC failed to compile the kernels.
    #[error("NVRTC compilation failed: {0}")]
    Compile(String),
    /// A cuBLAS call failed.
    #[error("cuBLAS error: {0}")]
    Cublas(String),
    /// Arguments disagree with each other.
    #[error("invalid kernel arguments: {0}")]
    Args(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Checks that the driver, NVRTC and cuBLAS libraries can be loaded, without
/// touching a device.
pub fn check_libraries() -> Result<()> {
    // SAFETY: each call only tries to dlopen the library's candidate names.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            return Err(Error::NoDriver);
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            return Err(Error::NoNvrtc);
        }
        if !cudarc::cublas::sys::is_culib_present() {
            return Err(Error::NoCublas);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// cudarc's loader searches CUDA 13 sonames first and also finds 12.x ones.
    #[test]
    fn library_candidates_cover_cuda_13_and_12() {
        for lib in ["nvrtc", "cublas"] {
            let c = cudarc::get_lib_name_candidates(lib);
            let i13 = c.iter().position(|n| n == &format!("lib{lib}.so.13")).expect("CUDA 13 soname");
            let i12 = c.iter().position(|n| n == &format!("lib{lib}.so.12")).expect("CUDA 12 soname");
            assert!(i13 < i12, "{c:?}");
        }
        assert!(cudarc::get_lib_name_candidates("cuda").contains(&"libcuda.so.1".to_string()));
    }

    /// Without a driver, the check is a typed error, not a panic.
    #[test]
    fn missing_libraries_are_errors() {
        match super::check_libraries() {
            Ok(()) => println!("CUDA libraries present"),
            Err(e) => assert!(
                e.to_string().contains("no CUDA driver")
                    || e.to_string().contains("no NVRTC")
                    || e.to_string().contains("no cuBLAS")
            ),
        }
    }
}
