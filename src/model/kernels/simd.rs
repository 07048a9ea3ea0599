//! The SIMD level of the fused kernels, chosen once at run time so that one binary runs on any
//! x86-64: AVX-512 (f, bw, dq, vl) where the CPU has it and the `avx512` feature is built,
//! else AVX2 + FMA, else the baseline. `MONE_SIMD=scalar|avx2|avx512` caps it (for
//! comparisons); `set_level` does the same from code. The kernel bodies are plain loops with
//! 16 independent lanes that the compiler vectorises for whichever level they are built for.

use std::sync::atomic::{AtomicU8, Ordering};

use super::math::{exp_approx, gelu_erf, gelu_erf_grad, gelu_tanh, gelu_tanh_grad};
use crate::model::config::Activation;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SimdLevel {
    Scalar,
    Avx2,
    Avx512,
}

impl SimdLevel {
    pub const ALL: [SimdLevel; 3] = [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|l| l.name() == s.trim().to_ascii_lowercase())
    }
}

impl std::fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The best level this CPU and this build support.
pub fn supported() -> SimdLevel {
    static BEST: std::sync::OnceLock<SimdLevel> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            #[cfg(feature = "avx512")]
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
            {
                return SimdLevel::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Scalar
    })
}

const UNSET: u8 = u8::MAX;
static LEVEL: AtomicU8 = AtomicU8::new(UNSET);

fn from_u8(v: u8) -> SimdLevel {
    SimdLevel::ALL[(v as usize).min(2)]
}

/// The level the kernels use now: the supported one, capped by `MONE_SIMD` or `set_level`.
pub fn level() -> SimdLevel {
    let v = LEVEL.load(Ordering::Relaxed);
    if v != UNSET {
        return from_u8(v);
    }
    let cap = std::env::var("MONE_SIMD")
        .ok()
        .and_then(|s| SimdLevel::parse(&s));
    let l = cap.map_or(supported(), |c| c.min(supported()));
    LEVEL.store(l as u8, Ordering::Relaxed);
    l
}

/// Use `l` from now on (all threads); a level the CPU lacks is refused.
pub fn set_level(l: SimdLevel) -> Result<(), String> {
    if l > supported() {
        return Err(format!(
            "SIMD level {l} is not available here (best: {})",
            supported()
        ));
    }
    LEVEL.store(l as u8, Ordering::Relaxed);
    Ok(())
}

