//! `mone bench model`: MoNE latency at every capacity against the dense forward, in one run.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::model::{self, flops, profile, Config, ForwardOptions, MoneVivit};

pub const DEFAULT_CAPACITIES: [f64; 7] = [1.0, 0.75, 0.5, 0.4, 0.3, 0.2, 0.15];

#[derive(clap::Args, Debug, Clone)]
pub struct ModelBenchArgs {
    /// Architecture preset with random weights.
    #[arg(long, default_value = "vivit-fe-b16")]
    pub preset: String,
    /// Benchmark a model folder instead of a preset.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Clips per forward.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// auto, cpu or cuda[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Timed forwards per configuration (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Capacities to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_CAPACITIES.to_vec())]
    pub capacities: Vec<f64>,
    /// Weights and activations: f32, bf16 or f16 (reduced precision is for GPUs). With bf16 or
    /// f16 the table adds each row's logit difference from f32 (same weights, same input).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// On a GPU, also measure where the time goes (a separate pass that synchronizes the
    /// device around every part of the forward).
    #[arg(long)]
    pub gpu_profile: bool,
    /// Also time the dense model built from plain candle layers.
    #[arg(long)]
    pub plain: bool,
    /// Also measure each configuration's peak resident memory, each in a fresh process (the
    /// allocator keeps freed pages, so one process would only show the largest).
    #[arg(long)]
    pub memory: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Internal (--memory): run one forward of this configuration (dense, plain or an e_c)
    /// and print the process's peak RSS in MiB.
    #[arg(long, hide = true)]
    pub rss_probe: Option<String>,
}

/// One measured configuration.
#[derive(Serialize, Debug, Clone)]
pub struct BenchRow {
    /// "dense", "plain-candle" or "mone".
    pub kind: String,
    /// Requested e_c (None for the dense references).
    pub capacity: Option<f64>,
    /// e_c realised by the integer token counts.
    pub realised_capacity: Option<f64>,
    /// Tokens per expert and frame, smallest expert first (the work a reference must do).
    pub token_counts: Option<Vec<usize>>,
    pub gmacs: f64,
    /// Dense MACs / this row's MACs.
    pub flop_ratio: f64,
    pub latency_ms: f64,
    pub clips_per_s: f64,
    /// Dense latency / this row's latency, same run.
    pub speedup: f64,
    /// Median milliseconds per part of the forward (CPU only; GPU work is asynchronous).
    pub profile_ms: Vec<(String, f64)>,
    /// Share of the time outside the nested linear layers.
    pub non_linear_share: f64,
    /// Share of the time outside GEMMs: outside the nested linear layers (fc1 includes its
    /// fused activation) and the attention's two GEMMs. Embedding, pooling, the temporal
    /// stage and the head count as outside, although they hold small GEMMs.
    pub non_gemm_share: f64,
    /// GFLOP/s of the nested linear layers (2 x their MACs / their time).
    pub linear_gflops: f64,
    /// Peak resident memory of a process that ran only this configuration (--memory).
    pub peak_rss_mib: Option<f64>,
    /// ||logits - logits_f32|| / ||logits_f32|| over the batch, same weights and input (only
    /// for a reduced precision).
    pub logit_rel_diff: Option<f64>,
    /// % of clips whose top-1 equals the f32 top-1 (only for a reduced precision).
    pub top1_agreement_f32: Option<f64>,
}

