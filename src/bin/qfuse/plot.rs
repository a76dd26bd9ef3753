//! SVG pictures for the CLI: the roofline of `qfuse bench --plot` and the stage / per-layer
//! charts of `qfuse demo --plot`. Drawn with `plotters`' SVG backend only (pure Rust: text is
//! written as SVG `<text>` elements, no font files or system libraries are read). The
//! functions take plain data (names and numbers), not the bench or demo types, so whatever
//! produces those numbers can draw them.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One kernel on the roofline: its arithmetic intensity and achieved rate.
#[derive(Debug, Clone, PartialEq)]
pub struct RooflinePoint {
    /// Kernel name and shape, e.g. `conv2d/auto 64x56x56`.
    pub label: String,
    /// Which series it belongs to (legend entry), e.g. `fused`, `unfused`, `conv2d`.
    pub series: String,
    /// FLOP (or integer op) per byte of minimal traffic.
    pub intensity: f64,
    /// Achieved GFLOP/s (or GOP/s).
    pub rate: f64,
}

/// Everything the roofline picture shows.
#[derive(Debug, Clone, PartialEq)]
pub struct RooflinePlot {
    /// Title line (adapter, mode).
    pub title: String,
    /// The copy roof, GB/s.
    pub copy_gbps: f64,
    /// The FMA roof, GFLOP/s.
    pub fma_gflops: f64,
    /// Kernels to place.
    pub points: Vec<RooflinePoint>,
    /// Pairs of points joined by a line (fused and unfused forms of the same work), with the
    /// label written beside the pair.
    pub pairs: Vec<(usize, usize, String)>,
    /// A note printed under the title (what is not shown, and why).
    pub note: String,
}

type PlotResult<T> = qfuse::Result<T>;

fn perr<E: std::fmt::Display>(e: E) -> qfuse::Error {
    qfuse::Error::invalid(format!("drawing the plot: {e}"))
}

/// The colour of a series (fixed per name, so pictures compare across runs).
fn series_color(series: &str) -> RGBColor {
    let qat = series.contains("qat");
    match series {
        s if s.starts_with("fused") && qat => RGBColor(0x0b, 0x5e, 0x47),
        s if s.starts_with("fused") => RGBColor(0x1b, 0x9e, 0x77),
        s if s.starts_with("unfused") && qat => RGBColor(0x99, 0x34, 0x04),
        s if s.starts_with("unfused") => RGBColor(0xf0, 0x80, 0x20),
        s if s.starts_with("prefolded") => RGBColor(0xa6, 0xce, 0xe3),
        s if s.starts_with("int8") => RGBColor(0x75, 0x70, 0xb3),
        s if s.starts_with("roof") => RGBColor(0x33, 0x33, 0x33),
        _ => RGBColor(0x1f, 0x78, 0xb4),
    }
}

/// `[lo, hi]` widened to whole decades around the finite positive values given (with some
/// room, so no point sits on the frame).
fn log_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
    for v in values.filter(|v| v.is_finite() && *v > 0.0) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.1, 10.0);
    }
    (
        10f64.powf((lo / 1.5).log10().floor()),
        10f64.powf((hi * 1.5).log10().ceil()),
    )
}

