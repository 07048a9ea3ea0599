//! The conversion chain between a decoder and the appsink: frame rate, fit to the model's size,
//! RGB. A centre crop either crops the decoded frame and then scales it, or scales first and
//! crops the small frame, whichever is cheaper for the sizes at hand: cropping first copies
//! most of every frame, scaling first resamples the whole of it. 3000 frames of 720p H.264 on
//! a 2-core Zen 4, CPU-s beyond the decoding's 1.07 (`gst-launch-1.0`, 4 runs alternated):
//!
//! | model size | crop, then scale | scale, then crop |
//! |---|---|---|
//! | 32 | 0.41 | 0.10 |
//! | 112 | 0.32 | 0.31 |
//! | 224 | 0.61 | 0.95 |

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;

use super::{make, Resize, SourceError, SourceOptions};

/// Pixels cut off each side of a frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Crop {
    pub left: u32,
    pub right: u32,
    pub top: u32,
    pub bottom: u32,
}

impl Crop {
    fn split(x: u32, y: u32) -> Self {
        Crop {
            left: x / 2,
            right: x - x / 2,
            top: y / 2,
            bottom: y - y / 2,
        }
    }

    fn apply(&self, to: &gst::Element) {
        to.set_property("left", self.left as i32);
        to.set_property("right", self.right as i32);
        to.set_property("top", self.top as i32);
        to.set_property("bottom", self.bottom as i32);
    }
}

/// How a `w` x `h` frame (pixels `par_n`/`par_d` wide) becomes its own centre at `out_w` x
/// `out_h` square pixels: crop it by `pre`, scale that to `scaled`, crop that by `post`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fit {
    pub pre: Crop,
    pub scaled: (u32, u32),
    pub post: Crop,
}

/// Scaling first pays from this much reduction on (the table above: a tie at 6.4, 720 rows to
/// 112; a clear win at 22).
const SCALE_FIRST_FROM: u128 = 8;

pub(crate) fn fit(w: u32, h: u32, par_n: u32, par_d: u32, out_w: u32, out_h: u32) -> Fit {
    let (par_n, par_d) = if par_n == 0 || par_d == 0 {
        (1, 1)
    } else {
        (par_n, par_d)
    };
    let (out_w, out_h) = (out_w.max(1), out_h.max(1));
    let none = Fit {
        pre: Crop::default(),
        scaled: (out_w, out_h),
        post: Crop::default(),
    };
    if w == 0 || h == 0 {
        return none;
    }
    let (w, h, par_n, par_d) = (w as u128, h as u128, par_n as u128, par_d as u128);
    let (ow, oh) = (out_w as u128, out_h as u128);
    let round_div = |a: u128, b: u128| ((2 * a + b) / (2 * b)).min(u32::MAX as u128) as u32;
    // Display width and height as integers: dw / dh is the display aspect ratio.
    let (dw, dh) = (w * par_n, h * par_d);
    let wide = dw * oh >= ow * dh;
    let reduction = if wide { h / oh } else { w / ow };
    if reduction >= SCALE_FIRST_FROM {
        let (sw, sh) = if wide {
            (round_div(oh * dw, dh).max(out_w), out_h)
        } else {
            (out_w, round_div(ow * dh, dw).max(out_h))
        };
        Fit {
            pre: Crop::default(),
            scaled: (sw, sh),
            post: Crop::split(sw - out_w, sh - out_h),
        }
    } else {
        // The part of the frame, in its own pixels, that has the target's aspect ratio.
        let (keep_w, keep_h) = if wide {
            (
                round_div(h * par_d * ow, oh * par_n).clamp(1, w as u32),
                h as u32,
            )
        } else {
            (
                w as u32,
                round_div(w * par_n * oh, ow * par_d).clamp(1, h as u32),
            )
        };
        Fit {
            pre: Crop::split(w as u32 - keep_w, h as u32 - keep_h),
            ..none
        }
    }
}

