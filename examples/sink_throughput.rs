//! Events per second one sink delivers with the receiver's confirmation of each:
//! `cargo run --release --example sink_throughput -- nats://127.0.0.1:4222 [EVENTS]`
//! (a nats-server with JetStream, `-js`, must be running there).

use std::time::{Duration, Instant};

use mone::events::{Event, EventSink, JsonLinesSink};
use mone::sinks::{Fanout, SinkKind, SinkSpec};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let url = args.get(1).map_or("nats://127.0.0.1:4222", |s| s.as_str());
    let n: usize = args.get(2).map_or(Ok(5000), |s| s.parse())?;
    let spec = SinkSpec {
        subject_prefix: Some("mone.bench".into()),
        ..SinkSpec::new("bench", SinkKind::Nats, url)
    };
    let root = std::env::temp_dir().join(format!("mone-sink-bench-{}", std::process::id()));
    let mut fan = Fanout::start(
        JsonLinesSink::null(),
        &[spec],
        &root,
        Duration::from_secs(120),
    )?;
    let run = std::process::id();
    let t0 = Instant::now();
    for i in 0..n {
        fan.write(&Event::SegmentStarted {
            event_id: format!("bench{run}#segment{i}"),
            stream: "bench".into(),
            label: "approaching".into(),
            start_pts_ns: i as u64,
            capture_time: None,
            score: 0.9,
            time: mone::events::now(),
        })?;
    }
    let appended = t0.elapsed();
    let mark = fan.mark();
    let ok = fan.wait_settled(&mark, Duration::from_secs(120));
    let total = t0.elapsed();
    let r = fan.close();
    let _ = std::fs::remove_dir_all(&root);
    println!(
        "{n} events: spooled in {:.3} s, confirmed by the server in {:.3} s: {:.0} events/s{}",
        appended.as_secs_f64(),
        total.as_secs_f64(),
        n as f64 / total.as_secs_f64(),
        if ok { "" } else { " (timed out)" }
    );
    println!("{r:?}");
    Ok(())
}