/// The roofline picture as an SVG document: log-log GFLOP/s against FLOP/byte, the copy roof
/// (`intensity · copy GB/s`) up to the ridge point and the FMA roof after it, each kernel a
/// point at its intensity, each pair joined by a line and labelled.
pub fn roofline_svg(plot: &RooflinePlot) -> PlotResult<String> {
    if !(plot.copy_gbps > 0.0 && plot.fma_gflops > 0.0) {
        return Err(qfuse::Error::invalid(format!(
            "roofline plot needs positive roofs, got copy {} GB/s, fma {} GFLOP/s",
            plot.copy_gbps, plot.fma_gflops
        )));
    }
    let ridge = plot.fma_gflops / plot.copy_gbps;
    let (x0, x1) = log_range(
        plot.points
            .iter()
            .map(|p| p.intensity)
            .chain([ridge / 4.0, ridge * 4.0]),
    );
    let (y0, y1) = log_range(
        plot.points
            .iter()
            .map(|p| p.rate)
            .chain([plot.copy_gbps * x0, plot.fma_gflops * 1.5]),
    );
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 680)).into_drawing_area();
        root.fill(&WHITE).map_err(perr)?;
        let (head, body) = root.split_vertically(70);
        head.draw(&Text::new(
            plot.title.clone(),
            (12, 8),
            ("sans-serif", 20).into_font(),
        ))
        .map_err(perr)?;
        for (i, line) in plot.note.split('\n').enumerate() {
            head.draw(&Text::new(
                line.to_string(),
                (12, 34 + 16 * i as i32),
                ("sans-serif", 13).into_font().color(&RGBColor(90, 90, 90)),
            ))
            .map_err(perr)?;
        }
        let mut chart = ChartBuilder::on(&body)
            .margin(12)
            .x_label_area_size(46)
            .y_label_area_size(70)
            .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
            .map_err(perr)?;
        chart
            .configure_mesh()
            .x_desc("arithmetic intensity (FLOP per byte of minimal traffic)")
            .y_desc("GFLOP/s (int8: GOP/s)")
            .x_label_formatter(&|v| format!("{v}"))
            .y_label_formatter(&|v| format!("{v}"))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(perr)?;
        let roof = series_color("roof");
        let copy_label = format!("copy roof: {:.1} GB/s", plot.copy_gbps);
        chart
            .draw_series(LineSeries::new(
                [(x0, plot.copy_gbps * x0), (ridge, plot.fma_gflops)],
                roof.stroke_width(2),
            ))
            .map_err(perr)?
            .label(copy_label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], roof.stroke_width(2)));
        let fma_label = format!("FMA roof: {:.1} GFLOP/s", plot.fma_gflops);
        let dashed = RGBColor(120, 120, 120);
        chart
            .draw_series(LineSeries::new(
                [(ridge, plot.fma_gflops), (x1, plot.fma_gflops)],
                dashed.stroke_width(2),
            ))
            .map_err(perr)?
            .label(fma_label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], dashed.stroke_width(2)));
        // Label positions taken so far (log10 coordinates), to keep labels from overlapping.
        let mut placed: Vec<(f64, f64)> = Vec::new();
        for (a, b, label) in &plot.pairs {
            let (Some(pa), Some(pb)) = (plot.points.get(*a), plot.points.get(*b)) else {
                continue;
            };
            chart
                .draw_series(LineSeries::new(
                    [(pa.intensity, pa.rate), (pb.intensity, pb.rate)],
                    RGBColor(150, 150, 150).stroke_width(1),
                ))
                .map_err(perr)?;
            let top = if pa.rate >= pb.rate { pa } else { pb };
            let (lx, mut ly) = (top.intensity * 1.08, top.rate * 1.06);
            // One text line is about 0.035 decades tall at this size: move down past any
            // label already near this spot.
            while placed
                .iter()
                .any(|&(px, py)| (px - lx.log10()).abs() < 0.6 && (py - ly.log10()).abs() < 0.04)
            {
                ly /= 10f64.powf(0.045);
            }
            placed.push((lx.log10(), ly.log10()));
            chart
                .draw_series([Text::new(
                    label.clone(),
                    (lx, ly),
                    ("sans-serif", 11).into_font(),
                )])
                .map_err(perr)?;
        }
        let mut seen: Vec<&str> = Vec::new();
        for p in &plot.points {
            if !seen.contains(&p.series.as_str()) {
                seen.push(&p.series);
            }
        }
        for series in seen {
            let color = series_color(series);
            let pts: Vec<(f64, f64)> = plot
                .points
                .iter()
                .filter(|p| p.series == series && p.intensity > 0.0 && p.rate > 0.0)
                .map(|p| (p.intensity, p.rate))
                .collect();
            chart
                .draw_series(
                    pts.iter()
                        .map(|&(x, y)| Circle::new((x, y), 5, color.filled())),
                )
                .map_err(perr)?
                .label(series.to_string())
                .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(perr)?;
        root.present().map_err(perr)?;
    }
    Ok(svg)
}

