//! The latency controller: given a latency profile measured on the device, an online slow-down
//! estimate and the waits of the queued clips, it picks each batch's capacity e_c and size so the
//! clips finish within the target, and in live mode sheds the clips that cannot. Pure and
//! clock-free: the runtime feeds it measurements and waits in milliseconds.
//!
//! Design, after the systems in docs/peers: a measured latency table per capacity and batch
//! (Clockwork), a multiplicative slow-down estimate with its spread (ALERT's Kalman-style
//! correction, here an EWMA of the log ratio), hysteresis on the way up (Clipper's AIMD: down at
//! once, up one step after a run of batches that fit), catch-up for a backlog (VideoStorm) and
//! shedding of clips whose deadline is out of reach (Clockwork, Nexus).

mod profile;
#[cfg(test)]
mod tests;

pub use profile::{normal_quantile, ControllerError, LatencyProfile, SlowdownEstimator};

/// The controller's bounds and tuning (from the pipeline config's `[controller]`).
#[derive(Clone, Debug, PartialEq)]
pub struct ControllerSettings {
    pub latency_target_ms: f64,
    pub min_capacity: f64,
    pub max_capacity: f64,
    /// The latency percentile to hold, e.g. 99.
    pub percentile: f64,
    pub max_batch: usize,
    /// Live inputs may shed clips; files never do.
    pub live: bool,
    /// Fixed capacity: no adaptation (a baseline), but the same batching and accounting.
    pub adaptive: bool,
    /// Batches in a row in which the next capacity up fits (with `up_margin` to spare) before
    /// the controller steps up.
    pub up_after: u32,
    /// Fraction of the target left free when stepping up.
    pub up_margin: f64,
    /// Weight of a new measurement in the slow-down estimate.
    pub alpha: f64,
    /// Capacity levels the controller moves between (ascending); clipped to the bounds.
    pub levels: Vec<f64>,
    /// A level is used only if the profile predicts it at least this much faster than the
    /// next level up at the batch size in use (see [`useful_levels`]).
    pub min_gain: f64,
}

impl Default for ControllerSettings {
    fn default() -> Self {
        Self {
            latency_target_ms: 1000.0,
            min_capacity: 0.125,
            max_capacity: 1.0,
            percentile: 99.0,
            max_batch: 8,
            live: true,
            adaptive: true,
            up_after: 4,
            up_margin: 0.15,
            alpha: 0.1,
            levels: vec![
                0.125, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
            ],
            min_gain: 0.03,
        }
    }
}

impl ControllerSettings {
    /// The capacities the controller moves between: the configured levels within the bounds,
    /// plus the bounds; only `max_capacity` when not adaptive.
    pub fn effective_levels(&self) -> Vec<f64> {
        if !self.adaptive {
            return vec![self.max_capacity];
        }
        let mut levels: Vec<f64> = self
            .levels
            .iter()
            .copied()
            .filter(|c| *c >= self.min_capacity - 1e-9 && *c <= self.max_capacity + 1e-9)
            .collect();
        levels.extend([self.min_capacity, self.max_capacity]);
        levels.sort_by(f64::total_cmp);
        levels.dedup_by(|a, b| (*a - *b).abs() < 1e-9);
        levels
    }

    pub fn validate(&self) -> Result<(), ControllerError> {
        let bad = |m: String| Err(ControllerError::Settings(m));
        if !(self.latency_target_ms.is_finite() && self.latency_target_ms > 0.0) {
            return bad(format!(
                "latency_target_ms must be positive, got {}",
                self.latency_target_ms
            ));
        }
        if !(self.min_capacity > 0.0
            && self.min_capacity <= self.max_capacity
            && self.max_capacity <= 1.0)
        {
            return bad(format!(
                "need 0 < min_capacity <= max_capacity <= 1, got {} and {}",
                self.min_capacity, self.max_capacity
            ));
        }
        if !(self.percentile > 50.0 && self.percentile < 100.0) {
            return bad(format!(
                "percentile must be in (50, 100), got {}",
                self.percentile
            ));
        }
        if self.max_batch == 0 {
            return bad("max_batch must be at least 1".into());
        }
        if !(self.min_gain >= 0.0 && self.min_gain < 1.0) {
            return bad(format!("min_gain must be in [0, 1), got {}", self.min_gain));
        }
        Ok(())
    }
}

/// The levels worth moving between: from the top down, a level is kept only if `profile`
/// predicts it at least `min_gain` faster than the last level kept, at `batch` clips. A lower
/// capacity that is not faster (a V-MoE, whose compute does not depend on it; MoNE on a device
/// where the narrow GEMMs do not pay at this batch size) would lose accuracy and buy no time:
/// the controller then holds the target with batch sizes and shedding alone. Returns (kept,
/// left out), both ascending; the top level is always kept.
pub fn useful_levels(
    levels: &[f64],
    profile: &LatencyProfile,
    batch: usize,
    min_gain: f64,
) -> (Vec<f64>, Vec<f64>) {
    let (mut kept, mut left) = (Vec::new(), Vec::new());
    let mut last = f64::INFINITY;
    for &c in levels.iter().rev() {
        let t = profile.predict(c, batch);
        if kept.is_empty() || t <= last * (1.0 - min_gain) {
            kept.push(c);
            last = t;
        } else {
            left.push(c);
        }
    }
    kept.reverse();
    left.reverse();
    (kept, left)
}

