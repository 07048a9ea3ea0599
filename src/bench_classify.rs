//! `mone bench classify`: peak resident memory and threads of `mone classify` over a folder of
//! N short videos, for several N, at the default `--jobs` (bounded) and with every input open
//! at once (the unbounded baseline, smallest N only). Each run is a child process sampled
//! through /proc every 50 ms.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(clap::Args, Debug, Clone)]
pub struct ClassifyBenchArgs {
    /// Numbers of inputs, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "100,400,1000")]
    pub inputs: Vec<usize>,
    #[arg(long, default_value = crate::cli::DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Frames of each input (160x120 H.264 at 25 fps).
    #[arg(long, default_value_t = 48)]
    pub frames: u32,
    /// Also run the smallest N with every input open at once.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub unbounded: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct ClassifyRun {
    pub inputs: usize,
    /// None: the default (sized to the machine).
    pub jobs: Option<usize>,
    pub peak_rss_mib: f64,
    pub peak_threads: usize,
    pub wall_s: f64,
    pub clips: u64,
    pub exit_code: Option<i32>,
}

fn status_field(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn run_one(
    exe: &Path,
    dir: &Path,
    model: &Path,
    n: usize,
    jobs: Option<usize>,
) -> anyhow::Result<ClassifyRun> {
    let events = dir.with_extension("jsonl");
    let _ = std::fs::remove_file(&events);
    let mut cmd = Command::new(exe);
    cmd.arg("classify")
        .arg(dir)
        .arg("--model")
        .arg(model)
        .arg("--out")
        .arg(&events)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(j) = jobs {
        cmd.args(["--jobs", &j.to_string()]);
    }
    let t0 = Instant::now();
    let mut child = cmd.spawn()?;
    let pid = child.id();
    let (mut rss, mut threads) = (0u64, 0u64);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        rss = rss.max(status_field(pid, "VmRSS:").unwrap_or(0));
        threads = threads.max(status_field(pid, "Threads:").unwrap_or(0));
        std::thread::sleep(Duration::from_millis(50));
    };
    let wall_s = t0.elapsed().as_secs_f64();
    let clips = std::fs::read_to_string(&events)
        .map(|t| {
            t.lines()
                .filter(|l| l.contains("\"type\":\"clip\""))
                .count() as u64
        })
        .unwrap_or(0);
    let _ = std::fs::remove_file(&events);
    Ok(ClassifyRun {
        inputs: n,
        jobs,
        peak_rss_mib: rss as f64 / 1024.0,
        peak_threads: threads as usize,
        wall_s,
        clips,
        exit_code: status.code(),
    })
}

pub fn run_classify_bench(a: &ClassifyBenchArgs) -> anyhow::Result<Vec<ClassifyRun>> {
    anyhow::ensure!(
        !a.inputs.is_empty() && a.inputs.iter().all(|n| *n > 0),
        "--inputs must list positive numbers"
    );
    let exe = std::env::current_exe()?;
    let root = PathBuf::from("target/bench/classify");
    std::fs::create_dir_all(&root)?;
    let base = root.join(format!("base-{}f.mp4", a.frames));
    if !base.exists() {
        crate::source::write_test_video(&base, "ball", a.frames, 25, 160, 120, "mp4")?;
    }
    let base_abs = std::fs::canonicalize(&base)?;
    let (jobs, why) = crate::cli::default_jobs();
    let mut plan: Vec<(usize, Option<usize>)> = a.inputs.iter().map(|n| (*n, None)).collect();
    if a.unbounded {
        let n = *a.inputs.iter().min().unwrap_or(&1);
        plan.push((n, Some(n)));
    }
    let mut runs = Vec::new();
    for (n, j) in plan {
        // N names for one file: symlinks cost no disk, and every input is opened and decoded.
        let dir = root.join(format!("inputs-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        for i in 0..n {
            std::os::unix::fs::symlink(&base_abs, dir.join(format!("v{i:06}.mp4")))?;
        }
        eprintln!(
            "mone bench classify: {n} inputs, {} ...",
            j.map_or(format!("default jobs ({jobs})"), |j| format!("--jobs {j}"))
        );
        runs.push(run_one(&exe, &dir, &a.model, n, j)?);
        std::fs::remove_dir_all(&dir).ok();
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&runs)?);
        return Ok(runs);
    }
    println!(
        "mone bench classify: {} frames of 160x120 H.264 per input, {}; default --jobs {jobs} ({why})",
        a.frames,
        a.model.display()
    );
    println!(
        "{:>7} {:>12} {:>14} {:>13} {:>9} {:>8} {:>5}",
        "inputs", "jobs", "peak RSS MiB", "peak threads", "wall s", "clips", "exit"
    );
    for r in &runs {
        println!(
            "{:>7} {:>12} {:>14.0} {:>13} {:>9.1} {:>8} {:>5}",
            r.inputs,
            r.jobs
                .map_or(format!("default {jobs}"), |j| format!("all ({j})")),
            r.peak_rss_mib,
            r.peak_threads,
            r.wall_s,
            r.clips,
            r.exit_code.map_or("-".into(), |c| c.to_string())
        );
    }
    Ok(runs)
}
