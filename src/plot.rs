//! PNG plots of a training run: losses and learning rate, kappa per epoch, ROC curves.
//!
//! Drawn with plotters into an RGB buffer; text uses the Ubuntu Light font embedded in the
//! binary (epaint_default_fonts), so no system font is needed.

use crate::data::StudyType;
use crate::disk::write_png_atomic;
use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Once;

const SIZE: (u32, u32) = (900, 640);
const FONT: &str = "sans-serif";

/// One epoch of `metrics.jsonl` as the plots need it; missing or null values are None.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct EpochRecord {
    pub epoch: f64,
    pub train_loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub lr: Option<f64>,
    pub kappa: Option<f64>,
    #[serde(default)]
    pub kappa_by_type: BTreeMap<StudyType, Option<f64>>,
}

/// One ROC curve: its legend name, points (fpr, tpr) and area.
pub struct RocCurve {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub auroc: f64,
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is a constant that ships inside the binary: a failure is a build defect.
        plotters::style::register_font(FONT, FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT)
            .unwrap_or_else(|_| panic!("embedded font does not parse"));
    });
}

/// Draw into a white RGB canvas and write it as a PNG.
fn render(
    path: &Path,
    draw: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> Result<()>,
) -> Result<()> {
    register_font();
    let mut rgb = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
        draw(&root)?;
        root.present().map_err(|e| anyhow!("plot: {e}"))?;
    }
    write_png_atomic(path, &rgb, SIZE.0, SIZE.1)
}

/// The error for values from `lo` to `hi` that no axis can span: the plotting library would lay
/// out ticks for ever (an infinite range) instead of failing.
fn unplottable(what: &str, lo: f64, hi: f64) -> anyhow::Error {
    anyhow!(
        "cannot plot the {what}: they range from {lo:e} to {hi:e}, more than a plot can span \
         (a damaged metrics.jsonl?)"
    )
}

/// (min, max) of finite values padded by 5%, or (0, 1) when there are none.
fn span(what: &str, values: impl Iterator<Item = f64>) -> Result<(f64, f64)> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return Ok((0.0, 1.0));
    }
    let pad = ((hi - lo) * 0.05).max(1e-3 * hi.abs().max(1e-12));
    let (a, b) = (lo - pad, hi + pad);
    if !(a.is_finite() && b.is_finite() && (b - a).is_finite()) {
        return Err(unplottable(what, lo, hi));
    }
    Ok((a, b))
}

/// The positive values `lo..=hi` padded by ×2 each way, for a log axis.
fn log_span(what: &str, lo: f64, hi: f64) -> Result<(f64, f64)> {
    let (a, b) = (lo / 2.0, hi * 2.0);
    if !(a > 0.0 && b.is_finite() && (b / a).is_finite()) {
        return Err(unplottable(what, lo, hi));
    }
    Ok((a, b))
}

fn epochs_span(epochs: &[EpochRecord]) -> Result<(f64, f64)> {
    let (lo, hi) = span("epochs", epochs.iter().map(|e| e.epoch))?;
    Ok((lo.min(hi - 1.0), hi))
}

/// Finite (epoch, value) points of one series.
fn series(epochs: &[EpochRecord], f: impl Fn(&EpochRecord) -> Option<f64>) -> Vec<(f64, f64)> {
    epochs
        .iter()
        .filter_map(|e| f(e).filter(|v| v.is_finite()).map(|v| (e.epoch, v)))
        .collect()
}

/// Epochs are whole numbers: label whole ticks only.
fn epoch_label(x: &f64) -> String {
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        String::new()
    }
}

fn colour(i: usize) -> RGBColor {
    const C: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    C[i % C.len()]
}

fn e<T: std::fmt::Display>(err: T) -> anyhow::Error {
    anyhow!("plot: {err}")
}

/// A line with markers and a legend entry.
fn line<DB: DrawingBackend, CT: plotters::coord::CoordTranslate<From = (f64, f64)>>(
    chart: &mut ChartContext<DB, CT>,
    points: Vec<(f64, f64)>,
    name: &str,
    style: ShapeStyle,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let c = style.color;
    chart
        .draw_series(points.iter().map(|&p| Circle::new(p, 3, c.filled())))
        .map_err(e)?;
    chart
        .draw_series(LineSeries::new(points, style))
        .map_err(e)?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    Ok(())
}

