//! Benchmark figures: line charts written as SVG and PNG with plotters. Laying out text needs
//! a TrueType font: DejaVu Sans (Debian's `fonts-dejavu-core`, installed by
//! `scripts/setup.sh`) is loaded at run time. Without it no figures are drawn, with a note
//! saying what to install; the JSON results are unaffected.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

/// One line of a chart.
#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A chart: axes, series, and vertical marks (e.g. switchovers).
#[derive(Clone, Debug, Default)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// (x, label) vertical lines.
    pub marks: Vec<(f64, String)>,
}

const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers DejaVu Sans as "sans-serif" for the bitmap backend, once; false if not found.
fn font_ready() -> bool {
    static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *READY.get_or_init(|| {
        FONT_PATHS.iter().any(|p| {
            std::fs::read(p).is_ok_and(|bytes| {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
            })
        })
    })
}

fn range(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let lo = values.clone().fold(f64::INFINITY, f64::min);
    let hi = values.fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-9);
    (lo.min(0.0).min(lo - pad), hi + pad)
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, c: &Chart) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the chart: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    let all = c.series.iter().flat_map(|s| s.points.iter());
    let (x0, x1) = range(all.clone().map(|p| p.0).chain(c.marks.iter().map(|m| m.0)));
    let (y0, y1) = range(all.map(|p| p.1));
    let mut chart = ChartBuilder::on(root)
        .caption(&c.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(&c.x_label)
        .y_desc(&c.y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for (i, s) in c.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(&s.label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    for (i, (x, label)) in c.marks.iter().enumerate() {
        let color = Palette99::pick(i).mix(0.6);
        chart
            .draw_series(LineSeries::new([(*x, y0), (*x, y1)], color.stroke_width(1)))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(1)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Writes `stem.svg` and `stem.png`. Returns the files written (none without a font).
pub fn line_chart(stem: &Path, c: &Chart) -> Result<Vec<std::path::PathBuf>> {
    if !font_ready() {
        eprintln!(
            "tsubame: no DejaVu Sans font at {}: figures skipped; install fonts-dejavu-core \
             (scripts/setup.sh does)",
            FONT_PATHS[0]
        );
        return Ok(Vec::new());
    }
    let size = (960, 540);
    let svg = stem.with_extension("svg");
    draw(&SVGBackend::new(&svg, size).into_drawing_area(), c)?;
    let png = stem.with_extension("png");
    draw(&BitMapBackend::new(&png, size).into_drawing_area(), c)?;
    Ok(vec![svg, png])
}
