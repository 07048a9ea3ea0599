//! A procedural motion-action dataset, deterministic by seed, in the spirit of
//! Something-Something: the class is in the motion, not in the appearance. A clip is one
//! object (shape, size, colour, speed and start drawn at random) doing the class's motion over a
//! textured, noisy background, with up to two small distractors drifting on their own.

pub const CLASSES: [&str; 12] = [
    "moving_left",
    "moving_right",
    "moving_up",
    "moving_down",
    "approaching",
    "receding",
    "rotating_clockwise",
    "rotating_counterclockwise",
    "appearing",
    "disappearing",
    "bouncing",
    "static",
];

/// Deterministic random numbers (splitmix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x6A09_E667_F3BC_C909)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn f(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.f()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    /// Fisher-Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for k in (1..v.len()).rev() {
            v.swap(k, self.below(k + 1));
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// A square with a bright corner marker, so that rotation is visible.
    MarkedSquare,
    Triangle,
    /// An L shape.
    Ell,
    Disc,
}

/// Where an object is in one frame (coordinates in [0, 1] of the frame).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pose {
    pub x: f32,
    pub y: f32,
    /// Half-size, as a fraction of the frame.
    pub r: f32,
    /// Rotation, radians (clockwise on screen, since y points down).
    pub angle: f32,
    /// 0: invisible, 1: opaque.
    pub alpha: f32,
}

#[derive(Clone, Debug)]
pub struct Object {
    pub shape: Shape,
    pub colour: [f32; 3],
    pub poses: Vec<Pose>,
}

/// Everything needed to draw a clip; `label` indexes [`CLASSES`].
#[derive(Clone, Debug)]
pub struct ClipPlan {
    pub label: usize,
    pub frames: usize,
    pub background: [f32; 3],
    pub texture: [f32; 4],
    pub noise: f32,
    /// The actor first, then the distractors.
    pub objects: Vec<Object>,
    pub seed: u64,
}

fn colour(rng: &mut Rng) -> [f32; 3] {
    [
        rng.range(0.1, 1.0),
        rng.range(0.1, 1.0),
        rng.range(0.1, 1.0),
    ]
}

/// The plan of clip `index` of the dataset with seed `seed`. Labels cycle through the classes,
/// so any `count` that is a multiple of 12 is balanced.
pub fn plan(seed: u64, index: u64, frames: usize) -> ClipPlan {
    let mut rng = Rng::new(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03),
    );
    let label = (index % CLASSES.len() as u64) as usize;
    let t_max = frames.saturating_sub(1).max(1) as f32;
    let shapes = [
        Shape::MarkedSquare,
        Shape::Triangle,
        Shape::Ell,
        Shape::Disc,
    ];
    let rotating = matches!(label, 6 | 7);
    // A disc shows no rotation: rotating classes never use one.
    let shape = shapes[rng.below(if rotating { 3 } else { 4 })];
    let r0 = rng.range(0.07, 0.14);
    let speed = rng.range(0.25, 0.5); // frame widths over the clip
    let (mut x0, mut y0) = (rng.range(0.3, 0.7), rng.range(0.3, 0.7));
    let angle0 = rng.range(0.0, std::f32::consts::TAU);
    let spin = rng.range(1.2, 2.5) * if label == 7 { -1.0 } else { 1.0 };
    let along = rng.range(0.3, 0.7);
    match label {
        0 => x0 = rng.range(0.62, 0.78),
        1 => x0 = rng.range(0.22, 0.38),
        2 => y0 = rng.range(0.62, 0.78),
        3 => y0 = rng.range(0.22, 0.38),
        _ => {}
    }
    let bounce_vertical = rng.f() < 0.5;
    let poses = (0..frames)
        .map(|t| {
            let u = t as f32 / t_max;
            let mut p = Pose {
                x: x0,
                y: y0,
                r: r0,
                angle: angle0,
                alpha: 1.0,
            };
            match label {
                0 => p.x = x0 - speed * u,
                1 => p.x = x0 + speed * u,
                2 => p.y = y0 - speed * u,
                3 => p.y = y0 + speed * u,
                4 => p.r = r0 * (0.6 + 1.6 * u),
                5 => p.r = r0 * (2.2 - 1.6 * u),
                6 | 7 => p.angle = angle0 + spin * u,
                8 => p.alpha = ((u - along * 0.5) / 0.2).clamp(0.0, 1.0),
                9 => p.alpha = 1.0 - ((u - along * 0.5) / 0.2).clamp(0.0, 1.0),
                10 => {
                    // Out to a turning point and back again.
                    let d = speed * 0.8 * (1.0 - (2.0 * u - 1.0).abs());
                    if bounce_vertical {
                        p.y = y0 - 0.2 + d;
                    } else {
                        p.x = x0 - 0.2 + d;
                    }
                }
                _ => {}
            }
            p
        })
        .collect();
    let mut objects = vec![Object {
        shape,
        colour: colour(&mut rng),
        poses,
    }];
    for _ in 0..rng.below(3) {
        let (dx, dy) = (rng.range(0.3, 0.7), rng.range(0.3, 0.7));
        let (vx, vy) = (rng.range(-0.06, 0.06), rng.range(-0.06, 0.06));
        let r = rng.range(0.03, 0.05);
        let s = shapes[rng.below(4)];
        let c = colour(&mut rng);
        let (xs, ys) = (
            if dx < 0.5 { dx - 0.25 } else { dx + 0.25 },
            if dy < 0.5 { dy - 0.25 } else { dy + 0.25 },
        );
        let poses = (0..frames)
            .map(|t| {
                let u = t as f32 / t_max;
                Pose {
                    x: xs.clamp(0.05, 0.95) + vx * u,
                    y: ys.clamp(0.05, 0.95) + vy * u,
                    r,
                    angle: 0.3 * u,
                    alpha: 1.0,
                }
            })
            .collect();
        objects.push(Object {
            shape: s,
            colour: c,
            poses,
        });
    }
    ClipPlan {
        label,
        frames,
        background: [
            rng.range(0.0, 0.6),
            rng.range(0.0, 0.6),
            rng.range(0.0, 0.6),
        ],
        texture: [
            rng.range(4.0, 14.0),
            rng.range(4.0, 14.0),
            rng.range(0.0, std::f32::consts::TAU),
            rng.range(0.03, 0.12),
        ],
        noise: rng.range(0.01, 0.05),
        objects,
        seed: rng.next_u64(),
    }
}

