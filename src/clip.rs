//! Clip windows: per stream, T frames per clip taken every `step` frames, a new clip every
//! `stride` sampled frames. Pure code: frames in, clips out.

use std::collections::VecDeque;
use std::sync::Arc;

/// One decoded RGB frame at the model's input size.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    /// Packed RGB, row-major, `width * height * 3` bytes.
    pub rgb: Arc<Vec<u8>>,
    pub width: usize,
    pub height: usize,
    /// Index of the frame in the stream (after frame-rate conversion), from 0.
    pub index: u64,
    /// Presentation time on the stream's timeline, nanoseconds.
    pub pts_ns: u64,
    /// Frame duration, nanoseconds (0 when unknown).
    pub duration_ns: u64,
}

/// What to do with the frames left at the end of a finite stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tail {
    /// Repeat the last frame to fill the final window (never loses the end of a video).
    #[default]
    Pad,
    /// Drop an incomplete final window (counted as `dropped_tail_frames`).
    Drop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClipSpec {
    /// Frames per clip (the model's T).
    pub frames: usize,
    /// Sampled frames between clip starts (frames = no overlap).
    pub stride: usize,
    /// Take every `step`-th frame of the stream.
    pub step: usize,
    pub tail: Tail,
}

impl ClipSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.frames == 0 || self.stride == 0 || self.step == 0 {
            return Err(format!(
                "clip frames, stride and step must be at least 1 (got {}, {}, {})",
                self.frames, self.stride, self.step
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Clip {
    /// Clip number in its stream, from 0.
    pub index: u64,
    pub frames: Vec<Frame>,
    /// Frames repeated at the end to fill the window.
    pub padded: usize,
}

impl Clip {
    pub fn first_frame(&self) -> u64 {
        self.frames.first().map_or(0, |f| f.index)
    }
    pub fn last_frame(&self) -> u64 {
        self.frames[..self.frames.len() - self.padded]
            .last()
            .map_or(0, |f| f.index)
    }
    pub fn pts_start_ns(&self) -> u64 {
        self.frames.first().map_or(0, |f| f.pts_ns)
    }
    /// End of the last real frame.
    pub fn pts_end_ns(&self) -> u64 {
        self.frames[..self.frames.len() - self.padded]
            .last()
            .map_or(0, |f| f.pts_ns + f.duration_ns)
    }
}

/// Assembles the clips of one stream.
#[derive(Debug)]
pub struct ClipAssembler {
    spec: ClipSpec,
    window: VecDeque<Frame>,
    seen: u64,
    /// Sampled frames to skip before the next one joins the window (stride > frames).
    skip: usize,
    next_index: u64,
    /// Sampled frames since the last emitted clip, for the tail decision.
    since_emit: usize,
    dropped_tail: u64,
}

impl ClipAssembler {
    pub fn new(spec: ClipSpec) -> Self {
        Self {
            spec,
            window: VecDeque::new(),
            seen: 0,
            skip: 0,
            next_index: 0,
            since_emit: 0,
            dropped_tail: 0,
        }
    }

    /// Feed one frame; returns a clip when a window completes.
    pub fn push(&mut self, frame: Frame) -> Option<Clip> {
        let take = self.seen.is_multiple_of(self.spec.step as u64);
        self.seen += 1;
        if !take {
            return None;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return None;
        }
        self.window.push_back(frame);
        self.since_emit += 1;
        if self.window.len() < self.spec.frames {
            return None;
        }
        let clip = Clip {
            index: self.next_index,
            frames: self.window.iter().cloned().collect(),
            padded: 0,
        };
        self.next_index += 1;
        self.since_emit = 0;
        let s = self.spec.stride;
        if s >= self.spec.frames {
            self.window.clear();
            self.skip = s - self.spec.frames;
        } else {
            self.window.drain(..s);
        }
        Some(clip)
    }

    /// End of stream: the final partial window, padded with its last frame, or dropped.
    pub fn finish(&mut self) -> Option<Clip> {
        let fresh = self.since_emit;
        self.since_emit = 0;
        if fresh == 0 || self.window.is_empty() {
            self.window.clear();
            return None;
        }
        match self.spec.tail {
            Tail::Drop => {
                self.dropped_tail += fresh as u64;
                self.window.clear();
                None
            }
            Tail::Pad => {
                let mut frames: Vec<Frame> = self.window.drain(..).collect();
                let padded = self.spec.frames - frames.len();
                let last = frames.last().cloned()?;
                frames.extend(std::iter::repeat_n(last, padded));
                let clip = Clip {
                    index: self.next_index,
                    frames,
                    padded,
                };
                self.next_index += 1;
                Some(clip)
            }
        }
    }

    pub fn clips_emitted(&self) -> u64 {
        self.next_index
    }
    /// Sampled frames an end-of-stream drop discarded.
    pub fn dropped_tail_frames(&self) -> u64 {
        self.dropped_tail
    }
}

/// Assemble every clip of a finished frame sequence (the offline reference).
pub fn clips_of(frames: impl IntoIterator<Item = Frame>, spec: ClipSpec) -> Vec<Clip> {
    let mut a = ClipAssembler::new(spec);
    let mut out: Vec<Clip> = frames.into_iter().filter_map(|f| a.push(f)).collect();
    out.extend(a.finish());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(i: u64) -> Frame {
        Frame {
            rgb: Arc::new(vec![i as u8; 3]),
            width: 1,
            height: 1,
            index: i,
            pts_ns: i * 40_000_000,
            duration_ns: 40_000_000,
        }
    }
    fn spec(frames: usize, stride: usize, step: usize, tail: Tail) -> ClipSpec {
        ClipSpec {
            frames,
            stride,
            step,
            tail,
        }
    }
    fn idx(c: &Clip) -> Vec<u64> {
        c.frames.iter().map(|f| f.index).collect()
    }

    #[test]
    fn non_overlapping_windows_and_padded_tail() {
        let clips = clips_of((0..10).map(frame), spec(4, 4, 1, Tail::Pad));
        assert_eq!(clips.len(), 3);
        assert_eq!(idx(&clips[0]), vec![0, 1, 2, 3]);
        assert_eq!(idx(&clips[1]), vec![4, 5, 6, 7]);
        assert_eq!(idx(&clips[2]), vec![8, 9, 9, 9]);
        assert_eq!(clips[2].padded, 2);
        assert_eq!(clips[2].last_frame(), 9);
        assert_eq!(clips[2].pts_end_ns(), 400_000_000);
        assert_eq!(
            clips.iter().map(|c| c.index).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn overlap_step_and_dropped_tail() {
        let clips = clips_of((0..12).map(frame), spec(3, 2, 2, Tail::Drop));
        // Sampled frames: 0 2 4 6 8 10; windows of 3 every 2 sampled frames.
        assert_eq!(
            clips.iter().map(idx).collect::<Vec<_>>(),
            vec![vec![0, 2, 4], vec![4, 6, 8]]
        );
        let mut a = ClipAssembler::new(spec(3, 2, 2, Tail::Drop));
        (0..12).map(frame).for_each(|f| {
            a.push(f);
        });
        assert!(a.finish().is_none());
        assert_eq!(a.dropped_tail_frames(), 1);
    }

    #[test]
    fn stride_larger_than_the_window_skips_frames() {
        let clips = clips_of((0..10).map(frame), spec(2, 4, 1, Tail::Drop));
        assert_eq!(
            clips.iter().map(idx).collect::<Vec<_>>(),
            vec![vec![0, 1], vec![4, 5], vec![8, 9]]
        );
    }

    #[test]
    fn no_tail_clip_when_the_stream_ends_on_a_boundary() {
        let clips = clips_of((0..8).map(frame), spec(4, 4, 1, Tail::Pad));
        assert_eq!(clips.len(), 2);
        // Overlapping windows: the frames after the last clip are new, so they make a tail.
        let clips = clips_of((0..6).map(frame), spec(4, 2, 1, Tail::Pad));
        assert_eq!(
            clips.iter().map(idx).collect::<Vec<_>>(),
            vec![vec![0, 1, 2, 3], vec![2, 3, 4, 5]]
        );
        assert!(spec(0, 1, 1, Tail::Pad).validate().is_err());
    }
}
