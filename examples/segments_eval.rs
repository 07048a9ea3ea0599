//! How well action segments recover the truth of long videos, for several smoothing weights:
//! `cargo run --release --example segments_eval -- [VIDEOS] [PARTS]`. Each video strings
//! together PARTS runs of 4 to 12 held-out clips (seed 1) of random classes; every run of a
//! non-`static` class is one true segment. A found segment matches a true one of its label that
//! it overlaps; the table counts matched, missed and spurious segments and the mean boundary
//! error of the matched ones, in clips.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::Device;
use mone::dataset::{plan, render, Rng, CLASSES};
use mone::events::Event;
use mone::runtime::{self, RuntimeOptions, StreamSpec};
use mone::segments::SegmentSettings;

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (videos, parts) = (
        args.first().copied().unwrap_or(6),
        args.get(1).copied().unwrap_or(8),
    );
    let model =
        mone::model::load_model_dir("models/mone-vivit-tiny-motion".as_ref(), &Device::Cpu)?;
    let (frames, fps, size) = (16usize, 12u32, 64usize);
    let clip_s = frames as f64 / fps as f64;
    let dir = std::env::temp_dir().join("mone-segments-eval");
    std::fs::create_dir_all(&dir)?;
    let mut rng = Rng::new(7);
    let mut truth = Vec::new();
    let mut specs = Vec::new();
    let mut k = 0u64;
    for v in 0..videos {
        let (mut pix, mut segs, mut at) = (Vec::new(), Vec::new(), 0usize);
        for _ in 0..parts {
            let label = rng.below(CLASSES.len());
            let n = 4 + rng.below(9);
            for _ in 0..n {
                pix.extend(render(
                    &plan(1, label as u64 + 12 * (1000 + k), frames),
                    size,
                ));
                k += 1;
            }
            if CLASSES[label] != "static" {
                // A run of the label just before continues the same segment.
                match segs.last_mut() {
                    Some((l, _, end)) if l == CLASSES[label] && *end == at as f64 => {
                        *end = (at + n) as f64
                    }
                    _ => segs.push((CLASSES[label].to_string(), at as f64, (at + n) as f64)),
                }
            }
            at += n;
        }
        let path = dir.join(format!("long{v}.mp4"));
        mone::source::write_rgb_video(&path, &pix, size as u32, size as u32, fps, "mp4")?;
        specs.push(StreamSpec::from_input(&path.display().to_string()));
        truth.push(segs);
    }
    println!(
        "{videos} videos of {parts} runs, {} true segments; boundaries in clips ({clip_s:.2} s)",
        truth.iter().map(|t| t.len()).sum::<usize>()
    );
    println!(
        "{:>9} {:>8} {:>7} {:>9} {:>15}",
        "smoothing", "matched", "missed", "spurious", "boundary error"
    );
    for smoothing in [1.0f32, 0.8, 0.6, 0.4] {
        let opts = RuntimeOptions {
            segments: Some(SegmentSettings {
                smoothing,
                ..SegmentSettings::default()
            }),
            ..RuntimeOptions::default()
        };
        let mut events: Vec<Event> = Vec::new();
        let hooks = runtime::Hooks::new(Arc::new(AtomicBool::new(false)));
        runtime::run(&model, "m", &Device::Cpu, &specs, &opts, &mut events, hooks)?;
        let (mut matched, mut missed, mut spurious, mut err) = (0, 0, 0, 0.0);
        for (spec, t) in specs.iter().zip(&truth) {
            let found: Vec<(String, f64, f64)> = events
                .iter()
                .filter_map(|e| match e {
                    Event::SegmentEnded {
                        stream, segment, ..
                    } if stream == &spec.name => Some((
                        segment.label.clone(),
                        segment.start_pts_ns as f64 / 1e9 / clip_s,
                        segment.end_pts_ns as f64 / 1e9 / clip_s,
                    )),
                    _ => None,
                })
                .collect();
            let overlaps = |a: &(String, f64, f64), b: &(String, f64, f64)| {
                a.0 == b.0 && a.1 < b.2 && b.1 < a.2
            };
            for tr in t {
                match found.iter().find(|f| overlaps(f, tr)) {
                    Some(f) => {
                        matched += 1;
                        err += ((f.1 - tr.1).abs() + (f.2 - tr.2).abs()) / 2.0;
                    }
                    None => missed += 1,
                }
            }
            spurious += found
                .iter()
                .filter(|f| !t.iter().any(|tr| overlaps(f, tr)))
                .count();
        }
        println!(
            "{smoothing:>9.1} {matched:>8} {missed:>7} {spurious:>9} {:>15.2}",
            err / (matched.max(1)) as f64
        );
    }
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
