//! The latency profile (forward time per capacity and batch size, measured on the device) and
//! the online slow-down estimate that scales it to what the device does now.

use serde::{Deserialize, Serialize};

/// Measured latency of one forward, per capacity and batch size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatencyProfile {
    /// Ascending.
    pub capacities: Vec<f64>,
    /// Ascending, the first at least 1.
    pub batches: Vec<usize>,
    /// `ms[i][j]`: median forward time at `capacities[i]` and `batches[j]`.
    pub ms: Vec<Vec<f64>>,
    /// What the profile was measured on (model, device, threads); a cache key.
    #[serde(default)]
    pub key: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ControllerError {
    #[error("latency profile: {0}")]
    Profile(String),
    #[error("controller settings: {0}")]
    Settings(String),
}

fn interp(xs: &[f64], x: f64) -> (usize, usize, f64) {
    if xs.len() == 1 || x <= xs[0] {
        return (0, 0, 0.0);
    }
    let last = xs.len() - 1;
    if x >= xs[last] {
        return (last, last, 0.0);
    }
    let j = xs.partition_point(|v| *v <= x).min(last);
    let i = j - 1;
    (i, j, (x - xs[i]) / (xs[j] - xs[i]))
}

impl LatencyProfile {
    /// Measure with `time_ms(capacity, batch)`, which runs one forward and returns its time.
    /// One warm-up round, then `iters` rounds over the whole grid (so slow drift, e.g. memory
    /// still being mapped in, spreads over every cell instead of biasing the first ones); the
    /// median per cell is kept.
    pub fn measure(
        capacities: &[f64],
        batches: &[usize],
        iters: usize,
        key: &str,
        mut time_ms: impl FnMut(f64, usize) -> Result<f64, String>,
    ) -> Result<Self, ControllerError> {
        let mut samples = vec![vec![Vec::new(); batches.len()]; capacities.len()];
        for round in 0..=iters.max(1) {
            for (i, &c) in capacities.iter().enumerate() {
                for (j, &b) in batches.iter().enumerate() {
                    let t = time_ms(c, b).map_err(ControllerError::Profile)?;
                    if round > 0 {
                        samples[i][j].push(t);
                    }
                }
            }
        }
        let ms = samples
            .into_iter()
            .map(|row| {
                row.into_iter()
                    .map(|mut v| {
                        v.sort_by(f64::total_cmp);
                        v[v.len() / 2]
                    })
                    .collect()
            })
            .collect();
        let p = Self {
            capacities: capacities.to_vec(),
            batches: batches.to_vec(),
            ms,
            key: key.to_string(),
        };
        p.validate()?;
        Ok(p)
    }

    pub fn validate(&self) -> Result<(), ControllerError> {
        let bad = |m: &str| Err(ControllerError::Profile(m.to_string()));
        if self.capacities.is_empty() || self.batches.is_empty() {
            return bad("no capacities or batch sizes");
        }
        if self.capacities.windows(2).any(|w| w[0] >= w[1])
            || self.batches.windows(2).any(|w| w[0] >= w[1])
            || self.batches[0] == 0
        {
            return bad("capacities and batch sizes must be strictly ascending (batches from 1)");
        }
        if self.ms.len() != self.capacities.len()
            || self.ms.iter().any(|r| r.len() != self.batches.len())
        {
            return bad("the table's shape does not match its capacities and batch sizes");
        }
        if self
            .ms
            .iter()
            .flatten()
            .any(|v| !v.is_finite() || *v <= 0.0)
        {
            return bad("every time must be a positive number of milliseconds");
        }
        Ok(())
    }

    /// Predicted forward time: bilinear between measured points; past the largest batch, the
    /// largest batch's time per clip.
    pub fn predict(&self, capacity: f64, batch: usize) -> f64 {
        let (ci, cj, ct) = interp(&self.capacities, capacity);
        let bs: Vec<f64> = self.batches.iter().map(|b| *b as f64).collect();
        let n = batch.max(1) as f64;
        let last = bs.len() - 1;
        let at = |row: &[f64]| {
            if n > bs[last] {
                row[last] * n / bs[last]
            } else {
                let (i, j, t) = interp(&bs, n);
                row[i] + (row[j] - row[i]) * t
            }
        };
        let a = at(&self.ms[ci]);
        let b = at(&self.ms[cj]);
        a + (b - a) * ct
    }

    pub fn max_batch(&self) -> usize {
        *self.batches.last().unwrap_or(&1)
    }
}

/// The standard normal quantile (Acklam's rational approximation, |error| < 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383_577_518_672_69e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// How much slower the device runs than its profile: an EWMA of log(measured / profiled) and of
/// its squared deviation, so contention from other processes and the spread of batch times are
/// both absorbed.
#[derive(Clone, Debug)]
pub struct SlowdownEstimator {
    alpha: f64,
    mean: f64,
    var: f64,
    pub samples: u64,
}

impl SlowdownEstimator {
    pub fn new(alpha: f64) -> Self {
        Self {
            alpha,
            mean: 0.0,
            // Until measurements arrive, assume a 10% spread.
            var: 0.1f64.powi(2),
            samples: 0,
        }
    }
    pub fn observe(&mut self, measured_ms: f64, predicted_ms: f64) {
        if !(measured_ms > 0.0 && predicted_ms > 0.0) {
            return;
        }
        let x = (measured_ms / predicted_ms).ln();
        // Faster adaptation for the first samples (a plain mean), then the EWMA.
        let a = self.alpha.max(1.0 / (self.samples as f64 + 1.0));
        let d = x - self.mean;
        self.mean += a * d;
        self.var = (1.0 - a) * (self.var + a * d * d);
        self.samples += 1;
    }
    /// Typical slow-down factor.
    pub fn factor(&self) -> f64 {
        self.mean.exp()
    }
    /// The slow-down factor not exceeded with probability given by `z` standard deviations.
    pub fn quantile(&self, z: f64) -> f64 {
        (self.mean + z * self.var.max(0.0).sqrt()).exp()
    }
}
