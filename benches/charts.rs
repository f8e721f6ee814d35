//! SVG charts of bench results, drawn with `plotters` (SVG backend only: text is left
//! to the viewer's fonts). Each bench draws one kind: bars per workload row and server
//! (`nfs_workload`), claims Bound over time (`provision`).

#![allow(dead_code, reason = "each bench draws one of the charts")]

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Server or series colours, in order: localnfs first (blue), then orange, green,
/// purple, grey.
const PALETTE: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(230, 126, 34),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(127, 127, 127),
];

pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Where a bench writes its chart: `--svg PATH` if given, else `bench/<name>` in the
/// repository.
pub fn svg_path(name: &str) -> PathBuf {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--svg")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("bench")
                .join(name)
        })
}

/// One bar: a server's median over the repetitions, with the min–max range.
pub struct Bar {
    pub name: String,
    /// `None`: every repetition failed.
    pub median: Option<f64>,
    pub min: f64,
    pub max: f64,
    /// Written after the whisker (the median, formatted).
    pub label: String,
}

/// One workload row: a panel of bars, one per server.
pub struct Panel {
    pub title: String,
    pub unit: String,
    pub lower_is_better: bool,
    pub bars: Vec<Bar>,
}

/// 12000 → `12k`, 1.5e6 → `1.5M`, small numbers as they are.
fn compact(v: f64) -> String {
    let a = v.abs();
    let (x, suffix) = if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let s = format!("{x:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}{suffix}")
}

fn draw_err<E: std::fmt::Debug>(e: E) -> String {
    format!("drawing the chart failed: {e:?}")
}

/// Small multiples, two panels a line: each panel one workload row, a horizontal bar
/// per server (median) with a whisker from min to max.
pub fn bar_panels(path: &Path, title: &str, panels: &[Panel]) -> Result<(), String> {
    const PANEL_W: u32 = 520;
    const PANEL_H: u32 = 150;
    let lines = panels.len().div_ceil(2).max(1);
    let size = (2 * PANEL_W, PANEL_H * lines as u32 + 60);
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(draw_err)?;
    for (area, panel) in root.split_evenly((lines, 2)).iter().zip(panels) {
        draw_panel(area, panel)?;
    }
    root.present().map_err(draw_err)
}

fn draw_panel(area: &DrawingArea<SVGBackend, Shift>, p: &Panel) -> Result<(), String> {
    let n = p.bars.len().max(1);
    let top = p
        .bars
        .iter()
        .map(|b| b.max.max(b.median.unwrap_or(0.0)))
        .fold(0.0, f64::max);
    // Room right of the longest whisker for its label.
    let x_end = if top > 0.0 { top * 1.35 } else { 1.0 };
    let better = if p.lower_is_better {
        "lower is better"
    } else {
        "higher is better"
    };
    let caption = format!("{} — {} ({better})", p.title, p.unit);
    let mut chart = ChartBuilder::on(area)
        .margin(8)
        .caption(caption, ("sans-serif", 14))
        .x_label_area_size(20)
        .y_label_area_size(70)
        // `a..b` segmented has b - a + 1 slots.
        .build_cartesian_2d(0.0..x_end, (0..n - 1).into_segmented())
        .map_err(draw_err)?;
    // The first server on top.
    let slot = |i: usize| n - 1 - i;
    let names: Vec<&str> = p.bars.iter().map(|b| b.name.as_str()).collect();
    let y_label = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(s) if *s < names.len() => names[slot(*s)].to_owned(),
        _ => String::new(),
    };
    let x_label = |v: &f64| compact(*v);
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_labels(5)
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .label_style(("sans-serif", 12))
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(225, 225, 225))
        .draw()
        .map_err(draw_err)?;
    for (i, b) in p.bars.iter().enumerate() {
        let c = color(i);
        let s = slot(i);
        let center = || SegmentValue::CenterOf(s);
        let Some(median) = b.median else {
            chart
                .draw_series([Text::new(
                    "failed".to_owned(),
                    (0.0, center()),
                    ("sans-serif", 12)
                        .into_font()
                        .color(&RED)
                        .pos(Pos::new(HPos::Left, VPos::Center)),
                )])
                .map_err(draw_err)?;
            continue;
        };
        let mut bar = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(s)),
                (median, SegmentValue::Exact(s + 1)),
            ],
            c.mix(0.85).filled(),
        );
        bar.set_margin(6, 6, 0, 0);
        let whisker = PathElement::new(
            vec![(b.min, center()), (b.max, center())],
            BLACK.stroke_width(1),
        );
        let label = Text::new(
            b.label.clone(),
            (b.max.max(median) + x_end * 0.015, center()),
            ("sans-serif", 12)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Left, VPos::Center)),
        );
        chart.draw_series([bar]).map_err(draw_err)?;
        chart.draw_series([whisker]).map_err(draw_err)?;
        chart.draw_series([label]).map_err(draw_err)?;
    }
    Ok(())
}

/// A series of (x, y) points, drawn as a staircase (each point a step up).
pub struct Steps {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Step lines on one pair of axes, with a legend.
pub fn step_lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Steps],
) -> Result<(), String> {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let x_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(0.0, f64::max)
        .max(1e-3);
    let y_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        .max(1.0);
    let mut chart = ChartBuilder::on(&root)
        .margin(16)
        .caption(title, ("sans-serif", 20))
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max * 1.05, 0.0..y_max * 1.05)
        .map_err(draw_err)?;
    let x_label = |v: &f64| compact(*v);
    let y_label = |v: &f64| compact(*v);
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 14))
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(225, 225, 225))
        .draw()
        .map_err(draw_err)?;
    for (i, s) in series.iter().enumerate() {
        let c = color(i);
        let mut stairs = Vec::with_capacity(s.points.len() * 2 + 1);
        let mut last = 0.0;
        stairs.push((0.0, 0.0));
        for &(x, y) in &s.points {
            stairs.push((x, last));
            stairs.push((x, y));
            last = y;
        }
        chart
            .draw_series(LineSeries::new(stairs, c.stroke_width(2)))
            .map_err(draw_err)?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(200, 200, 200))
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(draw_err)?;
    root.present().map_err(draw_err)
}