#[derive(Serialize, Debug)]
pub struct BenchReport {
    pub model: String,
    pub batch: usize,
    pub device: String,
    pub dtype: String,
    pub threads: usize,
    /// The kernels in use: the CPU's SIMD level (scalar, avx2, avx512), or on CUDA `cuda fused`
    /// (mone's kernels, `MONE_CUDA_KERNELS=fused`) or `cuda generic` (candle's ops).
    pub simd: String,
    /// The CPU's avx512 flags, as /proc/cpuinfo lists them.
    pub cpu_avx512: Vec<String>,
    pub iters: usize,
    pub dense: BenchRow,
    pub plain: Option<BenchRow>,
    pub rows: Vec<BenchRow>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

enum Which {
    Dense,
    Plain,
    Mone(f64),
}

fn run_once(m: &MoneVivit, x: &Tensor, w: &Which, dev: &Device) -> anyhow::Result<f64> {
    profile::reset();
    let t = Instant::now();
    let logits = match w {
        Which::Dense => m.forward_dense(x)?,
        Which::Plain => m.forward_plain(x)?,
        Which::Mone(c) => m.forward(x, &[*c], &ForwardOptions::default())?.logits,
    };
    dev.synchronize()?;
    let dt = t.elapsed().as_secs_f64();
    // Sanity: a broken kernel shows up as NaN long before it shows up as a bad number.
    let s = logits.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    anyhow::ensure!(s.is_finite(), "non-finite logits");
    Ok(dt)
}

/// What every configuration of one `mone bench model` run shares.
struct Setup {
    dev: Device,
    dtype: DType,
    cfg: Config,
    /// The f32 model, and the one measured (the same unless a reduced precision is asked for).
    m32: MoneVivit,
    m: MoneVivit,
    name: String,
    x: Tensor,
}

fn setup(args: &ModelBenchArgs) -> anyhow::Result<Setup> {
    anyhow::ensure!(args.batch >= 1, "--batch must be at least 1");
    anyhow::ensure!(args.iters >= 1, "--iters must be at least 1");
    let dev = crate::device::open(&args.device)?;
    let dtype = crate::device::parse_dtype(&args.dtype)?;
    let (cfg, m32, name): (Config, MoneVivit, String) = match &args.model {
        Some(dir) => {
            let l = model::load_model_dir(dir, &dev)?;
            (l.config, l.model, dir.display().to_string())
        }
        None => {
            let cfg = Config::preset(&args.preset)?;
            let m = model::random_model(&cfg, &dev)?;
            (cfg, m, format!("{} (random weights)", args.preset))
        }
    };
    for &c in &args.capacities {
        model::capacity::solve(c, cfg.num_experts)?;
    }
    let m = if dtype != DType::F32 {
        model::convert_model(&m32, &dev, dtype)?
    } else {
        m32.clone()
    };
    let x = Tensor::randn(
        0f32,
        1f32,
        (args.batch, 3, cfg.frames, cfg.image_size, cfg.image_size),
        &dev,
    )?;
    Ok(Setup {
        dev,
        dtype,
        cfg,
        m32,
        m,
        name,
        x,
    })
}

/// `--rss-probe`: one forward of `which` (dense, plain or an e_c), then this process's peak RSS.
fn rss_probe(args: &ModelBenchArgs, which: &str) -> anyhow::Result<f64> {
    let w = match which {
        "dense" => Which::Dense,
        "plain" => Which::Plain,
        c => Which::Mone(
            c.parse()
                .map_err(|_| anyhow::anyhow!("--rss-probe {c}: dense, plain or a capacity"))?,
        ),
    };
    let st = setup(args)?;
    run_once(&st.m, &st.x, &w, &st.dev)?;
    peak_rss_mib().ok_or_else(|| anyhow::anyhow!("no VmHWM in /proc/self/status"))
}

pub fn measure(args: &ModelBenchArgs) -> anyhow::Result<BenchReport> {
    let Setup {
        dev,
        dtype,
        cfg,
        m32,
        m,
        name,
        x,
    } = setup(args)?;
    let reduced = dtype != DType::F32;
    let dense_macs = flops::macs(&cfg, None)?;

    let mut configs = vec![Which::Dense];
    if args.plain {
        configs.push(Which::Plain);
    }
    configs.extend(args.capacities.iter().map(|&c| Which::Mone(c)));

    // Warm up every configuration once, then interleave the timed rounds so drift in the
    // machine's load hits all configurations alike.
    profile::enable(dev.is_cpu());
    for w in &configs {
        run_once(&m, &x, w, &dev)?;
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut parts: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); profile::PARTS.len()]; configs.len()];
    for round in 0..args.iters {
        for (i, w) in configs.iter().enumerate() {
            let dt = run_once(&m, &x, w, &dev)?;
            times[i].push(dt);
            for (k, (_, s)) in profile::snapshot().into_iter().enumerate() {
                parts[i][k].push(s);
            }
            if !args.json {
                eprint!("\rround {}/{}", round + 1, args.iters);
            }
        }
    }
    profile::enable(false);
    if !args.json {
        eprintln!();
    }
    if args.gpu_profile && !dev.is_cpu() {
        profile::enable_on(&dev);
        for (i, w) in configs.iter().enumerate() {
            parts[i].iter_mut().for_each(Vec::clear);
            for _ in 0..args.iters.min(3) {
                run_once(&m, &x, w, &dev)?;
                for (k, (_, s)) in profile::snapshot().into_iter().enumerate() {
                    parts[i][k].push(s);
                }
            }
        }
        profile::enable(false);
    }

    // Precision: every configuration against the f32 model on the same input.
    let mut diffs: Vec<Option<(f64, f64)>> = vec![None; configs.len()];
    if reduced {
        for (i, w) in configs.iter().enumerate() {
            let (a, b) = match w {
                Which::Dense => (m.forward_dense(&x)?, m32.forward_dense(&x)?),
                Which::Plain => (m.forward_plain(&x)?, m32.forward_plain(&x)?),
                Which::Mone(c) => {
                    let o = ForwardOptions::default();
                    (
                        m.forward(&x, &[*c], &o)?.logits,
                        m32.forward(&x, &[*c], &o)?.logits,
                    )
                }
            };
            diffs[i] = Some(logit_diff(&a, &b)?);
        }
    }

    let mut rss: Vec<Option<f64>> = vec![None; configs.len()];
    if args.memory {
        for (i, w) in configs.iter().enumerate() {
            let probe = match w {
                Which::Dense => "dense".to_string(),
                Which::Plain => "plain".to_string(),
                Which::Mone(c) => c.to_string(),
            };
            rss[i] = Some(rss_in_child(args, &probe)?);
        }
    }

    let dense_lat = median(&mut times[0].clone());
    let mut rows: Vec<BenchRow> = Vec::new();
    for (i, w) in configs.iter().enumerate() {
        let lat = median(&mut times[i]);
        let (kind, cap, macs) = match w {
            Which::Dense => ("dense", None, dense_macs),
            Which::Plain => ("plain-candle", None, dense_macs),
            Which::Mone(c) => ("mone", Some(*c), flops::macs(&cfg, Some(*c))?),
        };
        let counts = match cap {
            Some(c) => Some(model::capacity::token_counts(
                &model::capacity::solve(c, cfg.num_experts)?,
                cfg.spatial_tokens(),
            )),
            None => None,
        };
        let realised = counts
            .as_ref()
            .map(|k| model::capacity::realised_capacity(k));
        let profile_ms: Vec<(String, f64)> = profile::PARTS
            .iter()
            .enumerate()
            .map(|(k, p)| {
                (
                    format!("{p:?}").to_lowercase(),
                    median(&mut parts[i][k]) * 1e3,
                )
            })
            .collect();
        let total: f64 = profile_ms.iter().map(|(_, v)| v).sum();
        let sum_of = |names: &[&str]| -> f64 {
            profile_ms
                .iter()
                .filter(|(n, _)| names.contains(&n.as_str()))
                .map(|(_, v)| v)
                .sum()
        };
        let linear = sum_of(&["qkv", "proj", "fc1", "fc2"]);
        let gemm = linear + sum_of(&["attention"]);
        rows.push(BenchRow {
            kind: kind.to_string(),
            capacity: cap,
            realised_capacity: realised,
            token_counts: counts,
            gmacs: macs.gmacs(),
            flop_ratio: dense_macs.total() as f64 / macs.total() as f64,
            latency_ms: lat * 1e3,
            clips_per_s: args.batch as f64 / lat,
            speedup: dense_lat / lat,
            profile_ms,
            non_linear_share: if total > 0.0 {
                1.0 - linear / total
            } else {
                f64::NAN
            },
            non_gemm_share: if total > 0.0 {
                1.0 - gemm / total
            } else {
                f64::NAN
            },
            linear_gflops: if linear > 0.0 {
                2.0 * (macs.spatial_linear * args.batch as u64) as f64 / (linear * 1e-3) * 1e-9
            } else {
                f64::NAN
            },
            peak_rss_mib: rss[i],
            logit_rel_diff: diffs[i].map(|d| d.0),
            top1_agreement_f32: diffs[i].map(|d| d.1),
        });
    }
    let dense = rows.remove(0);
    let plain = if args.plain {
        Some(rows.remove(0))
    } else {
        None
    };
    Ok(BenchReport {
        model: name,
        batch: args.batch,
        device: crate::device::describe(&dev),
        dtype: format!("{dtype:?}").to_lowercase(),
        threads: rayon::current_num_threads(),
        simd: if dev.is_cuda() {
            let path = if model::cuda::fused() {
                "fused"
            } else {
                "generic"
            };
            format!("cuda {path}")
        } else {
            model::kernels::simd::level().to_string()
        },
        cpu_avx512: cpu_avx512_flags(),
        iters: args.iters,
        dense,
        plain,
        rows,
    })
}

