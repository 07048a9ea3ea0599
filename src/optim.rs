//! AdamW whose state can be saved and restored, so that a checkpoint resumes training exactly
//! (candle-nn's AdamW keeps its moments private).

use std::collections::HashMap;

use candle_core::{backprop::GradStore, DType, Result, Tensor, Var};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.05,
        }
    }
}

/// Parameters that take no weight decay: biases, norms, position embeddings, tokens, alpha.
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias")
        || name.contains("norm")
        || name.contains("position")
        || name.ends_with("_cls")
        || name.ends_with("alpha"))
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

pub struct AdamW {
    slots: Vec<Slot>,
    step: u64,
    pub cfg: AdamWConfig,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let z = var.as_tensor().zeros_like()?;
                Ok(Slot {
                    decay: decays(&name),
                    name,
                    m: z.clone(),
                    v: z,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            step: 0,
            cfg,
        })
    }

    /// Zero the moments and the step count (a new phase with a new loss).
    pub fn reset(&mut self) -> Result<()> {
        for s in &mut self.slots {
            s.m = s.m.zeros_like()?;
            s.v = s.v.zeros_like()?;
        }
        self.step = 0;
        Ok(())
    }

    pub fn steps(&self) -> u64 {
        self.step
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// One update from `grads`; parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            // A gradient can still hold the graph it came from (candle detaches the gradients
            // it passes down, not every leaf's sum); the moments must not, or each step's
            // moments would keep the previous step's graph, activations and all, alive.
            let g = &g.detach();
            s.m = ((&s.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            s.v = ((&s.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&s.m / bc1)?;
            let v_hat = (&s.v / bc2)?;
            let upd = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let theta = s.var.as_tensor();
            let decayed = if s.decay {
                (theta * (1.0 - c.lr * c.weight_decay))?
            } else {
                theta.clone()
            };
            s.var.set(&(decayed - (upd * c.lr)?)?)?;
        }
        Ok(())
    }

    /// The optimizer state as named tensors (`adamw.m.<param>`, `adamw.v.<param>`,
    /// `adamw.step`), for a checkpoint.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for s in &self.slots {
            out.insert(format!("adamw.m.{}", s.name), s.m.clone());
            out.insert(format!("adamw.v.{}", s.name), s.v.clone());
        }
        // u64 as two u32 halves: safetensors has no u64 in every reader.
        let dev = self
            .slots
            .first()
            .map(|s| s.m.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        out.insert(
            "adamw.step".into(),
            Tensor::new(&[(self.step >> 32) as u32, self.step as u32], &dev)?,
        );
        Ok(out)
    }

    /// Restore what [`AdamW::state`] saved; every parameter's moments must be present.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let get = |k: &str| {
            state
                .get(k)
                .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state lacks `{k}`")))
        };
        for s in &mut self.slots {
            let m = get(&format!("adamw.m.{}", s.name))?;
            let v = get(&format!("adamw.v.{}", s.name))?;
            if m.dims() != s.m.dims() || v.dims() != s.v.dims() {
                candle_core::bail!("optimizer state for `{}` has the wrong shape", s.name);
            }
            s.m = m.to_dtype(s.m.dtype())?.to_device(s.m.device())?;
            s.v = v.to_dtype(s.v.dtype())?.to_device(s.v.device())?;
        }
        let st = get("adamw.step")?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        if st.len() != 2 {
            candle_core::bail!("optimizer step is malformed");
        }
        self.step = ((st[0] as u64) << 32) | st[1] as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn problem() -> (Var, Var, Tensor, Tensor) {
        let d = &Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[[0.5f32, -0.3], [0.1, 0.2]], d).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[0.0f32, 0.1], d).unwrap()).unwrap();
        let x = Tensor::new(&[[1.0f32, 2.0], [-1.0, 0.5], [0.3, -0.7]], d).unwrap();
        let y = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0], [0.5, 0.5]], d).unwrap();
        (w, b, x, y)
    }

    fn loss(w: &Var, b: &Var, x: &Tensor, y: &Tensor) -> Tensor {
        let p = x
            .matmul(&w.as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        (p - y).unwrap().sqr().unwrap().mean_all().unwrap()
    }

    fn run(opt: &mut AdamW, w: &Var, b: &Var, x: &Tensor, y: &Tensor, n: usize) {
        for _ in 0..n {
            let g = loss(w, b, x, y).backward().unwrap();
            opt.step(&g).unwrap();
        }
    }

    #[test]
    fn first_step_matches_the_formula_and_decay_skips_biases() {
        let (w, b, x, y) = problem();
        let w0 = w.as_tensor().to_vec2::<f32>().unwrap();
        let g = loss(&w, &b, &x, &y).backward().unwrap();
        let gw = g.get(w.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = AdamW::new(
            vec![("l.weight".into(), w.clone()), ("l.bias".into(), b.clone())],
            cfg,
        )
        .unwrap();
        opt.step(&g).unwrap();
        let w1 = w.as_tensor().to_vec2::<f32>().unwrap();
        for i in 0..2 {
            for j in 0..2 {
                // Step 1: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps).
                let gg = gw[i][j] as f64;
                let want = w0[i][j] as f64 * (1.0 - 0.1 * 0.5) - 0.1 * gg / (gg.abs() + 1e-8);
                assert!(
                    (w1[i][j] as f64 - want).abs() < 1e-6,
                    "{} vs {want}",
                    w1[i][j]
                );
            }
        }
        assert!(
            !decays("spatial.layers.0.mlp.fc1.bias")
                && !decays("router.alpha")
                && decays("head.weight")
        );
    }

    #[test]
    fn resuming_from_saved_state_is_exact() {
        let cfg = AdamWConfig {
            lr: 0.05,
            ..Default::default()
        };
        let (w, b, x, y) = problem();
        let mut opt =
            AdamW::new(vec![("w".into(), w.clone()), ("b".into(), b.clone())], cfg).unwrap();
        run(&mut opt, &w, &b, &x, &y, 5);
        let saved = (
            w.as_tensor().copy().unwrap(),
            b.as_tensor().copy().unwrap(),
            opt.state().unwrap(),
        );
        run(&mut opt, &w, &b, &x, &y, 5);
        let straight = w.as_tensor().to_vec2::<f32>().unwrap();

        let (w2, b2, _, _) = problem();
        w2.set(&saved.0).unwrap();
        b2.set(&saved.1).unwrap();
        let mut opt2 = AdamW::new(
            vec![("w".into(), w2.clone()), ("b".into(), b2.clone())],
            cfg,
        )
        .unwrap();
        opt2.load_state(&saved.2).unwrap();
        assert_eq!(opt2.steps(), 5);
        run(&mut opt2, &w2, &b2, &x, &y, 5);
        assert_eq!(w2.as_tensor().to_vec2::<f32>().unwrap(), straight);
        // A fresh optimizer (moments lost) does not land on the same weights.
        let (w3, b3, _, _) = problem();
        w3.set(&saved.0).unwrap();
        b3.set(&saved.1).unwrap();
        let mut opt3 = AdamW::new(
            vec![("w".into(), w3.clone()), ("b".into(), b3.clone())],
            cfg,
        )
        .unwrap();
        run(&mut opt3, &w3, &b3, &x, &y, 5);
        assert_ne!(w3.as_tensor().to_vec2::<f32>().unwrap(), straight);
        let mut missing = saved.2.clone();
        missing.remove("adamw.v.b");
        assert!(opt3.load_state(&missing).is_err());
    }
}
