//! Classify one video file with the library API and print the clip-averaged top labels.
//!
//! cargo run --release --example classify_file -- VIDEO MODEL_DIR

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::Device;
use mone::events::{Event, JsonLinesSink};
use mone::runtime::{self, RuntimeOptions, StreamSpec};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(video), Some(model_dir)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: classify_file VIDEO MODEL_DIR");
    };
    let model = mone::model::load_model_dir(model_dir.as_ref(), &Device::Cpu)?;
    let events = std::env::temp_dir().join(format!("mone-example-{}.jsonl", std::process::id()));
    let mut sink = JsonLinesSink::file(&events)?;
    let summary = runtime::run(
        &model,
        "example",
        &Device::Cpu,
        &[StreamSpec::from_input(&video)],
        &RuntimeOptions::default(),
        &mut sink,
        runtime::Hooks::new(Arc::new(AtomicBool::new(false))),
    )?;
    drop(sink);
    for line in std::fs::read_to_string(&events)?.lines() {
        match serde_json::from_str::<Event>(line)? {
            Event::Video { labels, clips, .. } => {
                println!("{video}: {clips} clips");
                for l in labels {
                    println!("  {:>6.3}  {}", l.score, l.label);
                }
            }
            Event::StreamError { reason, .. } => println!("{video}: failed: {reason}"),
            _ => {}
        }
    }
    std::fs::remove_file(&events).ok();
    println!(
        "{} clips in {:.2} s",
        summary.clips,
        summary.elapsed.as_secs_f64()
    );
    Ok(())
}
