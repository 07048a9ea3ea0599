//! Training phases and the recipe file that lists them: an optional dense phase, a nested
//! joint phase (every width on every batch: with four widths the sandwich rule of slimmable
//! networks is all of them) and a MoNE phase (routed, e_c drawn per step), each with its own
//! warm-up and cosine schedule, and optional channel rewiring when a phase starts.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dataset::Rng;

/// The capacities the MoNE phase draws from (the paper's video recipe).
pub const CAPACITIES: [f64; 9] = [0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95];

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PhaseKind {
    /// Every token at full width, no router.
    Dense,
    /// Every width on every batch, each forward at one uniform width.
    Nested,
    /// Routed by the learned router at an e_c drawn from [`CAPACITIES`] every step.
    Mone,
}

impl PhaseKind {
    pub fn name(self) -> &'static str {
        match self {
            PhaseKind::Dense => "dense",
            PhaseKind::Nested => "nested",
            PhaseKind::Mone => "mone",
        }
    }
}

/// One phase. Loss with labels: CE of the full-width (nested) or e_c 1.0 (MoNE) pass, plus for
/// each narrower width or the routed pass `distill` x KL(teacher || student) to that pass's
/// detached output, plus `ce` x its own CE. With a teacher model (label-free distillation)
/// every pass learns only the teacher's output.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    pub kind: PhaseKind,
    pub steps: u64,
    pub lr: f64,
    #[serde(default = "default_warmup")]
    pub warmup: u64,
    /// Weight of the in-place distillation term.
    #[serde(default = "one")]
    pub distill: f64,
    /// Weight of the narrower widths' (or the routed pass's) own cross-entropy.
    #[serde(default)]
    pub ce: f64,
    /// Permute the residual channels by importance before the phase's first step, so that
    /// the most important ones sit in the narrowest expert's slice.
    #[serde(default)]
    pub rewire: bool,
}

fn default_warmup() -> u64 {
    20
}

fn one() -> f64 {
    1.0
}

impl Phase {
    /// A phase with the loss the flag-only command line always used: no distillation, every
    /// pass on its labels.
    pub fn plain(kind: PhaseKind, steps: u64, lr: f64, warmup: u64) -> Self {
        Self {
            kind,
            steps,
            lr,
            warmup,
            distill: 0.0,
            ce: 1.0,
            rewire: false,
        }
    }