/// The chain's elements in link order, the appsink last.
pub(crate) fn chain(
    opts: &SourceOptions,
) -> Result<(Vec<gst::Element>, gst_app::AppSink), SourceError> {
    let mut chain: Vec<gst::Element> = vec![make("queue")?];
    if opts.fps.is_some() {
        chain.push(make("videorate")?);
    }
    // One of the two crops works, the other passes buffers through untouched.
    let crops = if opts.resize == Resize::Crop {
        Some((make("videocrop")?, make("capsfilter")?, make("videocrop")?))
    } else {
        None
    };
    if let Some((pre, filter, post)) = &crops {
        follow_input_size(pre, filter.clone(), post.clone(), opts.width, opts.height)?;
        chain.push(pre.clone());
    }
    // Scaling in YUV is about 2x cheaper than in RGB.
    let scale = make("videoscale")?;
    scale.set_property("add-borders", opts.resize == Resize::Letterbox);
    chain.push(scale);
    if let Some((_, filter, _)) = &crops {
        chain.push(filter.clone());
    }
    chain.push(make("videoconvert")?);
    // The crop after scaling runs on the small RGB frame: exact to the pixel, where a 4:2:0
    // crop rounds odd offsets.
    chain.extend(crops.map(|(_, _, post)| post));
    let mut caps = gst::Caps::builder("video/x-raw")
        .field("format", "RGB")
        .field("width", opts.width as i32)
        .field("height", opts.height as i32)
        .field("pixel-aspect-ratio", gst::Fraction::new(1, 1));
    if let Some(f) = opts.fps {
        caps = caps.field("framerate", super::fraction(f));
    }
    let sink = gst_app::AppSink::builder()
        .caps(&caps.build())
        // Files decode as fast as they can; live sources pace themselves.
        .sync(false)
        .max_buffers(4)
        .drop(false)
        .build();
    chain.push(sink.clone().upcast());
    Ok((chain, sink))
}