/// Inside test in the object's own frame (unit half-size, unrotated).
fn inside(shape: Shape, u: f32, v: f32) -> Option<bool> {
    // Returns Some(marker?) when inside.
    let inside = match shape {
        Shape::MarkedSquare => u.abs() <= 1.0 && v.abs() <= 1.0,
        Shape::Disc => u * u + v * v <= 1.0,
        Shape::Triangle => (-1.0..=1.0).contains(&v) && u.abs() <= (v + 1.0) * 0.5,
        Shape::Ell => (u.abs() <= 1.0 && v.abs() <= 1.0) && (u <= -0.2 || v >= 0.2),
    };
    inside.then_some(match shape {
        Shape::MarkedSquare => u > 0.45 && v < -0.45,
        Shape::Triangle => v > 0.6,
        Shape::Ell => u < -0.6 && v < -0.6,
        Shape::Disc => false,
    })
}

/// Draw the clip: `frames` RGB frames of `size` x `size`, each `size * size * 3` bytes.
pub fn render(plan: &ClipPlan, size: usize) -> Vec<Vec<u8>> {
    let mut rng = Rng::new(plan.seed);
    let n = size as f32;
    let [fx, fy, ph, amp] = plan.texture;
    let mut out = Vec::with_capacity(plan.frames);
    for t in 0..plan.frames {
        let mut img = vec![[0f32; 3]; size * size];
        for y in 0..size {
            for x in 0..size {
                let (u, v) = (x as f32 / n, y as f32 / n);
                let tex = amp * ((fx * u + ph).sin() * (fy * v - ph).cos());
                img[y * size + x] = std::array::from_fn(|c| plan.background[c] + tex);
            }
        }
        // Distractors first, the actor on top.
        for obj in plan.objects.iter().rev() {
            let p = obj.poses[t];
            if p.alpha <= 0.0 {
                continue;
            }
            let (cx, cy, r) = (p.x * n, p.y * n, (p.r * n).max(1.0));
            let (s, c) = p.angle.sin_cos();
            let reach = (r * 1.5).ceil() as i64;
            for y in (cy as i64 - reach).max(0)..(cy as i64 + reach + 1).min(size as i64) {
                for x in (cx as i64 - reach).max(0)..(cx as i64 + reach + 1).min(size as i64) {
                    let (dx, dy) = ((x as f32 + 0.5 - cx) / r, (y as f32 + 0.5 - cy) / r);
                    // Rotate into the object's frame.
                    let (u, v) = (c * dx + s * dy, -s * dx + c * dy);
                    if let Some(marker) = inside(obj.shape, u, v) {
                        let px = &mut img[y as usize * size + x as usize];
                        for (v, oc) in px.iter_mut().zip(obj.colour) {
                            let col = if marker { 1.0 - oc * 0.3 } else { oc };
                            *v = *v * (1.0 - p.alpha) + col * p.alpha;
                        }
                    }
                }
            }
        }
        let frame: Vec<u8> = img
            .iter()
            .flat_map(|px| {
                let noise = plan.noise * (rng.f() * 2.0 - 1.0);
                px.map(|v| ((v + noise).clamp(0.0, 1.0) * 255.0).round() as u8)
            })
            .collect();
        out.push(frame);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_by_seed_and_balanced() {
        let a = render(&plan(7, 3, 8), 32);
        let b = render(&plan(7, 3, 8), 32);
        assert_eq!(a, b);
        assert_ne!(a, render(&plan(8, 3, 8), 32));
        let labels: Vec<usize> = (0..24).map(|i| plan(1, i, 8).label).collect();
        for c in 0..CLASSES.len() {
            assert_eq!(labels.iter().filter(|&&l| l == c).count(), 2);
        }
        assert_eq!(a.len(), 8);
        assert!(a.iter().all(|f| f.len() == 32 * 32 * 3));
    }

    #[test]
    fn the_actor_does_its_class_motion() {
        for i in 0..48u64 {
            let p = plan(11, i, 16);
            let a = &p.objects[0].poses;
            let (first, last) = (a[0], a[15]);
            match CLASSES[p.label] {
                "moving_left" => assert!(last.x < first.x - 0.2),
                "moving_right" => assert!(last.x > first.x + 0.2),
                "moving_up" => assert!(last.y < first.y - 0.2),
                "moving_down" => assert!(last.y > first.y + 0.2),
                "approaching" => assert!(last.r > first.r * 2.0),
                "receding" => assert!(last.r < first.r * 0.5),
                "rotating_clockwise" => assert!(last.angle > first.angle + 1.0),
                "rotating_counterclockwise" => assert!(last.angle < first.angle - 1.0),
                "appearing" => assert!(first.alpha == 0.0 && last.alpha == 1.0),
                "disappearing" => assert!(first.alpha == 1.0 && last.alpha == 0.0),
                "bouncing" => {
                    let mid = a[8];
                    let out = (mid.x - first.x).abs() + (mid.y - first.y).abs();
                    let back = (last.x - first.x).abs() + (last.y - first.y).abs();
                    assert!(out > 0.1 && back < 0.02, "{out} {back}");
                }
                "static" => assert_eq!(first, last),
                other => panic!("{other}"),
            }
            if matches!(p.label, 6 | 7) {
                assert_ne!(p.objects[0].shape, Shape::Disc);
            }
            // Distractors are small and move little.
            for d in &p.objects[1..] {
                assert!(d.poses[0].r < 0.06);
                assert!((d.poses[15].x - d.poses[0].x).abs() < 0.07);
            }
        }
    }

    #[test]
    fn the_actor_is_drawn_where_its_pose_says() {
        // A moving_right clip: the pixels that change most between the first and last frame sit
        // left of centre early and right of it late.
        let p = plan(3, 1, 16);
        assert_eq!(CLASSES[p.label], "moving_right");
        let f = render(&p, 64);
        let diff_centroid = |a: &[u8], b: &[u8]| {
            let (mut sx, mut n) = (0f64, 0f64);
            for (i, (x, y)) in a.chunks(3).zip(b.chunks(3)).enumerate() {
                let d: i32 = x
                    .iter()
                    .zip(y)
                    .map(|(p, q)| (*p as i32 - *q as i32).abs())
                    .sum();
                if d > 120 {
                    sx += (i % 64) as f64;
                    n += 1.0;
                }
            }
            sx / n.max(1.0) / 64.0
        };
        let first = p.objects[0].poses[0].x as f64;
        let last = p.objects[0].poses[15].x as f64;
        let c = diff_centroid(&f[0], &f[15]);
        assert!(
            c > first - 0.1 && c < last + 0.1,
            "changed pixels centred at {c}, object moved {first}..{last}"
        );
    }
}
