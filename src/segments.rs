//! Action segments from a stream's clip scores: pure and clock-free. Each clip's class
//! probabilities are smoothed by an exponential moving average, and every label runs a small
//! hysteresis machine: a segment starts once the smoothed score reaches `enter`; every clip whose
//! own score is at or above `exit` extends it to that clip's end; it ends once no clip has
//! supported it for longer than `max_gap_s` and the smoothed score is below `exit` too (so a
//! flicker is bridged, and the end falls on the last supporting clip rather than lagging with
//! the average); and it is reported only once it has lasted `min_duration_s`, so a short blip
//! emits nothing.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Thresholds of one label (every field optional in a per-label override).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelRule {
    pub enter: f32,
    pub exit: f32,
    pub min_duration_s: f64,
    pub max_gap_s: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelOverride {
    pub enter: Option<f32>,
    pub exit: Option<f32>,
    pub min_duration_s: Option<f64>,
    pub max_gap_s: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SegmentSettings {
    pub rule: LabelRule,
    /// Weight of the newest clip in the moving average (1: no smoothing).
    pub smoothing: f32,
    /// Labels that never form segments (e.g. `static`).
    pub ignore: Vec<String>,
    pub labels: HashMap<String, LabelOverride>,
}

impl Default for SegmentSettings {
    fn default() -> Self {
        Self {
            rule: LabelRule {
                enter: 0.5,
                exit: 0.3,
                min_duration_s: 1.0,
                max_gap_s: 1.5,
            },
            smoothing: 0.6,
            ignore: vec!["static".into()],
            labels: HashMap::new(),
        }
    }
}

impl SegmentSettings {
    /// The rule for `label`, overrides applied.
    pub fn rule_for(&self, label: &str) -> LabelRule {
        let mut r = self.rule;
        if let Some(o) = self.labels.get(label) {
            r.enter = o.enter.unwrap_or(r.enter);
            r.exit = o.exit.unwrap_or(r.exit);
            r.min_duration_s = o.min_duration_s.unwrap_or(r.min_duration_s);
            r.max_gap_s = o.max_gap_s.unwrap_or(r.max_gap_s);
        }
        r
    }

    pub fn validate(&self, labels: &[String]) -> Result<(), String> {
        if !(self.smoothing > 0.0 && self.smoothing <= 1.0) {
            return Err(format!(
                "[segments] smoothing must be in (0, 1], got {}",
                self.smoothing
            ));
        }
        // The default `ignore` names `static`, which a model may not have.
        let ignore: &[String] = if self.ignore == SegmentSettings::default().ignore {
            &[]
        } else {
            &self.ignore
        };
        for name in self.labels.keys().chain(ignore) {
            if !labels.contains(name) {
                return Err(format!(
                    "[segments] names `{name}`, which is not one of the model's labels ({})",
                    labels.join(", ")
                ));
            }
        }
        for l in labels {
            let r = self.rule_for(l);
            let ok = (0.0..=1.0).contains(&r.enter)
                && (0.0..=1.0).contains(&r.exit)
                && r.exit <= r.enter
                && r.min_duration_s >= 0.0
                && r.max_gap_s >= 0.0;
            if !ok {
                return Err(format!(
                    "[segments] for `{l}`: want 0 <= exit <= enter <= 1 and non-negative durations, got enter {} exit {} min_duration_s {} max_gap_s {}",
                    r.enter, r.exit, r.min_duration_s, r.max_gap_s
                ));
            }
        }
        Ok(())
    }
}

/// A segment that ended, as the `segment_ended` and `video` events carry it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    /// Per stream, from 0, in the order segments start.
    pub index: u64,
    pub label: String,
    pub start_pts_ns: u64,
    pub end_pts_ns: u64,
    pub clips: u64,
    /// Highest and mean score of the clips that support the segment.
    pub peak_score: f32,
    pub mean_score: f32,
    /// `ended` (the score fell), `stream_ended` or `offline`.
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum SegmentUpdate {
    Started {
        index: u64,
        label: String,
        start_pts_ns: u64,
        score: f32,
    },
    Ended(Segment),
}

#[derive(Clone, Debug)]
struct Open {
    start: u64,
    /// End of the last clip whose own score is at or above `exit`.
    end: u64,
    clips: u64,
    peak: f32,
    sum: f64,
    /// Reported (it lasted `min_duration_s`), with its index.
    index: Option<u64>,
}

/// One stream's segmenter.
#[derive(Clone, Debug)]
pub struct Segmenter {
    labels: Vec<String>,
    rules: Vec<Option<LabelRule>>,
    smoothing: f32,
    ema: Vec<f32>,
    open: Vec<Option<Open>>,
    next_index: u64,
}

const NS: f64 = 1e9;

impl Segmenter {
    pub fn new(settings: &SegmentSettings, labels: &[String]) -> Self {
        Self {
            labels: labels.to_vec(),
            rules: labels
                .iter()
                .map(|l| (!settings.ignore.contains(l)).then(|| settings.rule_for(l)))
                .collect(),
            smoothing: settings.smoothing,
            ema: Vec::new(),
            open: vec![None; labels.len()],
            next_index: 0,
        }
    }

    /// Feed one clip (probabilities per label, its PTS span); what started or ended.
    pub fn push(&mut self, probs: &[f32], start_ns: u64, end_ns: u64) -> Vec<SegmentUpdate> {
        if self.ema.len() != probs.len() {
            self.ema = probs.to_vec();
        } else {
            let a = self.smoothing;
            for (e, p) in self.ema.iter_mut().zip(probs) {
                *e = a * p + (1.0 - a) * *e;
            }
        }
        let mut out = Vec::new();
        let n = self.labels.len().min(self.ema.len());
        for (i, &raw) in probs.iter().enumerate().take(n) {
            let Some(rule) = self.rules[i] else {
                continue;
            };
            let score = self.ema[i];
            match self.open[i].as_mut() {
                None => {
                    if score >= rule.enter {
                        self.open[i] = Some(Open {
                            start: start_ns,
                            end: end_ns,
                            clips: 1,
                            peak: raw,
                            sum: raw as f64,
                            index: None,
                        });
                    }
                }
                Some(o) => {
                    if raw >= rule.exit {
                        // The clip itself supports the label: the segment reaches its end.
                        o.end = o.end.max(end_ns);
                        o.clips += 1;
                        o.peak = o.peak.max(raw);
                        o.sum += raw as f64;
                    } else if score < rule.exit
                        && end_ns.saturating_sub(o.end) as f64 / NS > rule.max_gap_s
                    {
                        if let Some(seg) = self.close(i, "ended") {
                            out.push(SegmentUpdate::Ended(seg));
                        }
                        continue;
                    }
                }
            }
            // Report a segment once it has lasted long enough.
            if let Some(o) = self.open[i].as_mut() {
                if o.index.is_none() && (o.end - o.start) as f64 / NS >= rule.min_duration_s {
                    o.index = Some(self.next_index);
                    self.next_index += 1;
                    out.push(SegmentUpdate::Started {
                        index: o.index.unwrap_or_default(),
                        label: self.labels[i].clone(),
                        start_pts_ns: o.start,
                        score: o.peak,
                    });
                }
            }
        }
        out
    }

    fn close(&mut self, i: usize, reason: &str) -> Option<Segment> {
        let o = self.open[i].take()?;
        let index = o.index?;
        Some(Segment {
            index,
            label: self.labels[i].clone(),
            start_pts_ns: o.start,
            end_pts_ns: o.end,
            clips: o.clips,
            peak_score: o.peak,
            mean_score: (o.sum / o.clips.max(1) as f64) as f32,
            reason: reason.into(),
        })
    }

    /// Close every open segment (the stream ended or went offline), in start order; a segment
    /// that never lasted its minimum is dropped. The smoothing starts afresh.
    pub fn finish(&mut self, reason: &str) -> Vec<Segment> {
        let mut closed: Vec<Segment> = (0..self.open.len())
            .filter_map(|i| self.close(i, reason))
            .collect();
        closed.sort_by_key(|s| s.index);
        self.ema.clear();
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn labels() -> Vec<String> {
        ["walk", "run", "static"].map(String::from).to_vec()
    }

    /// Clips of 0.5 s, one probability vector each; every update with its clip number.
    fn feed(seg: &mut Segmenter, clips: &[[f32; 3]]) -> Vec<(usize, SegmentUpdate)> {
        let mut out = Vec::new();
        for (k, p) in clips.iter().enumerate() {
            let t = k as u64 * S / 2;
            for u in seg.push(p, t, t + S / 2) {
                out.push((k, u));
            }
        }
        out
    }

    fn no_smoothing() -> SegmentSettings {
        SegmentSettings {
            smoothing: 1.0,
            ..SegmentSettings::default()
        }
    }

    const WALK: [f32; 3] = [0.9, 0.05, 0.05];
    const RUN: [f32; 3] = [0.05, 0.9, 0.05];
    const IDLE: [f32; 3] = [0.05, 0.05, 0.9];
    const LOW: [f32; 3] = [0.2, 0.2, 0.6];

    #[test]
    fn a_flicker_inside_a_segment_does_not_split_it() {
        let mut seg = Segmenter::new(&no_smoothing(), &labels());
        let mut clips = vec![WALK; 6];
        clips.push(LOW); // one low clip (0.5 s < max_gap 1.5 s)
        clips.extend([WALK; 6]);
        clips.extend([IDLE; 5]);
        let ups = feed(&mut seg, &clips);
        let ended: Vec<&Segment> = ups
            .iter()
            .filter_map(|(_, u)| match u {
                SegmentUpdate::Ended(s) => Some(s),
                _ => None,
            })
            .collect();
        assert_eq!(ended.len(), 1, "{ups:?}");
        assert_eq!(ended[0].label, "walk");
        assert_eq!(
            (ended[0].start_pts_ns, ended[0].end_pts_ns),
            (0, 13 * S / 2)
        );
        assert_eq!(ended[0].clips, 12);
        // `static` is ignored by default: no segment for it.
        assert!(seg.finish("stream_ended").is_empty());
    }

    #[test]
    fn a_blip_under_the_minimum_duration_emits_nothing() {
        let mut seg = Segmenter::new(&no_smoothing(), &labels());
        let mut clips = vec![IDLE; 4];
        clips.push(RUN); // 0.5 s < 1 s
        clips.extend([IDLE; 6]);
        assert!(feed(&mut seg, &clips).is_empty());
        assert!(seg.finish("stream_ended").is_empty());
    }

    #[test]
    fn hysteresis_enters_high_and_leaves_low() {
        let mut seg = Segmenter::new(&no_smoothing(), &labels());
        // 0.4 never enters (enter 0.5)...
        let middling = [0.4, 0.3, 0.3];
        assert!(feed(&mut seg, &[middling; 6]).is_empty());
        // ...but holds a segment that has entered (exit 0.3).
        let mut seg = Segmenter::new(&no_smoothing(), &labels());
        let mut clips = vec![WALK; 3];
        clips.extend([middling; 6]);
        clips.extend([IDLE; 5]);
        let ups = feed(&mut seg, &clips);
        let started = ups
            .iter()
            .filter(|(_, u)| matches!(u, SegmentUpdate::Started { .. }))
            .count();
        assert_eq!(started, 1);
        let end = ups.iter().find_map(|(k, u)| match u {
            SegmentUpdate::Ended(s) => Some((*k, s.end_pts_ns)),
            _ => None,
        });
        // It ends when the gap passes 1.5 s after its last clip at >= 0.3 (clip 8, ending 4.5 s).
        assert_eq!(end, Some((12, 9 * S / 2)));
    }

    #[test]
    fn per_label_overrides_apply() {
        let mut s = no_smoothing();
        s.labels.insert(
            "run".into(),
            LabelOverride {
                min_duration_s: Some(0.0),
                ..Default::default()
            },
        );
        s.validate(&labels()).unwrap();
        let mut seg = Segmenter::new(&s, &labels());
        let mut clips = vec![IDLE; 2];
        clips.push(RUN);
        clips.extend([IDLE; 5]);
        let ups = feed(&mut seg, &clips);
        assert!(
            matches!(&ups[..], [(2, SegmentUpdate::Started { label, .. }), (6, SegmentUpdate::Ended(_))] if label == "run"),
            "{ups:?}"
        );
        s.labels.insert("jump".into(), LabelOverride::default());
        assert!(s.validate(&labels()).unwrap_err().contains("jump"));
    }

    #[test]
    fn an_open_segment_is_closed_at_the_end_with_its_reason() {
        let mut seg = Segmenter::new(&SegmentSettings::default(), &labels());
        let ups = feed(&mut seg, &[WALK; 8]);
        assert!(matches!(ups[..], [(_, SegmentUpdate::Started { .. })]));
        let closed = seg.finish("offline");
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].reason, "offline");
        assert_eq!(closed[0].end_pts_ns, 4 * S);
        assert!(closed[0].peak_score >= closed[0].mean_score);
    }

    #[test]
    fn smoothing_bridges_what_no_smoothing_splits() {
        // Two low clips in a row (1 s): a gap under max_gap either way, but with a short
        // max_gap only the moving average keeps the segment whole.
        let mut s = SegmentSettings::default();
        s.rule.max_gap_s = 0.4;
        let mut clips = vec![WALK; 6];
        clips.extend([LOW; 2]);
        clips.extend([WALK; 6]);
        let count = |s: &SegmentSettings| {
            let mut seg = Segmenter::new(s, &labels());
            let mut n = feed(&mut seg, &clips)
                .iter()
                .filter(|(_, u)| matches!(u, SegmentUpdate::Ended(_)))
                .count();
            n += seg.finish("stream_ended").len();
            n
        };
        assert_eq!(count(&s), 1);
        s.smoothing = 1.0;
        assert_eq!(count(&s), 2);
    }
}
