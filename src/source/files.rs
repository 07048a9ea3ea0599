//! Encoding test videos and decoding files whole, through the same GStreamer elements the
//! pipeline uses: for demos, tests, benchmarks and labelled datasets.

use std::path::Path;
use std::time::Duration;

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

use super::{
    init, Input, Pulled, Resize, RtspTransport, SourceError, SourceOptions, SourcePipeline,
};
use crate::clip::Frame;

fn encoder_chain(format: &str) -> Result<&'static str, SourceError> {
    Ok(match format {
        "mp4" => "video/x-raw,format=I420 ! x264enc speed-preset=ultrafast key-int-max=30 ! h264parse ! mp4mux",
        "mkv" => "video/x-raw,format=I420 ! x264enc speed-preset=ultrafast key-int-max=30 ! h264parse ! matroskamux",
        "webm" => "vp8enc deadline=1 ! webmmux",
        "avi" => "jpegenc ! avimux",
        // What HTTP cameras serve: multipart/x-mixed-replace JPEG.
        "mjpeg" => "jpegenc ! multipartmux boundary=frame",
        other => return Err(SourceError::Invalid(other.into(), "format must be mp4, mkv, webm, avi or mjpeg".into())),
    })
}

fn run_to_eos(p: &gst::Element, what: &Path) -> Result<(), SourceError> {
    let bus = p.bus().ok_or_else(|| SourceError::Gst("no bus".into()))?;
    let res = match bus.timed_pop_filtered(
        gst::ClockTime::from_seconds(600),
        &[gst::MessageType::Eos, gst::MessageType::Error],
    ) {
        Some(m) => match m.view() {
            gst::MessageView::Error(e) => Err(SourceError::Gst(format!(
                "encoding {}: {}",
                what.display(),
                e.error()
            ))),
            _ => Ok(()),
        },
        None => Err(SourceError::Gst("encoding timed out".into())),
    };
    let _ = p.set_state(gst::State::Null);
    res
}

/// Encode packed RGB frames (`width * height * 3` bytes each) into a video file.
pub fn write_rgb_video(
    path: &Path,
    frames: &[Vec<u8>],
    width: u32,
    height: u32,
    fps: u32,
    format: &str,
) -> Result<(), SourceError> {
    init()?;
    if fps == 0
        || frames
            .iter()
            .any(|f| f.len() != (width * height * 3) as usize)
    {
        return Err(SourceError::Invalid(
            path.display().to_string(),
            "frames do not match width x height x 3, or fps is 0".into(),
        ));
    }
    let desc = format!(
        "appsrc name=src format=time caps=video/x-raw,format=RGB,width={width},height={height},framerate={fps}/1 ! videoconvert ! {} ! filesink location=\"{}\"",
        encoder_chain(format)?,
        path.display()
    );
    let p = gst::parse::launch(&desc).map_err(|e| SourceError::Gst(format!("{e}: {desc}")))?;
    let bin = p
        .clone()
        .downcast::<gst::Bin>()
        .map_err(|_| SourceError::Gst("not a bin".into()))?;
    let src = bin
        .by_name("src")
        .and_then(|e| e.downcast::<gst_app::AppSrc>().ok())
        .ok_or_else(|| SourceError::Gst("no appsrc".into()))?;
    p.set_state(gst::State::Playing)
        .map_err(|_| SourceError::Gst("encoder pipeline refused to start".into()))?;
    let dur = 1_000_000_000u64 / fps as u64;
    for (i, f) in frames.iter().enumerate() {
        let mut buf = gst::Buffer::from_slice(f.clone());
        if let Some(b) = buf.get_mut() {
            b.set_pts(gst::ClockTime::from_nseconds(i as u64 * dur));
            b.set_duration(gst::ClockTime::from_nseconds(dur));
        }
        src.push_buffer(buf)
            .map_err(|e| SourceError::Gst(format!("encoding {}: {e:?}", path.display())))?;
    }
    src.end_of_stream()
        .map_err(|e| SourceError::Gst(format!("encoding {}: {e:?}", path.display())))?;
    run_to_eos(&p, path)
}