/// One batch's decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Clips to drop first, oldest first (live only): their deadline is out of reach.
    pub shed: usize,
    /// Clips to run after the shed ones, oldest first.
    pub batch: usize,
    pub capacity: f64,
    /// Predicted forward time at the slow-down quantile.
    pub predicted_ms: f64,
}

#[derive(Clone, Debug)]
pub struct Controller {
    pub settings: ControllerSettings,
    pub profile: LatencyProfile,
    levels: Vec<f64>,
    level: usize,
    up_streak: u32,
    /// Batches in a row needed to step up now (doubles after a step up that did not hold).
    up_needed: u32,
    last_up: Option<u64>,
    batches: u64,
    z: f64,
    /// Over all batches (reported, and used for batch sizes with few samples yet).
    pub slowdown: SlowdownEstimator,
    /// Per batch size of the profile (nearest): the profile's error depends on the batch size
    /// (fixed costs weigh more in small batches), which one estimate would count as noise.
    per_batch: Vec<SlowdownEstimator>,
    /// Clips shed so far.
    pub shed: u64,
    /// Level changes so far (for flapping checks).
    pub switches: u64,
    /// Clips arriving per millisecond (all streams), when known.
    arrival_rate: Option<f64>,
    /// Levels the profile says buy no time at the batch size in use ([`useful_levels`]).
    pub unused_levels: Vec<f64>,
}

impl Controller {
    pub fn new(
        settings: ControllerSettings,
        profile: LatencyProfile,
    ) -> Result<Self, ControllerError> {
        settings.validate()?;
        profile.validate()?;
        let (levels, unused_levels) = useful_levels(
            &settings.effective_levels(),
            &profile,
            settings.max_batch,
            settings.min_gain,
        );
        let z = normal_quantile(settings.percentile / 100.0);
        let level = levels.len() - 1;
        let alpha = settings.alpha;
        let up_needed = settings.up_after.max(1);
        let buckets = profile.batches.len();
        Ok(Self {
            settings,
            profile,
            levels,
            level,
            up_streak: 0,
            up_needed,
            last_up: None,
            batches: 0,
            z,
            slowdown: SlowdownEstimator::new(alpha),
            per_batch: vec![SlowdownEstimator::new(alpha); buckets],
            shed: 0,
            switches: 0,
            arrival_rate: None,
            unused_levels,
        })
    }

    pub fn capacity(&self) -> f64 {
        self.levels[self.level]
    }

    pub fn levels(&self) -> &[f64] {
        &self.levels
    }

    fn max_batch(&self) -> usize {
        self.settings.max_batch
    }

    fn bucket(&self, batch: usize) -> usize {
        let b = &self.profile.batches;
        (0..b.len())
            .min_by_key(|&i| (b[i] as i64 - batch as i64).abs())
            .unwrap_or(0)
    }

    fn estimator(&self, batch: usize) -> &SlowdownEstimator {
        let e = &self.per_batch[self.bucket(batch)];
        if e.samples >= 5 {
            e
        } else {
            &self.slowdown
        }
    }

    /// Forward time of `batch` clips at `capacity`, at the held percentile of the slow-down.
    pub fn predict_ms(&self, capacity: f64, batch: usize) -> f64 {
        self.profile.predict(capacity, batch) * self.estimator(batch).quantile(self.z)
    }

    /// How long the oldest queued clip may still wait before its batch must start (0: flush
    /// now). `waits_ms`: the queued clips' waits so far, oldest first. A full batch goes at once;
    /// a partial one waits for more clips as long as the oldest still makes its deadline at the
    /// current capacity.
    pub fn flush_in_ms(&self, waits_ms: &[f64]) -> f64 {
        let Some(&oldest) = waits_ms.first() else {
            return f64::INFINITY;
        };
        let n = waits_ms.len();
        if n >= self.max_batch() {
            return 0.0;
        }
        // Leave room for one more clip in the batch and a tenth of the target for jitter.
        let t = self.settings.latency_target_ms;
        let latest = t * 0.9 - self.predict_ms(self.capacity(), n + 1);
        (latest - oldest).max(0.0)
    }

    /// The clips' arrival rate (per ms, all streams) measured by the caller. With it, a capacity
    /// is only chosen if full batches at it keep up with the arrivals: otherwise a bounded queue
    /// would drop clips while every clip that survives looks on time.
    pub fn set_arrival_rate(&mut self, per_ms: f64) {
        self.arrival_rate = (per_ms.is_finite() && per_ms > 0.0).then_some(per_ms);
    }

