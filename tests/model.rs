//! The MoNE-ViViT against an independent reference written straight from the paper's
//! equations (f64, per token, no code shared with the model), plus the fused/generic paths,
//! per-clip capacities, gradients and model folders.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use mone::model::{self, capacity, Config, ForwardOptions, MoneVivit, Routing};

mod common;
use common::weights;

fn build(cfg: &Config, w: &HashMap<String, Tensor>) -> MoneVivit {
    MoneVivit::new(
        cfg,
        VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu),
    )
    .unwrap()
}

fn input(cfg: &Config, b: usize, seed: u64) -> Tensor {
    let n = b * 3 * cfg.frames * cfg.image_size * cfg.image_size;
    let mut s = seed;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(
        v,
        (b, 3, cfg.frames, cfg.image_size, cfg.image_size),
        &Device::Cpu,
    )
    .unwrap()
}

// ---------------------------------------------------------------------------------------
// The reference: plain f64 loops over tokens.

struct W(HashMap<String, (Vec<f64>, Vec<usize>)>);

impl W {
    fn new(w: &HashMap<String, Tensor>) -> Self {
        W(w.iter()
            .map(|(k, t)| {
                let v = t
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .into_iter()
                    .map(f64::from)
                    .collect();
                (k.clone(), (v, t.dims().to_vec()))
            })
            .collect())
    }
    fn v(&self, k: &str) -> &[f64] {
        &self.0.get(k).unwrap_or_else(|| panic!("missing {k}")).0
    }
}

