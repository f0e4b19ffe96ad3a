//! PNG plots with plotters: headline metric vs trainable-parameter fraction per task, and training-loss curves.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::glue::tasks::Task;
use crate::report::Results;

pub(crate) const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn methods(res: &Results) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for r in &res.runs {
        if !v.contains(&r.method) {
            v.push(r.method.clone());
        }
    }
    v
}

fn tasks(res: &Results) -> Vec<Task> {
    Task::ALL.iter().copied().filter(|t| res.runs.iter().any(|r| r.task == t.name())).collect()
}

pub(crate) fn e<T: std::fmt::Display>(x: T) -> anyhow::Error {
    anyhow!("plotting: {x}")
}

/// DejaVu Sans cut down to Latin-1 plus a few symbols (pyftsubset; licence in `fonts/LICENSE-DejaVu.txt`). Embedded
/// so plots render the same on machines without system fonts or fontconfig (plotters' `ttf` feature needs both).
static FONT: &[u8] = include_bytes!("../fonts/DejaVuSans-subset.ttf");

/// Registers the embedded font as `sans-serif` (once per process).
pub(crate) fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *DONE.get_or_init(|| plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(anyhow!("plotting: the embedded font could not be parsed"))
    }
}

/// Writes `metric_vs_params.png` and `loss_curves.png` into `dir`; returns the file names.
///
/// # Errors
/// Drawing or file failures.
pub fn write_all(res: &Results, dir: &Path) -> Result<Vec<String>> {
    register_font()?;
    let ts = tasks(res);
    if ts.is_empty() {
        return Ok(Vec::new());
    }
    let ms = methods(res);
    let color = |m: &str| COLORS[ms.iter().position(|x| x == m).unwrap_or(0) % COLORS.len()];
    let w = 480 * ts.len() as u32;

    let f1 = "metric_vs_params.png";
    {
        let path = dir.join(f1);
        let root = BitMapBackend::new(&path, (w, 400)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        for (area, t) in root.split_evenly((1, ts.len())).iter().zip(&ts) {
            let runs: Vec<_> = res.runs.iter().filter(|r| r.task == t.name()).collect();
            let pts: Vec<(f64, f64, &str)> = runs
                .iter()
                .filter_map(|r| {
                    r.metrics
                        .get(&r.headline)
                        .map(|v| (r.trainable_pct.max(1e-4).log10(), 100.0 * v, r.method.as_str()))
                })
                .collect();
            let (x0, x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
            let (y0, y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
            let headline = runs.first().map_or("", |r| r.headline.as_str());
            let mut chart = ChartBuilder::on(area)
                .caption(format!("{} dev {headline}", t.display()), ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(48)
                .build_cartesian_2d((x0 - 0.5)..(x1 + 0.5), (y0 - 3.0).max(-100.0)..(y1 + 3.0).min(100.0))
                .map_err(e)?;
            chart.configure_mesh().x_desc("log10(trainable %)").y_desc(format!("{headline} x100")).draw().map_err(e)?;
            for (x, y, m) in &pts {
                let c = color(m);
                chart
                    .draw_series(std::iter::once(
                        EmptyElement::at((*x, *y))
                            + Circle::new((0, 0), 5, c.filled())
                            + Text::new(m.to_string(), (7, -7), ("sans-serif", 13).into_font().color(&c)),
                    ))
                    .map_err(e)?;
            }
        }
        root.present().map_err(e)?;
    }

    let f2 = "loss_curves.png";
    {
        let path = dir.join(f2);
        let root = BitMapBackend::new(&path, (w, 400)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        for (area, t) in root.split_evenly((1, ts.len())).iter().zip(&ts) {
            let runs: Vec<_> = res.runs.iter().filter(|r| r.task == t.name() && !r.losses.is_empty()).collect();
            let xmax = runs.iter().flat_map(|r| r.losses.iter().map(|p| p.0)).max().unwrap_or(1) as f64;
            let ymax =
                runs.iter().flat_map(|r| r.losses.iter().map(|p| p.1)).filter(|v| v.is_finite()).fold(0.0, f64::max);
            let mut chart = ChartBuilder::on(area)
                .caption(format!("{} training loss", t.display()), ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(48)
                .build_cartesian_2d(0f64..xmax, 0f64..(ymax * 1.05).max(1e-3))
                .map_err(e)?;
            chart.configure_mesh().x_desc("step").y_desc("loss").draw().map_err(e)?;
            for r in runs {
                let c = color(&r.method);
                chart
                    .draw_series(LineSeries::new(r.losses.iter().map(|&(s, l)| (s as f64, l)), c.stroke_width(2)))
                    .map_err(e)?
                    .label(format!("{} s{}", r.method, r.seed))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
            }
            chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(e)?;
        }
        root.present().map_err(e)?;
    }
    Ok(vec![f1.to_string(), f2.to_string()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::rec;

    /// Both PNGs are written and carry drawn text and markers (the embedded font renders without system fonts).
    #[test]
    fn plots_render_with_the_embedded_font() {
        let res = Results {
            runs: vec![rec("sst2", "lora", 0, 0.9), rec("sst2", "full", 0, 0.92), rec("mrpc", "lora", 0, 0.8)],
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let files = write_all(&res, dir.path()).unwrap();
        assert_eq!(files, ["metric_vs_params.png", "loss_curves.png"]);
        for f in &files {
            let img = image::open(dir.path().join(f)).unwrap().to_rgb8();
            assert_eq!(img.height(), 400);
            let dark = img.pixels().filter(|p| p.0.iter().all(|&c| c < 80)).count();
            assert!(dark > 200, "{f}: only {dark} dark pixels (no text drawn?)");
        }
    }
}
