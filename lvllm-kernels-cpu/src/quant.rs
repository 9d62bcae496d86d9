//! Scalar conversions and quantizers: FP8 E4M3 ↔ f32, and the helpers that turn
//! checkpoint formats into the packed runtime formats.

/// FP8 E4M3 (fn variant) to f32.
pub fn fp8_e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((b >> 3) & 0x0f) as i32;
    let man = (b & 0x07) as f32;
    if exp == 0x0f && (b & 0x07) == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

/// f32 to the nearest FP8 E4M3 (round half to even, saturating at ±448).
pub fn f32_to_fp8_e4m3(v: f32) -> u8 {
    if v.is_nan() {
        return 0x7f;
    }
    let sign = if v.is_sign_negative() { 0x80u8 } else { 0 };
    let a = v.abs().min(448.0);
    // Search the 127 non-negative finite codes; exactness matters more than speed
    // here (load-time only).
    let mut best = 0u8;
    let mut best_err = f32::INFINITY;
    for code in 0u8..0x7f {
        let err = (fp8_e4m3_to_f32(code) - a).abs();
        if err < best_err || (err == best_err && code % 2 == 0) {
            best = code;
            best_err = err;
        }
    }
    sign | best
}

/// Expands FP8 128×128 block scales (`weight_scale_inv`, shape
/// `[⌈n/128⌉, ⌈k/128⌉]`) to one scale per row per 128 columns, for row `r`.
pub fn fp8_row_scales(scale_inv: &[f32], k: usize, r: usize) -> &[f32] {
    let kb = k.div_ceil(128);
    &scale_inv[(r / 128) * kb..(r / 128 + 1) * kb]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_round_trips_every_code() {
        for code in 0u8..=255 {
            let v = fp8_e4m3_to_f32(code);
            if v.is_nan() {
                continue;
            }
            let back = f32_to_fp8_e4m3(v);
            // +0 and -0 both decode to 0.
            assert_eq!(fp8_e4m3_to_f32(back), v, "code {code:#x}");
        }
        assert_eq!(fp8_e4m3_to_f32(f32_to_fp8_e4m3(1000.0)), 448.0);
        assert_eq!(f32_to_fp8_e4m3(1.0), 0x38);
    }
}
