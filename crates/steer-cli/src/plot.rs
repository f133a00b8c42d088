//! PNG plots.
//!
//! Every plot is rendered with the pure-Rust `ab_glyph` text support of
//! `plotters`, using the DejaVu Sans font bundled in `assets/`, so no system
//! font packages are needed.

use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result, ensure};
use ndarray::{ArrayView1, ArrayView2};
use plotters::coord::Shift;
use plotters::coord::combinators::WithKeyPoints;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::register_font;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// The bundled font (DejaVu Sans; see `assets/DejaVuSans-LICENSE.txt`).
static FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
/// Font family used for all text (the bundled font is registered under it).
const FONT: &str = "sans-serif";

/// Size of the single-panel plots.
const SQUARE: (u32, u32) = (900, 700);
/// Size of the two-panel plots.
const WIDE: (u32, u32) = (1200, 500);
/// At most this many points of each set are drawn in a scatter plot.
const MAX_POINTS: usize = 5000;

const TITLE_SIZE: u32 = 26;
const PANEL_TITLE_SIZE: u32 = 20;
const AXIS_DESC_SIZE: u32 = 18;
const TICK_SIZE: u32 = 15;
const LEGEND_SIZE: u32 = 16;

const SAMPLE_COLOR: RGBColor = RGBColor(31, 119, 180);
const REFERENCE_COLOR: RGBColor = RGBColor(175, 175, 175);
const RESAMPLE_COLOR: RGBColor = RGBColor(214, 39, 40);
const VARIANCE_COLOR: RGBColor = RGBColor(255, 127, 14);
const NOTE_COLOR: RGBColor = RGBColor(110, 110, 110);
const LIGHT_GRID: RGBColor = RGBColor(244, 244, 244);
const BOLD_GRID: RGBColor = RGBColor(218, 218, 218);
const LEGEND_BORDER: RGBColor = RGBColor(160, 160, 160);

/// Line colours (matplotlib's "tab10").
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Registers the bundled font with plotters (once per process).
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        ["sans-serif", "serif", "monospace"]
            .iter()
            .all(|name| register_font(name, FontStyle::Normal, FONT_BYTES).is_ok())
    });
    ensure!(ok, "failed to register the bundled DejaVuSans font");
    Ok(())
}

/// Opens a PNG bitmap at `path` (creating its parent folder), runs `draw` on
/// it and writes the file.
fn render_png(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<()>,
) -> Result<()> {
    ensure_font()?;
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating folder {}", parent.display()))?;
    }
    let root = BitMapBackend::new(path, size).into_drawing_area();
    draw(&root).with_context(|| format!("drawing plot {}", path.display()))?;
    root.present()
        .with_context(|| format!("writing plot {}", path.display()))?;
    Ok(())
}

/// Scatter plot of the first two coordinates of `samples` (weighted
/// histograms when the samples are one-dimensional), optionally weighted by
/// unnormalised `log_weights` and drawn over `reference` points (grey).
///
/// With weights, a point's radius grows with `sqrt(N·W_i)`. Axis ranges come
/// from the 0.5%–99.5% quantiles of both sets; at most 5000 evenly spaced
/// points of each set are drawn.
pub fn samples_plot(
    path: &Path,
    samples: ArrayView2<f64>,
    log_weights: Option<ArrayView1<f64>>,
    reference: Option<ArrayView2<f64>>,
    title: &str,
) -> Result<()> {
    render_png(path, SQUARE, |root| {
        draw_samples(root, samples, log_weights, reference, title)
    })
}

/// Two panels over sampling time `t`: ESS/N (with marks where the particles
/// were resampled) and the variance of the potential on a log axis (a note
/// instead when it is zero or missing throughout).
///
/// `ess_fraction`, `potential_variance` and `resampled` each have the length
/// of `t` or are empty.
pub fn trace_plot(
    path: &Path,
    t: &[f64],
    ess_fraction: &[f64],
    potential_variance: &[f64],
    resampled: &[bool],
    title: &str,
) -> Result<()> {
    render_png(path, WIDE, |root| {
        draw_trace(root, t, ess_fraction, potential_variance, resampled, title)
    })
}

/// Line plot of several `(label, x, y)` series with a legend; non-finite
/// points (and non-positive ones when `log_y`) are skipped, breaking the line.
pub fn lines_plot(
    path: &Path,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<f64>, Vec<f64>)],
    log_y: bool,
    title: &str,
) -> Result<()> {
    let series: Vec<Series> = series
        .iter()
        .enumerate()
        .map(|(k, (label, x, y))| Series::new(label, x.clone(), y.clone(), k))
        .collect();
    series_plot(path, x_label, y_label, &series, false, log_y, title)
}

/// One line of a [`series_plot`].
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend entry (none when empty).
    pub label: String,
    /// x values.
    pub x: Vec<f64>,
    /// y values, one per x value.
    pub y: Vec<f64>,
    /// Half-lengths of symmetric error bars, one per point (non-finite or zero: no bar).
    pub error: Option<Vec<f64>>,
    /// Palette slot: series with the same slot share a colour.
    pub color: usize,
    /// Dashed line, e.g. a secondary quantity of the solid series of the same colour.
    pub dashed: bool,
    /// Horizontal shift when drawn, as a fraction of the plot's width, to tell apart the
    /// error bars of series that share x values (0: none).
    pub shift: f64,
}

impl Series {
    /// A solid line without error bars in palette slot `color`.
    pub fn new(label: &str, x: Vec<f64>, y: Vec<f64>, color: usize) -> Self {
        Series {
            label: label.to_string(),
            x,
            y,
            error: None,
            color,
            dashed: false,
            shift: 0.0,
        }
    }
}

/// Line plot of several [`Series`] with optional error bars, dashed lines and log axes.
/// Non-finite points (and non-positive ones on a log axis) are skipped, breaking the
/// line; an error bar reaching below zero on a log y axis is cut at the bottom of the
/// plot. A log x axis has its ticks at the data's x values when there are at most
/// eight distinct ones (such as particle counts). A series identical to an earlier one
/// (same points, error bars and dash) is drawn once, with the labels joined by " = ".
pub fn series_plot(
    path: &Path,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
    log_y: bool,
    title: &str,
) -> Result<()> {
    render_png(path, SQUARE, |root| {
        draw_lines(root, x_label, y_label, series, log_x, log_y, title)
    })
}