/// Encode a test video with GStreamer (`videotestsrc` + an encoder), for demos, tests and
/// benchmarks. `format`: mp4 (H.264), webm (VP8), avi (MJPEG), mkv (H.264).
pub fn write_test_video(
    path: &Path,
    pattern: &str,
    frames: u32,
    fps: u32,
    width: u32,
    height: u32,
    format: &str,
) -> Result<(), SourceError> {
    init()?;
    let desc = format!(
        "videotestsrc pattern={pattern} num-buffers={frames} ! video/x-raw,width={width},height={height},framerate={fps}/1 ! videoconvert ! {} ! filesink location=\"{}\"",
        encoder_chain(format)?,
        path.display()
    );
    let p = gst::parse::launch(&desc).map_err(|e| SourceError::Gst(format!("{e}: {desc}")))?;
    p.set_state(gst::State::Playing)
        .map_err(|_| SourceError::Gst("encoder pipeline refused to start".into()))?;
    run_to_eos(&p, path)
}

/// Decode up to `max_frames` frames of a file at `size` x `size` (centre crop) through the same
/// source the pipeline uses; used to read labelled datasets.
pub fn decode_file(path: &Path, size: u32, max_frames: usize) -> Result<Vec<Frame>, SourceError> {
    decode_input(&path.display().to_string(), size, max_frames)
}

/// [`decode_file`] for any input spec [`Input::parse`] takes (file, URI, `test:`...).
pub fn decode_input(spec: &str, size: u32, max_frames: usize) -> Result<Vec<Frame>, SourceError> {
    let input = Input::parse(spec)?;
    let opts = SourceOptions {
        width: size,
        height: size,
        fps: None,
        resize: Resize::default(),
        rtsp_transport: RtspTransport::default(),
        decode_threads: None,
        threads: None,
        gate: None,
    };
    let mut p = SourcePipeline::new(&input, &opts)?;
    p.start()?;
    let mut frames = Vec::new();
    let mut idle = 0;
    let result = loop {
        match p.pull(Duration::from_millis(200)) {
            Pulled::Frame(f) => {
                idle = 0;
                frames.push(f);
                if frames.len() >= max_frames {
                    break Ok(());
                }
            }
            Pulled::Eos => break Ok(()),
            Pulled::Error(e) => break Err(SourceError::Gst(format!("{spec}: {e}: {}", e.detail))),
            Pulled::Idle => {
                idle += 1;
                if idle > 150 {
                    break Err(SourceError::Gst(format!("{spec}: no frame for 30 s")));
                }
            }
        }
    };
    // Nothing after this point is wanted (the file ended, failed, or gave its frames), so no
    // graceful EOS: waiting for one cost up to 1 s per file when it never came (a decoded
    // 600-clip folder took 10 minutes).
    p.stop(Duration::ZERO);
    result.map(|_| frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `decode_threads` reaches the libav decoder that decodebin plugs in, and the default
    /// leaves libav's own setting (0: one thread per core); both decode every frame.
    #[test]
    fn decode_threads_reach_the_libav_decoder() {
        let dir = std::env::temp_dir().join(format!("mone-decode-threads-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ball.mp4");
        write_test_video(&path, "ball", 24, 16, 96, 96, "mp4").unwrap();
        let uri = format!("file://{}", path.display());
        for (threads, want) in [(Some(1u32), 1i32), (None, 0)] {
            let opts = SourceOptions {
                width: 32,
                height: 32,
                fps: None,
                resize: Resize::default(),
                rtsp_transport: RtspTransport::default(),
                decode_threads: threads,
                threads: None,
                gate: None,
            };
            let mut p = SourcePipeline::new(&Input::Uri(uri.clone()), &opts).unwrap();
            p.start().unwrap();
            let mut frames = 0;
            loop {
                match p.pull(Duration::from_secs(10)) {
                    Pulled::Frame(_) => frames += 1,
                    Pulled::Eos => break,
                    Pulled::Idle => panic!("no frame within 10 s"),
                    Pulled::Error(e) => panic!("{e:?}"),
                }
            }
            let decoders: Vec<i32> = p
                .pipeline
                .iterate_recurse()
                .into_iter()
                .filter_map(Result::ok)
                .filter(|e| e.factory().is_some_and(|f| f.name().starts_with("avdec_")))
                .map(|e| e.property::<i32>("max-threads"))
                .collect();
            p.stop(Duration::from_secs(2));
            assert_eq!(frames, 24, "{threads:?}");
            assert_eq!(decoders, vec![want], "{threads:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
