//! VTAB plots: accuracy vs trainable-parameter fraction per task, training-loss curves per task, and few-shot
//! accuracy vs shots per task (same style as the GLUE plots).

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use super::report::VtabResults;
use super::tasks::{label_of, order_key};
use crate::plot::{e, register_font, COLORS};

fn color_of(list: &[String], m: &str) -> RGBColor {
    COLORS[list.iter().position(|x| x == m).unwrap_or(0) % COLORS.len()]
}

/// Writes `metric_vs_params.png`, `loss_curves.png` and (with few-shot results) `fewshot.png` into `dir`;
/// returns the file names.
///
/// # Errors
/// Drawing or file failures.
pub fn write_all(res: &VtabResults, dir: &Path) -> Result<Vec<String>> {
    register_font()?;
    let mut files = Vec::new();
    let ts: Vec<String> = res.tasks().into_iter().map(|t| t.0).collect();
    let ms = res.methods();
    if !ts.is_empty() {
        let w = 480 * ts.len() as u32;
        let f1 = "metric_vs_params.png";
        {
            let path = dir.join(f1);
            let root = BitMapBackend::new(&path, (w, 400)).into_drawing_area();
            root.fill(&WHITE).map_err(e)?;
            for (area, t) in root.split_evenly((1, ts.len())).iter().zip(&ts) {
                let pts: Vec<(f64, f64, &str)> = res
                    .runs
                    .iter()
                    .filter(|r| &r.task == t)
                    .map(|r| (r.trainable_pct.max(1e-4).log10(), 100.0 * r.accuracy, r.method.as_str()))
                    .collect();
                let (x0, x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
                let (y0, y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
                let mut chart = ChartBuilder::on(area)
                    .caption(format!("{} test accuracy", label_of(t)), ("sans-serif", 20))
                    .margin(12)
                    .x_label_area_size(36)
                    .y_label_area_size(48)
                    .build_cartesian_2d((x0 - 0.5)..(x1 + 0.5), (y0 - 3.0).max(0.0)..(y1 + 3.0).min(100.0))
                    .map_err(e)?;
                chart.configure_mesh().x_desc("log10(trainable %)").y_desc("top-1 x100").draw().map_err(e)?;
                for (x, y, m) in &pts {
                    let c = color_of(&ms, m);
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
        files.push(f1.to_string());
        let f2 = "loss_curves.png";
        {
            let path = dir.join(f2);
            let root = BitMapBackend::new(&path, (w, 400)).into_drawing_area();
            root.fill(&WHITE).map_err(e)?;
            for (area, t) in root.split_evenly((1, ts.len())).iter().zip(&ts) {
                let runs: Vec<_> = res.runs.iter().filter(|r| &r.task == t && !r.losses.is_empty()).collect();
                let xmax = runs.iter().flat_map(|r| r.losses.iter().map(|p| p.0)).max().unwrap_or(1) as f64;
                let ymax = runs
                    .iter()
                    .flat_map(|r| r.losses.iter().map(|p| p.1))
                    .filter(|v| v.is_finite())
                    .fold(0.0, f64::max);
                let mut chart = ChartBuilder::on(area)
                    .caption(format!("{} training loss", label_of(t)), ("sans-serif", 20))
                    .margin(12)
                    .x_label_area_size(36)
                    .y_label_area_size(48)
                    .build_cartesian_2d(0f64..xmax, 0f64..(ymax * 1.05).max(1e-3))
                    .map_err(e)?;
                chart.configure_mesh().x_desc("step").y_desc("loss").draw().map_err(e)?;
                for r in runs {
                    let c = color_of(&ms, &r.method);
                    chart
                        .draw_series(LineSeries::new(r.losses.iter().map(|&(s, l)| (s as f64, l)), c.stroke_width(2)))
                        .map_err(e)?
                        .label(format!("{} s{}", r.method, r.seed))
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .draw()
                    .map_err(e)?;
            }
            root.present().map_err(e)?;
        }
        files.push(f2.to_string());
    }
    if !res.fewshot.is_empty() {
        let mut fts: Vec<String> = Vec::new();
        let mut fms: Vec<String> = Vec::new();
        for r in &res.fewshot {
            if !fts.contains(&r.task) {
                fts.push(r.task.clone());
            }
            if !fms.contains(&r.method) {
                fms.push(r.method.clone());
            }
        }
        fts.sort_by_key(|t| order_key(t));
        let f3 = "fewshot.png";
        let path = dir.join(f3);
        let root = BitMapBackend::new(&path, (520 * fts.len() as u32, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        for (area, t) in root.split_evenly((1, fts.len())).iter().zip(&fts) {
            let mut chart = ChartBuilder::on(area)
                .caption(format!("{} few-shot test accuracy", label_of(t)), ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(48)
                .build_cartesian_2d(-0.2f64..4.2f64, 0f64..100f64)
                .map_err(e)?;
            chart.configure_mesh().x_desc("log2(shots per class)").y_desc("top-1 x100").draw().map_err(e)?;
            for m in &fms {
                let mut shots: Vec<usize> =
                    res.fewshot.iter().filter(|r| &r.task == t && &r.method == m).map(|r| r.shots).collect();
                shots.sort_unstable();
                shots.dedup();
                let pts: Vec<(f64, f64)> = shots
                    .iter()
                    .map(|&k| {
                        let v: Vec<f64> = res
                            .fewshot
                            .iter()
                            .filter(|r| &r.task == t && &r.method == m && r.shots == k)
                            .map(|r| 100.0 * r.accuracy)
                            .collect();
                        ((k as f64).log2(), v.iter().sum::<f64>() / v.len().max(1) as f64)
                    })
                    .collect();
                let c = color_of(&fms, m);
                chart
                    .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                    .map_err(e)?
                    .label(m.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
                chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, c.filled()))).map_err(e)?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(e)?;
        }
        root.present().map_err(e)?;
        files.push(f3.to_string());
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vtab::report::tests::rec;
    use crate::vtab::report::FewShotRecord;
    use crate::vtab::tasks::Group;

    #[test]
    fn plots_render() {
        let mut res = VtabResults::default();
        res.upsert(rec("cifar10", Group::Natural, "lora", 0, 0.9));
        res.upsert(rec("cifar10", Group::Natural, "linear", 0, 0.8));
        for k in [1, 2, 4] {
            res.upsert_fewshot(FewShotRecord {
                task: "cifar10".into(),
                method: "gda".into(),
                shots: k,
                seed: 0,
                accuracy: 0.5 + 0.1 * k as f64,
                val_accuracy: None,
                hyper: Default::default(),
            });
        }
        let dir = tempfile::tempdir().unwrap();
        let files = write_all(&res, dir.path()).unwrap();
        assert_eq!(files, ["metric_vs_params.png", "loss_curves.png", "fewshot.png"]);
        for f in &files {
            let img = image::open(dir.path().join(f)).unwrap().to_rgb8();
            let dark = img.pixels().filter(|p| p.0.iter().all(|&c| c < 80)).count();
            assert!(dark > 200, "{f}: only {dark} dark pixels");
        }
    }
}
