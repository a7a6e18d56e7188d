//! `phalanx report`: a run's story as one SVG picture. The upper panel draws the training loss
//! and the evaluation losses against the step, with checkpoint ticks on the step axis, restarts
//! (red lines), rejected loss spikes (orange triangles, their losses clipped to the panel) and
//! the steps their rollbacks skipped (orange bands); the lower panel draws tokens/s. The input
//! is the run directory's `metrics.jsonl` lines and the committed checkpoint steps.

use std::fmt::Write;

/// What one metrics line says, as far as the picture needs it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Point {
    pub step: u64,
    pub loss: f64,
    pub eval_loss: Option<f64>,
    pub tokens_per_s: f64,
    /// Cumulative actor restarts when the step was recorded.
    pub restarts: u64,
    /// The loss monitor rejected the step and the run went back to this step.
    pub rolled_back_to: Option<u64>,
}

impl Point {
    /// A metrics line; lines without a step or a loss are not points (None).
    pub fn from_json(v: &serde_json::Value) -> Option<Point> {
        Some(Point {
            step: v["step"].as_u64()?,
            loss: v["loss"].as_f64().unwrap_or(f64::NAN),
            eval_loss: v["eval_loss"].as_f64(),
            tokens_per_s: v["tokens_per_s"].as_f64().unwrap_or(0.0),
            restarts: v["restarts"].as_u64().unwrap_or(0),
            rolled_back_to: v["rolled_back_to"].as_u64(),
        })
    }
}

/// Counts a report prints beside the picture.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Marks {
    pub steps: usize,
    pub evals: usize,
    pub checkpoints: usize,
    pub restarts: u64,
    pub rollbacks: usize,
    pub skipped_steps: u64,
}

const W: f64 = 960.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: (f64, f64) = (40.0, 330.0);
const BOTTOM: (f64, f64) = (380.0, 500.0);
const H: f64 = 550.0;

/// The SVG of a run (`title` on top) and what it marks.
pub fn svg(title: &str, points: &[Point], checkpoints: &[u64]) -> (String, Marks) {
    let mut marks = Marks {
        steps: points.len(),
        ..Marks::default()
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="22" font-size="15">{}</text>"#,
        escape(title)
    );
    if points.is_empty() {
        let _ = writeln!(
            out,
            r#"<text x="{LEFT}" y="80">no steps recorded</text></svg>"#
        );
        return (out, marks);
    }
    let (s0, s1) = (
        points
            .iter()
            .map(|p| p.step)
            .min()
            .unwrap_or(0)
            .saturating_sub(1),
        points.iter().map(|p| p.step).max().unwrap_or(1),
    );
    let x = |s: f64| LEFT + (s - s0 as f64) / ((s1 - s0).max(1) as f64) * (W - LEFT - RIGHT);
    // the loss axis spans the accepted steps' losses and the evaluations
    let accepted = points
        .iter()
        .filter(|p| p.rolled_back_to.is_none() && p.loss.is_finite());
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for v in accepted
        .map(|p| p.loss)
        .chain(points.iter().filter_map(|p| p.eval_loss))
    {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.08).max(1e-3);
    let (lo, hi) = (lo - pad, hi + pad);
    let y = |v: f64| {
        let v = v.clamp(lo, hi);
        TOP.1 - (v - lo) / (hi - lo) * (TOP.1 - TOP.0)
    };
    // skipped windows first, under everything
    for p in points {
        if let Some(back) = p.rolled_back_to {
            marks.rollbacks += 1;
            marks.skipped_steps += p.step - back;
            let (a, b) = (x(back as f64 + 0.5), x(p.step as f64 + 0.5));
            let _ = writeln!(
                out,
                r##"<rect x="{a:.1}" y="{}" width="{:.1}" height="{}" fill="#f5a623" opacity="0.2"><title>steps {}..={} skipped (rolled back to {back})</title></rect>"##,
                TOP.0,
                (b - a).max(1.0),
                TOP.1 - TOP.0,
                back + 1,
                p.step
            );
        }
    }
    axes(&mut out, TOP, lo, hi, "loss");
    axes(&mut out, BOTTOM, 0.0, 1.0, "tokens/s");
    // checkpoint ticks on the loss panel's step axis
    for &c in checkpoints.iter().filter(|&&c| c >= s0 && c <= s1) {
        marks.checkpoints += 1;
        let cx = x(c as f64);
        let _ = writeln!(
            out,
            r##"<line x1="{cx:.1}" y1="{}" x2="{cx:.1}" y2="{}" stroke="#2b6cb0" stroke-width="2"><title>checkpoint {c}</title></line>"##,
            TOP.1,
            TOP.1 + 8.0
        );
    }
    // restarts: where the cumulative count grows
    let mut before = points.first().map_or(0, |p| p.restarts);
    for p in points {
        if p.restarts > before {
            marks.restarts += p.restarts - before;
            let rx = x(p.step as f64);
            let _ = writeln!(
                out,
                r##"<line x1="{rx:.1}" y1="{}" x2="{rx:.1}" y2="{}" stroke="#d0312d" stroke-dasharray="3,3"><title>step {}: {} restart(s)</title></line>"##,
                TOP.0,
                TOP.1,
                p.step,
                p.restarts - before
            );
        }
        before = p.restarts;
    }
    // the training loss of accepted steps
    let line: Vec<String> = points
        .iter()
        .filter(|p| p.rolled_back_to.is_none() && p.loss.is_finite())
        .map(|p| format!("{:.1},{:.1}", x(p.step as f64), y(p.loss)))
        .collect();
    let _ = writeln!(
        out,
        r##"<polyline points="{}" fill="none" stroke="#333" stroke-width="1.2"/>"##,
        line.join(" ")
    );
    for p in points {
        if let Some(e) = p.eval_loss {
            marks.evals += 1;
            let _ = writeln!(
                out,
                r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="#2f855a"><title>step {}: eval loss {e:.4}</title></circle>"##,
                x(p.step as f64),
                y(e),
                p.step
            );
        }
        if p.rolled_back_to.is_some() {
            let (tx, ty) = (x(p.step as f64), y(p.loss));
            let _ = writeln!(
                out,
                r##"<path d="M{tx:.1},{:.1} l-6,10 h12 z" fill="#f5a623"><title>step {}: loss {:.4} rejected</title></path>"##,
                ty - 5.0,
                p.step,
                p.loss
            );
        }
    }
    // tokens/s
    let tmax = points
        .iter()
        .map(|p| p.tokens_per_s)
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let ty = |v: f64| BOTTOM.1 - v / tmax * (BOTTOM.1 - BOTTOM.0);
    let tl: Vec<String> = points
        .iter()
        .map(|p| format!("{:.1},{:.1}", x(p.step as f64), ty(p.tokens_per_s)))
        .collect();
    let _ = writeln!(
        out,
        r##"<polyline points="{}" fill="none" stroke="#6b46c1" stroke-width="1.2"/>"##,
        tl.join(" ")
    );
    let _ = writeln!(
        out,
        r##"<text x="{LEFT}" y="{}" fill="#555">{tmax:.0} tokens/s</text>"##,
        BOTTOM.0 - 4.0
    );
    // step axis labels and legend
    for (s, anchor) in [(s0 + 1, "start"), (s1, "end")] {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="{anchor}">step {s}</text>"#,
            x(s as f64),
            BOTTOM.1 + 18.0
        );
    }
    let _ = writeln!(
        out,
        r##"<text x="{}" y="{}" text-anchor="end" fill="#555">loss (black), eval (green), checkpoints (blue ticks), restarts (red), rejected spikes (orange) and skipped steps (orange bands)</text>"##,
        W - RIGHT,
        H - 8.0
    );
    out.push_str("</svg>\n");
    (out, marks)
}

