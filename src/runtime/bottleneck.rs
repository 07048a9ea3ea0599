//! Telling a run held back by the model from one held back by decoding, from what the worker
//! sees between batches: when the model is the bottleneck, a full batch is already queued
//! each time the previous one returns; when decoding is, the worker waits for clips. A run's
//! first batches are ready too, from the clips queued while the model warmed up, so the
//! streak must outlast everything the queues could have held.

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
}