    fn sustainable(&self, c: f64, headroom: f64) -> bool {
        let Some(rate) = self.arrival_rate else {
            return true;
        };
        let n = self.max_batch();
        rate * self.profile.predict(c, n) * self.estimator(n).factor()
            <= n as f64 * (1.0 - headroom)
    }

    fn fits(&self, c: f64, waits: &[f64], budget: f64) -> Option<usize> {
        if !self.sustainable(c, 0.0) {
            return None;
        }
        // The largest batch (from the oldest) that finishes in time at capacity c, and whose
        // leftover (the next batch) can still make it after it: catch-up for a backlog.
        let m = waits.len().min(self.max_batch());
        (1..=m).rev().find(|&n| {
            let first = self.predict_ms(c, n);
            if waits[0] + first > budget {
                return false;
            }
            let rest = waits.len() - n;
            if rest == 0 {
                return true;
            }
            let n2 = rest.min(self.max_batch());
            waits[n] + first + self.predict_ms(c, n2) <= budget
        })
    }

    /// Decide the next batch. `waits_ms`: waits of every queued clip, oldest first (non-empty).
    pub fn plan(&mut self, waits_ms: &[f64]) -> Plan {
        let t = self.settings.latency_target_ms;
        let lowest = self.levels[0];
        let mut shed = 0;
        if self.settings.live && self.settings.adaptive {
            // A clip that cannot finish in time even alone at the lowest capacity is dropped.
            let alone = self.predict_ms(lowest, 1);
            while shed < waits_ms.len() && waits_ms[shed] + alone > t {
                shed += 1;
            }
            self.shed += shed as u64;
        }
        let waits = &waits_ms[shed..];
        if waits.is_empty() {
            return Plan {
                shed,
                batch: 0,
                capacity: self.capacity(),
                predicted_ms: 0.0,
            };
        }
        if !self.settings.adaptive {
            let n = waits.len().min(self.max_batch());
            let c = self.capacity();
            return Plan {
                shed,
                batch: n,
                capacity: c,
                predicted_ms: self.predict_ms(c, n),
            };
        }
        // The highest level that fits (the backlog included), else the lowest at full batch.
        let best = (0..self.levels.len())
            .rev()
            .find_map(|l| self.fits(self.levels[l], waits, t).map(|n| (l, n)));
        let (level, n) = match best {
            // Behind: the lowest level, in the largest batch whose oldest clip still makes it
            // (live), or a full batch to catch up (files).
            // Behind: the lowest level in full batches, for throughput; live, the oldest clips
            // that a full batch would make late are shed first.
            None => {
                let mut extra = 0;
                if self.settings.live {
                    while extra + 1 < waits.len() {
                        let m = (waits.len() - extra).min(self.max_batch());
                        if waits[extra] + self.predict_ms(lowest, m) <= t {
                            break;
                        }
                        extra += 1;
                    }
                    shed += extra;
                    self.shed += extra as u64;
                }
                (0, (waits.len() - extra).min(self.max_batch()))
            }
            Some((l, _)) if l > self.level => {
                // Up one step at a time, only after a run of batches in which it fits with
                // margin to spare.
                let up = self.level + 1;
                if self.sustainable(self.levels[up], 0.05)
                    && self
                        .fits(self.levels[up], waits, t * (1.0 - self.settings.up_margin))
                        .is_some()
                {
                    self.up_streak += 1;
                } else {
                    self.up_streak = 0;
                }
                let l = if self.up_streak >= self.up_needed {
                    self.up_streak = 0;
                    self.last_up = Some(self.batches);
                    up
                } else {
                    self.level
                };
                let n = self
                    .fits(self.levels[l], waits, t)
                    .unwrap_or_else(|| waits.len().min(self.max_batch()));
                (l, n)
            }
            Some((l, n)) => {
                if l < self.level {
                    self.up_streak = 0;
                }
                (l, n)
            }
        };
        if level < self.level {
            // A step up that had to be undone soon after: be twice as slow to try again.
            if self
                .last_up
                .is_some_and(|b| self.batches - b <= 4 * self.up_needed as u64)
            {
                self.up_needed = (self.up_needed * 2).min(256);
            }
            self.last_up = None;
        } else if self
            .last_up
            .is_some_and(|b| self.batches - b > 8 * self.up_needed as u64)
        {
            // The last step up held: back to the configured patience.
            self.up_needed = self.settings.up_after;
            self.last_up = None;
        }
        self.batches += 1;
        if level != self.level {
            self.switches += 1;
            self.level = level;
        }
        let c = self.levels[level];
        Plan {
            shed,
            batch: n,
            capacity: c,
            predicted_ms: self.predict_ms(c, n),
        }
    }

    /// A batch of `batch` clips at `capacity` took `measured_ms` (forward and event writing).
    pub fn observe(&mut self, capacity: f64, batch: usize, measured_ms: f64) {
        let p = self.profile.predict(capacity, batch);
        self.slowdown.observe(measured_ms, p);
        let i = self.bucket(batch);
        self.per_batch[i].observe(measured_ms, p);
    }
}
