//! mone's CUDA kernels against the generic candle path and the CPU forward. Built only with
//! the `cuda` feature and run on a GPU machine (scripts/gpu_bench.sh); with no CUDA device
//! each test prints that it was skipped.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use mone::model::nested::{self, RowGroup, TokenLayout};
use mone::model::{self, cuda, Activation, Config, ForwardOptions, MoneVivit, Routing};

mod common;
use common::weights;

fn gpu(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("{test}: SKIPPED, no CUDA device ({e})");
            None
        }
    }
}

/// max |a - b| / max |b| over all elements, in f32.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let a = a
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let b = b
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    assert_eq!(a.dims(), b.dims());
    let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
    let m = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap().max(1e-12)
}

fn randn(shape: &[usize], dev: &Device, dt: DType) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
        .to_device(dev)
        .unwrap()
}

fn tol(dt: DType) -> f32 {
    if dt == DType::F32 {
        1e-5
    } else {
        2e-2
    }
}

#[test]
fn fused_attention_equals_the_generic_path() {
    let Some(dev) = gpu("fused_attention_equals_the_generic_path") else {
        return;
    };
    // Odd token counts (a partial key tile and a partial query block), both row orders,
    // several head dims.
    for dt in [DType::F32, DType::BF16, DType::F16] {
        for &(n, s, heads, hd) in &[
            (197, 3, 2, 64),
            (33, 5, 4, 16),
            (50, 2, 3, 24),
            (17, 4, 1, 128),
        ] {
            for token_major in [false, true] {
                let d = heads * hd;
                let qkv = randn(&[n * s, 3 * d], &dev, dt);
                let layout = TokenLayout {
                    n,
                    s,
                    token_major,
                    groups: vec![RowGroup {
                        row0: 0,
                        rows: n * s,
                        width: d,
                    }],
                };
                let want = model::attention::attention(&qkv, &layout, heads, false).unwrap();
                let got = cuda::attention(&qkv, n, s, heads, token_major).unwrap();
                let r = rel(&got, &want);
                assert!(
                    r < tol(dt),
                    "{dt:?} n {n} s {s} heads {heads} hd {hd} token-major {token_major}: {r}"
                );
            }
        }
    }
}

fn groups(rows: &[usize], widths: &[usize]) -> Vec<RowGroup> {
    let mut row0 = 0;
    rows.iter()
        .zip(widths)
        .map(|(&r, &w)| {
            let g = RowGroup {
                row0,
                rows: r,
                width: w,
            };
            row0 += r;
            g
        })
        .collect()
}

#[test]
fn nested_projections_equal_the_generic_path() {
    let Some(dev) = gpu("nested_projections_equal_the_generic_path") else {
        return;
    };
    let (d, m) = (128, 512);
    let g = groups(&[37, 0, 21, 70], &[16, 32, 64, 128]);
    let g: Vec<RowGroup> = g.into_iter().filter(|g| g.rows > 0).collect();
    let rows = 128;
    let layout = TokenLayout {
        n: rows,
        s: 1,
        token_major: true,
        groups: g.clone(),
    };
    for dt in [DType::F32, DType::BF16] {
        let h = randn(&[rows, d], &dev, dt);
        let w1 = (randn(&[m, d], &dev, dt) * 0.1).unwrap();
        let b1 = randn(&[m], &dev, dt);
        let w2 = (randn(&[d, m], &dev, dt) * 0.05).unwrap();
        let b2 = randn(&[d], &dev, dt);
        let scale = (randn(&[rows, 1], &dev, dt).abs().unwrap() + 0.5).unwrap();

        // In-projection: bias only, then bias + GELU + row scale.
        let want = nested::in_proj(&h, &w1, &b1, &layout).unwrap();
        let got = cuda::in_proj(&h, &w1, &b1, &g, None, None).unwrap();
        assert!(
            rel(&got, &want) < tol(dt),
            "{dt:?} in_proj {}",
            rel(&got, &want)
        );
        let want_act = want.gelu().unwrap().broadcast_mul(&scale).unwrap();
        let got_act =
            cuda::in_proj(&h, &w1, &b1, &g, Some(Activation::GeluTanh), Some(&scale)).unwrap();
        assert!(
            rel(&got_act, &want_act) < tol(dt) * 2.0,
            "{dt:?} in_proj + gelu + scale {}",
            rel(&got_act, &want_act)
        );

        // Out-projection into a residual, with and without the row scale (which the
        // activations carry already and the bias gets here).
        let f = want.gelu().unwrap();
        for with_scale in [false, true] {
            let x = randn(&[rows, d], &dev, dt);
            let want = if with_scale {
                (&x + nested::out_proj(&f, &w2, &b2, &layout, Some(&scale)).unwrap()).unwrap()
            } else {
                (&x + nested::out_proj(&f, &w2, &b2, &layout, None).unwrap()).unwrap()
            };
            let a = if with_scale {
                f.broadcast_mul(&scale).unwrap()
            } else {
                f.clone()
            };
            let x = x.copy().unwrap();
            cuda::out_accum(&x, &a, &w2, &b2, &g, with_scale.then_some(&scale)).unwrap();
            let r = rel(&x, &want);
            assert!(
                r < tol(dt) * 2.0,
                "{dt:?} out_accum scale {with_scale}: {r}"
            );
        }
    }
}

