//! `mone eval` end to end on a rendered dataset folder, and the folder formats it reads.
//! Rendering and decoding the folders needs GStreamer (the default feature `gst`).
#![cfg(feature = "gst")]

use std::path::PathBuf;

use candle_core::Device;
use mone::dataset::CLASSES;
use mone::eval::{self, EvalArgs};
use mone::model::{self, Config};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mone-eval-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn motion_model(dir: &std::path::Path) -> Config {
    let mut cfg = Config::preset("vivit-fe-tiny").unwrap();
    cfg.num_classes = CLASSES.len();
    let m = model::random_model(&cfg, &Device::Cpu).unwrap();
    let labels: Vec<String> = CLASSES.iter().map(|s| s.to_string()).collect();
    model::save_model_dir(dir, &cfg, &labels, &m.named_tensors()).unwrap();
    cfg
}

#[test]
fn eval_reads_a_rendered_folder_and_reports_every_capacity() {
    let root = tmp("folder");
    let data = root.join("data");
    mone::cli::render_dataset(&mone::cli::DatasetRenderArgs {
        out: data.clone(),
        count: 12,
        seed: 4,
        format: "mp4".into(),
        frames: 8,
        size: 32,
        fps: 12,
    })
    .unwrap();
    let mdir = root.join("model");
    let cfg = motion_model(&mdir);
    let args = EvalArgs {
        model: mdir.clone(),
        dataset: Some(data.clone()),
        synthetic: false,
        seed: 1,
        count: 12,
        baseline: Some(mdir.clone()),
        single_frame: None,
        json: true,
        plot: Some(root.join("plot.png")),
        batch: 5,
        device: "cpu".into(),
        compare: Vec::new(),
        superclasses: None,
        latency_clips: 4,
        teacher: Some(mdir.clone()),
    };
    let r = eval::run(&args).unwrap();
    assert_eq!(r.clips, 12);
    assert_eq!(r.mone.len(), eval::CAPACITIES.len());
    // Compute falls with capacity; e_c 1 costs the dense model plus the router.
    assert!(r.mone[0].gmacs >= r.dense_gmacs && r.mone[0].gmacs < r.dense_gmacs * 1.01);
    assert!(r.mone.windows(2).all(|w| w[1].gmacs < w[0].gmacs));
    // The same weights evaluated as a dense baseline score what MoNE scores at e_c 1 (alpha 0).
    assert_eq!(r.baselines[0].top1, r.mone[0].top1_learned);
    // The uniform-width sub-models: the widest is the dense baseline (`Routing::Width`), and
    // compute grows with the width, the widest costing what e_c 1 costs.
    assert_eq!(r.uniform.len(), cfg.num_experts);
    assert_eq!(r.uniform[cfg.num_experts - 1].top1, r.baselines[0].top1);
    assert_eq!(
        r.uniform.iter().map(|u| u.width).collect::<Vec<_>>(),
        cfg.expert_widths()
    );
    assert!(r.uniform.windows(2).all(|w| w[0].gmacs < w[1].gmacs));
    assert!((r.uniform[cfg.num_experts - 1].gmacs - r.mone[0].gmacs).abs() < 1e-12);
    // Agreement with e_c 1 is total at e_c 1 and a share elsewhere.
    assert_eq!(r.mone[0].agreement_with_full, 1.0);
    // The model as its own teacher: the same agreement.
    assert!(r
        .mone
        .iter()
        .all(|m| m.agreement_with_teacher == Some(m.agreement_with_full)));
    assert!(r
        .mone
        .iter()
        .all(|m| (0.0..=1.0).contains(&m.agreement_with_full)));
    // The decoded folder scores what the in-memory render scores (same frames, up to H.264).
    let set = eval::ClipSet::synthetic(&cfg, 4, 12);
    assert_eq!(
        set.labels,
        eval::ClipSet::folder(&data, &cfg, &labels())
            .unwrap()
            .labels
    );
    let png = std::fs::read(root.join("plot.png")).expect("plot written");
    assert_eq!(&png[1..4], b"PNG");
    // No comparison asked for a MoNE model: no side-by-side table.
    assert!(r.models.is_empty());
    std::fs::remove_dir_all(&root).ok();
}