/// A grid of images, one per row of `images` (`channels × height × width` values,
/// channel-major, each channel row-major), at most eight per row, under `title`.
///
/// One channel is drawn in grey scale, `range.0` black and `range.1` white (values outside
/// are clipped); three channels as RGB on the same scale. Each pixel becomes a square block
/// so that an image is about 96 pixels wide.
pub fn image_grid(
    path: &Path,
    images: ArrayView2<f64>,
    (channels, height, width): (usize, usize, usize),
    range: (f64, f64),
    title: &str,
) -> Result<()> {
    ensure!(
        channels == 1 || channels == 3,
        "images need 1 or 3 channels, got {channels}"
    );
    ensure!(
        height > 0 && width > 0 && images.ncols() == channels * height * width,
        "rows of {} values are not {channels} × {height} × {width} images",
        images.ncols()
    );
    let n = images.nrows();
    let cols = n.clamp(1, 8);
    let rows = n.div_ceil(cols).max(1);
    let block = (96 / height.max(width)).max(1) as u32;
    let (tile_w, tile_h) = (block * width as u32, block * height as u32);
    const GAP: u32 = 6;
    const TITLE_BAND: u32 = 44;
    let grid_w = cols as u32 * (tile_w + GAP) + GAP;
    let size = (
        grid_w.max(520),
        TITLE_BAND + rows as u32 * (tile_h + GAP) + GAP,
    );
    let left = (size.0 - grid_w) / 2 + GAP;
    let (lo, hi) = range;
    let level = |v: f64| -> u8 {
        let u = if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
        (255.0 * u.clamp(0.0, 1.0)).round() as u8
    };
    render_png(path, size, |root| {
        root.fill(&RGBColor(200, 200, 200))?;
        root.draw(&Text::new(
            title.to_string(),
            (size.0 as i32 / 2, TITLE_BAND as i32 / 2),
            TextStyle::from((FONT, PANEL_TITLE_SIZE).into_font())
                .pos(Pos::new(HPos::Center, VPos::Center)),
        ))?;
        let plane = height * width;
        for (k, image) in images.rows().into_iter().enumerate() {
            let x0 = left + (k % cols) as u32 * (tile_w + GAP);
            let y0 = TITLE_BAND + GAP + (k / cols) as u32 * (tile_h + GAP);
            for r in 0..height {
                for c in 0..width {
                    let p = r * width + c;
                    let color = if channels == 1 {
                        let g = level(image[p]);
                        RGBColor(g, g, g)
                    } else {
                        RGBColor(
                            level(image[p]),
                            level(image[plane + p]),
                            level(image[2 * plane + p]),
                        )
                    };
                    let (x, y) = (x0 + c as u32 * block, y0 + r as u32 * block);
                    root.draw(&Rectangle::new(
                        [
                            (x as i32, y as i32),
                            ((x + block) as i32, (y + block) as i32),
                        ],
                        color.filled(),
                    ))?;
                }
            }
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Samples.

fn draw_samples<DB>(
    root: &DrawingArea<DB, Shift>,
    samples: ArrayView2<f64>,
    log_weights: Option<ArrayView1<f64>>,
    reference: Option<ArrayView2<f64>>,
    title: &str,
) -> Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    let (n, d) = samples.dim();
    ensure!(d >= 1, "samples must have at least one coordinate");
    if let Some(lw) = log_weights {
        ensure!(lw.len() == n, "{} log-weights for {n} samples", lw.len());
    }
    if let Some(r) = reference {
        ensure!(
            r.ncols() == d,
            "reference points have {} coordinates, samples have {d}",
            r.ncols()
        );
    }
    let weights = log_weights.map(normalised_weights);
    root.fill(&WHITE)?;
    if d == 1 {
        draw_histograms(root, samples, weights.as_deref(), reference, title)
    } else {
        draw_scatter(root, samples, weights.as_deref(), reference, title)
    }
}

/// Legend label of the samples.
fn samples_label(n: usize, weights: Option<&[f64]>) -> String {
    match weights {
        Some(w) => format!("samples (n = {n}, ESS = {})", fmt_count(ess(w))),
        None => format!("samples (n = {n})"),
    }
}

fn draw_scatter<DB>(
    root: &DrawingArea<DB, Shift>,
    samples: ArrayView2<f64>,
    weights: Option<&[f64]>,
    reference: Option<ArrayView2<f64>>,
    title: &str,
) -> Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    let (n, d) = samples.dim();
    let finite = |x: f64, y: f64| x.is_finite() && y.is_finite();

    // Axis ranges from robust quantiles of the union of both sets.
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for set in std::iter::once(samples).chain(reference) {
        for row in set.rows() {
            if finite(row[0], row[1]) {
                xs.push(row[0]);
                ys.push(row[1]);
            }
        }
    }
    let x_range = robust_range(&mut xs);
    let y_range = robust_range(&mut ys);
    let inside = |x: f64, y: f64| x_range.contains(&x) && y_range.contains(&y);

    let x_desc = if d == 2 {
        "x[0]".to_string()
    } else {
        format!("x[0]   (first 2 of {d} coordinates)")
    };

    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, TITLE_SIZE))
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(75)
        .build_cartesian_2d(x_range.clone(), y_range.clone())?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("x[1]")
        .axis_desc_style((FONT, AXIS_DESC_SIZE))
        .label_style((FONT, TICK_SIZE))
        .light_line_style(LIGHT_GRID)
        .max_light_lines(4)
        .bold_line_style(BOLD_GRID)
        .x_label_formatter(&|v| fmt_tick(*v))
        .y_label_formatter(&|v| fmt_tick(*v))
        .draw()?;

    let frac = Fraction::new(&x_range, &y_range, false, false);
    let mut ink = Vec::new();
    let mut labels = Vec::new();

    if let Some(r) = reference {
        let points: Vec<(f64, f64)> = subsample(r.nrows(), MAX_POINTS)
            .map(|i| (r[[i, 0]], r[[i, 1]]))
            .filter(|&(x, y)| finite(x, y) && inside(x, y))
            .collect();
        ink.extend(points.iter().map(|&p| frac.of(p)));
        labels.push(format!("reference (n = {})", r.nrows()));
        chart
            .draw_series(
                points
                    .iter()
                    .map(|&p| Circle::new(p, 2.0, REFERENCE_COLOR.mix(0.8).filled())),
            )?
            .label(labels[0].as_str())
            .legend(|(x, y)| Circle::new((x, y), 4, REFERENCE_COLOR.filled()));
    }

    // Each point carries N·W_i (1 when unweighted); heavy points on top.
    let mut points: Vec<(f64, f64, f64)> = subsample(n, MAX_POINTS)
        .map(|i| {
            let nw = weights.map_or(1.0, |w| n as f64 * w[i]);
            (samples[[i, 0]], samples[[i, 1]], nw)
        })
        .filter(|&(x, y, nw)| finite(x, y) && inside(x, y) && nw > 0.0)
        .collect();
    points.sort_by(|a, b| a.2.total_cmp(&b.2));
    ink.extend(points.iter().map(|&(x, y, _)| frac.of((x, y))));
    let label = samples_label(n, weights);
    labels.push(label.clone());
    chart
        .draw_series(points.iter().map(|&(x, y, nw)| {
            let s = nw.sqrt();
            let radius = (2.5 * s).clamp(1.0, 6.0);
            let alpha = (0.3 + 0.3 * s).clamp(0.2, 0.85);
            Circle::new((x, y), radius, SAMPLE_COLOR.mix(alpha).filled())
        }))?
        .label(label)
        .legend(|(x, y)| Circle::new((x, y), 4, SAMPLE_COLOR.filled()));

    draw_legend(&mut chart, &labels, &ink)?;
    Ok(())
}