#[test]
fn pinned_upload_equals_the_cpu_tensor() {
    let Some(dev) = gpu("pinned_upload_equals_the_cpu_tensor") else {
        return;
    };
    // Two sizes, the second larger than the first buffer, and a repeat: reuse and growth.
    for (b, seed) in [(2usize, 1u8), (5, 7), (5, 3), (1, 9)] {
        let per = 3 * 4 * 6 * 6;
        let clips: Vec<Vec<u8>> = (0..b)
            .map(|c| {
                (0..per)
                    .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(c as u8))
                    .collect()
            })
            .collect();
        let refs: Vec<&[u8]> = clips.iter().map(|c| c.as_slice()).collect();
        let g = mone::tokenizer::batch_u8(&refs, 4, 6, 6, &dev).unwrap();
        let c = mone::tokenizer::batch_u8(&refs, 4, 6, 6, &Device::Cpu).unwrap();
        let g = g.to_device(&Device::Cpu).unwrap().flatten_all().unwrap();
        let c = c.flatten_all().unwrap();
        assert_eq!(g.to_vec1::<u8>().unwrap(), c.to_vec1::<u8>().unwrap());
    }
}

fn build(cfg: &Config, dev: &Device) -> MoneVivit {
    let w = weights(cfg, 7, 0.5)
        .into_iter()
        .map(|(k, v)| (k, v.to_device(dev).unwrap()))
        .collect();
    MoneVivit::new(cfg, VarBuilder::from_tensors(w, DType::F32, dev)).unwrap()
}

#[test]
fn mone_on_cuda_equals_the_cpu_forward_at_every_capacity() {
    let Some(dev) = gpu("mone_on_cuda_equals_the_cpu_forward_at_every_capacity") else {
        return;
    };
    let mut fe = Config::preset("vivit-fe-tiny").unwrap();
    fe.hidden_size = 128;
    fe.num_heads = 2;
    let joint = Config::preset("vivit-joint-tiny").unwrap();
    let shipped = model::io::read_config(std::path::Path::new(
        "models/mone-vivit-tiny-motion/config.json",
    ))
    .unwrap();
    for cfg in [fe, joint, shipped] {
        let (cpu_m, gpu_m) = (build(&cfg, &Device::Cpu), build(&cfg, &dev));
        let x = Tensor::randn(
            0f32,
            1.0,
            (2, 3, cfg.frames, cfg.image_size, cfg.image_size),
            &Device::Cpu,
        )
        .unwrap();
        let xg = x.to_device(&dev).unwrap();
        // Host-drawn random scores: the same expert assignment on both devices (a learned
        // router's near-ties could break differently).
        let opts = ForwardOptions {
            routing: Routing::Random { seed: 3 },
            want_assignment: true,
            ..Default::default()
        };
        for fused in [false, true] {
            cuda::set_fused(fused);
            for ec in [1.0, 0.75, 0.5, 0.3, 0.2, 0.15] {
                let want = cpu_m.forward(&x, &[ec], &opts).unwrap();
                let got = gpu_m.forward(&xg, &[ec], &opts).unwrap();
                assert_eq!(got.assignment, want.assignment, "{} e_c {ec}", cfg.kind);
                let r = rel(&got.logits, &want.logits);
                assert!(r < 1e-4, "{} e_c {ec} fused {fused}: {r}", cfg.kind);
            }
        }
        cuda::set_fused(false);
    }
}