fn layer_norm(x: &[f64], w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    x.iter()
        .enumerate()
        .map(|(i, v)| (v - mean) / (var + eps).sqrt() * w[i] + b[i])
        .collect()
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

/// out[o] = b[o] + sum_{k < d_in} W[o, k] x[k] for o < d_out (W is (rows, cols)).
fn affine(w: &[f64], cols: usize, b: &[f64], x: &[f64], d_in: usize, d_out: usize) -> Vec<f64> {
    (0..d_out)
        .map(|o| b[o] + (0..d_in).map(|k| w[o * cols + k] * x[k]).sum::<f64>())
        .collect()
}

/// One transformer layer for a sequence; token i uses width widths[i] and MLP scale scales[i].
fn ref_layer(
    cfg: &Config,
    w: &W,
    pre: &str,
    xs: &mut [Vec<f64>],
    widths: &[usize],
    scales: &[f64],
) {
    ref_attention(cfg, w, pre, xs, widths);
    let mlps: Vec<(String, Vec<f64>)> = vec![(format!("{pre}.mlp"), scales.to_vec())];
    ref_mlps(cfg, w, pre, xs, widths, &mlps);
}

/// x += attention(LN1(x)) with nested in/out widths.
fn ref_attention(cfg: &Config, w: &W, pre: &str, xs: &mut [Vec<f64>], widths: &[usize]) {
    let (d, h) = (cfg.hidden_size, cfg.num_heads);
    let hd = d / h;
    let eps = cfg.layer_norm_eps;
    let g = |n: &str| w.v(&format!("{pre}.{n}"));
    let qkv: Vec<Vec<f64>> = xs
        .iter()
        .zip(widths)
        .map(|(x, &dj)| {
            let ln = layer_norm(x, g("norm1.weight"), g("norm1.bias"), eps);
            affine(
                g("attention.qkv.weight"),
                d,
                g("attention.qkv.bias"),
                &ln,
                dj,
                3 * d,
            )
        })
        .collect();
    let n = xs.len();
    for i in 0..n {
        let mut a = vec![0.0; d];
        for head in 0..h {
            let q = &qkv[i][head * hd..(head + 1) * hd];
            let sc: Vec<f64> = (0..n)
                .map(|j| {
                    q.iter()
                        .zip(&qkv[j][d + head * hd..d + (head + 1) * hd])
                        .map(|(x, y)| x * y)
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let ex: Vec<f64> = sc.iter().map(|s| (s - mx).exp()).collect();
            let z: f64 = ex.iter().sum();
            for j in 0..n {
                for k in 0..hd {
                    a[head * hd + k] += ex[j] / z * qkv[j][2 * d + head * hd + k];
                }
            }
        }
        let o = affine(
            g("attention.proj.weight"),
            d,
            g("attention.proj.bias"),
            &a,
            d,
            widths[i],
        );
        // Stash the attention update; apply after all tokens have read the layer input.
        xs[i].extend(o);
    }
    for i in 0..n {
        let dj = widths[i];
        let upd: Vec<f64> = xs[i].split_off(d);
        for k in 0..dj {
            xs[i][k] += upd[k];
        }
    }
}

/// x += sum over `mlps` (prefix, per-token scale) of scale * MLP(LN2(x)), LN2 read once.
fn ref_mlps(
    cfg: &Config,
    w: &W,
    pre: &str,
    xs: &mut [Vec<f64>],
    widths: &[usize],
    mlps: &[(String, Vec<f64>)],
) {
    let (d, m) = (cfg.hidden_size, cfg.mlp_dim());
    let g = |n: &str| w.v(&format!("{pre}.{n}"));
    for i in 0..xs.len() {
        let dj = widths[i];
        let ln = layer_norm(
            &xs[i],
            g("norm2.weight"),
            g("norm2.bias"),
            cfg.layer_norm_eps,
        );
        for (mlp, scales) in mlps {
            let f = |n: &str| w.v(&format!("{mlp}.{n}"));
            let hid: Vec<f64> = affine(f("fc1.weight"), d, f("fc1.bias"), &ln, dj, m)
                .into_iter()
                .map(gelu)
                .collect();
            let y = affine(f("fc2.weight"), m, f("fc2.bias"), &hid, m, dj);
            for k in 0..dj {
                xs[i][k] += scales[i] * y[k];
            }
        }
    }
}

/// Clip `b`'s tubelet embeddings (no positions), in (t, row, column) order.
fn ref_tubelets(cfg: &Config, w: &W, x: &Tensor, b: usize) -> Vec<Vec<f64>> {
    let xv: Vec<f64> = x
        .get(b)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let (c, t_len, hw) = (3, cfg.frames, cfg.image_size);
    let [tt, p, _] = cfg.tubelet;
    let (nt, gsz) = (t_len / tt, hw / p);
    let pw = w.v("embedding.projection.weight");
    let pb = w.v("embedding.projection.bias");
    let mut all = Vec::new();
    for ti in 0..nt {
        for gy in 0..gsz {
            for gx in 0..gsz {
                let mut tok = pb.to_vec();
                for (o, v) in tok.iter_mut().enumerate() {
                    for ch in 0..c {
                        for dt in 0..tt {
                            for dy in 0..p {
                                for dx in 0..p {
                                    let wi = (((o * c + ch) * tt + dt) * p + dy) * p + dx;
                                    let xi = ((ch * t_len + ti * tt + dt) * hw + gy * p + dy) * hw
                                        + gx * p
                                        + dx;
                                    *v += pw[wi] * xv[xi];
                                }
                            }
                        }
                    }
                }
                all.push(tok);
            }
        }
    }
    all
}

/// Router softmax of one token.
fn ref_router(cfg: &Config, w: &W, tok: &[f64]) -> Vec<f64> {
    let (d, e) = (cfg.hidden_size, cfg.num_experts);
    let logits = affine(w.v("router.weight"), d, w.v("router.bias"), tok, d, e);
    let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = logits.iter().map(|l| (l - mx).exp()).sum();
    logits.iter().map(|l| (l - mx).exp() / z).collect()
}

/// Logits of clip `b` with the given per-token experts (nt * N, in token order).
fn reference(cfg: &Config, w: &W, x: &Tensor, b: usize, assign: &[u8]) -> Vec<f64> {
    reference_with_route(cfg, w, x, b, assign).0
}

/// As [`reference`], and for a V-MoE (dense spatial stage: `assign` all widest) the experts
/// its router picks, with their probabilities.
fn reference_with_route(
    cfg: &Config,
    w: &W,
    x: &Tensor,
    b: usize,
    assign: &[u8],
) -> (Vec<f64>, Vec<(usize, f64)>) {
    let d = cfg.hidden_size;
    let (nt, n) = (cfg.temporal_tokens(), cfg.spatial_tokens());
    let widths = cfg.expert_widths();
    // A V-MoE has no token router: every MLP scale is 1.
    let alpha =
        w.0.get("router.alpha")
            .map_or(0.0, |a| a.0[0].clamp(0.0, 0.999));
    let tubelets = ref_tubelets(cfg, w, x, b);
    let mut pooled = Vec::new();
    for ti in 0..nt {
        let mut seq: Vec<Vec<f64>> = tubelets[ti * n..(ti + 1) * n].to_vec();
        let pos = w.v("embedding.spatial_position");
        for (i, tok) in seq.iter_mut().enumerate() {
            tok.iter_mut()
                .zip(&pos[i * d..(i + 1) * d])
                .for_each(|(a, b)| *a += b);
        }
        let mut tw = Vec::new();
        let mut scales = Vec::new();
        for (i, tok) in seq.iter().enumerate() {
            let j = assign[ti * n + i] as usize;
            tw.push(widths[j]);
            scales.push(if alpha == 0.0 {
                1.0
            } else {
                alpha * ref_router(cfg, w, tok)[j] + 1.0
            });
        }
        for l in 0..cfg.spatial_layers {
            ref_layer(
                cfg,
                w,
                &format!("spatial.layers.{l}"),
                &mut seq,
                &tw,
                &scales,
            );
        }
        let mut mean = vec![0.0; d];
        for tok in &seq {
            let ln = layer_norm(
                tok,
                w.v("spatial.norm.weight"),
                w.v("spatial.norm.bias"),
                cfg.layer_norm_eps,
            );
            mean.iter_mut()
                .zip(&ln)
                .for_each(|(a, b)| *a += b / n as f64);
        }
        pooled.push(mean);
    }
    let mut seq: Vec<Vec<f64>> = vec![w.v("embedding.temporal_cls").to_vec()];
    seq.extend(pooled);
    let tp = w.v("embedding.temporal_position");
    for (i, tok) in seq.iter_mut().enumerate() {
        tok.iter_mut()
            .zip(&tp[i * d..(i + 1) * d])
            .for_each(|(a, b)| *a += b);
    }
    let full = vec![d; seq.len()];
    let ones = vec![1.0; seq.len()];
    let mut route: Vec<(usize, f64)> = Vec::new();
    for l in 0..cfg.temporal_layers {
        let pre = format!("temporal.layers.{l}");
        if !cfg.expert_layer("temporal", l) {
            ref_layer(cfg, w, &pre, &mut seq, &full, &ones);
            continue;
        }
        let moe = cfg.moe.unwrap();
        if route.is_empty() {
            // One router for every expert layer, on the clip's mean token at the first.
            let mut mean = vec![0.0; d];
            for tok in &seq {
                mean.iter_mut()
                    .zip(tok)
                    .for_each(|(a, v)| *a += v / seq.len() as f64);
            }
            let logits = affine(
                w.v("moe_router.weight"),
                d,
                w.v("moe_router.bias"),
                &mean,
                d,
                moe.experts,
            );
            let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|v| (v - mx).exp()).sum();
            let mut p: Vec<(usize, f64)> = logits
                .iter()
                .map(|v| (v - mx).exp() / z)
                .enumerate()
                .collect();
            p.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
            route = p[..moe.top_k].to_vec();
        }
        // The chosen experts, scaled by their router probabilities.
        ref_attention(cfg, w, &pre, &mut seq, &full);
        let mlps: Vec<(String, Vec<f64>)> = route
            .iter()
            .map(|&(j, g)| (format!("{pre}.mlp.experts.{j}"), vec![g; seq.len()]))
            .collect();
        ref_mlps(cfg, w, &pre, &mut seq, &full, &mlps);
    }
    let cls = layer_norm(
        &seq[0],
        w.v("temporal.norm.weight"),
        w.v("temporal.norm.bias"),
        cfg.layer_norm_eps,
    );
    let logits = affine(
        w.v("head.weight"),
        d,
        w.v("head.bias"),
        &cls,
        d,
        cfg.num_classes,
    );
    (logits, route)
}

/// The joint encoder's logits for clip `b`: CLS (always full width, scale 1) and tubelets with
/// their experts, attention over the whole clip, CLS or mean pooling, final norm, head.
fn joint_reference(cfg: &Config, w: &W, x: &Tensor, b: usize, assign: &[u8]) -> Vec<f64> {
    let d = cfg.hidden_size;
    let widths = cfg.expert_widths();
    let alpha = w.v("router.alpha")[0].clamp(0.0, 0.999);
    let cls = cfg.pooling == model::Pooling::Cls;
    let mut seq = Vec::new();
    let (mut tw, mut scales) = (Vec::new(), Vec::new());
    if cls {
        seq.push(w.v("embedding.cls").to_vec());
        tw.push(d);
        scales.push(1.0);
    }
    seq.extend(ref_tubelets(cfg, w, x, b));
    let pos = w.v("embedding.position");
    for (i, tok) in seq.iter_mut().enumerate() {
        tok.iter_mut()
            .zip(&pos[i * d..(i + 1) * d])
            .for_each(|(a, b)| *a += b);
    }
    for (i, tok) in seq.iter().enumerate().skip(usize::from(cls)) {
        let j = assign[i - usize::from(cls)] as usize;
        tw.push(widths[j]);
        scales.push(alpha * ref_router(cfg, w, tok)[j] + 1.0);
    }
    for l in 0..cfg.spatial_layers {
        ref_layer(
            cfg,
            w,
            &format!("encoder.layers.{l}"),
            &mut seq,
            &tw,
            &scales,
        );
    }
    let pooled = if cls {
        seq[0].clone()
    } else {
        let mut m = vec![0.0; d];
        for tok in &seq {
            m.iter_mut()
                .zip(tok)
                .for_each(|(a, b)| *a += b / seq.len() as f64);
        }
        m
    };
    let v = layer_norm(
        &pooled,
        w.v("encoder.norm.weight"),
        w.v("encoder.norm.bias"),
        cfg.final_eps(),
    );
    affine(
        w.v("head.weight"),
        d,
        w.v("head.bias"),
        &v,
        d,
        cfg.num_classes,
    )
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!(
            ((*g as f64) - w).abs() <= tol * (1.0 + w.abs()),
            "{what}: got {got:?}\nwant {want:?}"
        );
    }
}

fn tiny() -> Config {
    Config::preset("vivit-fe-tiny").unwrap()
}

#[test]
fn full_capacity_equals_a_plain_dense_vivit() {
    let cfg = tiny();
    let w = weights(&cfg, 1, 0.0);
    let m = build(&cfg, &w);
    let x = input(&cfg, 2, 5);
    let out = m
        .forward(
            &x,
            &[1.0],
            &ForwardOptions {
                want_assignment: true,
                ..Default::default()
            },
        )
        .unwrap();
    let assign = out.assignment.unwrap();
    assert!(assign.iter().all(|&a| a as usize == cfg.num_experts - 1));
    let rw = W::new(&w);
    let per_clip = cfg.temporal_tokens() * cfg.spatial_tokens();
    for b in 0..2 {
        let want = reference(&cfg, &rw, &x, b, &assign[b * per_clip..(b + 1) * per_clip]);
        let got = out.logits.get(b).unwrap().to_vec1::<f32>().unwrap();
        assert_close(&got, &want, 1e-4, "e_c 1 vs dense reference");
        // The model's own dense forwards agree too.
        let dense = m
            .forward_dense(&x)
            .unwrap()
            .get(b)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_close(&dense, &want, 1e-4, "forward_dense vs reference");
        let plain = m
            .forward_plain(&x)
            .unwrap()
            .get(b)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_close(&plain, &want, 1e-4, "forward_plain vs reference");
    }
}

#[test]
fn joint_encoder_routes_per_temporal_index_and_equals_the_per_token_reference() {
    for pooling in [model::Pooling::Cls, model::Pooling::Mean] {
        let cfg = Config {
            pooling,
            final_norm_eps: Some(1e-5),
            ..Config::preset("vivit-joint-tiny").unwrap()
        };
        let w = weights(&cfg, 4, 0.4);
        let m = build(&cfg, &w);
        let x = input(&cfg, 2, 3);
        let rw = W::new(&w);
        let n = cfg.spatial_tokens();
        let per_clip = cfg.temporal_tokens() * n;
        let full = m.forward(&x, &[1.0], &ForwardOptions::default()).unwrap();
        for b in 0..2 {
            let want = joint_reference(&cfg, &rw, &x, b, &vec![3u8; per_clip]);
            let got = full.logits.get(b).unwrap().to_vec1::<f32>().unwrap();
            assert_close(&got, &want, 1e-4, &format!("{pooling:?} e_c 1"));
        }
        for e_c in [0.5, 0.3] {
            for train in [false, true] {
                let opts = ForwardOptions {
                    want_assignment: true,
                    train,
                    ..Default::default()
                };
                let out = m.forward(&x, &[e_c], &opts).unwrap();
                let assign = out.assignment.unwrap();
                let counts = capacity::token_counts(&capacity::solve(e_c, 4).unwrap(), n);
                assert_epr_counts(&assign, &counts, n);
                for b in 0..2 {
                    let a = &assign[b * per_clip..(b + 1) * per_clip];
                    let want = joint_reference(&cfg, &rw, &x, b, a);
                    let got = out.logits.get(b).unwrap().to_vec1::<f32>().unwrap();
                    assert_close(&got, &want, 1e-4, &format!("{pooling:?} e_c {e_c} {train}"));
                }
            }
        }
        // The device routing path (taken off CPU-f32, here by f64) builds the same clip order.
        let m64 = MoneVivit::new(
            &cfg,
            VarBuilder::from_tensors(w.clone(), DType::F64, &Device::Cpu),
        )
        .unwrap();
        let x64 = x.to_dtype(DType::F64).unwrap();
        for caps in [vec![0.4], vec![0.9, 0.3]] {
            let host = m.forward(&x, &caps, &ForwardOptions::default()).unwrap();
            let dev = m64
                .forward(&x64, &caps, &ForwardOptions::default())
                .unwrap();
            let (h, d) = (
                host.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                dev.logits
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
            for (a, b) in h.iter().zip(&d) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{caps:?}: {h:?} vs {d:?}"
                );
            }
        }
        // Per-clip capacities in one batch equal each clip run alone.
        let mixed = m
            .forward(&x, &[0.3, 0.8], &ForwardOptions::default())
            .unwrap();
        for (b, c) in [(0usize, 0.3), (1, 0.8)] {
            let one = m
                .forward(
                    &x.narrow(0, b, 1).unwrap(),
                    &[c],
                    &ForwardOptions::default(),
                )
                .unwrap();
            let want: Vec<f64> = one
                .logits
                .get(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect();
            let got = mixed.logits.get(b).unwrap().to_vec1::<f32>().unwrap();
            assert_close(&got, &want, 1e-5, "mixed capacities");
        }
    }
}

#[test]
fn mixed_assignment_equals_the_per_token_reference() {
    let cfg = tiny();
    let w = weights(&cfg, 2, 0.4);
    let m = build(&cfg, &w);
    let x = input(&cfg, 2, 9);
    let rw = W::new(&w);
    let n = cfg.spatial_tokens();
    let per_clip = cfg.temporal_tokens() * n;
    for e_c in [0.5, 0.3, 0.15] {
        for train in [false, true] {
            let opts = ForwardOptions {
                want_assignment: true,
                train,
                ..Default::default()
            };
            let out = m.forward(&x, &[e_c], &opts).unwrap();
            let assign = out.assignment.unwrap();
            let counts = capacity::token_counts(&capacity::solve(e_c, 4).unwrap(), n);
            assert_epr_counts(&assign, &counts, n);
            assert!(
                counts.iter().filter(|&&k| k > 0).count() >= 2,
                "e_c {e_c} should mix experts"
            );
            for b in 0..2 {
                let want = reference(&cfg, &rw, &x, b, &assign[b * per_clip..(b + 1) * per_clip]);
                let got = out.logits.get(b).unwrap().to_vec1::<f32>().unwrap();
                assert_close(&got, &want, 1e-4, &format!("e_c {e_c} train {train}"));
            }
        }
    }
}

/// Every SIMD level of the fused kernels this machine has gives the scalar level's logits
/// within 1e-5 relative, and each still equals the per-token reference. D = 384 so that the
/// widest group's out-projections take the AVX-512 GEMM (fewer than 512 rows, width >= 384).
#[test]
fn every_simd_level_gives_the_same_logits() {
    use mone::model::kernels::simd::{self, SimdLevel};
    let cfg = Config {
        hidden_size: 384,
        num_heads: 6,
        ..tiny()
    };
    let w = weights(&cfg, 12, 0.4);
    // As a loaded model: fc2's weights packed once (D 384 is wide enough for that path).
    let mut m = build(&cfg, &w);
    m.prepack().unwrap();
    let x = input(&cfg, 2, 13);
    let rw = W::new(&w);
    let n = cfg.spatial_tokens();
    let per_clip = cfg.temporal_tokens() * n;
    let opts = ForwardOptions {
        want_assignment: true,
        ..Default::default()
    };
    let before = simd::level();
    let mut scalar: Vec<Vec<f32>> = Vec::new();
    for level in SimdLevel::ALL {
        if simd::set_level(level).is_err() {
            eprintln!(
                "every_simd_level_gives_the_same_logits: {level} skipped, not on this CPU or build"
            );
            continue;
        }
        for (i, e_c) in [1.0, 0.5, 0.3].into_iter().enumerate() {
            let out = m.forward(&x, &[e_c], &opts).unwrap();
            let logits = out.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let assign = out.assignment.unwrap();
            for b in 0..2 {
                let want = reference(&cfg, &rw, &x, b, &assign[b * per_clip..(b + 1) * per_clip]);
                let got = &logits[b * cfg.num_classes..(b + 1) * cfg.num_classes];
                assert_close(got, &want, 1e-4, &format!("{level} e_c {e_c}"));
            }
            if level == SimdLevel::Scalar {
                scalar.push(logits);
                continue;
            }
            let base = &scalar[i];
            let scale = base.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            let worst = logits
                .iter()
                .zip(base)
                .map(|(a, b)| (a - b).abs() / scale)
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-5,
                "{level} e_c {e_c}: {worst} relative to scalar"
            );
        }
    }
    simd::set_level(before).unwrap();
}