/// `loss.png`: train and validation loss per epoch (top), learning rate on a log scale (bottom).
pub fn plot_loss(path: &Path, epochs: &[EpochRecord]) -> Result<()> {
    render(path, |root| {
        let (top, bottom) = root.split_vertically(SIZE.1 * 62 / 100);
        let (x0, x1) = epochs_span(epochs)?;
        let train = series(epochs, |e| e.train_loss);
        let val = series(epochs, |e| e.val_loss);
        let (y0, y1) = span("losses", train.iter().chain(&val).map(|p| p.1))?;
        let mut chart = ChartBuilder::on(&top)
            .caption("Loss per epoch", (FONT, 24))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .x_label_formatter(&epoch_label)
            .y_desc("loss")
            .label_style((FONT, 15))
            .draw()
            .map_err(e)?;
        line(&mut chart, train, "train loss", colour(0).stroke_width(2))?;
        line(
            &mut chart,
            val,
            "validation loss",
            colour(1).stroke_width(2),
        )?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 16))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;

        let lr = series(epochs, |e| e.lr.filter(|&v| v > 0.0));
        let (lo, hi) = lr.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), p| {
            (lo.min(p.1), hi.max(p.1))
        });
        let (lo, hi) = if lr.is_empty() {
            (1e-5, 1e-3)
        } else {
            log_span("learning rates", lo, hi)?
        };
        let mut chart = ChartBuilder::on(&bottom)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, (lo..hi).log_scale())
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .x_label_formatter(&epoch_label)
            .y_desc("learning rate")
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .label_style((FONT, 15))
            .draw()
            .map_err(e)?;
        line(&mut chart, lr, "learning rate", colour(2).stroke_width(2))?;
        Ok(())
    })
}

/// `kappa.png`: overall (thick, black) and per-type Cohen's kappa per epoch.
pub fn plot_kappa(path: &Path, epochs: &[EpochRecord]) -> Result<()> {
    render(path, |root| {
        let (x0, x1) = epochs_span(epochs)?;
        let overall = series(epochs, |e| e.kappa);
        // One line per study type (a log naming another type does not parse).
        let types: Vec<&StudyType> = epochs
            .iter()
            .flat_map(|e| e.kappa_by_type.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let per_type: Vec<(&StudyType, Vec<(f64, f64)>)> = types
            .iter()
            .map(|&t| {
                (
                    t,
                    series(epochs, |e| e.kappa_by_type.get(t).copied().flatten()),
                )
            })
            .collect();
        let (y0, y1) = span(
            "kappas",
            overall
                .iter()
                .chain(per_type.iter().flat_map(|(_, s)| s))
                .map(|p| p.1),
        )?;
        let mut chart = ChartBuilder::on(root)
            .caption("Cohen's kappa on validation studies", (FONT, 24))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0.min(0.0)..y1.max(1.0))
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .x_label_formatter(&epoch_label)
            .y_desc("kappa")
            .label_style((FONT, 15))
            .draw()
            .map_err(e)?;
        for (i, (t, s)) in per_type.into_iter().enumerate() {
            line(&mut chart, s, t.name(), colour(i).stroke_width(1))?;
        }
        line(&mut chart, overall, "overall", BLACK.stroke_width(3))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FONT, 15))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
        Ok(())
    })
}

/// `roc.png`: one ROC curve per entry, AUROC in the legend, the chance diagonal dashed.
pub fn plot_roc(path: &Path, curves: &[RocCurve]) -> Result<()> {
    render(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption("ROC on validation studies (best checkpoint)", (FONT, 24))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..1.0, 0.0..1.0)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("false positive rate (1 - specificity)")
            .y_desc("true positive rate (sensitivity)")
            .label_style((FONT, 15))
            .draw()
            .map_err(e)?;
        chart
            .draw_series(DashedLineSeries::new(
                [(0.0, 0.0), (1.0, 1.0)],
                6,
                6,
                BLACK.mix(0.4).stroke_width(1),
            ))
            .map_err(e)?;
        for (i, c) in curves.iter().enumerate() {
            let style = if c.name == "overall" {
                BLACK.stroke_width(3)
            } else {
                colour(i).stroke_width(2)
            };
            let auc = if c.auroc.is_finite() {
                format!("{:.3}", c.auroc)
            } else {
                "n/a".into()
            };
            chart
                .draw_series(LineSeries::new(c.points.clone(), style))
                .map_err(e)?
                .label(format!("{} (AUROC {auc})", c.name))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FONT, 15))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
        Ok(())
    })
}