fn draw_histograms<DB>(
    root: &DrawingArea<DB, Shift>,
    samples: ArrayView2<f64>,
    weights: Option<&[f64]>,
    reference: Option<ArrayView2<f64>>,
    title: &str,
) -> Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    let n = samples.nrows();
    let sample_values: Vec<f64> = samples.column(0).to_vec();
    let reference_values: Option<Vec<f64>> = reference.map(|r| r.column(0).to_vec());

    let mut all: Vec<f64> = sample_values
        .iter()
        .chain(reference_values.iter().flatten())
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    let total = all.len();
    let x_range = robust_range(&mut all);
    let bins = ((total as f64).sqrt() as usize).clamp(20, 80);

    let sample_density = histogram(&sample_values, weights, &x_range, bins);
    let reference_density = reference_values
        .as_ref()
        .map(|r| histogram(r, None, &x_range, bins));
    let y_max = sample_density
        .iter()
        .chain(reference_density.iter().flatten())
        .fold(0.0f64, |m, &v| m.max(v));
    let y_max = if y_max > 0.0 { 1.1 * y_max } else { 1.0 };
    let width = (x_range.end - x_range.start) / bins as f64;
    let edge = |k: usize| x_range.start + k as f64 * width;

    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, TITLE_SIZE))
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(75)
        .build_cartesian_2d(x_range.clone(), 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("x[0]")
        .y_desc("density")
        .axis_desc_style((FONT, AXIS_DESC_SIZE))
        .label_style((FONT, TICK_SIZE))
        .light_line_style(LIGHT_GRID)
        .max_light_lines(4)
        .bold_line_style(BOLD_GRID)
        .x_label_formatter(&|v| fmt_tick(*v))
        .y_label_formatter(&|v| fmt_tick(*v))
        .draw()?;

    // The legend avoids the bars: every bar counts as a column of ink.
    let frac = Fraction::new(&x_range, &(0.0..y_max), false, false);
    let mut ink = Vec::new();
    for density in std::iter::once(&sample_density).chain(reference_density.iter()) {
        for (k, &h) in density.iter().enumerate() {
            let (x, top) = frac.of((edge(k) + 0.5 * width, h));
            ink.extend((0..50).map(|j| (x, top * j as f64 / 49.0)));
        }
    }
    let mut labels = Vec::new();

    if let (Some(density), Some(r)) = (&reference_density, reference) {
        labels.push(format!("reference (n = {})", r.nrows()));
        chart
            .draw_series(density.iter().enumerate().map(|(k, &h)| {
                Rectangle::new(
                    [(edge(k), 0.0), (edge(k + 1), h)],
                    REFERENCE_COLOR.mix(0.6).filled(),
                )
            }))?
            .label(labels[0].as_str())
            .legend(|(x, y)| {
                Rectangle::new([(x - 8, y - 5), (x + 8, y + 5)], REFERENCE_COLOR.filled())
            });
    }

    chart.draw_series(sample_density.iter().enumerate().map(|(k, &h)| {
        Rectangle::new(
            [(edge(k), 0.0), (edge(k + 1), h)],
            SAMPLE_COLOR.mix(0.15).filled(),
        )
    }))?;
    let mut step = Vec::with_capacity(2 * bins + 2);
    step.push((edge(0), 0.0));
    for (k, &h) in sample_density.iter().enumerate() {
        step.push((edge(k), h));
        step.push((edge(k + 1), h));
    }
    step.push((edge(bins), 0.0));
    let label = samples_label(n, weights);
    labels.push(label.clone());
    chart
        .draw_series(LineSeries::new(step, SAMPLE_COLOR.stroke_width(2)))?
        .label(label)
        .legend(|(x, y)| {
            PathElement::new(vec![(x - 10, y), (x + 10, y)], SAMPLE_COLOR.stroke_width(2))
        });

    draw_legend(&mut chart, &labels, &ink)?;
    Ok(())
}

/// Density histogram of the finite `values` over `range`, normalised by the
/// total (finite) weight, so that values outside the range still count.
fn histogram(values: &[f64], weights: Option<&[f64]>, range: &Range<f64>, bins: usize) -> Vec<f64> {
    let mut counts = vec![0.0; bins];
    let width = (range.end - range.start) / bins as f64;
    let mut total = 0.0;
    for (i, &v) in values.iter().enumerate() {
        let w = weights.map_or(1.0, |w| w[i]);
        if !v.is_finite() || !w.is_finite() {
            continue;
        }
        total += w;
        if v >= range.start && v <= range.end {
            let k = (((v - range.start) / width) as usize).min(bins - 1);
            counts[k] += w;
        }
    }
    if total > 0.0 {
        for c in &mut counts {
            *c /= total * width;
        }
    }
    counts
}

/// Self-normalised weights from log-weights; non-finite log-weights get
/// weight zero (all of them non-finite: uniform weights).
fn normalised_weights(log_weights: ArrayView1<f64>) -> Vec<f64> {
    let n = log_weights.len();
    let max = log_weights
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return vec![1.0 / n as f64; n];
    }
    let mut w: Vec<f64> = log_weights
        .iter()
        .map(|&l| if l.is_finite() { (l - max).exp() } else { 0.0 })
        .collect();
    let sum: f64 = w.iter().sum();
    for v in &mut w {
        *v /= sum;
    }
    w
}

/// Effective sample size of normalised weights.
fn ess(weights: &[f64]) -> f64 {
    let s: f64 = weights.iter().map(|w| w * w).sum();
    if s > 0.0 { 1.0 / s } else { 0.0 }
}

/// At most `cap` evenly spaced indices into `0..n` (all of them if `n <= cap`).
fn subsample(n: usize, cap: usize) -> impl Iterator<Item = usize> {
    let m = n.min(cap);
    (0..m).map(move |k| k * n / m)
}

/// Linearly interpolated `p`-quantile of sorted, non-empty `sorted`.
fn quantile(sorted: &[f64], p: f64) -> f64 {
    let pos = p.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    let frac = pos - lo as f64;
    sorted[lo] + frac * (sorted[hi] - sorted[lo])
}

/// Axis range from the 0.5%–99.5% quantiles of the finite `values`
/// (reordered in place), padded by 5% on each side.
fn robust_range(values: &mut Vec<f64>) -> Range<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return -1.0..1.0;
    }
    values.sort_by(f64::total_cmp);
    let lo = quantile(values, 0.005);
    let hi = quantile(values, 0.995);
    padded(lo, hi, 0.05)
}

/// `lo..hi` widened by `frac` of its span on each side (a degenerate span is
/// widened around its centre).
fn padded(lo: f64, hi: f64, frac: f64) -> Range<f64> {
    let span = hi - lo;
    if span > 1e-12 * lo.abs().max(hi.abs()).max(1e-300) {
        lo - frac * span..hi + frac * span
    } else {
        let half = 0.5 * lo.abs().max(1.0);
        lo - half..hi + half
    }
}

// ---------------------------------------------------------------------------
// Trace.