fn train_args(out: PathBuf) -> mone::train::TrainArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        train: mone::train::TrainArgs,
    }
    Cli::parse_from(["mone", "--out", out.to_str().unwrap()]).train
}

#[test]
fn vmoe_trains_with_auto_superclasses_and_compares_side_by_side() {
    let root = tmp("vmoe");
    let dense = root.join("dense");
    motion_model(&dense);
    // Super-classes clustered from the dense model's confusion matrix, then a V-MoE run.
    let sc_dir = root.join("vmoe-sc");
    let a = mone::train::TrainArgs {
        preset: Some("vivit-fe-tiny".into()),
        kind: "vmoe".into(),
        experts: 3,
        moe_layers: 1,
        steps: 2,
        batch: Some(4),
        eval_count: Some(8),
        superclasses: Some("auto".into()),
        baseline: Some(dense.clone()),
        superclass_clips: 24,
        ..train_args(sc_dir.clone())
    };
    mone::train::run(&a).unwrap();
    let sc = mone::superclass::Superclasses::read(&sc_dir.join("superclasses.json")).unwrap();
    assert_eq!(sc.groups.len(), 3);
    assert_eq!(sc.index(&labels(), 3).unwrap().len(), 12);
    assert_eq!(sc.confusion.iter().flatten().sum::<u64>(), 24);
    let vm = model::load_model_dir(&sc_dir, &Device::Cpu).unwrap();
    assert!(vm.config.is_vmoe() && vm.config.moe.unwrap().experts == 3);
    // auto without a baseline, and a super-class file for other classes, are refused clearly.
    let e = mone::train::run(&mone::train::TrainArgs {
        baseline: None,
        out: root.join("x"),
        ..a.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("--baseline"), "{e}");
    std::fs::write(root.join("bad.json"), r#"{"groups": [["walking"]]}"#).unwrap();
    let e = mone::train::run(&mone::train::TrainArgs {
        superclasses: Some(root.join("bad.json").display().to_string()),
        out: root.join("y"),
        ..a.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("`walking`"), "{e}");

    let args = EvalArgs {
        model: sc_dir.clone(),
        dataset: None,
        synthetic: true,
        seed: 1,
        count: 24,
        baseline: None,
        single_frame: None,
        json: true,
        plot: None,
        batch: 8,
        device: "cpu".into(),
        compare: vec![dense.clone()],
        superclasses: None,
        latency_clips: 3,
        teacher: None,
    };
    let r = eval::run(&args).unwrap();
    assert!(r.mone.is_empty(), "a V-MoE has no capacity sweep");
    assert_eq!(r.models.len(), 2);
    let (v, d) = (&r.models[0], &r.models[1]);
    assert_eq!(v.kind, "vmoe-vivit-fe");
    // Equal compute: the dense model plus a 3 x 64 router; the dense row runs MoNE's token
    // router at e_c 1 (0.2% of this tiny model).
    assert!(
        (v.gmacs - d.gmacs).abs() < 5e-3 * d.gmacs,
        "{} vs {}",
        v.gmacs,
        d.gmacs
    );
    assert!(v.params > d.params);
    let load: u64 = v.expert_load.iter().flatten().sum();
    assert_eq!(load, 24);
    let of = sc.index(&labels(), 3).unwrap();
    let hits: u64 = (0..12).map(|c| v.expert_load[c][of[c]]).sum();
    assert_eq!(v.router_accuracy, Some(hits as f64 / 24.0));
    assert!(v.routing_purity.unwrap() >= v.router_accuracy.unwrap());
    assert!(v.top1_random_router.is_some() && d.top1_random_router.is_none());
    assert!(v.ms_per_clip_batch1 > 0.0 && d.clips_per_s_batched > 0.0);
    let table = eval::table(&r);
    assert!(
        table.contains("clips per expert") && table.contains("super-classes: 0 = {"),
        "{table}"
    );
    std::fs::remove_dir_all(&root).ok();
}

fn labels() -> Vec<String> {
    CLASSES.iter().map(|s| s.to_string()).collect()
}

#[test]
fn folders_by_class_and_bad_csvs() {
    let root = tmp("layout");
    for (class, n) in [("waving", 2), ("clapping", 1)] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..n {
            std::fs::write(root.join(class).join(format!("v{i}.mp4")), b"x").unwrap();
        }
    }
    let list = eval::list_folder(&root).unwrap();
    let names: Vec<&str> = list.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(names, ["clapping", "waving", "waving"]);

    std::fs::write(
        root.join("labels.csv"),
        "path,label\nwaving/v0.mp4,waving\nmissing.mp4,x\n",
    )
    .unwrap();
    let e = eval::list_folder(&root).unwrap_err().to_string();
    assert!(
        e.contains("labels.csv:3") && e.contains("does not exist"),
        "{e}"
    );
    std::fs::write(root.join("labels.csv"), "path,label\nno-comma-here\n").unwrap();
    let e = eval::list_folder(&root).unwrap_err().to_string();
    assert!(e.contains("path,label"), "{e}");

    // A label the model does not know is named, not silently dropped.
    std::fs::write(root.join("labels.csv"), "waving/v0.mp4,waving\n").unwrap();
    let cfg = Config::preset("vivit-fe-tiny").unwrap();
    let e = eval::ClipSet::folder(&root, &cfg, &labels())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("`waving` is not one of the model's classes"),
        "{e}"
    );
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn explain_draws_the_routing_of_one_clip() {
    let root = tmp("explain");
    let mdir = root.join("model");
    motion_model(&mdir);
    let out = root.join("explain.png");
    mone::cli::explain(&mone::cli::ExplainArgs {
        model: Some(mdir),
        input: "test:pattern=ball,width=64,height=48,fps=12,frames=20,live=false".into(),
        capacity: 0.3,
        out: out.clone(),
        device: "cpu".into(),
    })
    .unwrap();
    assert_eq!(&std::fs::read(&out).unwrap()[1..4], b"PNG");
    std::fs::remove_dir_all(&root).ok();
}

/// The shipped model through real compression: held-out clips rendered to H.264 MP4 and run
/// through `mone classify` score at most 5 points below the same clips evaluated in memory.
#[test]
fn shipped_model_keeps_its_accuracy_through_h264_and_mone_classify() {
    let model_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/mone-vivit-tiny-motion");
    let lm = model::load_model_dir(&model_dir, &Device::Cpu).expect("the shipped model loads");
    let cfg = &lm.config;
    let root = tmp("shipped");
    let data = root.join("clips");
    let count = 96;
    mone::cli::render_dataset(&mone::cli::DatasetRenderArgs {
        out: data.clone(),
        count,
        seed: 1,
        format: "mp4".into(),
        frames: cfg.frames,
        size: cfg.image_size,
        fps: 12,
    })
    .unwrap();
    let mem = eval::score(
        &lm.model,
        cfg,
        &eval::ClipSet::synthetic(cfg, 1, count),
        1.0,
        model::Routing::Learned,
        eval::Input::AsIs,
        32,
        &Device::Cpu,
    )
    .unwrap()
    .top1();
    let events = root.join("events.jsonl");
    let files: Vec<String> = (0..count)
        .map(|i| data.join(format!("clip_{i:06}.mp4")).display().to_string())
        .collect();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_mone"))
        .arg("classify")
        .args(&files)
        .args(["--model", &model_dir.display().to_string(), "--out"])
        .arg(&events)
        .status()
        .unwrap();
    assert!(status.success());
    let mut hits = 0;
    let mut seen = 0;
    for line in std::fs::read_to_string(&events).unwrap().lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        if e["type"] != "video" {
            continue;
        }
        let stream = e["stream"].as_str().unwrap();
        let i: u64 = stream.rsplit("clip_").next().unwrap()[..6].parse().unwrap();
        seen += 1;
        if e["labels"][0]["label"] == CLASSES[mone::dataset::plan(1, i, cfg.frames).label] {
            hits += 1;
        }
    }
    assert_eq!(seen, count);
    let h264 = hits as f64 / count as f64;
    eprintln!(
        "in memory {:.1}%, through H.264 + mone classify {:.1}%",
        mem * 100.0,
        h264 * 100.0
    );
    assert!(h264 >= mem - 0.05, "in memory {mem}, through H.264 {h264}");
    std::fs::remove_dir_all(&root).ok();
}

/// Fine-tuning on a user's folder: another set of classes, the shipped model's body, the
/// project's GStreamer decode (48 px, 20-frame videos into a 32 px, 16-frame model).
#[test]
fn fine_tunes_the_shipped_model_on_a_class_folder() {
    let root = tmp("finetune");
    let all = root.join("all");
    mone::cli::render_dataset(&mone::cli::DatasetRenderArgs {
        out: all.clone(),
        count: 14,
        seed: 5,
        format: "mp4".into(),
        frames: 20,
        size: 48,
        fps: 12,
    })
    .unwrap();
    let data = root.join("data");
    for (class, clips) in [("left", [0, 12]), ("right", [1, 13])] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        for i in clips {
            let name = format!("clip_{i:06}.mp4");
            std::fs::copy(all.join(&name), data.join(class).join(&name)).unwrap();
        }
    }
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/mone-vivit-tiny-motion");
    let out = root.join("out");
    let run = |dataset: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_mone"))
            .args([
                "train", "--steps", "4", "--batch", "4", "--warmup", "1", "--init",
            ])
            .arg(&shipped)
            .arg("--dataset")
            .arg(dataset)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let o = run(&data);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tuned = model::load_model_dir(&out, &Device::Cpu).unwrap();
    assert_eq!(tuned.labels, ["left", "right"]);
    // The body started from the shipped model: the embedding moved only by 4 small steps.
    let a = model::load_model_dir(&shipped, &Device::Cpu)
        .unwrap()
        .model
        .named_tensors();
    let b = tuned.model.named_tensors();
    let diff = (&a["embedding.projection.weight"] - &b["embedding.projection.weight"])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 0.01, "embedding moved by {diff}");
    // One class is not a classification task.
    std::fs::remove_dir_all(data.join("right")).unwrap();
    let o = run(&data);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("at least two classes"));
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn distills_the_shipped_model_on_an_unlabelled_nested_folder() {
    let root = tmp("distill");
    let all = root.join("all");
    mone::cli::render_dataset(&mone::cli::DatasetRenderArgs {
        out: all.clone(),
        count: 4,
        seed: 6,
        format: "mp4".into(),
        frames: 16,
        size: 32,
        fps: 12,
    })
    .unwrap();
    // Any layout: videos at two depths, a labels file that must be ignored, and a file that
    // is not a video (skipped with a warning).
    let data = root.join("footage");
    std::fs::create_dir_all(data.join("cam1/2026-12-01")).unwrap();
    for i in 0..4 {
        let name = format!("clip_{i:06}.mp4");
        let to = if i % 2 == 0 {
            data.join("cam1/2026-12-01").join(&name)
        } else {
            data.join(&name)
        };
        std::fs::copy(all.join(&name), to).unwrap();
    }
    std::fs::write(
        data.join("labels.csv"),
        "path,label\nclip_000001.mp4,nonsense\n",
    )
    .unwrap();
    std::fs::write(data.join("cam1/notes.txt"), "not a video").unwrap();
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/mone-vivit-tiny-motion");
    let out = root.join("out");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_mone"))
        .args([
            "train",
            "--distill",
            "--steps",
            "3",
            "--batch",
            "2",
            "--warmup",
            "1",
        ])
        .arg("--init")
        .arg(&shipped)
        .arg("--dataset")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("skipping") && err.contains("notes.txt"),
        "{err}"
    );
    assert!(err.contains("4 unlabelled videos"), "{err}");
    let student = model::load_model_dir(&out, &Device::Cpu).unwrap();
    assert_eq!(student.labels, labels());
    std::fs::remove_dir_all(&root).ok();
}
