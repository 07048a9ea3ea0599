//! `mone import-hf` against transformers: tiny random ViViT and VideoMAE classifiers saved by
//! transformers 5.23 with an input and the logits transformers computed for it
//! (tests/fixtures/hf, written by scripts/hf_fixtures.py). Our logits must match within 1e-4.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use mone::import::{import_hf, ImportError};
use mone::model::{self, Activation, ForwardOptions};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mone-import-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn expected(name: &str) -> (PathBuf, Vec<Vec<f32>>) {
    let p = fixture(name).join("parity.safetensors");
    let t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    (p, t["logits"].to_vec2::<f32>().unwrap())
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn logits(dir: &Path, tensor: &Path, capacity: f64) -> Vec<Vec<f32>> {
    let m = model::load_model_dir(dir, &Device::Cpu).unwrap();
    let spec = format!("{}:pixel_values", tensor.display());
    let x = mone::infer::read_input(&spec, &m.config, &Device::Cpu).unwrap();
    mone::infer::infer(&m, &x, capacity).unwrap().0
}

#[test]
fn imported_vivit_and_videomae_match_transformers_logits() {
    let tmp = tmpdir("parity");
    for (name, labels, pooling) in [
        ("vivit", 5, model::Pooling::Cls),
        ("videomae", 5, model::Pooling::Mean),
    ] {
        let out = tmp.join(name);
        let r = import_hf(&fixture(name), &out, 4).unwrap();
        assert_eq!(r.labels, ["wave", "run", "jump", "sit", "clap"]);
        assert_eq!(r.config.num_classes, labels);
        assert_eq!(r.config.pooling, pooling);
        assert!(out.join("MODEL_CARD.md").exists());
        let (tensor, want) = expected(name);
        let got = logits(&out, &tensor, 1.0);
        let d = max_diff(&got, &want);
        eprintln!("{name}: max |logit difference| {d:e}");
        assert!(
            d <= 1e-4,
            "{name}: logits differ by {d}: {got:?} vs {want:?}"
        );
        // The fixture is sensitive to what the mapping gets right: the other GELU changes the
        // logits by far more than the tolerance.
        let cfg_path = out.join("config.json");
        let mut cfg: model::Config =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg.hidden_act = match cfg.hidden_act {
            Activation::GeluTanh => Activation::GeluErf,
            Activation::GeluErf => Activation::GeluTanh,
        };
        let wrong = tmp.join(format!("{name}-wrong-gelu"));
        std::fs::create_dir_all(&wrong).unwrap();
        for f in ["model.safetensors", "labels.txt"] {
            std::fs::copy(out.join(f), wrong.join(f)).unwrap();
        }
        std::fs::write(
            wrong.join("config.json"),
            serde_json::to_string(&cfg).unwrap(),
        )
        .unwrap();
        let off = max_diff(&logits(&wrong, &tensor, 1.0), &want);
        assert!(
            off > 2.0 * 1e-4,
            "{name}: the GELU variant moved the logits by only {off}"
        );
        // MoNE on the imported model: half capacity runs, and changes the answer's details.
        let half = logits(&out, &tensor, 0.5);
        assert!(half.iter().flatten().all(|v| v.is_finite()));
        assert!(max_diff(&half, &want) > 1e-3);
    }
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn mone_infer_prints_the_same_logits_as_json() {
    let tmp = tmpdir("cli");
    let out = tmp.join("vivit");
    import_hf(&fixture("vivit"), &out, 4).unwrap();
    let (tensor, want) = expected("vivit");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_mone"))
        .args(["infer", "--model"])
        .arg(&out)
        .arg("--tensor")
        .arg(format!("{}:pixel_values", tensor.display()))
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let got: Vec<Vec<f32>> = serde_json::from_value(v["logits"].clone()).unwrap();
    assert!(max_diff(&got, &want) <= 1e-4);
    assert_eq!(v["top1"][0]["label"], "clap");
    // A wrong tensor name lists what the file holds.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_mone"))
        .args(["infer", "--model"])
        .arg(&out)
        .arg("--tensor")
        .arg(format!("{}:nope", tensor.display()))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("nope") && err.contains("pixel_values"),
        "{err}"
    );
    std::fs::remove_dir_all(&tmp).ok();
}

/// Copy a fixture, letting `edit` change its tensors or its config.
fn edited(
    name: &str,
    tmp: &Path,
    edit: impl FnOnce(&mut HashMap<String, Tensor>, &mut serde_json::Value),
) -> PathBuf {
    let src = fixture(name);
    let dst = tmp.join(format!("{name}-edited"));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    let mut t =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut t, &mut cfg);
    candle_core::safetensors::save(&t, dst.join("model.safetensors")).unwrap();
    std::fs::write(dst.join("config.json"), cfg.to_string()).unwrap();
    dst
}