fn draw_trace<DB>(
    root: &DrawingArea<DB, Shift>,
    t: &[f64],
    ess_fraction: &[f64],
    potential_variance: &[f64],
    resampled: &[bool],
    title: &str,
) -> Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    let n = t.len();
    for (name, len) in [
        ("ess_fraction", ess_fraction.len()),
        ("potential_variance", potential_variance.len()),
        ("resampled", resampled.len()),
    ] {
        ensure!(
            len == n || len == 0,
            "{name} has {len} entries for {n} times"
        );
    }
    root.fill(&WHITE)?;
    let body = root.titled(title, (FONT, TITLE_SIZE))?;
    let (width, _) = body.dim_in_pixel();
    let (left, right) = body.split_horizontally(width / 2);

    let (t_min, t_max) = t
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    let t_range = if t_min <= t_max {
        padded(t_min, t_max, 0.0)
    } else {
        0.0..1.0
    };
    let marks: Vec<f64> = resampled
        .iter()
        .zip(t)
        .filter(|&(&r, &ti)| r && ti.is_finite())
        .map(|(_, &ti)| ti)
        .collect();

    // Left: ESS / N.
    let mut chart = ChartBuilder::on(&left)
        .caption("effective sample size", (FONT, PANEL_TITLE_SIZE))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(t_range.clone(), 0.0..1.05)?;
    chart
        .configure_mesh()
        .x_desc("sampling time t")
        .y_desc("ESS / N")
        .axis_desc_style((FONT, AXIS_DESC_SIZE))
        .label_style((FONT, TICK_SIZE))
        .light_line_style(LIGHT_GRID)
        .max_light_lines(4)
        .bold_line_style(BOLD_GRID)
        .x_label_formatter(&|v| fmt_tick(*v))
        .y_label_formatter(&|v| fmt_tick(*v))
        .draw()?;
    let mut labels = Vec::new();
    if !marks.is_empty() {
        labels.push(format!("resampled ({}×)", marks.len()));
        chart
            .draw_series(
                marks.iter().map(|&m| {
                    PathElement::new(vec![(m, 0.0), (m, 1.05)], RESAMPLE_COLOR.mix(0.35))
                }),
            )?
            .label(labels[0].as_str())
            .legend(|(x, y)| {
                PathElement::new(vec![(x, y - 6), (x, y + 6)], RESAMPLE_COLOR.stroke_width(2))
            });
    }
    let ess_points: Vec<(f64, f64)> = t
        .iter()
        .copied()
        .zip(ess_fraction.iter().copied())
        .collect();
    let ess_valid = |a: f64, b: f64| a.is_finite() && b.is_finite();
    let drawn = draw_broken_line(
        &mut chart,
        &ess_points,
        ess_valid,
        SAMPLE_COLOR,
        Some("ESS / N"),
        60,
    )?;
    if drawn {
        labels.push("ESS / N".to_string());
    }
    let frac = Fraction::new(&t_range, &(0.0..1.05), false, false);
    draw_legend(
        &mut chart,
        &labels,
        &line_ink(&ess_points, ess_valid, &frac),
    )?;

    // Right: variance of the potential, log axis.
    let var_points: Vec<(f64, f64)> = t
        .iter()
        .copied()
        .zip(potential_variance.iter().copied())
        .collect();
    let var_valid = |a: f64, b: f64| a.is_finite() && b.is_finite() && b > 0.0;
    let (v_min, v_max) = var_points
        .iter()
        .filter(|p| var_valid(p.0, p.1))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1), b.max(p.1))
        });
    let caption = "variance of the potential";
    if v_min > v_max {
        let mut chart = ChartBuilder::on(&right)
            .caption(caption, (FONT, PANEL_TITLE_SIZE))
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(t_range.clone(), 0.0..1.0)?;
        chart
            .configure_mesh()
            .x_desc("sampling time t")
            .y_desc("Var[potential]")
            .y_labels(0)
            .disable_y_mesh()
            .axis_desc_style((FONT, AXIS_DESC_SIZE))
            .label_style((FONT, TICK_SIZE))
            .light_line_style(LIGHT_GRID)
            .max_light_lines(4)
            .bold_line_style(BOLD_GRID)
            .x_label_formatter(&|v| fmt_tick(*v))
            .draw()?;
        let centre = (0.5 * (t_range.start + t_range.end), 0.5);
        chart.plotting_area().draw(&Text::new(
            "no potential (unweighted method)",
            centre,
            note_style(),
        ))?;
    } else {
        let y_range = log_padded(v_min, v_max);
        let mut chart = ChartBuilder::on(&right)
            .caption(caption, (FONT, PANEL_TITLE_SIZE))
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(t_range.clone(), log_axis(&y_range))?;
        chart
            .configure_mesh()
            .x_desc("sampling time t")
            .y_desc("Var[potential]  (log scale)")
            .axis_desc_style((FONT, AXIS_DESC_SIZE))
            .label_style((FONT, TICK_SIZE))
            .light_line_style(LIGHT_GRID)
            .max_light_lines(4)
            .bold_line_style(BOLD_GRID)
            .x_label_formatter(&|v| fmt_tick(*v))
            .y_label_formatter(&|v| fmt_tick(*v))
            .draw()?;
        if !marks.is_empty() {
            chart.draw_series(marks.iter().map(|&m| {
                PathElement::new(
                    vec![(m, y_range.start), (m, y_range.end)],
                    RESAMPLE_COLOR.mix(0.35),
                )
            }))?;
        }
        draw_broken_line(&mut chart, &var_points, var_valid, VARIANCE_COLOR, None, 60)?;
    }
    Ok(())
}

/// Style of a grey note in the middle of an empty panel.
fn note_style() -> TextStyle<'static> {
    TextStyle::from((FONT, PANEL_TITLE_SIZE).into_font())
        .color(&NOTE_COLOR)
        .pos(Pos::new(HPos::Center, VPos::Center))
}

/// Colour and dash of a line.
#[derive(Clone, Copy)]
struct LineStyle {
    color: RGBColor,
    dashed: bool,
}

impl From<RGBColor> for LineStyle {
    fn from(color: RGBColor) -> Self {
        LineStyle {
            color,
            dashed: false,
        }
    }
}

/// Dash and gap lengths of dashed lines, in pixels.
const DASH: (u32, u32) = (9, 6);

/// Draws `points` as a line broken wherever `valid(x, y)` fails, with small
/// markers when there are at most `marker_limit` valid points; `label` (if
/// any) becomes the legend entry. Returns whether anything was drawn.
fn draw_broken_line<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    points: &[(f64, f64)],
    valid: impl Fn(f64, f64) -> bool,
    style: impl Into<LineStyle>,
    label: Option<&str>,
    marker_limit: usize,
) -> Result<bool>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let LineStyle { color, dashed } = style.into();
    let stroke = color.stroke_width(2);
    let segments = segments(points, valid);
    let count: usize = segments.iter().map(Vec::len).sum();
    let markers = count <= marker_limit;
    let mut label = label;
    for segment in segments {
        if markers || segment.len() == 1 {
            chart.draw_series(segment.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        if dashed {
            let anno = chart.draw_series(DashedLineSeries::new(segment, DASH.0, DASH.1, stroke))?;
            if let Some(label) = label.take() {
                anno.label(label).legend(move |(x, y)| {
                    DashedPathElement::new(vec![(x - 12, y), (x + 12, y)], DASH.0, DASH.1, stroke)
                });
            }
        } else {
            let anno = chart.draw_series(LineSeries::new(segment, stroke))?;
            if let Some(label) = label.take() {
                anno.label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x - 10, y), (x + 10, y)], stroke));
            }
        }
    }
    Ok(count > 0)
}

/// Maximal runs of consecutive points passing `valid`.
fn segments(points: &[(f64, f64)], valid: impl Fn(f64, f64) -> bool) -> Vec<Vec<(f64, f64)>> {
    let mut segments = Vec::new();
    let mut current = Vec::new();
    for &(x, y) in points {
        if valid(x, y) {
            current.push((x, y));
        } else if !current.is_empty() {
            segments.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        segments.push(current);
    }
    segments
}

// ---------------------------------------------------------------------------
// Lines.

fn draw_lines<DB>(
    root: &DrawingArea<DB, Shift>,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
    log_y: bool,
    title: &str,
) -> Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    for s in series {
        ensure!(
            s.x.len() == s.y.len(),
            "series {:?} has {} x values and {} y values",
            s.label,
            s.x.len(),
            s.y.len()
        );
        if let Some(e) = &s.error {
            ensure!(
                e.len() == s.y.len(),
                "series {:?} has {} error bars for {} points",
                s.label,
                e.len(),
                s.y.len()
            );
        }
    }
    let series = &merge_identical(series);
    root.fill(&WHITE)?;
    let valid = move |x: f64, y: f64| {
        x.is_finite() && y.is_finite() && (!log_x || x > 0.0) && (!log_y || y > 0.0)
    };
    let (mut x_min, mut x_max) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut y_min, mut y_max) = (f64::INFINITY, f64::NEG_INFINITY);
    let mut xs = Vec::new();
    for s in series {
        for (i, (&x, &y)) in s.x.iter().zip(&s.y).enumerate() {
            if !valid(x, y) {
                continue;
            }
            xs.push(x);
            x_min = x_min.min(x);
            x_max = x_max.max(x);
            let e = error_at(s, i);
            y_max = y_max.max(y + e);
            y_min = y_min.min(if !log_y || y - e > 0.0 { y - e } else { y });
        }
    }
    let empty = x_min > x_max;
    let shift = series.iter().map(|s| s.shift.abs()).fold(0.0, f64::max);
    let x_range = match (empty, log_x) {
        (true, false) => 0.0..1.0,
        (true, true) => 0.1..10.0,
        (false, false) => padded(x_min, x_max, 0.02 + 1.1 * shift),
        (false, true) => log_padded(x_min, x_max),
    };
    let y_range = match (empty, log_y) {
        (true, false) => 0.0..1.0,
        (true, true) => 0.1..10.0,
        (false, false) => padded(y_min, y_max, 0.05),
        (false, true) => log_padded(y_min, y_max),
    };
    let chart = LinesChart {
        series,
        valid: &valid,
        empty,
        title,
        frac: Fraction::new(&x_range, &y_range, log_x, log_y),
    };
    let log_label = |label: &str, log: bool| {
        if log {
            format!("{label}  (log scale)")
        } else {
            label.to_string()
        }
    };
    let labels = (log_label(x_label, log_x), log_label(y_label, log_y));
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let x_axis = || {
        if xs.len() <= 8 && !xs.is_empty() {
            log_axis_with(&x_range, xs.clone(), Vec::new())
        } else {
            log_axis(&x_range)
        }
    };
    match (log_x, log_y) {
        (false, false) => chart.draw(root, &labels, x_range.clone(), y_range.clone()),
        (false, true) => chart.draw(root, &labels, x_range.clone(), log_axis(&y_range)),
        (true, false) => chart.draw(root, &labels, x_axis(), y_range.clone()),
        (true, true) => chart.draw(root, &labels, x_axis(), log_axis(&y_range)),
    }
}