/// Peak resident set of this process (VmHWM), MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The avx512 flags of the first CPU in /proc/cpuinfo (empty elsewhere).
pub fn cpu_avx512_flags() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mut flags: Vec<String> = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| {
            l.split_whitespace()
                .filter(|f| f.starts_with("avx512"))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    flags.sort();
    flags
}

/// Runs one forward of `probe` in a fresh copy of this process and reads its peak RSS.
fn rss_in_child(args: &ModelBenchArgs, probe: &str) -> anyhow::Result<f64> {
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["bench", "model", "--preset", &args.preset]);
    if let Some(m) = &args.model {
        cmd.arg("--model").arg(m);
    }
    cmd.args(["--batch", &args.batch.to_string(), "--device", &args.device]);
    cmd.args(["--dtype", &args.dtype, "--rss-probe", probe]);
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "memory probe for {probe} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("memory probe for {probe} printed {text:?}"))
}

/// (relative L2 difference, % top-1 agreement) of `a` against the reference `b`.
fn logit_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<(f64, f64)> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let den = b.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let ta = a.argmax(1)?.to_vec1::<u32>()?;
    let tb = b.argmax(1)?.to_vec1::<u32>()?;
    let same = ta.iter().zip(&tb).filter(|(x, y)| x == y).count();
    Ok((
        (num / den.max(f64::MIN_POSITIVE)).sqrt(),
        100.0 * same as f64 / ta.len().max(1) as f64,
    ))
}

