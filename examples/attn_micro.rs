//! Micro-benchmark of the fused attention kernel against candle's generic attention.
use candle_core::{Device, Tensor};
use mone::model::attention::attention;
use mone::model::kernels::FusedAttention;
use mone::model::nested::TokenLayout;
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let (n, s, h, hd) = (196, 16, 12, 64);
    let d = h * hd;
    let qkv = Tensor::randn(0f32, 1f32, (n * s, 3 * d), &Device::Cpu)?;
    let layout = TokenLayout::dense(n, s, d);
    for _ in 0..3 {
        let t = Instant::now();
        let a = qkv.apply_op1_no_bwd(&FusedAttention {
            n,
            s,
            heads: h,
            head_dim: hd,
            token_major: false,
        })?;
        let t1 = t.elapsed();
        let t = Instant::now();
        let b = attention(&qkv, &layout, h, false)?;
        let t2 = t.elapsed();
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        println!("fused {:?}  generic {:?}  max diff {diff:e}", t1, t2);
    }
    Ok(())
}
