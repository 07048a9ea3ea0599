//! `mone bench gemm`: GFLOP/s of the nested layers' products on one preset's shapes, for every
//! SIMD level of our kernels this machine has (AVX2 and up), alternated in one run. The gemm
//! crate picks its own SIMD at run time, so below AVX-512 the level changes only which of our
//! products go to it; at AVX-512 the small wide out-projections go to `gemm512`. The dense shapes are the ones the
//! PyTorch reference times (`scripts/torch_vivit.py --gemm`); the narrow ones are each expert
//! group's at one capacity.

use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::model::kernels::simd::{self, SimdLevel};
use crate::model::kernels::{NestedInProj, NestedOutAccum, RowGroup};
use crate::model::{capacity, Config};

#[derive(clap::Args, Debug, Clone)]
pub struct GemmBenchArgs {
    #[arg(long, default_value = "vivit-fe-b16")]
    pub preset: String,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// The capacity whose expert groups give the narrow shapes.
    #[arg(long, default_value_t = 0.3)]
    pub capacity: f64,
    /// Timed products per shape and level (the best is reported).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
}

struct Shape {
    name: String,
    rows: usize,
    k: usize,
    n: usize,
    /// Out-projection into the first n of `d` residual columns (else an in-projection).
    out_of: Option<usize>,
}

fn shapes(cfg: &Config, batch: usize, e_c: f64) -> anyhow::Result<Vec<Shape>> {
    let (d, m) = (cfg.hidden_size, cfg.mlp_dim());
    let seqs = batch * cfg.temporal_tokens();
    let n_tok = cfg.spatial_tokens();
    let counts = capacity::token_counts(&capacity::solve(e_c, cfg.num_experts)?, n_tok);
    let widths = cfg.expert_widths();
    let mut groups: Vec<(String, usize, usize)> = vec![("dense".into(), seqs * n_tok, d)];
    for (c, w) in counts.iter().zip(&widths) {
        if *c > 0 {
            groups.push((format!("e_c {e_c} d/{}", d / w), seqs * c, *w));
        }
    }
    let mut out = Vec::new();
    for (tag, rows, w) in groups {
        for (layer, k, n, of) in [
            ("qkv", w, 3 * d, None),
            ("proj", d, w, Some(d)),
            ("fc1", w, m, None),
            ("fc2", m, w, Some(d)),
        ] {
            out.push(Shape {
                name: format!("{tag} {layer}"),
                rows,
                k,
                n,
                out_of: of,
            });
        }
    }
    Ok(out)
}

fn time_shape(s: &Shape, dev: &Device) -> anyhow::Result<f64> {
    match s.out_of {
        None => {
            let x = Tensor::randn(0f32, 1.0, (s.rows, s.k.max(1)), dev)?;
            let w = Tensor::randn(0f32, 0.02, (s.n, s.k), dev)?;
            let b = Tensor::zeros(s.n, candle_core::DType::F32, dev)?;
            let groups = [RowGroup {
                row0: 0,
                rows: s.rows,
                width: s.k,
            }];
            let t = Instant::now();
            let y = x.apply_op3_no_bwd(
                &w,
                &b,
                &NestedInProj {
                    groups: &groups,
                    add_bias: true,
                    act: None,
                },
            )?;
            let dt = t.elapsed().as_secs_f64();
            drop(y);
            Ok(dt)
        }
        Some(d) => {
            let a = Tensor::randn(0f32, 1.0, (s.rows, s.k), dev)?;
            let w = Tensor::randn(0f32, 0.02, (d, s.k), dev)?;
            let x = Tensor::zeros((s.rows, d), candle_core::DType::F32, dev)?;
            let bias = vec![0f32; d];
            // fc2's weight comes packed, as in a loaded model (`Mlp::prepack`).
            let packed = if s.name.ends_with("fc2") {
                crate::model::kernels::linear::prepack_out(&w)?
            } else {
                None
            };
            let groups = [RowGroup {
                row0: 0,
                rows: s.rows,
                width: s.n,
            }];
            let t = Instant::now();
            x.inplace_op3(
                &a,
                &w,
                &NestedOutAccum {
                    groups: &groups,
                    bias: &bias,
                    row_scale: None,
                    packed: packed.as_ref(),
                },
            )?;
            Ok(t.elapsed().as_secs_f64())
        }
    }
}

pub fn run_gemm_bench(a: &GemmBenchArgs) -> anyhow::Result<()> {
    let cfg = Config::preset(&a.preset)?;
    let dev = Device::Cpu;
    let levels: Vec<SimdLevel> = SimdLevel::ALL
        .into_iter()
        .filter(|l| *l >= SimdLevel::Avx2 && *l <= simd::supported())
        .collect();
    let before = simd::level();
    let shapes = shapes(&cfg, a.batch, a.capacity)?;
    let mut best = vec![vec![f64::INFINITY; levels.len()]; shapes.len()];
    for _ in 0..a.iters.max(1) {
        for (i, s) in shapes.iter().enumerate() {
            for (j, l) in levels.iter().enumerate() {
                simd::set_level(*l).map_err(anyhow::Error::msg)?;
                best[i][j] = best[i][j].min(time_shape(s, &dev)?);
            }
        }
    }
    simd::set_level(before).map_err(anyhow::Error::msg)?;
    println!(
        "mone bench gemm: {} batch {}, {} threads, best of {}; GFLOP/s (bias or accumulate included)",
        a.preset,
        a.batch,
        rayon::current_num_threads(),
        a.iters
    );
    print!("{:<22} {:>6} {:>6} {:>6}", "shape", "rows", "k", "n");
    for l in &levels {
        let name = match l {
            SimdLevel::Avx512 => "kernels avx512".to_string(),
            _ => format!("kernels {l} (gemm crate)"),
        };
        print!(" {name:>26}");
    }
    println!();
    for (s, b) in shapes.iter().zip(&best) {
        let flop = 2.0 * (s.rows * s.k * s.n) as f64;
        print!("{:<22} {:>6} {:>6} {:>6}", s.name, s.rows, s.k, s.n);
        for t in b {
            print!(" {:>26.1}", flop / t * 1e-9);
        }
        println!();
    }
    Ok(())
}