/// Set both crops and the scaled size from each input caps before they are negotiated (a
/// stream can change size midway).
fn follow_input_size(
    pre: &gst::Element,
    filter: gst::Element,
    post: gst::Element,
    out_w: u32,
    out_h: u32,
) -> Result<(), SourceError> {
    let pad = pre
        .static_pad("sink")
        .ok_or_else(|| SourceError::Gst("videocrop without a sink pad".into()))?;
    let pre_weak = pre.downgrade();
    pad.add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, move |_, info| {
        let Some(gst::EventView::Caps(c)) = info.event().map(|e| e.view()) else {
            return gst::PadProbeReturn::Ok;
        };
        // Caps it cannot read (not raw video) leave the last geometry in place.
        if let (Ok(v), Some(pre)) = (
            gst_video::VideoInfo::from_caps(c.caps()),
            pre_weak.upgrade(),
        ) {
            let par = v.par();
            let f = fit(
                v.width(),
                v.height(),
                par.numer().max(0) as u32,
                par.denom().max(0) as u32,
                out_w,
                out_h,
            );
            f.pre.apply(&pre);
            f.post.apply(&post);
            filter.set_property(
                "caps",
                gst::Caps::builder("video/x-raw")
                    .field("width", f.scaled.0 as i32)
                    .field("height", f.scaled.1 as i32)
                    .field("pixel-aspect-ratio", gst::Fraction::new(1, 1))
                    .build(),
            );
        }
        gst::PadProbeReturn::Ok
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gstreamer_video::prelude::*;

    /// The frame's size after both crops.
    fn out(f: &Fit) -> (u32, u32) {
        let p = &f.post;
        (f.scaled.0 - p.left - p.right, f.scaled.1 - p.top - p.bottom)
    }

    #[test]
    fn a_large_frame_scales_first_and_a_small_one_crops_first() {
        let f = fit(1280, 720, 1, 1, 32, 32);
        assert_eq!(f.pre, Crop::default());
        assert_eq!(f.scaled, (57, 32));
        assert_eq!(
            f.post,
            Crop {
                left: 12,
                right: 13,
                top: 0,
                bottom: 0
            }
        );
        let f = fit(1280, 720, 1, 1, 224, 224);
        assert_eq!(
            f.pre,
            Crop {
                left: 280,
                right: 280,
                top: 0,
                bottom: 0
            }
        );
        assert_eq!((f.scaled, f.post), ((224, 224), Crop::default()));
    }

    #[test]
    fn a_tall_frame_loses_top_and_bottom() {
        let f = fit(720, 1280, 1, 1, 32, 32);
        assert_eq!(f.scaled, (32, 57));
        assert_eq!(
            f.post,
            Crop {
                left: 0,
                right: 0,
                top: 12,
                bottom: 13
            }
        );
        let f = fit(720, 1280, 1, 1, 224, 224);
        assert_eq!(
            f.pre,
            Crop {
                left: 0,
                right: 0,
                top: 280,
                bottom: 280
            }
        );
    }

    #[test]
    fn the_pixel_aspect_ratio_counts() {
        // 720x576 at 16:15 is 768x576 on screen (4:3); anamorphic 64:45 is 1024x576 (16:9).
        assert_eq!(fit(720, 576, 16, 15, 64, 48).pre, Crop::default());
        assert_eq!(fit(720, 576, 64, 45, 32, 32).scaled, (57, 32));
        // 16:9 anamorphic to a square: keep 405 of the 720 stored columns.
        let f = fit(720, 576, 64, 45, 224, 224);
        assert_eq!((f.pre.left, f.pre.right), (157, 158));
    }

    #[test]
    fn every_shape_yields_exactly_the_target() {
        for (w, h) in [
            (1, 1),
            (3, 1000),
            (1000, 3),
            (641, 479),
            (1920, 1080),
            (32, 32),
        ] {
            for (ow, oh) in [(32, 32), (224, 224), (64, 48), (48, 64), (1, 1)] {
                for (pn, pd) in [(1, 1), (4, 3), (10, 11), (0, 0)] {
                    let f = fit(w, h, pn, pd, ow, oh);
                    let case = format!("{w}x{h} par {pn}/{pd} -> {ow}x{oh}: {f:?}");
                    assert_eq!(out(&f), (ow, oh), "{case}");
                    assert!(
                        f.pre == Crop::default() || f.post == Crop::default(),
                        "{case}"
                    );
                    for c in [f.pre, f.post] {
                        assert!(c.left.abs_diff(c.right) <= 1 && c.top.abs_diff(c.bottom) <= 1);
                        assert!(c.left + c.right == 0 || c.top + c.bottom == 0, "{case}");
                        assert!(c.left + c.right < w.max(f.scaled.0), "{case}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_frame_of_the_target_aspect_is_not_cropped() {
        for out in [(64, 36), (384, 216)] {
            let f = fit(1920, 1080, 1, 1, out.0, out.1);
            assert_eq!(
                (f.pre, f.scaled, f.post),
                (Crop::default(), out, Crop::default())
            );
        }
    }

    /// RGB bytes of the first frame of a `gst-launch` style pipeline ending in `appsink name=s`.
    fn reference(desc: &str) -> Vec<u8> {
        super::super::init().unwrap();
        let p = gst::parse::launch(desc)
            .unwrap()
            .downcast::<gst::Bin>()
            .unwrap();
        let sink = p
            .by_name("s")
            .unwrap()
            .downcast::<gst_app::AppSink>()
            .unwrap();
        p.set_state(gst::State::Playing).unwrap();
        let sample = sink.pull_sample().unwrap();
        let caps = sample.caps().unwrap();
        let info = gst_video::VideoInfo::from_caps(caps).unwrap();
        let buf = sample.buffer().unwrap();
        let vf = gst_video::VideoFrameRef::from_buffer_ref_readable(buf, &info).unwrap();
        let (w, stride) = (info.width() as usize, vf.plane_stride()[0] as usize);
        let data = vf.plane_data(0).unwrap();
        let rgb = (0..info.height() as usize)
            .flat_map(|r| data[r * stride..r * stride + w * 3].iter().copied())
            .collect();
        p.set_state(gst::State::Null).unwrap();
        rgb
    }

    fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| x.abs_diff(*y) as f64)
            .sum::<f64>()
            / a.len() as f64
    }

    /// The source's crop shows what cropping the full frame and then scaling shows, and not
    /// the squashed whole frame, for wide and tall inputs, cropped first (180 rows to 32) and
    /// scaled first (360 to 32). Cropping first gives the reference's bytes; scaling first puts
    /// sharp bar edges a pixel apart, 8-9 of 255 on average, against 107-121 squashed.
    #[test]
    fn the_crop_takes_the_centre_of_the_frame() {
        for (w, h) in [(320, 180), (180, 320), (640, 360), (360, 640)] {
            let spec = format!("test:pattern=smpte,frames=1,width={w},height={h}");
            let ours = super::super::decode_input(&spec, 32, 1).unwrap();
            let ours = &ours[0].rgb;
            let src = format!(
                "videotestsrc pattern=smpte num-buffers=1 ! video/x-raw,width={w},height={h}"
            );
            let out = "videoconvert ! video/x-raw,format=RGB,width=32,height=32,pixel-aspect-ratio=1/1 ! appsink name=s";
            let cropped = reference(&format!(
                "{src} ! aspectratiocrop aspect-ratio=1/1 ! videoscale ! {out}"
            ));
            let squashed = reference(&format!("{src} ! videoscale ! {out}"));
            let (d_crop, d_squash) = (
                mean_abs_diff(ours, &cropped),
                mean_abs_diff(ours, &squashed),
            );
            assert!(
                d_crop < 12.0 && d_squash > 5.0 * d_crop.max(1.0),
                "{w}x{h}: off the cropped reference by {d_crop:.2}, the squashed one by {d_squash:.2}"
            );
        }
    }
}