/// `series` with each series identical to an earlier one (same points, error bars and dash)
/// folded into it, their labels joined.
fn merge_identical(series: &[Series]) -> Vec<Series> {
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let key = |s: &Series| {
        (
            s.dashed,
            bits(&s.x),
            bits(&s.y),
            s.error.as_deref().map(bits),
        )
    };
    let mut out: Vec<Series> = Vec::new();
    for s in series {
        match out.iter_mut().find(|o| key(o) == key(s)) {
            Some(o) => o.label = joined_label(&o.label, &s.label),
            None => out.push(s.clone()),
        }
    }
    out
}

/// "a = b", with a parenthesised suffix common to both written once:
/// "vcg (before) = vcg-smc (before)" is "vcg = vcg-smc (before)".
fn joined_label(a: &str, b: &str) -> String {
    if a.is_empty() || b.is_empty() {
        return format!("{a}{b}");
    }
    if a.ends_with(')')
        && let (Some(i), Some(j)) = (a.rfind(" ("), b.rfind(" ("))
        && a[i..] == b[j..]
    {
        return format!("{} = {}{}", &a[..i], &b[..j], &a[i..]);
    }
    format!("{a} = {b}")
}

/// The error-bar half-length of point `i` of `s` (0 when it has none).
fn error_at(s: &Series, i: usize) -> f64 {
    s.error
        .as_ref()
        .map(|e| e[i])
        .filter(|e| e.is_finite() && *e > 0.0)
        .unwrap_or(0.0)
}

/// What a line chart draws, apart from its axes.
struct LinesChart<'a> {
    series: &'a [Series],
    valid: &'a dyn Fn(f64, f64) -> bool,
    empty: bool,
    title: &'a str,
    frac: Fraction,
}

impl LinesChart<'_> {
    fn draw<DB, XR, YR>(
        &self,
        root: &DrawingArea<DB, Shift>,
        (x_label, y_label): &(String, String),
        x_range: XR,
        y_range: YR,
    ) -> Result<()>
    where
        DB: DrawingBackend,
        DB::ErrorType: 'static,
        XR: AsRangedCoord<Value = f64>,
        XR::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
        YR: AsRangedCoord<Value = f64>,
        YR::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
    {
        let mut chart = ChartBuilder::on(root)
            .caption(self.title, (FONT, TITLE_SIZE))
            .margin(20)
            .x_label_area_size(55)
            .y_label_area_size(75)
            .build_cartesian_2d(x_range, y_range)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .axis_desc_style((FONT, AXIS_DESC_SIZE))
            .label_style((FONT, TICK_SIZE))
            .light_line_style(LIGHT_GRID)
            .max_light_lines(4)
            .bold_line_style(BOLD_GRID)
            .x_label_formatter(&|v| fmt_tick(*v))
            .y_label_formatter(&|v| fmt_tick(*v))
            .draw()?;

        if self.empty {
            chart.plotting_area().draw(&Text::new(
                "no data",
                self.frac.at(0.5, 0.5),
                note_style(),
            ))?;
            return Ok(());
        }

        let bottom = self.frac.at(0.0, 0.0).1;
        let mut labels = Vec::new();
        let mut ink = Vec::new();
        for s in self.series {
            let color = PALETTE[s.color % PALETTE.len()];
            let label = (!s.label.is_empty()).then_some(s.label.as_str());
            let frac = &self.frac;
            let shifted = |x: f64| frac.at(frac.of((x, 1.0)).0 + s.shift, 0.5).0;
            let points: Vec<(f64, f64)> = if s.shift == 0.0 {
                s.x.iter().copied().zip(s.y.iter().copied()).collect()
            } else {
                s.x.iter()
                    .map(|&x| shifted(x))
                    .zip(s.y.iter().copied())
                    .collect()
            };
            let style = LineStyle {
                color,
                dashed: s.dashed,
            };
            let drawn = draw_broken_line(&mut chart, &points, self.valid, style, label, 40)?;
            ink.extend(line_ink(&points, self.valid, &self.frac));
            if s.error.is_some() {
                // (x, bottom, top, whether the bottom is cut at the axis).
                let bars: Vec<(f64, f64, f64, bool)> = points
                    .iter()
                    .enumerate()
                    .filter(|&(i, &(x, y))| (self.valid)(x, y) && error_at(s, i) > 0.0)
                    .map(|(i, &(x, y))| {
                        let e = error_at(s, i);
                        let cut = self.frac.log_y && y - e <= 0.0;
                        (x, if cut { bottom } else { y - e }, y + e, cut)
                    })
                    .collect();
                let stroke = color.stroke_width(2);
                for &(x, lo, hi, cut) in &bars {
                    chart.draw_series([PathElement::new(vec![(x, lo), (x, hi)], stroke)])?;
                    let caps = if cut { &[hi][..] } else { &[lo, hi][..] };
                    chart.draw_series(caps.iter().map(|&y| {
                        EmptyElement::at((x, y)) + PathElement::new(vec![(-6, 0), (6, 0)], stroke)
                    }))?;
                    let ((fx, flo), (_, fhi)) = (self.frac.of((x, lo)), self.frac.of((x, hi)));
                    ink.extend((0..=20).map(|j| (fx, flo + (fhi - flo) * j as f64 / 20.0)));
                }
            }
            if let Some(label) = label
                && drawn
            {
                labels.push(label.to_string());
            }
        }
        draw_legend(&mut chart, &labels, &ink)
    }
}

// ---------------------------------------------------------------------------
// Axes and legends.

/// Maps data coordinates to fractions of the plotting area (y upwards).
struct Fraction {
    x: Range<f64>,
    y: Range<f64>,
    log_x: bool,
    log_y: bool,
}

impl Fraction {
    fn new(x: &Range<f64>, y: &Range<f64>, log_x: bool, log_y: bool) -> Self {
        let axis = |r: &Range<f64>, log: bool| {
            if log {
                r.start.log10()..r.end.log10()
            } else {
                r.clone()
            }
        };
        Self {
            x: axis(x, log_x),
            y: axis(y, log_y),
            log_x,
            log_y,
        }
    }