#[test]
fn a_low_capacity_changes_the_output() {
    let cfg = tiny();
    let m = build(&cfg, &weights(&cfg, 3, 0.2));
    let x = input(&cfg, 1, 1);
    let full = m
        .forward(&x, &[1.0], &ForwardOptions::default())
        .unwrap()
        .logits;
    let low = m
        .forward(&x, &[0.2], &ForwardOptions::default())
        .unwrap()
        .logits;
    let diff = max_abs_diff(&full, &low);
    assert!(
        diff > 1e-3,
        "a low capacity must change the logits (diff {diff})"
    );
}

#[test]
fn fused_and_generic_paths_agree_for_every_routing() {
    let cfg = tiny();
    let m = build(&cfg, &weights(&cfg, 4, 0.3));
    let x = input(&cfg, 3, 2);
    for routing in [
        Routing::Learned,
        Routing::Random { seed: 7 },
        Routing::Width(0),
        Routing::Width(2),
    ] {
        for e_c in [0.9, 0.4] {
            let a = m
                .forward(
                    &x,
                    &[e_c],
                    &ForwardOptions {
                        routing,
                        train: false,
                        want_assignment: true,
                    },
                )
                .unwrap();
            let b = m
                .forward(
                    &x,
                    &[e_c],
                    &ForwardOptions {
                        routing,
                        train: true,
                        want_assignment: true,
                    },
                )
                .unwrap();
            assert_eq!(a.assignment, b.assignment, "{routing:?}");
            let d = max_abs_diff(&a.logits, &b.logits);
            assert!(
                d < 1e-4,
                "{routing:?} e_c {e_c}: fused vs generic differ by {d}"
            );
        }
    }
    // Width(j) puts every token on expert j.
    let out = m
        .forward(
            &x,
            &[1.0],
            &ForwardOptions {
                routing: Routing::Width(1),
                want_assignment: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(out.assignment.unwrap().iter().all(|&a| a == 1));
    assert!((out.capacity[0] - 0.25).abs() < 1e-12);
    // The random router differs from the learned one.
    let l = m
        .forward(
            &x,
            &[0.4],
            &ForwardOptions {
                want_assignment: true,
                ..Default::default()
            },
        )
        .unwrap();
    let r = m
        .forward(
            &x,
            &[0.4],
            &ForwardOptions {
                routing: Routing::Random { seed: 1 },
                want_assignment: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert_ne!(l.assignment, r.assignment);
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Expert Preferred Routing per temporal index: each index's N tokens split as `counts` says.
fn assert_epr_counts(assign: &[u8], counts: &[usize], n: usize) {
    for seq in assign.chunks(n) {
        for (j, &k) in counts.iter().enumerate() {
            assert_eq!(seq.iter().filter(|&&a| a as usize == j).count(), k);
        }
    }
}

fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let num = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap();
    let den = b.sqr().unwrap().sum_all().unwrap();
    (num.to_scalar::<f64>().unwrap() / den.to_scalar::<f64>().unwrap()).sqrt()
}

#[test]
fn tensor_routing_and_other_precisions_agree_with_host_routing_in_f32() {
    // Off the CPU-f32 path (here: f64 and bf16 on the CPU, as on a GPU) EPR runs as tensor
    // ops with no copy to the host; it must route exactly as the host version does.
    let cfg = tiny();
    let m = build(&cfg, &weights(&cfg, 5, 0.3));
    let x = input(&cfg, 3, 4);
    let m64 = model::convert_model(&m, &Device::Cpu, DType::F64).unwrap();
    let m16 = model::convert_model(&m, &Device::Cpu, DType::BF16).unwrap();
    assert_eq!(m64.dtype(), DType::F64);
    for caps in [vec![0.4], vec![0.9], vec![0.3, 1.0, 0.5]] {
        let want = m.forward(&x, &caps, &ForwardOptions::default()).unwrap();
        let got = m64.forward(&x, &caps, &ForwardOptions::default()).unwrap();
        assert_eq!(got.capacity, want.capacity);
        let d = rel_l2(&got.logits, &want.logits);
        assert!(
            d < 1e-5,
            "{caps:?}: f64 tensor routing differs from f32 host routing by {d}"
        );
        let low = m16.forward(&x, &caps, &ForwardOptions::default()).unwrap();
        assert_eq!(low.logits.dtype(), DType::F32);
        let d = rel_l2(&low.logits, &want.logits);
        assert!(d < 5e-2, "{caps:?}: bf16 differs from f32 by {d}");
    }
    // A routing bug shows: the low capacity is not the full one.
    let full = m64.forward(&x, &[1.0], &ForwardOptions::default()).unwrap();
    let low = m64.forward(&x, &[0.4], &ForwardOptions::default()).unwrap();
    assert!(rel_l2(&low.logits, &full.logits) > 1e-3);
}

#[test]
fn per_clip_capacities_equal_each_clip_alone() {
    let cfg = tiny();
    let m = build(&cfg, &weights(&cfg, 5, 0.3));
    let x = input(&cfg, 3, 3);
    let caps = [0.3, 1.0, 0.3];
    let out = m
        .forward(
            &x,
            &caps,
            &ForwardOptions {
                want_assignment: true,
                ..Default::default()
            },
        )
        .unwrap();
    let per_clip = cfg.temporal_tokens() * cfg.spatial_tokens();
    for (b, &c) in caps.iter().enumerate() {
        let xb = x.narrow(0, b, 1).unwrap();
        let alone = m
            .forward(
                &xb,
                &[c],
                &ForwardOptions {
                    want_assignment: true,
                    ..Default::default()
                },
            )
            .unwrap();
        let d = max_abs_diff(&out.logits.get(b).unwrap(), &alone.logits.get(0).unwrap());
        assert!(d < 1e-5, "clip {b}: {d}");
        assert_eq!(
            &out.assignment.as_ref().unwrap()[b * per_clip..(b + 1) * per_clip],
            &alone.assignment.unwrap()[..]
        );
    }
    assert!(m
        .forward(&x, &[0.5, 0.5], &ForwardOptions::default())
        .is_err());
    assert!(m.forward(&x, &[0.05], &ForwardOptions::default()).is_err());
}

#[test]
fn every_parameter_gets_a_gradient_and_alpha_wakes_the_router() {
    let cfg = tiny();
    let vm = VarMap::new();
    let m = MoneVivit::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let x = input(&cfg, 2, 4);
    let y = Tensor::new(&[1u32, 3], &Device::Cpu).unwrap();
    let grads_at = |m: &MoneVivit| {
        let out = m
            .forward(
                &x,
                &[0.5],
                &ForwardOptions {
                    train: true,
                    ..Default::default()
                },
            )
            .unwrap();
        candle_nn::loss::cross_entropy(&out.logits, &y)
            .unwrap()
            .backward()
            .unwrap()
    };
    let vars: Vec<(String, Var)> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let g = grads_at(&m);
    let norm = |name: &str, g: &candle_core::backprop::GradStore| {
        let v = &vars.iter().find(|(k, _)| k == name).unwrap().1;
        g.get(v.as_tensor()).map(|t| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
    };
    for (name, _) in &vars {
        let n = norm(name, &g).unwrap_or_else(|| panic!("{name} got no gradient"));
        // At alpha = 0 the router's only path to the loss is multiplied by alpha.
        if name.starts_with("router.weight") || name.starts_with("router.bias") {
            assert_eq!(n, 0.0, "{name}");
        } else {
            assert!(n > 0.0, "{name} has a zero gradient");
        }
    }
    // Once alpha is positive the router learns.
    let alpha = &vars.iter().find(|(k, _)| k == "router.alpha").unwrap().1;
    alpha
        .set(&Tensor::new(&[0.1f32], &Device::Cpu).unwrap())
        .unwrap();
    let g = grads_at(&m);
    assert!(norm("router.weight", &g).unwrap() > 0.0);
}

#[test]
fn model_folder_round_trip_and_mismatch_errors() {
    let cfg = tiny();
    let w = weights(&cfg, 6, 0.25);
    let m = build(&cfg, &w);
    let dir = std::env::temp_dir().join(format!("mone-model-test-{}", std::process::id()));
    let labels: Vec<String> = (0..cfg.num_classes).map(|i| format!("class {i}")).collect();
    model::save_model_dir(&dir, &cfg, &labels, &m.named_tensors()).unwrap();
    let loaded = model::load_model_dir(&dir, &Device::Cpu).unwrap();
    assert_eq!(loaded.config, cfg);
    assert_eq!(loaded.labels, labels);
    let x = input(&cfg, 1, 8);
    let a = m
        .forward(&x, &[0.5], &ForwardOptions::default())
        .unwrap()
        .logits;
    let b = loaded
        .model
        .forward(&x, &[0.5], &ForwardOptions::default())
        .unwrap()
        .logits;
    assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());

    // A config that does not match the weights names the offending tensor.
    let mut wrong = cfg.clone();
    wrong.spatial_layers = 3;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&wrong).unwrap(),
    )
    .unwrap();
    let e = model::load_model_dir(&dir, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("spatial.layers.2.norm1.weight") && e.contains("missing"),
        "{e}"
    );
    let mut wrong = cfg.clone();
    wrong.num_classes = 7;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&wrong).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("labels.txt"),
        (0..7).map(|i| format!("c{i}\n")).collect::<String>(),
    )
    .unwrap();
    let e = model::load_model_dir(&dir, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("head.weight") && e.contains("[5, 64]") && e.contains("[7, 64]"),
        "{e}"
    );
    let mut wrong = cfg.clone();
    wrong.temporal_layers = 0;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&wrong).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("labels.txt"), labels.join("\n")).unwrap();
    let e = model::load_model_dir(&dir, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("temporal.layers.0") && e.contains("not part of this config"),
        "{e}"
    );
    // Malformed JSON, wrong label count, garbage weights.
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    assert!(model::load_model_dir(&dir, &Device::Cpu)
        .unwrap_err()
        .to_string()
        .contains("malformed JSON"));
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("labels.txt"), "only one\n").unwrap();
    assert!(model::load_model_dir(&dir, &Device::Cpu)
        .unwrap_err()
        .to_string()
        .contains("1 labels"));
    std::fs::write(dir.join("labels.txt"), labels.join("\n")).unwrap();
    std::fs::write(dir.join("model.safetensors"), b"garbage").unwrap();
    assert!(model::load_model_dir(&dir, &Device::Cpu)
        .unwrap_err()
        .to_string()
        .contains("safetensors"));
    assert!(model::load_model_dir(&dir.join("nope"), &Device::Cpu).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

/// Backward through the whole training graph (routing at e_c 0.5 with alpha > 0, so the router,
/// the nested slices and the gathers all take part) against central finite differences, in f64.
#[test]
fn training_gradients_match_finite_differences() {
    let mut cfg = tiny();
    cfg.num_classes = 4;
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let m = MoneVivit::new(&cfg, VarBuilder::from_varmap(&vm, DType::F64, &dev)).unwrap();
    vm.data()
        .lock()
        .unwrap()
        .get("router.alpha")
        .unwrap()
        .set(&Tensor::new(&[0.5f64], &dev).unwrap())
        .unwrap();
    let x = input(&cfg, 3, 5).to_dtype(DType::F64).unwrap();
    let y = Tensor::new(&[0u32, 1, 2], &dev).unwrap();
    let loss = || {
        let out = m
            .forward(
                &x,
                &[0.5],
                &ForwardOptions {
                    routing: Routing::Learned,
                    train: true,
                    want_assignment: false,
                },
            )
            .unwrap();
        candle_nn::loss::cross_entropy(&out.logits, &y).unwrap()
    };
    let grads = loss().backward().unwrap();
    let data = vm.data().lock().unwrap();
    let mut checked = 0;
    for (name, v) in data.iter() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let w0 = v
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let shape = v.as_tensor().shape().clone();
        for k in [0, w0.len() / 2, w0.len() - 1] {
            let at = |delta: f64| {
                let mut w = w0.clone();
                w[k] += delta;
                v.set(&Tensor::from_vec(w, &shape, &dev).unwrap()).unwrap();
                loss().to_scalar::<f64>().unwrap()
            };
            let eps = 1e-5;
            let num = (at(eps) - at(-eps)) / (2.0 * eps);
            v.set(&Tensor::from_vec(w0.clone(), &shape, &dev).unwrap())
                .unwrap();
            assert!(
                (num - g[k]).abs() < 1e-6 + 1e-4 * num.abs(),
                "{name}[{k}]: backward {} vs finite difference {num}",
                g[k]
            );
            checked += 1;
        }
    }
    assert!(checked > 100);
}

