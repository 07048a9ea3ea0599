//! Element-wise ops for training whose candle backward is slow (GELU and bias-add), and the
//! inference path's token mean pooling.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::simd::{gelu_grad_rows, gelu_rows};
use super::{contiguous_f32, overwritten_f32};
use crate::model::config::Activation;

/// x + b for a contiguous (R, D) x and (D) b, whose backward sums b's gradient over rows in one
/// pass (candle's broadcast backward reduces over the strided leading dimension, slowly).
pub struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias-add"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let b = contiguous_f32(s2, l2, self.name())?;
        let d = b.len();
        if d == 0 || l1.dims().last() != Some(&d) {
            bail!("bias-add: bias of {d} for input {:?}", l1.dims());
        }
        let mut y = overwritten_f32(x.len());
        y.par_chunks_mut(d * 64)
            .zip(x.par_chunks(d * 64))
            .for_each(|(y, x)| {
                for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                    for k in 0..d {
                        y[k] = x[k] + b[k];
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let db = g.apply_op1_no_bwd(&ColumnSum(b.dim(0)?))?;
        Ok((Some(g), Some(db)))
    }
}

struct ColumnSum(usize);

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "column-sum"
    }
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(storage, layout, self.name())?;
        let d = self.0;
        let mut out = vec![0f32; d];
        for r in g.chunks(d) {
            out.iter_mut().zip(r).for_each(|(o, v)| *o += v);
        }
        Ok((CpuStorage::F32(out), Shape::from(d)))
    }
}

/// The mean of each of S sequences' N token rows of width D, in a contiguous (N * S, D) buffer
/// where token p of sequence s is row p * S + s when `token_major`, else s * N + p; returns
/// (S, D). candle reduces over a leading dimension element by element (two divisions per
/// element: 7 ms for one b16 clip's 3136 x 768 tokens, measured); this adds whole rows.
/// Inference only (no backward).
pub struct MeanPool {
    pub n: usize,
    pub s: usize,
    pub token_major: bool,
}

impl CustomOp1 for MeanPool {
    fn name(&self) -> &'static str {
        "mean-pool"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let (n, s) = (self.n, self.s);
        let d = match layout.dims() {
            [rows, d] if *rows == n * s && n > 0 => *d,
            dims => bail!("mean-pool: expected ({}, D) rows, got {dims:?}", n * s),
        };
        let (tok, seq) = if self.token_major { (s, 1) } else { (1, n) };
        let inv = 1.0 / n as f32;
        let mut out = vec![0f32; s * d];
        out.par_chunks_mut(d).enumerate().for_each(|(si, o)| {
            for p in 0..n {
                let r = (si * seq + p * tok) * d;
                o.iter_mut().zip(&x[r..r + d]).for_each(|(o, v)| *o += v);
            }
            o.iter_mut().for_each(|o| *o *= inv);
        });
        Ok((CpuStorage::F32(out), Shape::from((s, d))))
    }
}

/// GELU for training on CPU f32: candle's own op computes its backward from eight separate
/// tensor ops (powf, tanh, ...), which took a third of a training step; this one computes the
/// value and, on backward, the derivative in one vectorised pass each.
pub struct Gelu(pub Activation);

const ELEMWISE_CHUNK: usize = 1 << 14;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-fast"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "gelu-fast")?;
        let mut y = overwritten_f32(x.len());
        let act = self.0;
        y.par_chunks_mut(ELEMWISE_CHUNK)
            .zip(x.par_chunks(ELEMWISE_CHUNK))
            .for_each(|(y, x)| gelu_rows(x, y, act));
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &GeluGrad(self.0),
        )?))
    }
}

/// grad * GELU'(x).
struct GeluGrad(Activation);

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "gelu-fast-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "gelu-fast-grad")?;
        let g = contiguous_f32(s2, l2, "gelu-fast-grad")?;
        if x.len() != g.len() {
            bail!("gelu-fast-grad: {} values, {} gradients", x.len(), g.len());
        }
        let mut y = overwritten_f32(x.len());
        let act = self.0;
        y.par_chunks_mut(ELEMWISE_CHUNK)
            .zip(
                x.par_chunks(ELEMWISE_CHUNK)
                    .zip(g.par_chunks(ELEMWISE_CHUNK)),
            )
            .for_each(|(y, (x, g))| gelu_grad_rows(x, g, y, act));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pool_equals_candles_mean_in_both_row_orders() {
        use candle_core::Device;
        for &(n, s, d) in &[(1, 1, 1), (7, 3, 5), (13, 1, 17), (196, 4, 33)] {
            let x = Tensor::randn(0f32, 1.0, (n * s, d), &Device::Cpu).unwrap();
            for token_major in [false, true] {
                let want = if token_major {
                    x.reshape((n, s, d)).unwrap().mean(0).unwrap()
                } else {
                    x.reshape((s, n, d)).unwrap().mean(1).unwrap()
                };
                let got = x.apply_op1_no_bwd(&MeanPool { n, s, token_major }).unwrap();
                assert_eq!(got.dims(), &[s, d]);
                let diff = (got - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    diff < 1e-5,
                    "n {n} s {s} d {d} token-major {token_major}: {diff}"
                );
            }
        }
        let x = Tensor::zeros((10, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let wrong = MeanPool {
            n: 3,
            s: 3,
            token_major: false,
        };
        assert!(x.apply_op1_no_bwd(&wrong).is_err());
    }

    #[test]
    fn fast_gelu_matches_candles_value_and_gradient() {
        use candle_core::{Device, Var};
        let xs: Vec<f32> = (0..40_000).map(|i| (i as f32 - 20_000.0) * 4e-4).collect();
        for act in [Activation::GeluTanh, Activation::GeluErf] {
            let x = Var::new(xs.as_slice(), &Device::Cpu).unwrap();
            let w = Tensor::new(
                (0..xs.len())
                    .map(|i| (i % 7) as f32 - 3.0)
                    .collect::<Vec<_>>(),
                &Device::Cpu,
            )
            .unwrap();
            let ours = x.apply_op1(Gelu(act)).unwrap();
            let theirs = match act {
                Activation::GeluTanh => x.gelu().unwrap(),
                Activation::GeluErf => x.gelu_erf().unwrap(),
            };
            let (a, b) = (
                ours.to_vec1::<f32>().unwrap(),
                theirs.to_vec1::<f32>().unwrap(),
            );
            assert!(
                a.iter().zip(&b).all(|(a, b)| (a - b).abs() < 1e-5),
                "{act:?}"
            );
            let ga = ours.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = theirs
                .mul(&w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let ga = ga.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            let gb = gb.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            let worst = ga
                .iter()
                .zip(&gb)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "{act:?}: gradient off by {worst}");
        }
    }
}
