//! The loss curve as a PNG: training loss per step and held-out loss per evaluation, against
//! the step. Pure Rust (plotters' bitmap backend, ab_glyph text with a bundled DejaVu Sans), so
//! no system font or fontconfig is needed.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::train::metrics::Record;

/// The plot's file name in the output folder.
pub const PLOT_FILE: &str = "loss.png";

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

fn register_font() {
    REGISTER.call_once(|| {
        // The bundled font is a valid TTF; should registration ever fail, text is just
        // missing from the plot, which is not worth failing training over.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Draws train and eval loss from `records` into the PNG `path` (900×540), atomically.
pub fn plot_losses(records: &[Record], path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".loss.{}.tmp.png", std::process::id()));
    let drawn = draw(
        BitMapBackend::new(&tmp, (900, 540)).into_drawing_area(),
        records,
    );
    let res = drawn
        .map_err(|reason| Error::BadOutput {
            path: path.into(),
            reason: format!("drawing the loss curve: {reason}"),
        })
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Draws the curves on any plotters backend; errors as text.
fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    records: &[Record],
) -> std::result::Result<(), String> {
    register_font();
    let mut train = Vec::new();
    let mut eval = Vec::new();
    for r in records {
        match r {
            Record::Step(s) if s.loss.is_finite() => train.push((s.step as f64, s.loss)),
            Record::Eval(e) if e.eval_loss.is_finite() => eval.push((e.step as f64, e.eval_loss)),
            _ => {}
        }
    }
    let all = train.iter().chain(&eval);
    let x_max = all.clone().map(|p| p.0).fold(1.0f64, f64::max);
    let (mut y_lo, mut y_hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    if !y_lo.is_finite() {
        (y_lo, y_hi) = (0.0, 1.0);
    }
    let pad = ((y_hi - y_lo) * 0.05).max(1e-3);
    let (y_lo, y_hi) = (y_lo - pad, y_hi + pad);
    let s = |e: &dyn std::fmt::Display| e.to_string();

    root.fill(&WHITE).map_err(|e| s(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("loss", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, y_lo..y_hi)
        .map_err(|e| s(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-9 {
                format!("{x:.0}")
            } else {
                format!("{x:.1}")
            }
        })
        .y_desc("loss")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| s(&e))?;
    chart
        .draw_series(LineSeries::new(train, BLUE.stroke_width(2)))
        .map_err(|e| s(&e))?
        .label("train")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    if !eval.is_empty() {
        chart
            .draw_series(LineSeries::new(eval.clone(), RED.stroke_width(2)))
            .map_err(|e| s(&e))?
            .label("eval")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart
            .draw_series(eval.iter().map(|&p| Circle::new(p, 4, RED.filled())))
            .map_err(|e| s(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| s(&e))?;
    root.present().map_err(|e| s(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::metrics::{EvalRecord, StepRecord};

    fn records() -> Vec<Record> {
        let mut recs = Vec::new();
        for s in 1..=20 {
            recs.push(Record::Step(StepRecord {
                step: s,
                epoch: s as f64 / 20.0,
                loss: 5.0 / s as f64,
                lr: 1e-3,
                grad_norm: 1.0,
                tokens: 10,
                tokens_per_s: 1.0,
            }));
            if s % 5 == 0 {
                recs.push(Record::Eval(EvalRecord {
                    step: s,
                    eval_loss: 6.0 / s as f64,
                    eval_ppl: 1.0,
                    eval_tokens: 3,
                }));
            }
        }
        recs
    }

    #[test]
    fn draws_both_curves_and_text() {
        let (w, h) = (900u32, 540u32);
        let mut buf = vec![0u8; (w * h * 3) as usize];
        draw(
            BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area(),
            &records(),
        )
        .unwrap();
        let count = |rgb: [u8; 3]| buf.chunks(3).filter(|p| *p == rgb).count();
        // Pure blue (train) and pure red (eval) pixels drawn, black text and axes, white ground.
        assert!(count([0, 0, 255]) > 500, "blue {}", count([0, 0, 255]));
        assert!(count([255, 0, 0]) > 200, "red {}", count([255, 0, 0]));
        assert!(count([0, 0, 0]) > 500, "black {}", count([0, 0, 0]));
        assert!(count([255, 255, 255]) > (w * h / 2) as usize);
    }

    #[test]
    fn writes_a_png_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(PLOT_FILE);
        plot_losses(&records(), &p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: width 900 and height 540, big-endian, at bytes 16..24.
        assert_eq!(&bytes[16..24], &[0, 0, 3, 132, 0, 0, 2, 28]);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file"
        );
    }
}