    fn of(&self, (x, y): (f64, f64)) -> (f64, f64) {
        let x = if self.log_x { x.log10() } else { x };
        let y = if self.log_y { y.log10() } else { y };
        (
            (x - self.x.start) / (self.x.end - self.x.start),
            (y - self.y.start) / (self.y.end - self.y.start),
        )
    }

    /// The data point at fractions `(fx, fy)` of the plotting area.
    fn at(&self, fx: f64, fy: f64) -> (f64, f64) {
        let x = self.x.start + fx * (self.x.end - self.x.start);
        let y = self.y.start + fy * (self.y.end - self.y.start);
        (
            if self.log_x { pow10(x) } else { x },
            if self.log_y { pow10(y) } else { y },
        )
    }
}

/// `10^x`.
fn pow10(x: f64) -> f64 {
    10f64.powf(x)
}

/// The valid parts of a line in plotting-area fractions, densely
/// interpolated (so that a legend does not cover long straight stretches).
fn line_ink(
    points: &[(f64, f64)],
    valid: impl Fn(f64, f64) -> bool,
    frac: &Fraction,
) -> Vec<(f64, f64)> {
    let mut ink = Vec::new();
    for segment in segments(points, valid) {
        let fractions: Vec<(f64, f64)> = segment.iter().map(|&p| frac.of(p)).collect();
        ink.extend(fractions.first().copied());
        for pair in fractions.windows(2) {
            let ((x0, y0), (x1, y1)) = (pair[0], pair[1]);
            let steps = ((x1 - x0).hypot(y1 - y0) / 0.01).ceil().clamp(1.0, 200.0) as usize;
            ink.extend((1..=steps).map(|j| {
                let s = j as f64 / steps as f64;
                (x0 + s * (x1 - x0), y0 + s * (y1 - y0))
            }));
        }
    }
    ink
}

/// Log-axis range around `[lo, hi]` (both positive), padded by 5% of the
/// decades spanned (at least a fifth of a decade).
fn log_padded(lo: f64, hi: f64) -> Range<f64> {
    let (l_lo, l_hi) = (lo.log10(), hi.log10());
    let pad = (0.05 * (l_hi - l_lo)).max(0.2);
    pow10(l_lo - pad)..pow10(l_hi + pad)
}

/// A log axis over `range` with readable tick marks.
fn log_axis(range: &Range<f64>) -> WithKeyPoints<LogCoord<f64>> {
    let (bold, light) = log_ticks(range.start, range.end);
    log_axis_with(range, bold, light)
}

/// A log axis over `range` with labelled ticks at `bold` and unlabelled ones at `light`.
fn log_axis_with(
    range: &Range<f64>,
    bold: Vec<f64>,
    light: Vec<f64>,
) -> WithKeyPoints<LogCoord<f64>> {
    range
        .clone()
        .log_scale()
        .with_key_points(bold)
        .with_light_points(light)
}

/// Labelled and unlabelled tick values for a log axis over `[lo, hi]`:
/// powers of ten (every few when there are many decades), else 1-2-5 or
/// 1…9 multiples of them, else plain decimal steps for very short ranges.
fn log_ticks(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
    let inside = |v: f64| v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9);
    let k0 = lo.log10().floor() as i32;
    let k1 = hi.log10().ceil() as i32;
    let multiples = |mantissas: &[f64], every: i32| -> Vec<f64> {
        (k0..=k1)
            .filter(|k| k.rem_euclid(every) == 0)
            .flat_map(|k| mantissas.iter().map(move |m| m * 10f64.powi(k)))
            .filter(|&v| inside(v))
            .collect()
    };
    let all = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0];
    let decades = k1 - k0;
    if decades > 8 {
        let every = (decades + 7) / 8;
        return (multiples(&[1.0], every), multiples(&[1.0], 1));
    }
    for (bold, light) in [
        (&[1.0][..], &all[..]),
        (&[1.0, 2.0, 5.0][..], &all[..]),
        (&all[..], &[][..]),
    ] {
        let ticks = multiples(bold, 1);
        if ticks.len() >= 3 {
            return (ticks, multiples(light, 1));
        }
    }
    // Less than a factor of about three: linear steps.
    let step = nice_step((hi - lo) / 4.0);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (
        (first..=last).map(|k| k as f64 * step).collect(),
        Vec::new(),
    )
}

/// The 1-2-5 step nearest above `raw`.
fn nice_step(raw: f64) -> f64 {
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * p)
}

/// Draws the legend with `labels` in the corner of the plotting area that
/// covers the fewest `ink` points (plotting-area fractions, y upwards).
fn draw_legend<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    labels: &[String],
    ink: &[(f64, f64)],
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    X: Ranged,
    Y: Ranged,
{
    if labels.is_empty() {
        return Ok(());
    }
    let (w, h) = chart.plotting_area().dim_in_pixel();
    let chars = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    // Rough size of the legend box (DejaVu Sans at 16 px: ~9 px a character).
    let box_w = (50.0 + 9.0 * chars as f64 + 12.0) / w.max(1) as f64;
    let box_h = (labels.len() as f64 * 22.0 + 24.0) / h.max(1) as f64;
    let position = legend_corner(ink, box_w, box_h);
    chart
        .configure_series_labels()
        .position(position)
        .margin(12)
        .legend_area_size(30)
        .background_style(WHITE.mix(0.85))
        .border_style(LEGEND_BORDER)
        .label_font((FONT, LEGEND_SIZE))
        .draw()?;
    Ok(())
}

/// The corner whose `box_w × box_h` box (fractions of the plotting area)
/// holds the fewest `ink` points; ties prefer upper right, upper left, lower
/// right, lower left.
fn legend_corner(ink: &[(f64, f64)], box_w: f64, box_h: f64) -> SeriesLabelPosition {
    let corners = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let mut best = (usize::MAX, SeriesLabelPosition::UpperRight);
    for (position, right, upper) in corners {
        let count = ink
            .iter()
            .filter(|&&(x, y)| {
                let in_x = if right { x >= 1.0 - box_w } else { x <= box_w };
                let in_y = if upper { y >= 1.0 - box_h } else { y <= box_h };
                in_x && in_y
            })
            .count();
        if count < best.0 {
            best = (count, position);
        }
    }
    best.1
}

