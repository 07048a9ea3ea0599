//! `mone bench train`: resident memory and speed of training steps of one phase kind, sampled
//! from /proc as the steps run, to show that memory stays flat (the nested phase's four
//! forwards a step once grew the process by tens of MB a step).

use std::time::Instant;

use candle_core::Device;

use crate::dataset::CLASSES;
use crate::model::Config;
use crate::train::{Phase, PhaseKind, TrainConfig, Trainer};

#[derive(clap::Args, Debug)]
pub struct TrainBenchArgs {
    #[arg(long, default_value = "vivit-fe-motion")]
    pub preset: String,
    /// `nested`, `mone` or `dense`.
    #[arg(long, default_value = "nested", value_parser = ["nested", "mone", "dense"])]
    pub phase: String,
    #[arg(long, default_value_t = 300)]
    pub steps: u64,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Steps between two samples of the resident set.
    #[arg(long, default_value_t = 25)]
    pub every: u64,
}

/// Resident set of this process (VmRSS), MiB.
pub fn rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Run the steps, print a table of (step, RSS, clips/s) and return the RSS samples.
pub fn run_train_bench(a: &TrainBenchArgs) -> anyhow::Result<Vec<(u64, f64)>> {
    let mut model = Config::preset(&a.preset)?;
    model.num_classes = CLASSES.len();
    let kind = match a.phase.as_str() {
        "nested" => PhaseKind::Nested,
        "mone" => PhaseKind::Mone,
        _ => PhaseKind::Dense,
    };
    let phase = Phase {
        distill: 1.0,
        ce: 0.0,
        ..Phase::plain(kind, a.steps, 1e-4, 20)
    };
    let cfg = TrainConfig {
        steps: a.steps,
        batch: a.batch,
        phases: vec![phase],
        ..TrainConfig::for_model(model)
    };
    let mut tr = Trainer::new(cfg, &Device::Cpu)?;
    println!(
        "{} phase, {} preset, batch {}, {} threads",
        a.phase,
        a.preset,
        a.batch,
        rayon::current_num_threads()
    );
    println!("| step | RSS MiB | clips/s since last |\n|---|---|---|");
    let mut samples = Vec::new();
    let mut t = Instant::now();
    let every = a.every.max(1);
    for s in 1..=a.steps {
        tr.step()?;
        if s.is_multiple_of(every) || s == a.steps {
            let rss = rss_mib().unwrap_or(f64::NAN);
            let rate = (every as usize * a.batch) as f64 / t.elapsed().as_secs_f64();
            println!("| {s} | {rss:.0} | {rate:.1} |");
            samples.push((s, rss));
            t = Instant::now();
        }
    }
    if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
        let peak = samples.iter().map(|s| s.1).fold(0.0, f64::max);
        println!(
            "RSS {:.0} MiB at step {}, {:.0} MiB at step {} (peak {:.0} MiB): {:+.2} MiB a step",
            first.1,
            first.0,
            last.1,
            last.0,
            peak,
            (last.1 - first.1) / (last.0 - first.0).max(1) as f64
        );
    }
    Ok(samples)
}
