//! From a compute budget e_c to per-expert capacities (the paper's section 3.3).
//!
//! c maximises sum_i c_i * delta^(i-1) - beta * sum_i c_i ln c_i subject to sum c_i = 1 and
//! sum c_i * w_i = e_c (w_i = d_i / D). The optimum is c_i ∝ exp((delta^(i-1) + lambda w_i) / beta);
//! the constraint is monotone in lambda, so bisection finds it exactly.

use super::ModelError;

pub const BETA: f64 = 10.0;
pub const DELTA: f64 = 2.0;

/// Relative widths w_i = d_i / D, smallest first.
pub fn relative_widths(num_experts: usize) -> Vec<f64> {
    (0..num_experts)
        .map(|i| 0.5f64.powi((num_experts - 1 - i) as i32))
        .collect()
}

/// The smallest reachable e_c for `num_experts` (every token on the narrowest expert).
pub fn min_capacity(num_experts: usize) -> f64 {
    relative_widths(num_experts)[0]
}

fn dist(lambda: f64, w: &[f64]) -> Vec<f64> {
    let logits: Vec<f64> = w
        .iter()
        .enumerate()
        .map(|(i, wi)| (DELTA.powi(i as i32) + lambda * wi) / BETA)
        .collect();
    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

fn budget(c: &[f64], w: &[f64]) -> f64 {
    c.iter().zip(w).map(|(a, b)| a * b).sum()
}

/// Capacities c_1..c_E (smallest expert first) for the budget `e_c`.
pub fn solve(e_c: f64, num_experts: usize) -> Result<Vec<f64>, ModelError> {
    if num_experts == 0 {
        return Err(ModelError::Capacity(
            "num_experts must be at least 1".into(),
        ));
    }
    let w = relative_widths(num_experts);
    let lo_cap = w[0];
    const EPS: f64 = 1e-9;
    if !e_c.is_finite() || e_c < lo_cap - EPS || e_c > 1.0 + EPS {
        return Err(ModelError::Capacity(format!(
            "capacity e_c must be in [{lo_cap}, 1] for {num_experts} experts, got {e_c}"
        )));
    }
    let one_hot = |k: usize| {
        let mut c = vec![0.0; num_experts];
        c[k] = 1.0;
        c
    };
    if num_experts == 1 || e_c >= 1.0 - EPS {
        return Ok(one_hot(num_experts - 1));
    }
    if e_c <= lo_cap + EPS {
        return Ok(one_hot(0));
    }
    let (mut lo, mut hi) = (-1.0f64, 1.0f64);
    while budget(&dist(lo, &w), &w) > e_c {
        lo *= 2.0;
        if lo < -1e12 {
            break;
        }
    }
    while budget(&dist(hi, &w), &w) < e_c {
        hi *= 2.0;
        if hi > 1e12 {
            break;
        }
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if budget(&dist(mid, &w), &w) < e_c {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(dist(0.5 * (lo + hi), &w))
}

/// Tokens per expert for N tokens: floor(c_j * N) for every expert but the smallest, which
/// takes the rest (the leftovers of the floors), as EPR does.
pub fn token_counts(capacities: &[f64], n: usize) -> Vec<usize> {
    let mut counts: Vec<usize> = capacities
        .iter()
        .map(|c| ((c * n as f64) + 1e-9).floor() as usize)
        .collect();
    let rest: usize = counts[1..].iter().sum();
    counts[0] = n.saturating_sub(rest);
    counts
}

/// The e_c actually realised by integer token counts.
pub fn realised_capacity(counts: &[usize]) -> f64 {
    let w = relative_widths(counts.len());
    let n: usize = counts.iter().sum();
    if n == 0 {
        return 0.0;
    }
    counts
        .iter()
        .zip(&w)
        .map(|(c, w)| *c as f64 * w)
        .sum::<f64>()
        / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &[(f64, [f64; 4])] = &[
        (0.15, [0.816, 0.176, 0.008, 0.000]),
        (0.20, [0.601, 0.310, 0.083, 0.006]),
        (0.25, [0.488, 0.330, 0.150, 0.031]),
        (0.30, [0.414, 0.321, 0.194, 0.071]),
        (0.40, [0.307, 0.282, 0.239, 0.171]),
        (0.50, [0.227, 0.235, 0.251, 0.287]),
        (0.60, [0.161, 0.184, 0.241, 0.413]),
        (0.70, [0.106, 0.134, 0.214, 0.546]),
        (0.80, [0.059, 0.084, 0.170, 0.687]),
        (0.90, [0.022, 0.037, 0.105, 0.835]),
        (0.95, [0.008, 0.016, 0.062, 0.914]),
    ];

    #[test]
    fn reproduces_the_reference_table() {
        for (e_c, want) in TABLE {
            let c = solve(*e_c, 4).unwrap();
            for (got, want) in c.iter().zip(want) {
                assert!(
                    (got - want).abs() < 0.005,
                    "e_c {e_c}: got {c:?}, want {want:?}"
                );
            }
            assert!((c.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            assert!((budget(&c, &relative_widths(4)) - e_c).abs() < 1e-9);
        }
    }

    #[test]
    fn boundaries_and_errors() {
        assert_eq!(solve(0.125, 4).unwrap(), vec![1.0, 0.0, 0.0, 0.0]);
        assert_eq!(solve(1.0, 4).unwrap(), vec![0.0, 0.0, 0.0, 1.0]);
        assert!(solve(0.1, 4).is_err());
        assert!(solve(1.01, 4).is_err());
        assert!(solve(f64::NAN, 4).is_err());
        assert_eq!(solve(1.0, 1).unwrap(), vec![1.0]);
        // e_c = 0.15 is close to the lower bound but still interior.
        let c = solve(0.15, 4).unwrap();
        assert!(c[3] > 0.0 && c[3] < 1e-4);
    }

    #[test]
    fn counts_floor_and_leftovers_go_to_the_smallest() {
        let c = solve(0.5, 4).unwrap();
        let n = 196;
        let k = token_counts(&c, n);
        assert_eq!(k.iter().sum::<usize>(), n);
        for j in 1..4 {
            assert_eq!(k[j], (c[j] * n as f64).floor() as usize);
        }
        assert_eq!(token_counts(&[0.0, 0.0, 0.0, 1.0], 10), vec![0, 0, 0, 10]);
        assert!((realised_capacity(&[0, 0, 0, 10]) - 1.0).abs() < 1e-12);
        assert!((realised_capacity(&[10, 0, 0, 0]) - 0.125).abs() < 1e-12);
    }
}
