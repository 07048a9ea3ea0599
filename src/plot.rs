//! PNG plots (plotters, pure Rust): accuracy against compute for `mone eval`, expert maps,
//! timelines and training curves.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::eval::Report;

const FONTS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

/// plotters draws text with a font registered at run time: use the first system TTF found.
fn ensure_font() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = FONTS
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .ok_or_else(|| "no TTF font found (install fonts-dejavu-core)".to_string())?;
        let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        register_font("sans-serif", FontStyle::Normal, leaked)
            .map_err(|_| "cannot load the font".to_string())
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Top-1 (%) against GMACs per clip: MoNE (learned router), random router, baselines.
pub fn accuracy_vs_gmacs(r: &Report, path: &Path) -> anyhow::Result<()> {
    ensure_font()?;
    let xs = r
        .mone
        .iter()
        .map(|p| p.gmacs)
        .chain(r.baselines.iter().map(|b| b.gmacs));
    let x_max = xs.fold(r.dense_gmacs, f64::max) * 1.1;
    let root = BitMapBackend::new(path, (800, 560)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Top-1 accuracy vs compute", ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..x_max, 0f64..100f64)?;
        chart
            .configure_mesh()
            .x_desc("GMACs per clip")
            .y_desc("top-1 (%)")
            .draw()?;
        let mone: Vec<(f64, f64)> = r
            .mone
            .iter()
            .map(|p| (p.gmacs, p.top1_learned * 100.0))
            .collect();
        let rand: Vec<(f64, f64)> = r
            .mone
            .iter()
            .map(|p| (p.gmacs, p.top1_random * 100.0))
            .collect();
        chart
            .draw_series(LineSeries::new(mone.clone(), BLUE.stroke_width(2)))?
            .label("MoNE, learned router")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        chart.draw_series(mone.iter().map(|&p| Circle::new(p, 4, BLUE.filled())))?;
        chart
            .draw_series(LineSeries::new(rand.clone(), RED.stroke_width(2)))?
            .label("MoNE, random router")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart.draw_series(
            rand.iter()
                .map(|&p| TriangleMarker::new(p, 5, RED.filled())),
        )?;
        for (b, colour) in r.baselines.iter().zip([BLACK, GREEN]) {
            let p = (b.gmacs, b.top1 * 100.0);
            chart
                .draw_series(std::iter::once(Cross::new(p, 7, colour.stroke_width(3))))?
                .label(format!("{} baseline", b.name))
                .legend(move |(x, y)| Cross::new((x + 10, y), 5, colour.stroke_width(2)));
        }
        let chance = r.chance * 100.0;
        chart
            .draw_series(LineSeries::new(
                vec![(0.0, chance), (x_max, chance)],
                BLACK.mix(0.3),
            ))?
            .label("chance")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.3)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Expert colours, narrowest first (the widest is drawn clear).
const EXPERT_RGB: [(u8, u8, u8); 4] = [(40, 90, 255), (0, 200, 200), (255, 190, 0), (255, 40, 40)];

/// One panel per tubelet time step: its first frame, each tubelet tinted by the expert it was
/// routed to (blue = narrowest ... red = widest), with a legend.
pub fn expert_map(
    frames: &[&[u8]],
    size: usize,
    tubelet: [usize; 3],
    experts: usize,
    assignment: &[u8],
    title: &str,
    path: &Path,
) -> anyhow::Result<()> {
    ensure_font()?;
    let [t, p, _] = tubelet;
    let nt = frames.len() / t;
    let g = size / p;
    let zoom = (256 / size).max(1);
    let panel = size * zoom;
    let cols = nt.min(4);
    let rows = nt.div_ceil(cols);
    let (w, h) = (cols * (panel + 8) + 8, rows * (panel + 8) + 90);
    let root = BitMapBackend::new(path, (w as u32, h as u32)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        root.draw_text(title, &("sans-serif", 18).into_text_style(&root), (8, 6))?;
        for ti in 0..nt {
            let (ox, oy) = (
                8 + (ti % cols) * (panel + 8),
                56 + (ti / cols) * (panel + 8),
            );
            let f = frames[ti * t];
            for y in 0..size {
                for x in 0..size {
                    let e = assignment[ti * g * g + (y / p) * g + x / p] as usize;
                    let px = &f[(y * size + x) * 3..(y * size + x) * 3 + 3];
                    let (r, gg, b) = EXPERT_RGB[(e + 4 - experts.min(4)).min(3)];
                    // Blend 35% of the expert colour over the frame.
                    let mix = |a: u8, c: u8| ((a as u32 * 65 + c as u32 * 35) / 100) as u8;
                    let colour = RGBColor(mix(px[0], r), mix(px[1], gg), mix(px[2], b));
                    let (x0, y0) = ((ox + x * zoom) as i32, (oy + y * zoom) as i32);
                    root.draw(&Rectangle::new(
                        [(x0, y0), (x0 + zoom as i32, y0 + zoom as i32)],
                        colour.filled(),
                    ))?;
                }
            }
            root.draw_text(
                &format!("t={}", ti * t),
                &("sans-serif", 14).into_text_style(&root).color(&WHITE),
                (ox as i32 + 4, oy as i32 + 4),
            )?;
        }
        let ly = (h - 26) as i32;
        let mut lx = 8;
        for e in 0..experts {
            let (r, gg, b) = EXPERT_RGB[(e + 4 - experts.min(4)).min(3)];
            root.draw(&Rectangle::new(
                [(lx, ly), (lx + 16, ly + 16)],
                RGBColor(r, gg, b).filled(),
            ))?;
            let label = format!("expert {} (D/{})", e + 1, 1 << (experts - 1 - e));
            root.draw_text(
                &label,
                &("sans-serif", 14).into_text_style(&root),
                (lx + 22, ly + 1),
            )?;
            lx += 150;
        }
        root.present()?;
        Ok(())
    };
    draw()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot write {}", path.display()))
}

type Chart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;
type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// One line per run through its per-second bins (served, p99, capacity), skipping empty bins.
fn run_lines(
    c: &mut Chart,
    runs: &[TimelineRun],
    bins: &[Vec<(f64, f64, f64)>],
    prefix: &str,
    pick: impl Fn(&(f64, f64, f64)) -> f64,
) -> DrawResult {
    for ((r, b), col) in runs.iter().zip(bins).zip([BLUE, RED, GREEN, MAGENTA]) {
        c.draw_series(LineSeries::new(
            b.iter()
                .enumerate()
                .map(|(i, v)| (i as f64 + 0.5, pick(v)))
                .filter(|(_, y)| y.is_finite()),
            col.stroke_width(2),
        ))?
        .label(format!("{prefix}{}", r.name))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2)));
    }
    Ok(())
}

