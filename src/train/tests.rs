use super::*;

fn tiny_cfg(steps: u64) -> TrainConfig {
    let mut m = Config::preset("vivit-fe-tiny").unwrap();
    m.num_classes = CLASSES.len();
    TrainConfig {
        steps,
        batch: 4,
        lr: 1e-3,
        warmup: 2,
        nested_steps: 2,
        seed: 3,
        checkpoint_every: 3,
        ..TrainConfig::for_model(m)
    }
}

fn weights(t: &Trainer) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<(String, Vec<f32>)> = t
        .varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn a_short_run_lowers_the_loss_on_a_fixed_batch() {
    let cfg = TrainConfig {
        nested_steps: 5,
        lr: 2e-3,
        warmup: 1,
        ..tiny_cfg(40)
    };
    let mut tr = Trainer::new(cfg.clone(), &Device::Cpu).unwrap();
    let idx: Vec<u64> = (0..8).collect();
    let (x, y) = synthetic_batch(&cfg.model, 1, &idx, &Device::Cpu, false).unwrap();
    let eval = |tr: &Trainer| {
        let out = tr
            .model
            .forward(&x, &[1.0], &ForwardOptions::default())
            .unwrap();
        candle_nn::loss::cross_entropy(&out.logits, &y)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let before = eval(&tr);
    for _ in 0..40 {
        let info = tr.step_on(&x, &y).unwrap();
        assert!(info.loss.is_finite());
    }
    let after = eval(&tr);
    // A run that learns nothing stays near 1x; 40 steps reach about 0.5x, a little more or
    // less with the rounding of the GEMM kernels the CPU runs (0.508x was seen).
    assert!(after < before * 0.6, "loss {before} -> {after}");
}

#[test]
fn the_superclass_loss_teaches_the_vmoe_router_its_groups() {
    let mut m = Config::preset("vmoe-fe-tiny").unwrap();
    m.num_classes = CLASSES.len();
    let sc: Vec<usize> = (0..CLASSES.len()).map(|c| c % 3).collect();
    let cfg = |superclasses| TrainConfig {
        model: m.clone(),
        nested_steps: 0,
        lr: 3e-3,
        warmup: 1,
        superclasses,
        router_weight: 1.0,
        ..tiny_cfg(30)
    };
    let idx: Vec<u64> = (0..12).collect();
    let (x, y) = synthetic_batch(&m, 1, &idx, &Device::Cpu, false).unwrap();
    let labels = y.to_vec1::<u32>().unwrap();
    let router_ce = |tr: &Trainer| {
        let out = tr
            .model
            .forward(&x, &[1.0], &ForwardOptions::default())
            .unwrap();
        let t: Vec<u32> = labels.iter().map(|&l| sc[l as usize] as u32).collect();
        let t = Tensor::new(t.as_slice(), &Device::Cpu).unwrap();
        candle_nn::loss::cross_entropy(out.router_logits.as_ref().unwrap(), &t)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let mut guided = Trainer::new(cfg(Some(sc.clone())), &Device::Cpu).unwrap();
    let mut plain = Trainer::new(cfg(None), &Device::Cpu).unwrap();
    let before = router_ce(&guided);
    // Near-uniform at initialisation: ln 3.
    assert!((before - 3f32.ln()).abs() < 0.1, "{before}");
    for _ in 0..30 {
        assert!(guided.step_on(&x, &y).unwrap().loss.is_finite());
        assert!(plain.step_on(&x, &y).unwrap().loss.is_finite());
    }
    let (g, p) = (router_ce(&guided), router_ce(&plain));
    assert!(g < 0.5 * before, "guided router CE {before} -> {g}");
    assert!(g < 0.5 * p, "guided {g} vs end-to-end {p}");
}

#[test]
fn the_balance_loss_adds_the_cv_squared_of_expert_importance() {
    let mut m = Config::preset("vmoe-fe-tiny").unwrap();
    m.num_classes = CLASSES.len();
    let cfg = |balance_weight| TrainConfig {
        model: m.clone(),
        nested_steps: 0,
        balance_weight,
        ..tiny_cfg(5)
    };
    let idx: Vec<u64> = (0..6).collect();
    let (x, y) = synthetic_batch(&m, 2, &idx, &Device::Cpu, false).unwrap();
    let mut plain = Trainer::new(cfg(0.0), &Device::Cpu).unwrap();
    let mut balanced = Trainer::new(cfg(2.0), &Device::Cpu).unwrap();
    // The same weights, and a router that prefers expert 0.
    for (name, var) in balanced.varmap.data().lock().unwrap().iter() {
        let src = plain.varmap.data().lock().unwrap()[name]
            .as_tensor()
            .copy()
            .unwrap();
        let src = if name == "moe_router.bias" {
            Tensor::new(&[1.5f32, 0.0, -0.5], &Device::Cpu).unwrap()
        } else {
            src
        };
        var.set(&src).unwrap();
        plain.varmap.data().lock().unwrap()[name].set(&src).unwrap();
    }
    let out = plain
        .model
        .forward(&x, &[1.0], &ForwardOptions::default())
        .unwrap();
    let p = candle_nn::ops::softmax(out.router_logits.as_ref().unwrap(), 1)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let imp: Vec<f64> = (0..3)
        .map(|e| p.iter().map(|r| r[e] as f64).sum())
        .collect();
    let mean = imp.iter().sum::<f64>() / 3.0;
    let var = imp.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 3.0;
    let cv2 = var / (mean * mean);
    assert!(cv2 > 0.1, "{cv2}");
    let a = plain.step_on(&x, &y).unwrap().loss as f64;
    let b = balanced.step_on(&x, &y).unwrap().loss as f64;
    assert!((b - a - 2.0 * cv2).abs() < 1e-4, "{b} - {a} vs 2 * {cv2}");
}

#[test]
fn a_resumed_run_ends_exactly_where_a_straight_run_does() {
    let dir = std::env::temp_dir().join(format!("mone-train-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut straight = Trainer::new(tiny_cfg(6), &Device::Cpu).unwrap();
    // Same initial weights for both runs: copy them over.
    let mut first = Trainer::new(tiny_cfg(6), &Device::Cpu).unwrap();
    for (name, var) in first.varmap.data().lock().unwrap().iter() {
        let src = straight
            .varmap
            .data()
            .lock()
            .unwrap()
            .get(name)
            .unwrap()
            .as_tensor()
            .copy()
            .unwrap();
        var.set(&src).unwrap();
    }
    let mut losses = Vec::new();
    for _ in 0..6 {
        losses.push(straight.step().unwrap().loss);
    }
    assert!(losses.iter().all(|l| l.is_finite()));
    for _ in 0..3 {
        first.step().unwrap();
    }
    first.save_checkpoint(&dir).unwrap();
    let mut resumed = Trainer::new(tiny_cfg(6), &Device::Cpu).unwrap();
    assert!(resumed.resume(&dir).unwrap());
    assert_eq!(resumed.step, 3);
    for _ in 3..6 {
        resumed.step().unwrap();
    }
    assert_eq!(weights(&resumed), weights(&straight));
    // Another config refuses the checkpoint.
    let mut other = Trainer::new(
        TrainConfig {
            lr: 5e-4,
            ..tiny_cfg(6)
        },
        &Device::Cpu,
    )
    .unwrap();
    assert!(other.resume(&dir).is_err());
    resumed.export(&dir.join("model")).unwrap();
    let loaded = model::load_model_dir(&dir.join("model"), &Device::Cpu).unwrap();
    assert_eq!(loaded.labels.len(), 12);
    std::fs::remove_dir_all(&dir).ok();
}

fn copy_weights(from: &Trainer, to: &Trainer) {
    for (name, var) in to.varmap.data().lock().unwrap().iter() {
        let src = from.varmap.data().lock().unwrap()[name]
            .as_tensor()
            .copy()
            .unwrap();
        var.set(&src).unwrap();
    }
}

fn phased_cfg() -> TrainConfig {
    let p = |kind, steps| Phase {
        distill: 1.0,
        ce: 0.5,
        ..Phase::plain(kind, steps, 1e-3, 1)
    };
    TrainConfig {
        phases: vec![
            p(PhaseKind::Dense, 2),
            Phase {
                rewire: true,
                ..p(PhaseKind::Nested, 2)
            },
            p(PhaseKind::Mone, 2),
        ],
        nested_steps: 0,
        ..tiny_cfg(6)
    }
}

#[test]
fn a_phase_boundary_resumes_bit_for_bit() {
    let dir = std::env::temp_dir().join(format!("mone-phase-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = phased_cfg();
    assert_eq!(cfg.total_steps(), 6);
    let mut straight = Trainer::new(cfg.clone(), &Device::Cpu).unwrap();
    let mut kinds = Vec::new();
    for _ in 0..6 {
        let info = straight.step().unwrap();
        assert!(info.loss.is_finite());
        kinds.push(info.phase);
    }
    use PhaseKind::*;
    assert_eq!(kinds, [Dense, Dense, Nested, Nested, Mone, Mone]);
    // Stopped at each boundary (before the rewiring phase and before MoNE) and inside one.
    for stop in [2, 3, 4] {
        let mut first = Trainer::new(cfg.clone(), &Device::Cpu).unwrap();
        let fresh = Trainer::new(cfg.clone(), &Device::Cpu).unwrap();
        copy_weights(&fresh, &first);
        let mut reference = Trainer::new(cfg.clone(), &Device::Cpu).unwrap();
        copy_weights(&fresh, &reference);
        for _ in 0..stop {
            first.step().unwrap();
        }
        first.save_checkpoint(&dir).unwrap();
        let mut resumed = Trainer::new(cfg.clone(), &Device::Cpu).unwrap();
        assert!(resumed.resume(&dir).unwrap());
        for _ in stop..6 {
            resumed.step().unwrap();
        }
        for _ in 0..6 {
            reference.step().unwrap();
        }
        assert_eq!(weights(&resumed), weights(&reference), "stopped at {stop}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn rewiring_keeps_the_full_width_function_and_moves_important_channels_first() {
    let mut m = Config::preset("vivit-fe-tiny").unwrap();
    m.num_classes = CLASSES.len();
    let mut tr = Trainer::new(
        TrainConfig {
            model: m.clone(),
            ..tiny_cfg(4)
        },
        &Device::Cpu,
    )
    .unwrap();
    // A few steps so that the weights (and the importance) are not the initial ones.
    for _ in 0..3 {
        tr.step().unwrap();
    }
    let idx: Vec<u64> = (0..6).collect();
    let (x, _) = synthetic_batch(&m, 9, &idx, &Device::Cpu, false).unwrap();
    let logits = |tr: &Trainer, routing| {
        tr.model
            .forward(
                &x,
                &[1.0],
                &ForwardOptions {
                    routing,
                    ..Default::default()
                },
            )
            .unwrap()
            .logits
    };
    let max_diff = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let widest = Routing::Width(m.num_experts - 1);
    let before = logits(&tr, widest);
    let narrow_before = logits(&tr, Routing::Width(0));
    let imp = model::rewire::importance(&m, &tr.model.named_tensors()).unwrap();
    let perm = tr.rewire().unwrap();
    assert_ne!(perm, (0..m.hidden_size).collect::<Vec<_>>());
    let diff = max_diff(&before, &logits(&tr, widest));
    assert!(diff < 1e-5, "full-width logits moved by {diff}");
    // The narrowest width now reads other channels: its function changed.
    let narrow_diff = max_diff(&narrow_before, &logits(&tr, Routing::Width(0)));
    // Far beyond the float noise of the full width (about 1e-7): the narrow logits, about
    // 0.3 in size, moved by 0.9e-4 to 2.5e-4 in runs whose initial weights differed.
    assert!(
        narrow_diff > 100.0 * diff.max(1e-7),
        "narrow logits moved by {narrow_diff}, the full width by {diff}"
    );
    // The D/8 most important channels are the first D/8 now, most important first.
    let d8 = m.hidden_size / 8;
    let mut top: Vec<usize> = (0..m.hidden_size).collect();
    top.sort_by(|&a, &b| imp[b].total_cmp(&imp[a]));
    assert_eq!(&perm[..d8], &top[..d8]);
    let imp2 = model::rewire::importance(&m, &tr.model.named_tensors()).unwrap();
    assert!(imp2.windows(2).all(|w| w[0] >= w[1] - 1e-5), "{imp2:?}");
}

#[test]
fn label_free_distillation_moves_the_student_towards_the_teacher() {
    let dir = std::env::temp_dir().join(format!("mone-distill-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut m = Config::preset("vivit-fe-tiny").unwrap();
    m.num_classes = 5;
    let teacher = model::random_model(&m, &Device::Cpu).unwrap();
    let labels: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
    // A confident teacher (a random head gives near-uniform outputs at every width).
    let mut w = teacher.named_tensors();
    let head = (&w["head.weight"] * 40.0).unwrap();
    w.insert("head.weight".into(), head);
    model::save_model_dir(&dir, &m, &labels, &w).unwrap();
    let cfg = TrainConfig {
        model: m.clone(),
        phases: vec![Phase {
            distill: 1.0,
            ..Phase::plain(PhaseKind::Mone, 30, 2e-3, 1)
        }],
        classes: labels.clone(),
        teacher: Some(dir.clone()),
        ..tiny_cfg(30)
    };
    // A student of its own random initialisation: far from the teacher.
    let mut tr = Trainer::new(cfg, &Device::Cpu).unwrap();
    tr.set_teacher(&dir).unwrap();
    let idx: Vec<u64> = (0..8).collect();
    let (x, _) = synthetic_batch(&m, 1, &idx, &Device::Cpu, false).unwrap();
    // Labels that are out of range: a run that read them would fail.
    let y = Tensor::from_vec(vec![99u32; 8], 8, &Device::Cpu).unwrap();
    let t = tr.teacher_logits(&x).unwrap().unwrap();
    assert!(candle_nn::loss::cross_entropy(&t, &y)
        .and_then(|l| l.to_scalar::<f32>())
        .map_or(true, |l| !l.is_finite()));
    let kl = |tr: &Trainer| {
        let out = tr
            .model
            .forward(&x, &[0.3], &ForwardOptions::default())
            .unwrap();
        loss::distill(&t, &out.logits)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let before = kl(&tr);
    for _ in 0..30 {
        assert!(tr.step_on(&x, &y).unwrap().loss.is_finite());
    }
    let after = kl(&tr);
    assert!(after < 0.5 * before, "KL at e_c 0.3: {before} -> {after}");
    std::fs::remove_dir_all(&dir).ok();
}
