//! LayerNorm over the last dimension, forward and backward.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::simd::{layer_norm_row, sum16};
use super::{contiguous_f32, f32_slice, overwritten_f32};

/// LayerNorm over the last dimension of a contiguous (R, D) tensor.
pub struct FusedLayerNorm {
    pub eps: f32,
}

impl CustomOp3 for FusedLayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = *l1.dims().last().unwrap_or(&0);
        if !l1.is_contiguous()
            || !l2.is_contiguous()
            || !l3.is_contiguous()
            || l2.dims() != [d]
            || l3.dims() != [d]
            || d == 0
        {
            bail!("fused-layer-norm: needs contiguous (.., {d}) input and ({d}) weight and bias");
        }
        let n = l1.shape().elem_count();
        let x = &f32_slice(s1, l1, self.name())?[..n];
        let w = &f32_slice(s2, l2, self.name())?[..d];
        let b = &f32_slice(s3, l3, self.name())?[..d];
        let mut y = overwritten_f32(n);
        let eps = self.eps;
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(yr, xr)| layer_norm_row(xr, w, b, eps, yr));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// candle's composed layer norm spends most of its backward in strided column sums; this
    /// computes dx row by row and dw, db in one pass over the rows.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, g) = (x.contiguous()?, grad.contiguous()?);
        let dx = x.apply_op3_no_bwd(w, &g, &LayerNormGradX { eps: self.eps })?;
        let dwb = x.apply_op2_no_bwd(&g, &LayerNormGradWB { eps: self.eps })?;
        Ok((Some(dx), Some(dwb.get(0)?), Some(dwb.get(1)?)))
    }
}

/// Mean and 1/sigma of one row, as in the forward.
#[inline(always)]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum16(x) / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// dx = (g w - mean(g w) - xhat mean(g w xhat)) / sigma, per row.
struct LayerNormGradX {
    eps: f32,
}

impl CustomOp3 for LayerNormGradX {
    fn name(&self) -> &'static str {
        "layer-norm-grad-x"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        let g = contiguous_f32(s3, l3, self.name())?;
        let d = w.len();
        if d == 0 || x.len() != g.len() || x.len() % d != 0 {
            bail!("layer-norm-grad-x: shapes do not match");
        }
        let mut dx = overwritten_f32(x.len());
        let eps = self.eps;
        dx.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(o, (x, g))| {
                let (mean, inv) = row_stats(x, eps);
                let (mut a, mut c) = (0f32, 0f32);
                for k in 0..d {
                    let gw = g[k] * w[k];
                    a += gw;
                    c += gw * (x[k] - mean) * inv;
                }
                let (a, c) = (a / d as f32, c / d as f32);
                for k in 0..d {
                    let xh = (x[k] - mean) * inv;
                    o[k] = (g[k] * w[k] - a - xh * c) * inv;
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// (2, D): sum over rows of g * xhat, then of g.
struct LayerNormGradWB {
    eps: f32,
}

impl CustomOp2 for LayerNormGradWB {
    fn name(&self) -> &'static str {
        "layer-norm-grad-wb"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let g = contiguous_f32(s2, l2, self.name())?;
        let d = *l1.dims().last().unwrap_or(&0);
        if d == 0 || x.len() != g.len() {
            bail!("layer-norm-grad-wb: shapes do not match");
        }
        let eps = self.eps;
        let rows_per = (x.len() / d)
            .div_ceil(rayon::current_num_threads().max(1))
            .max(1);
        let partial: Vec<Vec<f32>> = x
            .par_chunks(rows_per * d)
            .zip(g.par_chunks(rows_per * d))
            .map(|(x, g)| {
                let mut acc = vec![0f32; 2 * d];
                for (x, g) in x.chunks(d).zip(g.chunks(d)) {
                    let (mean, inv) = row_stats(x, eps);
                    let (dw, db) = acc.split_at_mut(d);
                    for k in 0..d {
                        dw[k] += g[k] * (x[k] - mean) * inv;
                        db[k] += g[k];
                    }
                }
                acc
            })
            .collect();
        let mut out = vec![0f32; 2 * d];
        for p in partial {
            out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
        }
        Ok((CpuStorage::F32(out), Shape::from((2, d))))
    }
}

#[cfg(test)]
mod tests {
    use super::super::elementwise::{BiasAdd, Gelu};
    use super::*;
    use crate::model::config::Activation;

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        let worst = a
            .iter()
            .zip(&b)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= tol, "off by {worst}");
    }

    /// Gradients of sum(out * probe).
    fn grads(out: &Tensor, probe: &Tensor) -> candle_core::backprop::GradStore {
        out.mul(probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    }

    #[test]
    fn kernels_read_a_view_that_starts_at_an_offset() {
        use candle_core::{Device, Var};
        let dev = Device::Cpu;
        let base = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 8), &dev).unwrap()).unwrap();
        let w = Tensor::ones(8, candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros(8, candle_core::DType::F32, &dev).unwrap();
        // Rows 3..5: contiguous, but at offset 24 of the storage.
        let view = base.narrow(0, 3, 2).unwrap();
        let ours = view
            .apply_op3(&w, &b, FusedLayerNorm { eps: 1e-6 })
            .unwrap();
        let theirs = candle_nn::ops::layer_norm_slow(&view, &w, &b, 1e-6).unwrap();
        close(&ours, &theirs, 1e-5);
        let probe = Tensor::randn(0f32, 1.0, (2, 8), &dev).unwrap();
        let (go, gt) = (grads(&ours, &probe), grads(&theirs, &probe));
        close(go.get(&base).unwrap(), gt.get(&base).unwrap(), 1e-4);
        let g = Gelu(Activation::GeluErf);
        let ours = view.apply_op1(g).unwrap();
        let (go, gt) = (
            grads(&ours, &probe),
            grads(&view.gelu_erf().unwrap(), &probe),
        );
        close(go.get(&base).unwrap(), gt.get(&base).unwrap(), 1e-4);
    }

    #[test]
    fn layer_norm_and_bias_gradients_match_candles() {
        use candle_core::{Device, Var};
        let dev = Device::Cpu;
        let (r, d) = (37, 24);
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (r, d), &dev).unwrap() + 0.7).unwrap())
            .unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, d, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, d, &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (r, d), &dev).unwrap();
        let ours = x
            .apply_op3(w.as_tensor(), b.as_tensor(), FusedLayerNorm { eps: 1e-6 })
            .unwrap();
        let theirs = candle_nn::ops::layer_norm_slow(&x, &w, &b, 1e-6).unwrap();
        close(&ours, &theirs, 1e-5);
        let (go, gt) = (grads(&ours, &probe), grads(&theirs, &probe));
        for v in [&x, &w, &b] {
            close(go.get(v).unwrap(), gt.get(v).unwrap(), 1e-4);
        }
        let ours = x.apply_op2(b.as_tensor(), BiasAdd).unwrap();
        let theirs = x.broadcast_add(&b).unwrap();
        close(&ours, &theirs, 0.0);
        let (go, gt) = (grads(&ours, &probe), grads(&theirs, &probe));
        for v in [&x, &b] {
            close(go.get(v).unwrap(), gt.get(v).unwrap(), 1e-5);
        }
    }
}