pub fn format_table(r: &BenchReport) -> String {
    let mut s = format!(
        "mone bench model: {}, batch {}, {} {} ({} threads, kernels {}), median of {}\n",
        r.model, r.batch, r.device, r.dtype, r.threads, r.simd, r.iters
    );
    s += &format!(
        "CPU avx512 flags: {}\n",
        if r.cpu_avx512.is_empty() {
            "none".to_string()
        } else {
            r.cpu_avx512.join(" ")
        }
    );
    let precision = r.dense.logit_rel_diff.is_some();
    let memory = r.dense.peak_rss_mib.is_some();
    s += "config          GMACs/clip  FLOP ratio  latency ms   clips/s  speed-up  outside linear  non-GEMM  linear GFLOP/s";
    if memory {
        s += "  peak RSS MiB";
    }
    if precision {
        s += "  logit diff vs f32  top-1 = f32";
    }
    s += "\n";
    let line = |name: String, row: &BenchRow| {
        let pct = |v: f64| {
            if v.is_finite() {
                format!("{:.1}%", v * 100.0)
            } else {
                "-".into()
            }
        };
        let mut l = format!(
            "{:<14} {:>11.2} {:>11.2} {:>11.1} {:>9.2} {:>9.2} {:>15} {:>9} {:>15}",
            name,
            row.gmacs,
            row.flop_ratio,
            row.latency_ms,
            row.clips_per_s,
            row.speedup,
            pct(row.non_linear_share),
            pct(row.non_gemm_share),
            if row.linear_gflops.is_finite() {
                format!("{:.1}", row.linear_gflops)
            } else {
                "-".into()
            }
        );
        if let Some(m) = row.peak_rss_mib {
            l += &format!(" {m:>13.1}");
        }
        if let (Some(d), Some(a)) = (row.logit_rel_diff, row.top1_agreement_f32) {
            l += &format!(" {d:>18.2e} {a:>11.1}%");
        }
        l + "\n"
    };
    s += &line("dense".into(), &r.dense);
    if let Some(p) = &r.plain {
        s += &line("plain candle".into(), p);
    }
    for row in &r.rows {
        s += &line(
            format!("mone e_c {:.2}", row.capacity.unwrap_or(f64::NAN)),
            row,
        );
    }
    if r.dense.profile_ms.iter().all(|(_, v)| *v == 0.0) {
        // Not profiled (GPU work is asynchronous).
        return s;
    }
    s += "\nwhere the time goes (ms, median):\n";
    s += &format!("{:<14}", "config");
    for (n, _) in &r.dense.profile_ms {
        s += &format!(" {:>9}", n);
    }
    s += "\n";
    let prof = |name: String, row: &BenchRow| {
        let mut l = format!("{name:<14}");
        for (_, v) in &row.profile_ms {
            l += &format!(" {v:>9.1}");
        }
        l + "\n"
    };
    s += &prof("dense".into(), &r.dense);
    for row in &r.rows {
        s += &prof(
            format!("mone e_c {:.2}", row.capacity.unwrap_or(f64::NAN)),
            row,
        );
    }
    s
}

pub fn run_model_bench(args: &ModelBenchArgs) -> anyhow::Result<()> {
    if let Some(which) = &args.rss_probe {
        println!("{:.1}", rss_probe(args, which)?);
        return Ok(());
    }
    let r = measure(args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", format_table(&r));
    }
    Ok(())
}

/// `mone config PRESET`: the preset's JSON on stdout, its compute on stderr.
pub fn print_config(preset: &str) -> anyhow::Result<()> {
    let cfg = Config::preset(preset)?;
    println!("{}", serde_json::to_string_pretty(&cfg)?);
    if let Some(moe) = cfg.moe {
        let m = flops::macs(&cfg, None)?;
        eprintln!(
            "V-MoE, {} experts in each of the last {} temporal layers, top-{}: {:.4} GMACs per clip (router {} MACs); no capacity to turn",
            moe.experts, moe.layers, moe.top_k, m.gmacs(), m.router
        );
        return Ok(());
    }
    for e_c in [None, Some(1.0), Some(0.5), Some(0.3)] {
        let m = flops::macs(&cfg, e_c)?;
        let name = e_c.map_or("dense".to_string(), |c| format!("e_c {c}"));
        eprintln!("{name:>9}: {:.2} GMACs per clip", m.gmacs());
    }
    Ok(())
}
