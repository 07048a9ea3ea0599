//! Feeding classified clips to each stream's segmenter and writing the segment events.

use super::worker::Worker;
use super::*;
use crate::segments::{Segment, SegmentUpdate};

/// A PTS on the wall clock, by the stream's latest capture offset.
fn wall(offset: Option<(i64, CaptureSource)>, pts: u64) -> Option<String> {
    offset.map(|(o, _)| crate::events::rfc3339_ns(o + pts as i64))
}

/// A file's `<stream>#segment<index>`; a live stream's `<stream>#segment@<capture ns of its
/// start>`, since a live stream's indices restart when it moves to another worker.
fn segment_id(
    stream: &str,
    index: u64,
    live: bool,
    offset: Option<(i64, CaptureSource)>,
    start_pts: u64,
) -> String {
    match offset {
        Some((o, _)) if live => format!("{stream}#segment@{}", o + start_pts as i64),
        _ => format!("{stream}#segment{index}"),
    }
}

fn segment_ended(
    stream: &str,
    s: Segment,
    id: Option<String>,
    live: bool,
    offset: Option<(i64, CaptureSource)>,
) -> Event {
    Event::SegmentEnded {
        event_id: id.unwrap_or_else(|| segment_id(stream, s.index, live, offset, s.start_pts_ns)),
        stream: stream.to_string(),
        start_capture_time: wall(offset, s.start_pts_ns),
        end_capture_time: wall(offset, s.end_pts_ns),
        duration_s: s.end_pts_ns.saturating_sub(s.start_pts_ns) as f64 / 1e9,
        segment: s,
        time: now(),
    }
}

impl Worker<'_, '_> {
    /// Feed a classified clip to its stream's segmenter and write what started or ended.
    pub(super) fn segment(
        &mut self,
        i: usize,
        probs: &[f32],
        pts: [u64; 2],
    ) -> Result<(), RuntimeError> {
        let st = &mut self.streams[i];
        let Some(seg) = st.segmenter.as_mut() else {
            return Ok(());
        };
        let name = st.name.clone();
        let offset = st.capture_offset;
        let live = st.live.load(Ordering::Relaxed);
        for u in seg.push(probs, pts[0], pts[1]) {
            let e = match u {
                SegmentUpdate::Started {
                    index,
                    label,
                    start_pts_ns,
                    score,
                } => Event::SegmentStarted {
                    event_id: {
                        let id = segment_id(&name, index, live, offset, start_pts_ns);
                        self.streams[i].segment_ids.insert(index, id.clone());
                        id
                    },
                    stream: name.clone(),
                    label,
                    start_pts_ns,
                    capture_time: wall(offset, start_pts_ns),
                    score,
                    time: now(),
                },
                SegmentUpdate::Ended(s) => {
                    let st = &mut self.streams[i];
                    st.segments.push(s.clone());
                    let id = st.segment_ids.remove(&s.index);
                    segment_ended(&name, s, id, live, offset)
                }
            };
            self.write(&e)?;
        }
        Ok(())
    }

    /// Close the open segments of stream `i` (it ended or went offline).
    pub(super) fn close_segments(&mut self, i: usize, reason: &str) -> Result<(), RuntimeError> {
        let st = &mut self.streams[i];
        let Some(seg) = st.segmenter.as_mut() else {
            return Ok(());
        };
        let closed = seg.finish(reason);
        st.segments.extend(closed.iter().cloned());
        let name = st.name.clone();
        let offset = st.capture_offset;
        let live = st.live.load(Ordering::Relaxed);
        let ids: Vec<Option<String>> = closed
            .iter()
            .map(|s| st.segment_ids.remove(&s.index))
            .collect();
        for (s, id) in closed.into_iter().zip(ids) {
            self.write(&segment_ended(&name, s, id, live, offset))?;
        }
        Ok(())
    }
}