fn legend<'a, 'b: 'a>(c: &mut Chart<'a, 'b>, pos: SeriesLabelPosition) -> DrawResult {
    c.configure_series_labels()
        .position(pos)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// One policy's run for [`timeline`]: (seconds, latency ms, capacity) per classified clip and
/// (seconds, count) per drop.
pub struct TimelineRun {
    pub name: String,
    pub done: Vec<(f64, f64, f64)>,
    pub dropped: Vec<(f64, u64)>,
}

/// `mone bench adaptive`'s timeline: offered and served load, p99 latency per second against
/// the target, and capacity per second, for each run; the load step marked.
pub fn timeline(
    runs: &[TimelineRun],
    target_ms: f64,
    step_s: f64,
    total_s: f64,
    offered: (f64, f64),
    path: &Path,
) -> anyhow::Result<()> {
    ensure_font()?;
    let secs = total_s.ceil() as usize;
    // Per-second bins: served clips/s, p99 latency, mean capacity.
    let bins: Vec<Vec<(f64, f64, f64)>> = runs
        .iter()
        .map(|r| {
            let mut lat: Vec<Vec<f64>> = vec![Vec::new(); secs];
            let mut cap = vec![0.0; secs];
            for (t, l, c) in &r.done {
                let i = (*t as usize).min(secs - 1);
                lat[i].push(*l);
                cap[i] += c;
            }
            lat.into_iter()
                .zip(cap)
                .map(|(mut l, c)| {
                    let n = l.len() as f64;
                    let p99 = crate::metrics::percentile(&mut l, 99.0).unwrap_or(f64::NAN);
                    (n, p99, if n > 0.0 { c / n } else { f64::NAN })
                })
                .collect()
        })
        .collect();
    let lat_max = (target_ms * 4.0).max(1.0);
    let load_max = offered.1 * 1.3;
    let root = BitMapBackend::new(path, (1000, 900)).into_drawing_area();
    let draw = || -> DrawResult {
        root.fill(&WHITE)?;
        let panels = root.split_evenly((3, 1));
        let x = 0f64..total_s;
        let step_line =
            |ymax: f64| LineSeries::new(vec![(step_s, 0.0), (step_s, ymax)], BLACK.mix(0.4));
        // Load.
        let mut c = ChartBuilder::on(&panels[0])
            .caption("Load: clips/s offered and served", ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(x.clone(), 0f64..load_max)?;
        c.configure_mesh().y_desc("clips/s").draw()?;
        c.draw_series(LineSeries::new(
            vec![
                (0.0, offered.0),
                (step_s, offered.0),
                (step_s, offered.1),
                (total_s, offered.1),
            ],
            BLACK.stroke_width(2),
        ))?
        .label("offered")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
        run_lines(&mut c, runs, &bins, "served, ", |v| v.0)?;
        c.draw_series(step_line(load_max))?;
        legend(&mut c, SeriesLabelPosition::UpperLeft)?;
        // Latency.
        let mut c = ChartBuilder::on(&panels[1])
            .caption("p99 end-to-end latency per second (ms)", ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(x.clone(), 0f64..lat_max)?;
        c.configure_mesh().y_desc("ms").draw()?;
        c.draw_series(LineSeries::new(
            vec![(0.0, target_ms), (total_s, target_ms)],
            BLACK.stroke_width(1),
        ))?
        .label("target")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
        run_lines(&mut c, runs, &bins, "", |v| v.1.min(lat_max))?;
        c.draw_series(step_line(lat_max))?;
        legend(&mut c, SeriesLabelPosition::UpperLeft)?;
        // Capacity.
        let mut c = ChartBuilder::on(&panels[2])
            .caption("mean capacity e_c per second", ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x, 0f64..1.05f64)?;
        c.configure_mesh().x_desc("seconds").y_desc("e_c").draw()?;
        run_lines(&mut c, runs, &bins, "", |v| v.2)?;
        c.draw_series(step_line(1.05))?;
        legend(&mut c, SeriesLabelPosition::LowerLeft)?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))
}

/// The training curve: the loss (a moving average over 20 steps) and held-out top-1 at the
/// tracked capacities against the step, with the phase boundaries marked.
pub fn training_curve(points: &[crate::train::curve::Point], path: &Path) -> anyhow::Result<()> {
    use crate::train::curve::CAPACITIES;
    ensure_font()?;
    anyhow::ensure!(!points.is_empty(), "no training steps to plot");
    let last = points.iter().map(|p| p.step).max().unwrap_or(0).max(1) as f64;
    let mut smooth = Vec::with_capacity(points.len());
    let mut window = std::collections::VecDeque::new();
    for p in points {
        window.push_back(p.loss as f64);
        if window.len() > 20 {
            window.pop_front();
        }
        smooth.push((
            p.step as f64,
            window.iter().sum::<f64>() / window.len() as f64,
        ));
    }
    let y_max = smooth.iter().map(|p| p.1).fold(0.1, f64::max) * 1.05;
    let bounds: Vec<f64> = points
        .windows(2)
        .filter(|w| w[0].phase != w[1].phase)
        .map(|w| w[1].step as f64)
        .collect();
    let root = BitMapBackend::new(path, (1100, 460)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(550);
        let mut loss = ChartBuilder::on(&left)
            .caption("Training loss", ("sans-serif", 22))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..last, 0f64..y_max)?;
        loss.configure_mesh()
            .x_desc("step")
            .y_desc("loss (20-step mean)")
            .draw()?;
        loss.draw_series(LineSeries::new(smooth, BLUE.stroke_width(2)))?;
        for &b in &bounds {
            loss.draw_series(LineSeries::new(vec![(b, 0.0), (b, y_max)], BLACK.mix(0.3)))?;
        }
        let mut acc = ChartBuilder::on(&right)
            .caption("Held-out top-1 (phase boundaries grey)", ("sans-serif", 22))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..last, 0f64..100f64)?;
        acc.configure_mesh()
            .x_desc("step")
            .y_desc("top-1 (%)")
            .draw()?;
        for &b in &bounds {
            acc.draw_series(LineSeries::new(vec![(b, 0.0), (b, 100.0)], BLACK.mix(0.3)))?;
        }
        for (k, (&e_c, colour)) in CAPACITIES.iter().zip([RED, BLUE, GREEN]).enumerate() {
            let series: Vec<(f64, f64)> = points
                .iter()
                .filter_map(|p| Some((p.step as f64, p.top1.as_ref()?.get(k)? * 100.0)))
                .collect();
            if series.is_empty() {
                continue;
            }
            acc.draw_series(LineSeries::new(series.clone(), colour.stroke_width(2)))?
                .label(format!("e_c {e_c}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                });
            acc.draw_series(series.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
        }
        acc.configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot write {}", path.display()))
}
