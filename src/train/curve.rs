//! The training curve: every step's loss and, every few steps, held-out top-1 at e_c 1.0,
//! 0.5 and 0.3, kept as JSON lines next to the checkpoint (cut back to the checkpoint's step
//! on resume, so a resumed run's curve is a straight run's) and drawn as a PNG.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const FILE: &str = "curve.jsonl";
/// The capacities the curve tracks.
pub const CAPACITIES: [f64; 3] = [1.0, 0.5, 0.3];

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Point {
    pub step: u64,
    pub phase: String,
    pub loss: f32,
    /// Held-out top-1 at [`CAPACITIES`], when evaluated at this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top1: Option<Vec<f64>>,
}

pub struct Curve {
    path: PathBuf,
    pub points: Vec<Point>,
}

impl Curve {
    /// The curve in `dir`, keeping only points before `step` (where a resumed run goes on).
    pub fn open(dir: &Path, step: u64) -> anyhow::Result<Self> {
        let path = dir.join(FILE);
        let mut points = Vec::new();
        if let Ok(text) = std::fs::read_to_string(&path) {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                // A line cut by a crash is dropped, not fatal.
                if let Ok(p) = serde_json::from_str::<Point>(line) {
                    if p.step < step {
                        points.push(p);
                    }
                }
            }
        }
        let c = Self { path, points };
        c.rewrite()?;
        Ok(c)
    }

    fn rewrite(&self) -> anyhow::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut text = String::new();
        for p in &self.points {
            text += &serde_json::to_string(p)?;
            text.push('\n');
        }
        std::fs::write(&self.path, text)?;
        Ok(())
    }

    pub fn push(&mut self, p: Point) -> anyhow::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)?;
        writeln!(f, "{}", serde_json::to_string(&p)?)?;
        self.points.push(p);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_curve_drops_what_came_after_the_checkpoint() {
        let dir = std::env::temp_dir().join(format!("mone-curve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut c = Curve::open(&dir, 0).unwrap();
        for step in 0..6 {
            c.push(Point {
                step,
                phase: "mone".into(),
                loss: step as f32,
                top1: (step % 3 == 0).then(|| vec![0.5, 0.4, 0.3]),
            })
            .unwrap();
        }
        let again = Curve::open(&dir, 4).unwrap();
        assert_eq!(again.points.len(), 4);
        // What is on disk is what was kept.
        assert_eq!(Curve::open(&dir, u64::MAX).unwrap().points, again.points);
        assert_eq!(again.points[3].top1, Some(vec![0.5, 0.4, 0.3]));
        std::fs::remove_dir_all(&dir).ok();
    }
}
