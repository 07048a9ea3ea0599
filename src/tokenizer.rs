//! Clips to the model's input: normalised (C, T, H, W) f32, stacked into (B, C, T, H, W).

use candle_core::{Device, Result, Tensor};

use crate::clip::Clip;

/// (x / 255 - mean) / std per channel, laid out (C, T, H, W).
pub fn clip_to_chw(clip: &Clip, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let plane = clip.frames.first().map_or(0, |f| f.height * f.width);
    let frames: Vec<&[u8]> = clip.frames.iter().map(|f| f.rgb.as_slice()).collect();
    let mut out = Vec::new();
    frames_to_chw_into(&frames, plane, mean, std, &mut out);
    out
}

/// [`clip_to_chw`] for packed RGB frames of `plane` pixels each, appended to `out`.
pub fn frames_to_chw_into(
    frames: &[&[u8]],
    plane: usize,
    mean: [f32; 3],
    std: [f32; 3],
    out: &mut Vec<f32>,
) {
    let t = frames.len();
    let base = out.len();
    out.resize(base + 3 * t * plane, 0.0);
    let dst = &mut out[base..];
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * std[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| mean[c] / std[c]);
    for (ti, f) in frames.iter().enumerate() {
        for (p, px) in f.chunks_exact(3).take(plane).enumerate() {
            for c in 0..3 {
                dst[(c * t + ti) * plane + p] = px[c] as f32 * scale[c] - shift[c];
            }
        }
    }
}

/// Clips given as packed RGB frames of `size` x `size` (same T for all) as one normalised
/// (B, C, T, size, size) tensor.
pub fn frames_batch(
    clips: &[Vec<&[u8]>],
    size: usize,
    mean: [f32; 3],
    std: [f32; 3],
    device: &Device,
) -> Result<Tensor> {
    let t = clips.first().map_or(0, Vec::len);
    let mut data = Vec::with_capacity(clips.len() * 3 * t * size * size);
    for c in clips {
        if c.len() != t {
            candle_core::bail!("clips of {} and {t} frames in one batch", c.len());
        }
        frames_to_chw_into(c, size * size, mean, std, &mut data);
    }
    Tensor::from_vec(data, (clips.len(), 3, t, size, size), device)
}

/// Stack tokenised clips of shape (C, T, H, W) into one (B, C, T, H, W) tensor.
pub fn batch(clips: &[&[f32]], t: usize, h: usize, w: usize, device: &Device) -> Result<Tensor> {
    let per = 3 * t * h * w;
    let mut data = Vec::with_capacity(per * clips.len());
    for c in clips {
        if c.len() != per {
            candle_core::bail!(
                "clip has {} values, expected {per} for (3, {t}, {h}, {w})",
                c.len()
            );
        }
        data.extend_from_slice(c);
    }
    Tensor::from_vec(data, (clips.len(), 3, t, h, w), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clip::Frame;
    use std::sync::Arc;

    #[test]
    fn normalises_into_channel_time_planes() {
        let f = |i: u64, v: [u8; 3]| Frame {
            rgb: Arc::new(v.iter().copied().cycle().take(2 * 3).collect()),
            width: 2,
            height: 1,
            index: i,
            pts_ns: 0,
            duration_ns: 0,
        };
        let clip = Clip {
            index: 0,
            frames: vec![f(0, [0, 255, 51]), f(1, [255, 0, 102])],
            padded: 0,
        };
        let x = clip_to_chw(&clip, [0.5, 0.5, 0.0], [0.5, 0.5, 1.0]);
        // (C=3, T=2, H=1, W=2)
        assert_eq!(x.len(), 12);
        assert_eq!(&x[0..2], &[-1.0, -1.0]); // R, t=0
        assert_eq!(&x[2..4], &[1.0, 1.0]); // R, t=1
        assert_eq!(&x[4..6], &[1.0, 1.0]); // G, t=0
        assert!((x[8] - 0.2).abs() < 1e-6 && (x[10] - 0.4).abs() < 1e-6); // B
        let t = batch(&[&x, &x], 2, 1, 2, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 3, 2, 1, 2]);
        assert!(batch(&[&x[..5]], 2, 1, 2, &Device::Cpu).is_err());
    }
}
