//! Vectorisable approximations of exp, tanh, erf and GELU: no tables, no branches, no libm
//! calls, so the compiler turns the loops that call them into SIMD code at every level.

#[inline(always)]
pub fn gelu_tanh_grad(x: f32) -> f32 {
    const C: f32 = 0.797_884_6;
    let t = tanh_approx(C * (x + 0.044_715 * x * x * x));
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3.0 * 0.044_715 * x * x)
}

#[inline(always)]
pub fn gelu_erf_grad(x: f32) -> f32 {
    // Phi(x) + x * phi(x).
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    0.5 * (1.0 + erf_approx(x * std::f32::consts::FRAC_1_SQRT_2))
        + x * INV_SQRT_2PI * exp_approx(-0.5 * x * x)
}

/// (no table, no branch, no `floor` call: rounding by the 1.5 * 2^23 trick).
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    p = p * r * r + r + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    p * f32::from_bits((ni.wrapping_add(127) as u32) << 23)
}

/// tanh via Eigen's rational approximation (accurate to a few ulp, vectorises).
#[inline(always)]
pub fn tanh_approx(x: f32) -> f32 {
    let x = x.clamp(-7.905_311, 7.905_311);
    let x2 = x * x;
    let mut p = -2.760_768_5e-16f32;
    p = p * x2 + 2.000_188e-13;
    p = p * x2 - 8.604_672e-11;
    p = p * x2 + 5.122_297e-8;
    p = p * x2 + 1.485_722_4e-5;
    p = p * x2 + 6.372_619_3e-4;
    p = p * x2 + 4.893_524_6e-3;
    p *= x;
    let mut q = 1.198_258_4e-6f32;
    q = q * x2 + 1.185_347e-4;
    q = q * x2 + 2.268_434_6e-3;
    q = q * x2 + 4.893_525e-3;
    p / q
}

#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    0.5 * x * (1.0 + tanh_approx(C * (x + 0.044_715 * x * x * x)))
}

/// erf via Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7).
#[inline(always)]
pub fn erf_approx(x: f32) -> f32 {
    let sign = if x < 0.0 { -1.0 } else { 1.0 };
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let y = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    sign * (1.0 - y * exp_approx(-a * a))
}

#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_approx(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approximations_match_std() {
        let mut x = -20.0f32;
        while x < 20.0 {
            let e = (exp_approx(x) - x.exp()).abs() / x.exp().max(1e-30);
            assert!(e < 1e-6, "exp({x}) rel err {e}");
            assert!((tanh_approx(x) - x.tanh()).abs() < 2e-6, "tanh({x})");
            let g = 0.5 * x * (1.0 + (0.797_884_6f32 * (x + 0.044_715 * x * x * x)).tanh());
            assert!(
                (gelu_tanh(x) - g).abs() < 1e-5 * (1.0 + x.abs()),
                "gelu({x})"
            );
            x += 0.013;
        }
        assert!((erf_approx(0.5) - 0.520_499_9).abs() < 1e-6);
        assert!((erf_approx(-1.5) + 0.966_105_1).abs() < 1e-6);
        assert!(exp_approx(-200.0) < 1e-37);
    }
}
