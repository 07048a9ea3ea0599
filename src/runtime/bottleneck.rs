//! Telling a run held back by the model from one held back by decoding, from what the worker
//! sees between batches: when the model is the bottleneck, a full batch is already queued
//! each time the previous one returns; when decoding is, the worker waits for clips. A run's
//! first batches are ready too, from the clips queued while the model warmed up, so the
//! streak must outlast everything the queues could have held.

use std::time::Duration;

/// Clips consumed in a streak of ready batches, as a multiple of what the queues hold, before
/// the model counts as the bottleneck: decoding then kept up with at least 3/4 of the
/// model's rate while the backlog could only have covered the rest.
pub(super) const BACKLOGS: usize = 4;

#[derive(Debug, Default)]
pub(super) struct ModelBound {
    streak: usize,
    waited: bool,
    reached: bool,
}

impl ModelBound {
    /// The worker waited for input since the last batch.
    pub(super) fn waited(&mut self) {
        self.waited = true;
    }

    /// A batch of `clips` starts, `full` or not, with queues that hold at most `backlog`
    /// clips. True exactly once: at the batch that completes the streak.
    pub(super) fn batch(&mut self, clips: usize, full: bool, backlog: usize) -> bool {
        let ready = full && !std::mem::take(&mut self.waited);
        self.streak = if ready { self.streak + clips } else { 0 };
        if self.streak >= BACKLOGS * backlog.max(1) && !self.reached {
            self.reached = true;
            return true;
        }
        false
    }
}

/// When files should pause decoding while a batch runs (`crate::source::ModelGate`). With the
/// two alternating, the model is busy for decode/(decode + model) of the wall time (each
/// stage's rate alone), over one half exactly when it is the slower stage and the pause pays.
/// Decoding that runs beside the model says nothing of the kind: on 2 cores four decoders
/// slowed a model 7 times as fast as them until it was busy over 60% of the time. So the
/// decision is made with the gate on: it starts on, turns off after a window under half busy,
/// and comes back on for one window to look again, after 2, 4, 8... windows (at most 32).
#[derive(Debug)]
pub(super) struct GateSwitch {
    on: bool,
    busy: Duration,
    elapsed: Duration,
    /// Windows left before the next look, while off.
    left: u32,
    /// Windows to stay off after the next window under half busy.
    backoff: u32,
}

/// Each decision looks at this much wall time.
pub(super) const GATE_WINDOW: Duration = Duration::from_secs(1);
const FIRST_BACKOFF: u32 = 2;
const MAX_BACKOFF: u32 = 32;

impl Default for GateSwitch {
    fn default() -> Self {
        Self {
            on: true,
            busy: Duration::ZERO,
            elapsed: Duration::ZERO,
            left: 0,
            backoff: FIRST_BACKOFF,
        }
    }
}

impl GateSwitch {
    /// Whether the gate is on now (it starts on).
    pub(super) fn is_on(&self) -> bool {
        self.on
    }

    /// A batch took `busy`, `elapsed` after the previous one ended (its wait for input
    /// included). Some(new state) when a window's end changes it.
    pub(super) fn batch(&mut self, busy: Duration, elapsed: Duration) -> Option<bool> {
        self.busy += busy;
        self.elapsed += elapsed.max(busy);
        if self.elapsed < GATE_WINDOW {
            return None;
        }
        let share = self.busy.as_secs_f64() / self.elapsed.as_secs_f64();
        (self.busy, self.elapsed) = (Duration::ZERO, Duration::ZERO);
        if self.on {
            if share >= 0.5 {
                self.backoff = FIRST_BACKOFF;
                return None;
            }
            self.left = self.backoff;
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        } else {
            self.left = self.left.saturating_sub(1);
            if self.left > 0 {
                return None;
            }
        }
        self.on = !self.on;
        Some(self.on)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_is_the_bottleneck_after_a_streak_longer_than_the_backlog() {
        let (batch, backlog) = (4, 8);
        let needed = BACKLOGS * backlog / batch;
        let mut m = ModelBound::default();
        // The first batch waited for the queues to fill; partial batches do not count.
        m.waited();
        assert!(!m.batch(batch, true, backlog));
        for _ in 0..needed - 1 {
            assert!(!m.batch(batch, true, backlog));
        }
        assert!(
            !m.batch(2, false, backlog),
            "a partial batch breaks the streak"
        );
        for _ in 0..needed - 1 {
            assert!(!m.batch(batch, true, backlog));
        }
        m.waited();
        assert!(
            !m.batch(batch, true, backlog),
            "waiting for clips breaks it too"
        );
        for _ in 0..needed - 1 {
            assert!(!m.batch(batch, true, backlog));
        }
        assert!(m.batch(batch, true, backlog));
        // Once only.
        for _ in 0..3 * needed {
            assert!(!m.batch(batch, true, backlog));
        }
    }

    #[test]
    fn a_warm_up_backlog_or_a_decode_bound_run_never_gets_there() {
        let (batch, backlog) = (4, 32);
        let mut m = ModelBound::default();
        // Four files' full queues drained by a model faster than their decoders...
        for _ in 0..backlog / batch {
            assert!(!m.batch(batch, true, backlog));
        }
        // ...which then waits for each batch.
        for _ in 0..100 {
            m.waited();
            assert!(!m.batch(batch, true, backlog));
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The states over `windows` one-second windows at `share` busy, from `g`.
    fn run(g: &mut GateSwitch, share: u64, windows: usize) -> Vec<bool> {
        (0..windows)
            .map(|_| {
                for _ in 0..10 {
                    g.batch(ms(share), ms(100));
                }
                g.is_on()
            })
            .collect()
    }

    #[test]
    fn a_model_busy_half_the_time_with_the_gate_on_keeps_it_on() {
        let mut g = GateSwitch::default();
        assert!(g.is_on());
        assert!(run(&mut g, 70, 20).iter().all(|on| *on));
        assert!(run(&mut g, 50, 20).iter().all(|on| *on));
    }

    #[test]
    fn an_idle_model_turns_it_off_and_looks_again_ever_more_rarely() {
        let mut g = GateSwitch::default();
        let states = run(&mut g, 20, 40);
        let looks: Vec<usize> = (0..states.len()).filter(|i| states[*i]).collect();
        // Off after each window on: on again after 2, 4, 8, 16 windows off.
        assert_eq!(looks, vec![2, 7, 16, 33]);
        // A look that finds the model busy keeps the gate on, and the next idle spell starts
        // from the shortest wait again.
        let mut g = GateSwitch::default();
        run(&mut g, 20, 2);
        assert_eq!(run(&mut g, 70, 3), vec![true, true, true]);
        assert_eq!(run(&mut g, 20, 4), vec![false, false, true, false]);
    }

    #[test]
    fn nothing_is_decided_before_a_window_has_passed() {
        let mut g = GateSwitch::default();
        for _ in 0..9 {
            assert_eq!(g.batch(ms(10), ms(100)), None);
        }
        assert_eq!(g.batch(ms(10), ms(100)), Some(false));
        // A batch longer than the time since the last one (clock granularity) counts as all
        // busy, never more.
        let mut g = GateSwitch::default();
        assert_eq!(g.batch(ms(1500), ms(1000)), None);
        assert!(g.is_on());
    }
}