// ---------------------------------------------------------------------------------------
// Mobile V-MoE: per-clip expert layers on the same blocks.

fn vmoe(experts: usize, top_k: usize) -> (Config, HashMap<String, Tensor>) {
    let mut cfg = Config::preset("vmoe-fe-tiny").unwrap();
    cfg.temporal_layers = 2;
    cfg.moe = Some(model::MoeConfig {
        layers: 1,
        experts,
        top_k,
    });
    let mut w = weights(&cfg, 21, 0.0);
    // A confident router, so that a small batch spreads over several experts.
    let r = (w["moe_router.weight"].clone() * 20.0).unwrap();
    w.insert("moe_router.weight".into(), r);
    (cfg, w)
}

/// Clips with different brightness and contrast, so that their pooled representations (and
/// so their experts) differ.
fn varied_input(cfg: &Config, b: usize, seed: u64) -> Tensor {
    let clips: Vec<Tensor> = (0..b)
        .map(|c| {
            input(cfg, 1, seed + c as u64)
                .affine(0.3 + 0.15 * c as f64, 0.25 * c as f64 - 1.0)
                .unwrap()
        })
        .collect();
    Tensor::cat(&clips, 0).unwrap()
}

#[test]
fn vmoe_routes_whole_clips_and_equals_the_per_clip_reference() {
    for top_k in [1, 2] {
        let (cfg, w) = vmoe(4, top_k);
        assert!(cfg.expert_layer("temporal", 1) && !cfg.expert_layer("temporal", 0));
        let m = build(&cfg, &w);
        assert!(m.router.is_none(), "a V-MoE has no token router");
        let reference_w = W::new(&w);
        let b = 8;
        let x = varied_input(&cfg, b, 5);
        let all_widest =
            vec![(cfg.num_experts - 1) as u8; cfg.temporal_tokens() * cfg.spatial_tokens()];
        let mut used = std::collections::BTreeSet::new();
        for train in [false, true] {
            let out = m
                .forward(
                    &x,
                    &[0.3],
                    &ForwardOptions {
                        train,
                        ..Default::default()
                    },
                )
                .unwrap();
            // No capacity to turn: every clip reports full compute.
            assert_eq!(out.capacity, vec![1.0; b]);
            assert_eq!(out.router_logits.as_ref().unwrap().dims(), &[b, 4]);
            let logits = out.logits.to_vec2::<f32>().unwrap();
            for (c, got_logits) in logits.iter().enumerate() {
                let (want, route) = reference_with_route(&cfg, &reference_w, &x, c, &all_widest);
                assert_close(
                    got_logits,
                    &want,
                    2e-4,
                    &format!("top-{top_k} clip {c} train {train}"),
                );
                let got = &out.experts[c];
                assert_eq!(got.len(), top_k);
                for ((j, g), (rj, rg)) in got.iter().zip(&route) {
                    assert_eq!(j, rj, "clip {c}: expert");
                    assert!(
                        (*g as f64 - rg).abs() < 1e-4,
                        "clip {c}: weight {g} vs {rg}"
                    );
                }
                used.insert(got[0].0);
            }
        }
        assert!(used.len() >= 2, "the batch used one expert only: {used:?}");
    }
}