    /// Learning rate at step `s` of this phase: linear warm-up, then cosine to zero.
    pub fn lr_at(&self, s: u64) -> f64 {
        if s < self.warmup {
            return self.lr * (s + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let u = ((s - self.warmup) as f64 / span).min(1.0);
        self.lr * 0.5 * (1.0 + (std::f64::consts::PI * u).cos())
    }
}

/// Where global step `step` falls: (phase index, step within that phase).
pub fn locate(phases: &[Phase], step: u64) -> Option<(usize, u64)> {
    let mut start = 0;
    for (i, p) in phases.iter().enumerate() {
        if step < start + p.steps {
            return Some((i, step - start));
        }
        start += p.steps;
    }
    None
}

/// The first global step of phase `i`.
pub fn phase_start(phases: &[Phase], i: usize) -> u64 {
    phases.iter().take(i).map(|p| p.steps).sum()
}

/// The widths a nested step trains, narrowest first: all of them (with four widths the
/// sandwich rule, widest + narrowest + `random` in between, covers every width). With more
/// widths than four: the widest, the narrowest and `random` distinct ones between, drawn from
/// the step's seed.
pub fn sandwich(num_widths: usize, random: usize, seed: u64) -> Vec<usize> {
    if num_widths <= 2 + random {
        return (0..num_widths).collect();
    }
    let mut middle: Vec<usize> = (1..num_widths - 1).collect();
    Rng::new(seed).shuffle(&mut middle);
    let mut w: Vec<usize> = middle.into_iter().take(random).collect();
    w.push(0);
    w.push(num_widths - 1);
    w.sort_unstable();
    w
}

/// The capacity a MoNE step at global step `step` trains at.
pub fn capacity_at(seed: u64, step: u64) -> f64 {
    let mut rng = Rng::new(seed ^ step.wrapping_mul(0x2545_F491_4F6C_DD1D));
    CAPACITIES[rng.below(CAPACITIES.len())]
}

/// A recipe file: the model, the run's settings and the phases, with the flags of `mone
/// train` as overrides of the run's settings.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    #[serde(default)]
    pub model: ModelSpec,
    #[serde(default)]
    pub run: RunSpec,
    #[serde(rename = "phase", default)]
    pub phases: Vec<Phase>,
}

/// The architecture: a preset and the overrides `mone train` also takes as flags.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub preset: Option<String>,
    pub hidden_size: Option<usize>,
    pub heads: Option<usize>,
    pub spatial_layers: Option<usize>,
    pub temporal_layers: Option<usize>,
    pub image_size: Option<usize>,
    pub frames: Option<usize>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    pub batch: Option<usize>,
    pub seed: Option<u64>,
    pub weight_decay: Option<f64>,
    pub checkpoint_every: Option<u64>,
    pub eval_every: Option<u64>,
    pub eval_count: Option<u64>,
    /// A model folder to start from, relative to the working directory.
    pub init: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("cannot read the recipe {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the recipe {path} is malformed: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("the recipe {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Recipe {
    pub fn read(path: &Path) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let r: Recipe = toml::from_str(&text).map_err(|e| RecipeError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| RecipeError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        if r.phases.is_empty() {
            return Err(invalid("it lists no [[phase]]".into()));
        }
        for (i, p) in r.phases.iter().enumerate() {
            if p.steps == 0 || !(p.lr > 0.0 && p.lr.is_finite()) {
                return Err(invalid(format!(
                    "phase {} ({}) needs steps > 0 and a positive lr",
                    i + 1,
                    p.kind.name()
                )));
            }
            if p.distill < 0.0 || p.ce < 0.0 {
                return Err(invalid(format!(
                    "phase {} has a negative loss weight",
                    i + 1
                )));
            }
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_widths_train_all_of_them_and_more_keep_both_ends() {
        assert_eq!(sandwich(4, 2, 7), vec![0, 1, 2, 3]);
        for seed in 0..20 {
            let w = sandwich(8, 2, seed);
            assert_eq!(w.len(), 4, "{w:?}");
            assert_eq!((w[0], w[3]), (0, 7));
            assert!(w.windows(2).all(|p| p[0] < p[1]), "{w:?}");
        }
        // The middle widths vary with the seed.
        let seen: std::collections::HashSet<Vec<usize>> =
            (0..20).map(|s| sandwich(8, 2, s)).collect();
        assert!(seen.len() > 3);
    }

    #[test]
    fn steps_fall_into_their_phases() {
        let p = |kind, steps| Phase::plain(kind, steps, 1e-3, 1);
        let ph = [
            p(PhaseKind::Dense, 3),
            p(PhaseKind::Nested, 2),
            p(PhaseKind::Mone, 4),
        ];
        assert_eq!(locate(&ph, 0), Some((0, 0)));
        assert_eq!(locate(&ph, 3), Some((1, 0)));
        assert_eq!(locate(&ph, 4), Some((1, 1)));
        assert_eq!(locate(&ph, 8), Some((2, 3)));
        assert_eq!(locate(&ph, 9), None);
        assert_eq!(phase_start(&ph, 2), 5);
    }

    #[test]
    fn each_phase_warms_up_then_decays() {
        let p = Phase::plain(PhaseKind::Mone, 110, 1.0, 10);
        assert!((p.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((p.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((p.lr_at(60) - 0.5).abs() < 1e-9);
        assert!(p.lr_at(109) < 0.01);
    }

    #[test]
    fn recipes_parse_and_bad_ones_say_why() {
        let dir = std::env::temp_dir().join(format!("mone-recipe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(
            &good,
            "[model]\npreset = \"vivit-fe-tiny\"\nhidden_size = 32\n[run]\nbatch = 8\n\
             [[phase]]\nkind = \"nested\"\nsteps = 5\nlr = 1e-3\nrewire = true\n\
             [[phase]]\nkind = \"mone\"\nsteps = 7\nlr = 5e-4\ndistill = 0.5\n",
        )
        .unwrap();
        let r = Recipe::read(&good).unwrap();
        assert_eq!(r.model.hidden_size, Some(32));
        assert_eq!(r.run.batch, Some(8));
        assert_eq!(r.phases.len(), 2);
        assert!(r.phases[0].rewire && r.phases[0].distill == 1.0 && r.phases[0].warmup == 20);
        assert_eq!(r.phases[1].distill, 0.5);
        for (text, want) in [
            ("[run]\nbatch = 8\n", "no [[phase]]"),
            (
                "[[phase]]\nkind = \"mone\"\nsteps = 0\nlr = 1e-3\n",
                "steps > 0",
            ),
            (
                "[[phase]]\nkind = \"sparse\"\nsteps = 3\nlr = 1e-3\n",
                "malformed",
            ),
            (
                "[[phase]]\nkind = \"mone\"\nstep = 3\nlr = 1e-3\n",
                "malformed",
            ),
        ] {
            let f = dir.join("bad.toml");
            std::fs::write(&f, text).unwrap();
            let e = Recipe::read(&f).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        assert!(Recipe::read(&dir.join("missing.toml"))
            .unwrap_err()
            .to_string()
            .contains("cannot read"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
