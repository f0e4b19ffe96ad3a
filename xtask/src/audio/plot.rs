//! The audio report's plot: test accuracy vs trainable parameters (log scale), one point per method (mean over
//! seeds), one panel per protocol — the parameter-budget view, which shows the budget sweep's methods
//! (`conformer-rr*`, `pfeiffer-par-rr*`, `lora-r*`) as lines of points.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::report::{methods, tasks};
use crate::report::Results;

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn e<T: std::fmt::Display>(x: T) -> anyhow::Error {
    anyhow!("plotting: {x}")
}

static FONT: &[u8] = include_bytes!("../../fonts/DejaVuSans-subset.ttf");

fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *DONE.get_or_init(|| plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(anyhow!("plotting: the embedded font could not be parsed"))
    }
}

/// The method family a sweep point belongs to (`conformer-rr24` -> `conformer`), for colour.
fn family(m: &str) -> &str {
    m.split_once("-rr").or_else(|| m.split_once("-r")).map_or(m, |(f, _)| f)
}

/// Writes `accuracy_vs_params.png`; returns the file names.
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
    let mut fams: Vec<&str> = Vec::new();
    for m in &ms {
        if !fams.contains(&family(m)) {
            fams.push(family(m));
        }
    }
    let color = |m: &str| COLORS[fams.iter().position(|f| *f == family(m)).unwrap_or(0) % COLORS.len()];
    let f = "accuracy_vs_params.png";
    let path = dir.join(f);
    let root = BitMapBackend::new(&path, (640 * ts.len() as u32, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    for (area, t) in root.split_evenly((1, ts.len())).iter().zip(&ts) {
        let mut pts: Vec<(f64, f64, &str)> = Vec::new();
        for m in &ms {
            let runs: Vec<_> = res.runs.iter().filter(|r| r.task == t.name() && &r.method == m).collect();
            let accs: Vec<f64> = runs.iter().filter_map(|r| r.metrics.get("acc")).copied().collect();
            if let (Some(r), false) = (runs.first(), accs.is_empty()) {
                let acc = 100.0 * accs.iter().sum::<f64>() / accs.len() as f64;
                pts.push(((r.trainable_params.max(1) as f64).log10(), acc, m.as_str()));
            }
        }
        let (x0, x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
        let (y0, y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let mut chart = ChartBuilder::on(area)
            .caption(t.display().replace('`', ""), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d((x0 - 0.3)..(x1 + 0.6), (y0 - 3.0).max(0.0)..(y1 + 3.0).min(100.5))
            .map_err(e)?;
        chart.configure_mesh().x_desc("log10(trainable parameters)").y_desc("test accuracy x100").draw().map_err(e)?;
        for (x, y, m) in &pts {
            let c = color(m);
            chart
                .draw_series(std::iter::once(
                    EmptyElement::at((*x, *y))
                        + Circle::new((0, 0), 5, c.filled())
                        + Text::new(m.to_string(), (7, -7), ("sans-serif", 12).into_font().color(&c)),
                ))
                .map_err(e)?;
        }
        // sweep families as lines through their points, in parameter order
        for fam in &fams {
            let mut line: Vec<(f64, f64)> =
                pts.iter().filter(|p| family(p.2) == *fam && p.2 != *fam).map(|p| (p.0, p.1)).collect();
            if line.len() > 1 {
                line.sort_by(|a, b| a.0.total_cmp(&b.0));
                chart.draw_series(LineSeries::new(line, color(fam).stroke_width(1))).map_err(e)?;
            }
        }
    }
    root.present().map_err(e)?;
    Ok(vec![f.to_string()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::rec;

    #[test]
    fn families_group_sweep_points() {
        assert_eq!(family("conformer-rr24"), "conformer");
        assert_eq!(family("pfeiffer-par-rr6"), "pfeiffer-par");
        assert_eq!(family("lora-r32"), "lora");
        assert_eq!(family("houlsby-par"), "houlsby-par");
    }

    #[test]
    fn plot_renders() {
        let res = Results {
            runs: vec![
                rec("fsdd", "conformer-rr6", 0, 0.9),
                rec("fsdd", "conformer-rr24", 0, 0.8),
                rec("fsdd-speaker", "lora", 0, 0.7),
            ],
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(write_all(&res, dir.path()).unwrap(), ["accuracy_vs_params.png"]);
        let img = image::open(dir.path().join("accuracy_vs_params.png")).unwrap().to_rgb8();
        assert_eq!(img.height(), 480);
    }
}
