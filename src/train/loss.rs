//! The distillation loss: KL(teacher || student) over classes, the teacher detached, as in
//! slimmable networks' in-place distillation (every narrower width, or a routed pass, learns
//! the widest pass's soft output).

use candle_core::{Result, Tensor, D};
use candle_nn::ops::log_softmax;

/// Mean over the batch of KL(softmax(teacher) || softmax(student)); no gradient reaches the
/// teacher.
pub fn distill(teacher_logits: &Tensor, student_logits: &Tensor) -> Result<Tensor> {
    let lt = log_softmax(&teacher_logits.detach(), D::Minus1)?;
    let ls = log_softmax(student_logits, D::Minus1)?;
    (lt.exp()? * (lt - ls)?)?.sum(D::Minus1)?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn distillation_is_zero_at_the_teacher_and_pulls_towards_it() {
        let dev = Device::Cpu;
        let t = Tensor::new(&[[2.0f32, 0.5, -1.0], [0.0, 1.0, 0.2]], &dev).unwrap();
        let same = distill(&t, &t).unwrap().to_scalar::<f32>().unwrap();
        assert!(same.abs() < 1e-6, "{same}");
        // A student that puts too little mass on the teacher's top class of row 0 and too much
        // on another.
        let s = Var::new(&[[0.0f32, 0.5, 1.0], [0.0, 1.0, 0.2]], &dev).unwrap();
        let loss = distill(&t, s.as_tensor()).unwrap();
        assert!(loss.to_scalar::<f32>().unwrap() > 0.1);
        let g = loss.backward().unwrap();
        let gs = g.get(s.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        // Gradient descent raises the under-weighted logit and lowers the over-weighted one;
        // the row that already matches gets (almost) none.
        assert!(gs[0][0] < 0.0 && gs[0][2] > 0.0, "{gs:?}");
        assert!(gs[1].iter().all(|v| v.abs() < 1e-6), "{gs:?}");
        // d KL / d s = (softmax(s) - softmax(t)) / B.
        let ps = candle_nn::ops::softmax(s.as_tensor(), 1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let pt = candle_nn::ops::softmax(&t, 1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for k in 0..3 {
            assert!((gs[0][k] - (ps[0][k] - pt[0][k]) / 2.0).abs() < 1e-5);
        }
        assert!(g.get(&t).is_none());
    }
}