/// Draws grouped bars: for each category, one bar per series value (fractions in `[0, 1]`,
/// shown as percent), with the value written above each bar.
fn grouped_bars(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    caption: &str,
    y_desc: &str,
    categories: &[String],
    series: &[(&str, RGBColor)],
    values: &[Vec<f64>],
    y_min: f64,
) -> PlotResult<()> {
    let n = categories.len().max(1);
    // Room above 100% for the values and (with several series) the legend.
    let y_top = if series.len() > 1 {
        100.0 + (100.0 - y_min) * 0.3
    } else {
        100.0 + (100.0 - y_min) * 0.05
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 17))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..n as f64, y_min..y_top)
        .map_err(perr)?;
    let cats = categories.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&move |v| {
            let i = v.floor() as usize;
            if (v - v.floor() - 0.5).abs() < 1e-6 && i < cats.len() {
                cats[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc(y_desc)
        .y_label_formatter(&|v| {
            if *v <= 100.0 + 1e-9 {
                format!("{v:.0}%")
            } else {
                String::new()
            }
        })
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(perr)?;
    let k = series.len().max(1) as f64;
    let width = 0.8 / k;
    for (s, (name, color)) in series.iter().enumerate() {
        let color = *color;
        let bars: Vec<(f64, f64)> = values
            .iter()
            .enumerate()
            .filter_map(|(i, row)| row.get(s).map(|v| (i as f64, 100.0 * v)))
            .collect();
        chart
            .draw_series(bars.iter().map(|&(i, v)| {
                let left = i + 0.1 + width * s as f64;
                Rectangle::new(
                    [(left, y_min), (left + width * 0.92, v.max(y_min))],
                    color.filled(),
                )
            }))
            .map_err(perr)?
            .label(name.to_string())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled()));
        let centred = TextStyle::from(("sans-serif", 11).into_font())
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        chart
            .draw_series(bars.iter().map(|&(i, v)| {
                let mid = i + 0.1 + width * (s as f64 + 0.46);
                Text::new(format!("{v:.1}%"), (mid, v.max(y_min)), centred.clone())
            }))
            .map_err(perr)?;
    }
    if series.len() > 1 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(perr)?;
    }
    Ok(())
}

/// The demo picture as an SVG document: on the left a bar per stage (`stage_metric` names
/// what the fraction is: test accuracy, or agreement with the float model where the data has
/// no labels), on the right the per-layer fraction of identical integer codes, fused against
/// unfused simulation.
pub fn demo_svg(
    title: &str,
    stage_metric: &str,
    stages: &[(String, f64)],
    layers: &[(String, f64, f64)],
) -> PlotResult<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1100, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(perr)?;
        let (head, body) = root.split_vertically(40);
        head.draw(&Text::new(
            title.to_string(),
            (12, 10),
            ("sans-serif", 19).into_font(),
        ))
        .map_err(perr)?;
        let (left, right) = body.split_horizontally(460);
        let names: Vec<String> = stages.iter().map(|(s, _)| s.clone()).collect();
        let vals: Vec<Vec<f64>> = stages.iter().map(|(_, v)| vec![*v]).collect();
        let lowest = stages.iter().map(|(_, v)| 100.0 * v).fold(100.0, f64::min);
        grouped_bars(
            &left,
            &format!("{stage_metric} per stage"),
            stage_metric,
            &names,
            &[(stage_metric, RGBColor(0x1f, 0x78, 0xb4))],
            &vals,
            (lowest - 10.0).clamp(0.0, 90.0).floor(),
        )?;
        let lnames: Vec<String> = layers.iter().map(|(l, _, _)| l.clone()).collect();
        let lvals: Vec<Vec<f64>> = layers.iter().map(|(_, f, u)| vec![*f, *u]).collect();
        let lowest = layers
            .iter()
            .flat_map(|(_, f, u)| [100.0 * f, 100.0 * u])
            .fold(100.0, f64::min);
        grouped_bars(
            &right,
            "int8 model vs simulation: identical output codes per layer",
            "identical codes",
            &lnames,
            &[
                ("fused simulation", series_color("fused")),
                ("unfused simulation", series_color("unfused")),
            ],
            &lvals,
            (lowest - 10.0).clamp(0.0, 90.0).floor(),
        )?;
        root.present().map_err(perr)?;
    }
    Ok(svg)
}

/// Writes `svg` to `path` through a temporary file in the same folder and a rename, so a
/// failure leaves no partial picture. Refuses a `path` that names one of `inputs`.
///
/// Errors: [`qfuse::Error::InvalidArgument`] when `path` is an input or has no file name;
/// [`qfuse::Error::Io`] naming `path` when writing fails.
pub fn write_svg(path: &Path, svg: &str, inputs: &[&Path]) -> PlotResult<()> {
    // qfuse's one output writer: temporary + rename, never over an input (through links).
    qfuse::io::file::write_output(path, svg.as_bytes(), inputs)
}
