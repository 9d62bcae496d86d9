//! Element types of tensors, including packed and block-quantized ones.

use std::fmt;

/// The element type of a tensor.
///
/// `I4` is packed: two signed 4-bit values per byte, low nibble first; its scales
/// live in a separate tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16.
    BF16,
    /// FP8 E4M3 (the "fn" variant: no infinities, one NaN pattern).
    F8E4M3,
    /// Packed signed int4, two per byte.
    I4,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 32-bit integer.
    I32,
    /// Signed 64-bit integer.
    I64,
}

impl DType {
    /// Size of one element in bits.
    pub const fn size_in_bits(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 32,
            DType::F16 | DType::BF16 => 16,
            DType::F8E4M3 | DType::U8 => 8,
            DType::I4 => 4,
            DType::I64 => 64,
        }
    }

    /// Bytes needed for `n` elements (packed types round up).
    pub const fn bytes_for(self, n: usize) -> usize {
        (n * self.size_in_bits()).div_ceil(8)
    }

    /// The name safetensors uses for this dtype.
    pub const fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3 => "F8_E4M3",
            DType::I4 => "I4",
            DType::U8 => "U8",
            DType::I32 => "I32",
            DType::I64 => "I64",
        }
    }

    /// Parses a safetensors dtype name; `None` for dtypes lvllm does not handle.
    pub fn from_safetensors_name(name: &str) -> Option<Self> {
        Some(match name {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F8_E4M3" => DType::F8E4M3,
            "U8" => DType::U8,
            "I32" => DType::I32,
            "I64" => DType::I64,
            _ => return None,
        })
    }

    /// Whether this is a floating-point type that converts to f32 element-wise.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F8E4M3 => "fp8-e4m3",
            DType::I4 => "int4",
            DType::U8 => "u8",
            DType::I32 => "i32",
            DType::I64 => "i64",
        };
        f.write_str(s)
    }
}

/// Converts one FP8 E4M3 (fn) byte to f32 (the kernels crate's conversion).
pub use lvllm_kernels_cpu::quant::fp8_e4m3_to_f32 as f8e4m3_to_f32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_names_round_trip() {
        assert_eq!(DType::I4.bytes_for(3), 2);
        assert_eq!(DType::BF16.bytes_for(3), 6);
        for d in [DType::F32, DType::F16, DType::BF16, DType::F8E4M3, DType::U8, DType::I32, DType::I64] {
            assert_eq!(DType::from_safetensors_name(d.safetensors_name()), Some(d));
        }
        assert_eq!(DType::from_safetensors_name("F64"), None);
    }

    #[test]
    fn fp8_e4m3_values() {
        assert_eq!(f8e4m3_to_f32(0x00), 0.0);
        assert_eq!(f8e4m3_to_f32(0x38), 1.0);
        assert_eq!(f8e4m3_to_f32(0xb8), -1.0);
        assert_eq!(f8e4m3_to_f32(0x7e), 448.0);
        assert_eq!(f8e4m3_to_f32(0x01), 2f32.powi(-9));
        assert!(f8e4m3_to_f32(0x7f).is_nan());
    }
}