/// Tick label: plain decimals for moderate magnitudes, short scientific
/// notation otherwise.
fn fmt_tick(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if a < 1e-12 {
        return "0".to_string();
    }
    if !(1e-3..1e5).contains(&a) {
        let s = format!("{v:.1e}");
        return match s.split_once('e') {
            Some((m, e)) => {
                let m = m.trim_end_matches('0').trim_end_matches('.');
                format!("{m}e{e}")
            }
            None => s,
        };
    }
    let decimals = (3 - a.log10().floor() as i32).clamp(0, 9) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// A count-like number (such as an ESS) with at most one decimal.
fn fmt_count(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array1, Array2};

    /// Deterministic standard normals (LCG + Box–Muller), no extra deps.
    fn normals(count: usize, seed: u64) -> Vec<f64> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut uniform = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..count)
            .map(|_| {
                let (u, v) = (uniform(), uniform());
                (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
            })
            .collect()
    }

    /// Samples from a two-component mixture in `d` dimensions.
    fn mixture(n: usize, d: usize, seed: u64) -> Array2<f64> {
        let z = normals(n * d, seed);
        Array2::from_shape_fn((n, d), |(i, j)| {
            let centre = if i % 3 == 0 { -2.0 } else { 2.0 };
            centre * if j < 2 { 1.0 } else { 0.0 } + 0.6 * z[i * d + j]
        })
    }

    fn log_weights_for(x: &Array2<f64>) -> Array1<f64> {
        // Tilt towards positive x[0].
        Array1::from_iter(x.rows().into_iter().map(|r| 0.8 * r[0]))
    }

    /// Checks the PNG signature and the IHDR dimensions of `path`.
    fn check_png(path: &Path, size: (u32, u32)) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
        assert_eq!(&bytes[12..16], b"IHDR");
        let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!((w, h), size);
        // A blank white image of this size compresses to a few KiB at most.
        assert!(
            bytes.len() > 10_000,
            "{} is suspiciously small",
            path.display()
        );
    }

    /// Renders with `draw` into an RGB buffer.
    fn render_buffer(
        size: (u32, u32),
        draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<()>,
    ) -> Vec<u8> {
        ensure_font().unwrap();
        let mut buf = vec![0u8; (size.0 * size.1 * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
            draw(&root).unwrap();
            root.present().unwrap();
        }
        buf
    }

    /// Number of dark pixels in the rectangle `[x0, x1) × [y0, y1)`.
    fn dark_pixels(buf: &[u8], width: u32, (x0, x1): (u32, u32), (y0, y1): (u32, u32)) -> usize {
        let mut count = 0;
        for y in y0..y1 {
            for x in x0..x1 {
                let i = ((y * width + x) * 3) as usize;
                if buf[i] < 100 && buf[i + 1] < 100 && buf[i + 2] < 100 {
                    count += 1;
                }
            }
        }
        count
    }

    /// Writes the example plots into `dir`.
    fn write_examples(dir: &Path) -> Result<()> {
        let x2 = mixture(3000, 2, 1);
        let r2 = mixture(20000, 2, 2);
        let x5 = mixture(3000, 5, 3);
        let r5 = mixture(8000, 5, 4);
        let x1 = mixture(4000, 1, 5);
        let r1 = mixture(20000, 1, 6);
        samples_plot(
            &dir.join("samples_2d_weighted.png"),
            x2.view(),
            Some(log_weights_for(&x2).view()),
            Some(r2.view()),
            "SMC steering, 2-d mixture",
        )?;
        samples_plot(
            &dir.join("samples_2d_plain.png"),
            x2.view(),
            None,
            None,
            "unweighted samples",
        )?;
        samples_plot(
            &dir.join("samples_5d.png"),
            x5.view(),
            Some(log_weights_for(&x5).view()),
            Some(r5.view()),
            "5-d mixture",
        )?;
        samples_plot(
            &dir.join("samples_1d.png"),
            x1.view(),
            Some(log_weights_for(&x1).view()),
            Some(r1.view()),
            "1-d mixture",
        )?;
        samples_plot(
            &dir.join("samples_1d_plain.png"),
            x1.view(),
            None,
            None,
            "1-d samples only",
        )?;

        let steps = 100;
        let t: Vec<f64> = (0..steps).map(|k| 1.0 - k as f64 / steps as f64).collect();
        let mut ess = Vec::new();
        let mut resampled = Vec::new();
        let mut e = 1.0;
        for k in 0..steps {
            e *= 0.93 + 0.02 * ((k as f64) * 0.7).sin();
            let r = e < 0.5;
            if r {
                e = 1.0;
            }
            ess.push(e);
            resampled.push(r);
        }
        let var: Vec<f64> = t
            .iter()
            .enumerate()
            .map(|(k, ti)| {
                if k == 0 {
                    0.0
                } else {
                    0.05 * (1.0 / (ti + 0.01)).powi(2)
                }
            })
            .collect();
        trace_plot(
            &dir.join("trace.png"),
            &t,
            &ess,
            &var,
            &resampled,
            "particle diagnostics",
        )?;
        trace_plot(
            &dir.join("trace_unweighted.png"),
            &t,
            &vec![1.0; steps],
            &vec![0.0; steps],
            &[],
            "unweighted method",
        )?;

        let epochs: Vec<f64> = (1..=200).map(f64::from).collect();
        let series = vec![
            (
                "train loss".to_string(),
                epochs.clone(),
                epochs.iter().map(|e| 2.0 / e.sqrt() + 0.01).collect(),
            ),
            (
                "validation loss".to_string(),
                epochs.clone(),
                epochs.iter().map(|e| 2.5 / e.sqrt() + 0.03).collect(),
            ),
        ];
        lines_plot(
            &dir.join("lines_log.png"),
            "epoch",
            "loss",
            &series,
            true,
            "training",
        )?;
        let n: Vec<f64> = vec![64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0];
        let bench = vec![
            (
                "bootstrap".to_string(),
                n.clone(),
                n.iter().map(|v| 0.002 * v).collect(),
            ),
            (
                "twisted".to_string(),
                n.clone(),
                n.iter().map(|v| 0.003 * v + 0.5).collect(),
            ),
            (
                "guidance".to_string(),
                n.clone(),
                n.iter().map(|v| 0.001 * v + 0.1).collect(),
            ),
        ];
        lines_plot(
            &dir.join("lines_linear.png"),
            "particles N",
            "seconds",
            &bench,
            false,
            "benchmark",
        )?;

        // Error bars (one reaching below zero), dashed companions, log axes.
        let mut with_errors = Vec::new();
        for (k, (label, x, y)) in bench.iter().enumerate() {
            let mut s = Series::new(label, x.clone(), y.iter().map(|v| 1.0 / v).collect(), k);
            s.error = Some(s.y.iter().map(|v| 0.3 * v).collect());
            s.shift = 0.01 * (k as f64 - 1.0);
            with_errors.push(s);
            let mut d = Series::new(
                &format!("{label} (before)"),
                x.clone(),
                y.iter().map(|v| 3.0 / v).collect(),
                k,
            );
            d.dashed = true;
            with_errors.push(d);
        }
        with_errors[0].error.as_mut().unwrap()[2] = 10.0;
        // Drawn once, labelled "twisted = copy (before)".
        let mut copy = with_errors[3].clone();
        copy.label = "copy (before)".to_string();
        with_errors.push(copy);
        series_plot(
            &dir.join("series_log_log.png"),
            "particles N",
            "error",
            &with_errors,
            true,
            true,
            "errors vs N",
        )?;
        series_plot(
            &dir.join("series_linear.png"),
            "particles N",
            "error",
            &with_errors,
            false,
            false,
            "errors vs N",
        )?;
        Ok(())
    }

    #[test]
    fn plot_files_are_valid_pngs() {
        let dir = tempfile::tempdir().unwrap();
        write_examples(dir.path()).unwrap();
        for name in [
            "samples_2d_weighted",
            "samples_2d_plain",
            "samples_5d",
            "samples_1d",
            "samples_1d_plain",
            "lines_log",
            "lines_linear",
            "series_log_log",
            "series_linear",
        ] {
            check_png(&dir.path().join(format!("{name}.png")), SQUARE);
        }
        for name in ["trace", "trace_unweighted"] {
            check_png(&dir.path().join(format!("{name}.png")), WIDE);
        }
        // Keep copies to look at when asked to.
        if let Some(out) = std::env::var_os("STEER_PLOT_DIR") {
            write_examples(Path::new(&out)).unwrap();
        }
    }

    #[test]
    fn plot_creates_missing_parent_folders() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/lines.png");
        let series = vec![("s".to_string(), vec![0.0, 1.0], vec![1.0, 2.0])];
        lines_plot(&path, "x", "y", &series, false, "t").unwrap();
        check_png(&path, SQUARE);
    }

    #[test]
    fn plot_text_renders_without_system_fonts() {
        let x = mixture(500, 2, 7);
        let buf = render_buffer(SQUARE, |root| {
            draw_samples(root, x.view(), None, None, "TITLE TEXT")
        });
        // The title sits at the top centre; nothing but text is drawn there.
        assert!(dark_pixels(&buf, SQUARE.0, (300, 600), (0, 50)) > 100);
        // The rotated y-axis description sits at the far left.
        assert!(dark_pixels(&buf, SQUARE.0, (0, 35), (200, 500)) > 20);
        // The area to the right of the title stays white.
        assert_eq!(dark_pixels(&buf, SQUARE.0, (820, 900), (0, 15)), 0);

        let t: Vec<f64> = (0..10).map(f64::from).collect();
        let buf = render_buffer(WIDE, |root| {
            draw_trace(root, &t, &[1.0; 10], &[0.0; 10], &[false; 10], "TRACE")
        });
        assert!(dark_pixels(&buf, WIDE.0, (500, 700), (0, 40)) > 50);
        // The note in the right panel (grey text).
        let note = (750u32..1150)
            .flat_map(|x| (200u32..300).map(move |y| (x, y)))
            .filter(|&(x, y)| {
                let i = ((y * WIDE.0 + x) * 3) as usize;
                buf[i] < 180 && buf[i] == buf[i + 1] && buf[i] == buf[i + 2]
            })
            .count();
        assert!(note > 50, "note not drawn ({note} grey pixels)");

        let series = vec![Series::new("only", vec![1.0, 2.0], vec![3.0, 4.0], 0)];
        let buf = render_buffer(SQUARE, |root| {
            draw_lines(root, "x", "y", &series, false, true, "LINES")
        });
        assert!(dark_pixels(&buf, SQUARE.0, (350, 550), (0, 50)) > 50);
    }

    #[test]
    fn plot_rejects_mismatched_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let x = mixture(10, 2, 1);
        let lw = Array1::zeros(9);
        assert!(
            samples_plot(
                &dir.path().join("a.png"),
                x.view(),
                Some(lw.view()),
                None,
                ""
            )
            .is_err()
        );
        let r = mixture(10, 3, 1);
        assert!(
            samples_plot(
                &dir.path().join("b.png"),
                x.view(),
                None,
                Some(r.view()),
                ""
            )
            .is_err()
        );
        assert!(trace_plot(&dir.path().join("c.png"), &[0.0, 1.0], &[1.0], &[], &[], "").is_err());
        let bad = vec![("s".to_string(), vec![0.0], vec![])];
        assert!(lines_plot(&dir.path().join("d.png"), "x", "y", &bad, false, "").is_err());
        let mut bad = Series::new("s", vec![1.0, 2.0], vec![1.0, 2.0], 0);
        bad.error = Some(vec![0.1]);
        let err =
            series_plot(&dir.path().join("e.png"), "x", "y", &[bad], true, true, "").unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("1 error bars for 2 points"), "{err}");
    }

    #[test]
    fn plot_handles_degenerate_inputs() {
        let tmp = tempfile::tempdir().unwrap();
        // Keep copies to look at when asked to.
        let dir = match std::env::var_os("STEER_PLOT_DIR") {
            Some(out) => Path::new(&out).join("degenerate"),
            None => tmp.path().to_path_buf(),
        };
        // Identical points, non-finite values, all-(-inf) log-weights.
        let mut x = Array2::from_elem((20, 2), 3.0);
        x[[0, 0]] = f64::NAN;
        x[[1, 1]] = f64::INFINITY;
        let lw = Array1::from_elem(20, f64::NEG_INFINITY);
        samples_plot(&dir.join("a.png"), x.view(), Some(lw.view()), None, "same").unwrap();
        let empty = Array2::<f64>::zeros((0, 1));
        samples_plot(&dir.join("b.png"), empty.view(), None, None, "empty").unwrap();
        trace_plot(&dir.join("c.png"), &[], &[], &[], &[], "empty").unwrap();
        trace_plot(&dir.join("d.png"), &[0.5], &[1.0], &[2.0], &[true], "one").unwrap();
        lines_plot(&dir.join("e.png"), "x", "y", &[], true, "none").unwrap();
        let neg = vec![("neg".to_string(), vec![0.0, 1.0], vec![-1.0, 0.0])];
        lines_plot(&dir.join("f.png"), "x", "y", &neg, true, "nonpositive").unwrap();
        // Log x with non-positive x, and error bars that are NaN, zero or cross zero.
        let mut s = Series::new("s", vec![0.0, 1.0, 2.0, 4.0], vec![1.0, 1.0, 2.0, 0.5], 3);
        s.error = Some(vec![1.0, f64::NAN, 0.0, 2.0]);
        series_plot(&dir.join("g.png"), "x", "y", &[s], true, true, "bars").unwrap();
        series_plot(&dir.join("h.png"), "x", "y", &[], true, true, "none").unwrap();
    }

    #[test]
    fn plot_helpers() {
        assert_eq!(fmt_tick(0.0), "0");
        assert_eq!(fmt_tick(0.5), "0.5");
        assert_eq!(fmt_tick(2.0), "2");
        assert_eq!(fmt_tick(-12.5), "-12.5");
        assert_eq!(fmt_tick(0.0025), "0.0025");
        assert_eq!(fmt_tick(1e-4), "1e-4");
        assert_eq!(fmt_tick(2.5e6), "2.5e6");
        assert_eq!(fmt_tick(30000.0), "30000");

        assert_eq!(subsample(3, 5).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(subsample(10, 5).collect::<Vec<_>>(), vec![0, 2, 4, 6, 8]);
        assert_eq!(subsample(0, 5).count(), 0);

        let sorted = [0.0, 1.0, 2.0, 3.0];
        assert_eq!(quantile(&sorted, 0.0), 0.0);
        assert_eq!(quantile(&sorted, 1.0), 3.0);
        assert!((quantile(&sorted, 0.5) - 1.5).abs() < 1e-12);

        let mut values: Vec<f64> = (0..=1000).map(f64::from).collect();
        values.push(1e9);
        values.push(f64::NAN);
        let r = robust_range(&mut values);
        assert!(r.start < 5.0 && r.start > -60.0, "{r:?}");
        assert!(r.end > 995.0 && r.end < 1100.0, "{r:?}");

        let w =
            normalised_weights(Array1::from(vec![0.0, 0.0, f64::NEG_INFINITY, f64::NAN]).view());
        assert_eq!(w, vec![0.5, 0.5, 0.0, 0.0]);
        assert!((ess(&w) - 2.0).abs() < 1e-12);
        let w = normalised_weights(Array1::from(vec![f64::NEG_INFINITY; 4]).view());
        assert_eq!(w, vec![0.25; 4]);

        let h = histogram(&[0.1, 0.2, 0.9, 5.0], None, &(0.0..1.0), 2);
        assert_eq!(h, vec![1.0, 0.5]);

        assert_eq!(joined_label("vcg", "vcg-smc"), "vcg = vcg-smc");
        assert_eq!(joined_label("a (x)", "b (x)"), "a = b (x)");
        assert_eq!(joined_label("a (x)", "b (y)"), "a (x) = b (y)");
        assert_eq!(joined_label("", "b"), "b");
        let a = Series::new("a", vec![1.0, 2.0], vec![f64::NAN, 1.0], 0);
        let mut b = Series::new("b", vec![1.0, 2.0], vec![f64::NAN, 1.0], 1);
        b.shift = 0.1;
        let mut c = b.clone();
        c.dashed = true;
        let merged = merge_identical(&[a, b, c]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].label, "a = b");
        assert_eq!((merged[0].color, merged[0].shift), (0, 0.0));
        assert!(merged[1].dashed);
    }
}