/// Defines `$name(args)` at the current level and `$at(level, args)` at a given one (capped
/// at what the CPU supports), each running `$body` compiled for that level.
macro_rules! dispatch_simd {
    ($name:ident, $at:ident, $body:ident, ($($arg:ident : $ty:ty),*)) => {
        #[allow(dead_code)]
        pub(crate) fn $name($($arg: $ty),*) {
            $at(level(), $($arg),*)
        }
        #[allow(unused_variables)]
        pub(crate) fn $at(l: $crate::model::kernels::simd::SimdLevel, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[cfg(feature = "avx512")]
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn w512($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn w256($($arg: $ty),*) {
                    $body($($arg),*)
                }
                let l = l.min(supported());
                // SAFETY (both): `supported` detected the features at run time.
                #[cfg(feature = "avx512")]
                if l == SimdLevel::Avx512 {
                    return unsafe { w512($($arg),*) };
                }
                if l >= SimdLevel::Avx2 {
                    return unsafe { w256($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

dispatch_simd!(softmax_in_place, softmax_in_place_at, softmax_body, (r: &mut [f32]));
dispatch_simd!(layer_norm_row, layer_norm_row_at, layer_norm_row_body, (x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]));
dispatch_simd!(act_row, act_row_at, act_row_body, (row: &mut [f32], bias: &[f32], act: Activation, scale: f32));
dispatch_simd!(bias_row, bias_row_at, bias_row_body, (row: &mut [f32], bias: &[f32]));
dispatch_simd!(gelu_rows, gelu_rows_at, gelu_rows_body, (x: &[f32], y: &mut [f32], act: Activation));
dispatch_simd!(gelu_grad_rows, gelu_grad_rows_at, gelu_grad_rows_body, (x: &[f32], g: &[f32], y: &mut [f32], act: Activation));

/// Lanes of the accumulators: one AVX-512 register, two AVX2 ones.
const LANES: usize = 16;

#[inline(always)]
pub(crate) fn sum16(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for k in 0..LANES {
            acc[k] += c[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn sum_sq16(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for k in 0..LANES {
            acc[k] += c[k] * c[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn max16(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    // A plain comparison, not `f32::max`, whose NaN rules cost a compare and a blend per
    // vector (about 15% of a 196-wide softmax, measured); a NaN input is skipped by both.
    for c in chunks {
        for k in 0..LANES {
            m[k] = if c[k] > m[k] { c[k] } else { m[k] };
        }
    }
    m.iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a })
}

#[inline(always)]
pub(crate) fn layer_norm_row_body(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    let n = x.len() as f32;
    let mean = sum16(x) / n;
    // Two passes (centre, then square) keep the variance accurate for large means.
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = xi - mean;
    }
    let inv = 1.0 / (sum_sq16(y) / n + eps).sqrt();
    for ((yi, wi), bi) in y.iter_mut().zip(w).zip(b) {
        *yi = *yi * inv * wi + bi;
    }
}

#[inline(always)]
pub(crate) fn softmax_body(r: &mut [f32]) {
    let m = max16(r);
    for v in r.iter_mut() {
        *v = exp_approx(*v - m);
    }
    let inv = 1.0 / sum16(r);
    r.iter_mut().for_each(|v| *v *= inv);
}

#[inline(always)]
pub(crate) fn act_row_body(row: &mut [f32], bias: &[f32], act: Activation, scale: f32) {
    let it = row.iter_mut().zip(bias);
    match act {
        Activation::GeluTanh => it.for_each(|(v, b)| *v = gelu_tanh(*v + b) * scale),
        Activation::GeluErf => it.for_each(|(v, b)| *v = gelu_erf(*v + b) * scale),
    }
}

#[inline(always)]
pub(crate) fn bias_row_body(row: &mut [f32], bias: &[f32]) {
    row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
}

#[inline(always)]
pub(crate) fn gelu_rows_body(x: &[f32], y: &mut [f32], act: Activation) {
    let it = y.iter_mut().zip(x);
    match act {
        Activation::GeluTanh => it.for_each(|(y, x)| *y = gelu_tanh(*x)),
        Activation::GeluErf => it.for_each(|(y, x)| *y = gelu_erf(*x)),
    }
}

#[inline(always)]
pub(crate) fn gelu_grad_rows_body(x: &[f32], g: &[f32], y: &mut [f32], act: Activation) {
    let it = y.iter_mut().zip(x.iter().zip(g));
    match act {
        Activation::GeluTanh => it.for_each(|(y, (x, g))| *y = g * gelu_tanh_grad(*x)),
        Activation::GeluErf => it.for_each(|(y, (x, g))| *y = g * gelu_erf_grad(*x)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64, spread: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * spread
            })
            .collect()
    }

    fn assert_rel(got: &[f32], want: &[f64], what: &str) {
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let e = (*g as f64 - w).abs() / scale;
            assert!(e <= 1e-5, "{what} [{i}]: {g} vs {w} ({e:.2e} relative)");
        }
    }

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|x| *x as f64).collect()
    }

    /// Every level this machine has against an f64 reference (softmax, LayerNorm) or the
    /// scalar level (the GELU family, whose approximations the levels share) and the AVX2
    /// level, on lengths around the 8- and 16-lane boundaries; a missing level says so.
    #[test]
    fn every_level_equals_the_scalar_reference() {
        let lengths = [1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 196, 197, 768, 1001];
        for level in [SimdLevel::Avx2, SimdLevel::Avx512] {
            if level > supported() {
                eprintln!("every_level_equals_the_scalar_reference: {level} skipped, not on this CPU or build");
                continue;
            }
            for (seed, &n) in lengths.iter().enumerate() {
                let x = data(n, seed as u64, 12.0);
                let what = |k: &str| format!("{k} at {level}, length {n}");

                let mut got = x.clone();
                softmax_in_place_at(level, &mut got);
                let m = x.iter().fold(f64::NEG_INFINITY, |m, v| m.max(*v as f64));
                let e: Vec<f64> = x.iter().map(|v| (*v as f64 - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                assert_rel(
                    &got,
                    &e.iter().map(|v| v / sum).collect::<Vec<_>>(),
                    &what("softmax"),
                );

                let (w, b) = (
                    data(n, 100 + seed as u64, 2.0),
                    data(n, 200 + seed as u64, 1.0),
                );
                let shifted: Vec<f32> = x.iter().map(|v| v + 30.0).collect();
                let mut got = vec![0f32; n];
                layer_norm_row_at(level, &shifted, &w, &b, 1e-6, &mut got);
                let xs = f64s(&shifted);
                let mean = xs.iter().sum::<f64>() / n as f64;
                let var = xs.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
                let want: Vec<f64> = xs
                    .iter()
                    .zip(w.iter().zip(&b))
                    .map(|(v, (w, b))| (v - mean) / (var + 1e-6).sqrt() * *w as f64 + *b as f64)
                    .collect();
                assert_rel(&got, &want, &what("layer norm"));

                let mut got = x.clone();
                bias_row_at(level, &mut got, &b);
                let want: Vec<f64> = x
                    .iter()
                    .zip(&b)
                    .map(|(v, b)| *v as f64 + *b as f64)
                    .collect();
                assert_rel(&got, &want, &what("bias"));

                for act in [Activation::GeluTanh, Activation::GeluErf] {
                    let g = data(n, 300 + seed as u64, 3.0);
                    let run = |l: SimdLevel| {
                        let mut a = x.clone();
                        act_row_at(l, &mut a, &b, act, 1.3);
                        let mut y = vec![0f32; n];
                        gelu_rows_at(l, &x, &mut y, act);
                        let mut dy = vec![0f32; n];
                        gelu_grad_rows_at(l, &x, &g, &mut dy, act);
                        [a, y, dy]
                    };
                    let reference = run(SimdLevel::Scalar);
                    let avx2 = run(SimdLevel::Avx2);
                    for (k, (got, (want, want2))) in run(level)
                        .iter()
                        .zip(reference.iter().zip(&avx2))
                        .enumerate()
                    {
                        let name = ["bias+act+scale", "gelu", "gelu grad"][k];
                        assert_rel(
                            got,
                            &f64s(want),
                            &what(&format!("{name} {act:?} vs scalar")),
                        );
                        assert_rel(got, &f64s(want2), &what(&format!("{name} {act:?} vs avx2")));
                    }
                }
            }
        }
    }

    #[test]
    fn levels_parse_and_a_missing_level_is_refused() {
        for l in SimdLevel::ALL {
            assert_eq!(SimdLevel::parse(l.name()), Some(l));
        }
        assert_eq!(SimdLevel::parse("AVX512"), Some(SimdLevel::Avx512));
        assert_eq!(SimdLevel::parse("sse9"), None);
        assert!(set_level(supported()).is_ok());
        if supported() < SimdLevel::Avx512 {
            assert!(set_level(SimdLevel::Avx512).is_err());
        }
        assert!(level() <= supported());
    }
}
