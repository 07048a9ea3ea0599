//! Clips to the model's input. The pipeline keeps a clip as raw (C, T, H, W) u8 until its
//! batch reaches the device ([`clip_to_chw_u8`], [`batch_u8`]): a quarter of f32's bytes in the
//! queues and the upload. [`batch_normalized`] then normalises a batch just before the
//! forward (on the device for a GPU).
//! Training, `mone infer` and the parity checks build normalised f32 batches directly
//! ([`clip_to_chw`], [`frames_batch`]); both give the same values.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

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

/// A clip's raw RGB laid out (C, T, H, W), not normalised.
pub fn clip_to_chw_u8(clip: &Clip) -> Vec<u8> {
    let t = clip.frames.len();
    let plane = clip.frames.first().map_or(0, |f| f.height * f.width);
    let mut out = vec![0u8; 3 * t * plane];
    for (ti, f) in clip.frames.iter().enumerate() {
        for (p, px) in f.rgb.chunks_exact(3).take(plane).enumerate() {
            for c in 0..3 {
                out[(c * t + ti) * plane + p] = px[c];
            }
        }
    }
    out
}

/// Stack raw (C, T, H, W) clips into one (B, C, T, H, W) u8 tensor on `device`.
pub fn batch_u8(clips: &[&[u8]], t: usize, h: usize, w: usize, device: &Device) -> Result<Tensor> {
    check_lengths(clips, t, h, w)?;
    crate::device::upload_u8(clips, &[clips.len(), 3, t, h, w], device)
}

/// (x / 255 - mean) / std per channel of a (B, 3, ...) u8 tensor, as `dtype`, where `x` is.
pub fn normalize(x: &Tensor, mean: [f32; 3], std: [f32; 3], dtype: DType) -> Result<Tensor> {
    let mut shape = vec![1usize; x.rank()];
    if shape.len() < 2 {
        candle_core::bail!("normalize wants (B, 3, ...), got {:?}", x.dims());
    }
    shape[1] = 3;
    let scale: Vec<f32> = (0..3).map(|c| 1.0 / (255.0 * std[c])).collect();
    let shift: Vec<f32> = (0..3).map(|c| mean[c] / std[c]).collect();
    let scale = Tensor::from_vec(scale, shape.as_slice(), x.device())?;
    let shift = Tensor::from_vec(shift, shape.as_slice(), x.device())?;
    x.to_dtype(DType::F32)?
        .broadcast_mul(&scale)?
        .broadcast_sub(&shift)?
        .to_dtype(dtype)
}

/// Raw (C, T, H, W) clips as one normalised (B, C, T, H, W) f32 batch on `device`: what
/// [`batch_u8`] then [`normalize`] give. On the CPU in one parallel pass straight from the
/// bytes: for four 16-frame 224 x 224 clips candle's cast and two broadcast ops took 37-46 ms,
/// this pass 8-11 ms (measured, system allocator), on the thread that then runs the model.
/// Elsewhere uploaded as u8 and normalised on the device.
pub fn batch_normalized(
    clips: &[&[u8]],
    t: usize,
    h: usize,
    w: usize,
    mean: [f32; 3],
    std: [f32; 3],
    device: &Device,
) -> Result<Tensor> {
    if !device.is_cpu() {
        return normalize(&batch_u8(clips, t, h, w, device)?, mean, std, DType::F32);
    }
    check_lengths(clips, t, h, w)?;
    let plane = t * h * w;
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * std[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| mean[c] / std[c]);
    let mut out = vec![0f32; clips.len() * 3 * plane];
    if plane > 0 {
        out.par_chunks_mut(plane).enumerate().for_each(|(i, dst)| {
            let (clip, c) = (i / 3, i % 3);
            let src = &clips[clip][c * plane..(c + 1) * plane];
            dst.iter_mut()
                .zip(src)
                .for_each(|(y, x)| *y = *x as f32 * scale[c] - shift[c]);
        });
    }
    Tensor::from_vec(out, (clips.len(), 3, t, h, w), device)
}

/// Stack tokenised clips of shape (C, T, H, W) into one (B, C, T, H, W) tensor.
pub fn batch(clips: &[&[f32]], t: usize, h: usize, w: usize, device: &Device) -> Result<Tensor> {
    check_lengths(clips, t, h, w)?;
    Tensor::from_vec(clips.concat(), (clips.len(), 3, t, h, w), device)
}

/// Every clip holds (3, t, h, w) values.
fn check_lengths<T>(clips: &[&[T]], t: usize, h: usize, w: usize) -> Result<()> {
    let per = 3 * t * h * w;
    if let Some(c) = clips.iter().find(|c| c.len() != per) {
        candle_core::bail!(
            "clip has {} values, expected {per} for (3, {t}, {h}, {w})",
            c.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clip::Frame;
    use std::sync::Arc;

    #[test]
    fn batch_normalized_equals_the_upload_then_normalize_path() {
        let (t, h, w) = (3, 5, 7);
        let per = 3 * t * h * w;
        let clips: Vec<Vec<u8>> = (0..3)
            .map(|k| (0..per).map(|i| ((i * 31 + k * 97) % 256) as u8).collect())
            .collect();
        let refs: Vec<&[u8]> = clips.iter().map(Vec::as_slice).collect();
        let (mean, std) = ([0.45, 0.40, 0.35], [0.22, 0.25, 0.28]);
        let dev = Device::Cpu;
        let want = normalize(
            &batch_u8(&refs, t, h, w, &dev).unwrap(),
            mean,
            std,
            DType::F32,
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        let got = batch_normalized(&refs, t, h, w, mean, std, &dev).unwrap();
        assert_eq!(got.dims(), &[3, 3, t, h, w]);
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-6, "{diff}");
        let short = [&clips[0][..per - 1]];
        assert!(batch_normalized(&short, t, h, w, mean, std, &dev).is_err());
    }

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

    #[test]
    fn the_u8_path_equals_the_f32_path() {
        // Two 3-frame 5x4 clips of varied pixels, and the model's usual and unusual stats.
        let clip = |seed: u64| {
            let mut r = crate::dataset::Rng::new(seed);
            Clip {
                index: 0,
                frames: (0..3)
                    .map(|i| Frame {
                        rgb: Arc::new((0..5 * 4 * 3).map(|_| r.below(256) as u8).collect()),
                        width: 5,
                        height: 4,
                        index: i,
                        pts_ns: 0,
                        duration_ns: 0,
                    })
                    .collect(),
                padded: 0,
            }
        };
        let clips = [clip(1), clip(2)];
        for (mean, std) in [
            ([0.5; 3], [0.5; 3]),
            ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ] {
            let f: Vec<Vec<f32>> = clips.iter().map(|c| clip_to_chw(c, mean, std)).collect();
            let u: Vec<Vec<u8>> = clips.iter().map(clip_to_chw_u8).collect();
            let fr: Vec<&[f32]> = f.iter().map(|v| v.as_slice()).collect();
            let ur: Vec<&[u8]> = u.iter().map(|v| v.as_slice()).collect();
            let want = batch(&fr, 3, 4, 5, &Device::Cpu).unwrap();
            let got = normalize(
                &batch_u8(&ur, 3, 4, 5, &Device::Cpu).unwrap(),
                mean,
                std,
                DType::F32,
            )
            .unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = (got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-5, "max difference {d}");
        }
        assert!(batch_u8(&[&[0u8; 7]], 3, 4, 5, &Device::Cpu).is_err());
    }
}
