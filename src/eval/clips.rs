//! Evaluation clips: the procedural dataset rendered in memory, a labelled folder, or an
//! unlabelled folder of videos (for label-free distillation), decoded through the project's
//! GStreamer source.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::dataset;
use crate::model::Config;

/// Labelled clips at a model's input size: `frames[i]` holds T packed RGB frames.
pub struct ClipSet {
    pub frames: Vec<Vec<Vec<u8>>>,
    pub labels: Vec<usize>,
    pub size: usize,
    /// Where the clips came from, for reports.
    pub source: String,
}

impl ClipSet {
    /// `count` clips of the procedural dataset with seed `seed`, rendered in memory.
    pub fn synthetic(cfg: &Config, seed: u64, count: u64) -> Self {
        let (frames, labels) = (0..count)
            .map(|i| {
                let p = dataset::plan(seed, i, cfg.frames);
                (dataset::render(&p, cfg.image_size), p.label)
            })
            .unzip();
        Self {
            frames,
            labels,
            size: cfg.image_size,
            source: format!("synthetic seed {seed}, {count} clips"),
        }
    }

    /// A labelled folder (`labels.csv` of path,label, or one sub-folder per class) decoded
    /// through the project's GStreamer source; labels must be among `classes`. Each video gives
    /// its centre `cfg.frames` frames (repeating the last frame of a shorter one).
    #[cfg(feature = "gst")]
    pub fn folder(dir: &Path, cfg: &Config, classes: &[String]) -> anyhow::Result<Self> {
        let entries = list_folder(dir)?;
        anyhow::ensure!(
            !entries.is_empty(),
            "{} holds no labelled videos",
            dir.display()
        );
        let (mut frames, mut labels) = (Vec::new(), Vec::new());
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        for (k, (path, label)) in entries.iter().enumerate() {
            let idx = classes.iter().position(|c| c == label).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: label `{label}` is not one of the model's classes ({})",
                    path.display(),
                    classes.join(", ")
                )
            })?;
            frames.push(decode_clip(path, cfg)?);
            labels.push(idx);
            if tty {
                eprint!("\rdecoded {}/{}", k + 1, entries.len());
            }
        }
        if tty {
            eprintln!();
        }
        Ok(Self {
            frames,
            labels,
            size: cfg.image_size,
            source: format!("{} ({} videos)", dir.display(), entries.len()),
        })
    }

    /// Every video under `dir` (searched recursively, any layout), unlabelled: for
    /// label-free distillation. Files that do not decode are skipped with a warning; none
    /// decoding is an error.
    #[cfg(feature = "gst")]
    pub fn unlabelled(dir: &Path, cfg: &Config) -> anyhow::Result<Self> {
        let files = list_videos(dir)?;
        anyhow::ensure!(!files.is_empty(), "{} holds no files", dir.display());
        let mut frames = Vec::new();
        let mut skipped = 0;
        for path in &files {
            match decode_clip(path, cfg) {
                Ok(clip) => frames.push(clip),
                Err(e) => {
                    skipped += 1;
                    eprintln!("warning: skipping {}: {e:#}", path.display());
                }
            }
        }
        anyhow::ensure!(
            !frames.is_empty(),
            "none of the {} files under {} decoded as video",
            files.len(),
            dir.display()
        );
        Ok(Self {
            labels: vec![0; frames.len()],
            frames,
            size: cfg.image_size,
            source: format!(
                "{} ({} unlabelled videos{})",
                dir.display(),
                files.len() - skipped,
                if skipped > 0 {
                    format!(", {skipped} skipped")
                } else {
                    String::new()
                }
            ),
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// (video path, label name) pairs of a dataset folder: `labels.csv` (path,label; paths relative
/// to the folder) if present, else every video in each sub-folder, labelled by the sub-folder.
pub fn list_folder(dir: &Path) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let csv = dir.join("labels.csv");
    if csv.exists() {
        let text = std::fs::read_to_string(&csv)
            .with_context(|| format!("cannot read {}", csv.display()))?;
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || (n == 0 && line == "path,label") {
                continue;
            }
            let (p, l) = line.rsplit_once(',').ok_or_else(|| {
                anyhow::anyhow!("{}:{}: expected `path,label`", csv.display(), n + 1)
            })?;
            let path = dir.join(p.trim());
            anyhow::ensure!(
                path.exists(),
                "{}:{}: {} does not exist",
                csv.display(),
                n + 1,
                path.display()
            );
            out.push((path, l.trim().to_string()));
        }
        return Ok(out);
    }
    let mut out = Vec::new();
    let mut classes: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .collect();
    classes.sort_by_key(|e| e.file_name());
    for c in classes {
        let label = c.file_name().to_string_lossy().to_string();
        let mut files: Vec<PathBuf> = std::fs::read_dir(c.path())?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        out.extend(files.into_iter().map(|p| (p, label.clone())));
    }
    Ok(out)
}

/// A video's centre `cfg.frames` frames at the model's size (the last frame repeated for a
/// shorter one).
#[cfg(feature = "gst")]
fn decode_clip(path: &Path, cfg: &Config) -> anyhow::Result<Vec<Vec<u8>>> {
    let decoded = crate::source::decode_file(path, cfg.image_size as u32, 512)
        .with_context(|| format!("cannot decode {}", path.display()))?;
    anyhow::ensure!(!decoded.is_empty(), "{}: no frames", path.display());
    let t = cfg.frames;
    let start = decoded.len().saturating_sub(t) / 2;
    Ok((0..t)
        .map(|i| decoded[(start + i).min(decoded.len() - 1)].rgb.to_vec())
        .collect())
}

/// Every file under `dir`, recursively, sorted; hidden files and `labels.csv` left out.
pub fn list_videos(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
            let p = e?.path();
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            if name.starts_with('.') {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() && name != "labels.csv" {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}