#[test]
fn vmoe_random_and_forced_routing_and_gradients_only_reach_used_experts() {
    let (cfg, w) = vmoe(4, 1);
    let m = build(&cfg, &w);
    let x = varied_input(&cfg, 6, 9);
    let run = |routing| {
        m.forward(
            &x,
            &[1.0],
            &ForwardOptions {
                routing,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let learned = run(Routing::Learned);
    let forced = run(Routing::Width(3));
    assert!(forced.experts.iter().all(|e| e[0].0 == 3));
    let random = run(Routing::Random { seed: 3 });
    let pick = |o: &model::ForwardOutput| o.experts.iter().map(|e| e[0].0).collect::<Vec<_>>();
    assert_ne!(pick(&learned), pick(&random));
    // The same clip gets other logits on another expert.
    assert!(max_abs_diff(&learned.logits, &forced.logits) > 1e-3);
    assert!(m
        .forward(
            &x,
            &[1.0],
            &ForwardOptions {
                routing: Routing::Width(4),
                ..Default::default()
            }
        )
        .is_err());

    // Training: the task loss reaches the router (through the gates) and exactly the experts
    // some clip used.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let tm = MoneVivit::new(&cfg, vb).unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        var.set(&w[name]).unwrap();
    }
    let out = tm
        .forward(
            &x,
            &[1.0],
            &ForwardOptions {
                train: true,
                ..Default::default()
            },
        )
        .unwrap();
    let y = Tensor::new(&[0u32, 1, 2, 3, 4, 0], &Device::Cpu).unwrap();
    let loss = candle_nn::loss::cross_entropy(&out.logits, &y).unwrap();
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    let norm = |name: &str| {
        grads.get(data[name].as_tensor()).map_or(0.0, |g| {
            g.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
    };
    assert!(norm("moe_router.weight") > 0.0);
    let used: std::collections::BTreeSet<usize> = out.experts.iter().map(|e| e[0].0).collect();
    for j in 0..4 {
        let g = norm(&format!("temporal.layers.1.mlp.experts.{j}.fc1.weight"));
        assert_eq!(
            g > 0.0,
            used.contains(&j),
            "expert {j}: grad {g}, used {used:?}"
        );
    }
}

#[test]
fn vmoe_model_folder_round_trip_and_mismatch_errors() {
    let (cfg, w) = vmoe(3, 2);
    let m = build(&cfg, &w);
    let dir = std::env::temp_dir().join(format!("mone-vmoe-test-{}", std::process::id()));
    let labels: Vec<String> = (0..cfg.num_classes).map(|i| format!("c{i}")).collect();
    model::save_model_dir(&dir, &cfg, &labels, &m.named_tensors()).unwrap();
    let loaded = model::load_model_dir(&dir, &Device::Cpu).unwrap();
    assert_eq!(loaded.config, cfg);
    let x = input(&cfg, 2, 4);
    let a = m.forward(&x, &[1.0], &ForwardOptions::default()).unwrap();
    let b = loaded
        .model
        .forward(&x, &[1.0], &ForwardOptions::default())
        .unwrap();
    assert_eq!(
        a.logits.to_vec2::<f32>().unwrap(),
        b.logits.to_vec2::<f32>().unwrap()
    );
    assert_eq!(a.experts, b.experts);
    // The dense and plain-candle forwards of a V-MoE are the same model.
    for other in [m.forward_dense(&x).unwrap(), m.forward_plain(&x).unwrap()] {
        assert!(max_abs_diff(&a.logits, &other) < 1e-4);
    }
    // More experts in the config than in the file: the first missing one is named.
    let mut wrong = cfg.clone();
    wrong.moe.as_mut().unwrap().experts = 5;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&wrong).unwrap(),
    )
    .unwrap();
    let e = model::load_model_dir(&dir, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("moe_router.weight") && e.contains("[3, 64]"),
        "{e}"
    );
    // A MoNE config over V-MoE weights: the token router is missing.
    let mut wrong = cfg.clone();
    wrong.kind = "mone-vivit-fe".into();
    wrong.moe = None;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&wrong).unwrap(),
    )
    .unwrap();
    let e = model::load_model_dir(&dir, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("router.weight") && e.contains("missing"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