#[test]
fn what_cannot_be_mapped_is_named() {
    let tmp = tmpdir("errors");
    let out = tmp.join("out");
    let key = "vivit.encoder.layer.1.intermediate.dense.weight";
    let src = edited("vivit", &tmp, |t, _| {
        t.remove(key);
    });
    let e = import_hf(&src, &out, 4).unwrap_err();
    assert!(
        matches!(&e, ImportError::Missing { name } if name == key),
        "{e}"
    );

    let src = edited("vivit", &tmp, |t, _| {
        t.insert(
            "vivit.pooler.dense.weight".into(),
            Tensor::zeros((32, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = import_hf(&src, &out, 4).unwrap_err().to_string();
    assert!(e.contains("vivit.pooler.dense.weight"), "{e}");

    let src = edited("videomae", &tmp, |t, _| {
        let k = "videomae.embeddings.patch_embeddings.projection.weight";
        let w = t[k].narrow(0, 0, 16).unwrap();
        t.insert(k.into(), w);
    });
    let e = import_hf(&src, &out, 4).unwrap_err().to_string();
    assert!(
        e.contains("projection.weight") && e.contains("[16, 3, 2, 8, 8]"),
        "{e}"
    );

    let src = edited("vivit", &tmp, |_, c| c["model_type"] = "timesformer".into());
    let e = import_hf(&src, &out, 4).unwrap_err().to_string();
    assert!(e.contains("timesformer") && e.contains("videomae"), "{e}");

    let src = edited("vivit", &tmp, |_, c| c["hidden_act"] = "relu".into());
    let e = import_hf(&src, &out, 4).unwrap_err().to_string();
    assert!(e.contains("relu"), "{e}");

    let src = edited("vivit", &tmp, |_, c| {
        c["architectures"] = serde_json::json!(["VivitModel"])
    });
    let e = import_hf(&src, &out, 4).unwrap_err().to_string();
    assert!(e.contains("classification head"), "{e}");

    let e = import_hf(&tmp.join("missing"), &out, 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing") && e.contains("not found"), "{e}");
    std::fs::remove_dir_all(&tmp).ok();
}

/// `mone train --init` starts from an imported model: its weights carry over (a new head for
/// other classes) and MoNE steps lower the loss.
#[test]
fn an_imported_model_fine_tunes_with_the_mone_recipe() {
    use mone::train::{synthetic_batch, TrainConfig, Trainer};
    let tmp = tmpdir("finetune");
    let out = tmp.join("vivit");
    import_hf(&fixture("vivit"), &out, 4).unwrap();
    let mut mcfg = model::io::read_config(&out.join("config.json")).unwrap();
    mcfg.num_classes = mone::dataset::CLASSES.len();
    let cfg = TrainConfig {
        steps: 60,
        batch: 4,
        lr: 2e-3,
        warmup: 1,
        weight_decay: 0.0,
        seed: 1,
        init: Some(out.clone()),
        ..TrainConfig::for_model(mcfg)
    };
    let mut tr = Trainer::new(cfg.clone(), &Device::Cpu).unwrap();
    tr.init_from(&out).unwrap();
    let imported = model::load_model_dir(&out, &Device::Cpu).unwrap();
    let a = imported.model.named_tensors();
    let b = tr.model.named_tensors();
    for (k, v) in &a {
        if k.starts_with("head.") {
            assert_ne!(v.dims(), b[k].dims());
            continue;
        }
        let same = (v - &b[k]).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(
            same.to_scalar::<f32>().unwrap(),
            0.0,
            "{k} was not carried over"
        );
    }
    let idx: Vec<u64> = (0..8).collect();
    let (x, y) = synthetic_batch(&cfg.model, 1, &idx, &Device::Cpu, false).unwrap();
    let loss = |tr: &Trainer| {
        let out = tr
            .model
            .forward(&x, &[0.5], &ForwardOptions::default())
            .unwrap();
        candle_nn::loss::cross_entropy(&out.logits, &y)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let before = loss(&tr);
    for _ in 0..60 {
        assert!(tr.step_on(&x, &y).unwrap().loss.is_finite());
    }
    let after = loss(&tr);
    assert!(after < before * 0.7, "loss at e_c 0.5: {before} -> {after}");
    std::fs::remove_dir_all(&tmp).ok();
}