/// A panel's frame and its value labels.
fn axes(out: &mut String, (top, bottom): (f64, f64), lo: f64, hi: f64, name: &str) {
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{top}" width="{}" height="{}" fill="none" stroke="#999"/>"##,
        W - LEFT - RIGHT,
        bottom - top
    );
    if name == "loss" {
        for (v, yy) in [(hi, top + 12.0), (lo, bottom - 2.0)] {
            let _ = writeln!(
                out,
                r#"<text x="{}" y="{yy}" text-anchor="end">{v:.3}</text>"#,
                LEFT - 6.0
            );
        }
    }
    let _ = writeln!(
        out,
        r#"<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">{name}</text>"#,
        (top + bottom) / 2.0,
        (top + bottom) / 2.0
    );
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> Vec<Point> {
        (1..=20u64)
            .map(|s| Point {
                step: s,
                loss: if s == 12 { 90.0 } else { 5.0 - s as f64 * 0.1 },
                eval_loss: (s % 10 == 0).then_some(4.5),
                tokens_per_s: 1000.0 + s as f64,
                restarts: if s >= 7 { 2 } else { 0 },
                rolled_back_to: (s == 12).then_some(10),
            })
            .collect()
    }

    #[test]
    fn marks_what_happened() {
        let (svg, m) = svg("tiny <test>", &run(), &[5, 10, 15, 20, 40]);
        assert_eq!(
            m,
            Marks {
                steps: 20,
                evals: 2,
                checkpoints: 4,
                restarts: 2,
                rollbacks: 1,
                skipped_steps: 2,
            }
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("tiny &lt;test&gt;"));
        assert!(svg.contains("steps 11..=12 skipped (rolled back to 10)"));
        assert!(svg.contains("step 12: loss 90.0000 rejected"));
        // the rejected loss does not stretch the axis: its top label is near the other losses
        assert!(!svg.contains(">90."), "the axis is set by accepted losses");
    }

    #[test]
    fn reads_metrics_lines() {
        let v = serde_json::json!({"step": 3, "loss": 2.5, "tokens_per_s": 10.0,
            "rejected": "loss 9 above the limit 7", "rolled_back_to": 2, "restarts": 1});
        let p = Point::from_json(&v).unwrap();
        assert_eq!((p.step, p.rolled_back_to, p.restarts), (3, Some(2), 1));
        assert!(Point::from_json(&serde_json::json!({"loss": 1.0})).is_none());
        let (empty, m) = svg("none", &[], &[]);
        assert!(empty.contains("no steps recorded") && m.steps == 0);
    }
}
