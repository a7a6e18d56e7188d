//! What `phalanx simulate` prints and draws: the summary of every policy (and every sweep
//! value) as JSON, an SVG of effective training time per policy (against the swept value when
//! there is a sweep), and an SVG of progress over time with the failures marked.

use crate::run::Outcome;
use std::fmt::Write;

/// One simulated configuration: the swept value (if any) and each policy's outcome.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Point {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sweep: Option<(String, f64)>,
    pub outcomes: Vec<Outcome>,
}

/// The opening of a `w` × `h` picture on white with `title` at `left`.
fn header(w: f64, h: f64, left: f64, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\"><rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n<text x=\"{left}\" y=\"22\" font-size=\"15\">{title}</text>\n"
    )
}

/// Bars of effective training time: one group per point, one bar per policy.
pub fn svg(title: &str, points: &[Point]) -> String {
    let (w, h, left, top, bottom) = (900.0, 420.0, 60.0, 40.0, 360.0);
    let colours = ["#d0312d", "#2b6cb0", "#2f855a"];
    let mut out = header(w, h, left, title);
    let groups = points.len().max(1) as f64;
    let gw = (w - left - 20.0) / groups;
    for (gi, p) in points.iter().enumerate() {
        let n = p.outcomes.len().max(1) as f64;
        for (bi, o) in p.outcomes.iter().enumerate() {
            let bw = gw * 0.8 / n;
            let x = left + gi as f64 * gw + gw * 0.1 + bi as f64 * bw;
            let y = bottom - o.effective_training_time * (bottom - top);
            let _ = writeln!(
                out,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {:.2}%</title></rect>"#,
                bw * 0.9,
                bottom - y,
                colours[bi % colours.len()],
                o.policy.name(),
                o.effective_training_time * 100.0
            );
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{:.1}%</text>"#,
                x + bw * 0.45,
                y - 3.0,
                o.effective_training_time * 100.0
            );
        }
        let label = match &p.sweep {
            Some((k, v)) => format!("{k} = {v}"),
            None => "scenario".into(),
        };
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text>"#,
            left + gi as f64 * gw + gw / 2.0,
            bottom + 18.0
        );
    }
    let _ = writeln!(
        out,
        r##"<line x1="{left}" y1="{bottom}" x2="{}" y2="{bottom}" stroke="#999"/><text x="{}" y="{}" text-anchor="end">effective training time: whole-job restart (red), actor restart (blue), peer restore (green)</text></svg>"##,
        w - 20.0,
        w - 20.0,
        h - 10.0
    );
    out
}

/// Tokens kept against wall time, one line per policy, a tick per failure (of the first).
pub fn progress_svg(title: &str, outcomes: &[Outcome]) -> String {
    let (w, h, left, top, bottom, right) = (900.0, 420.0, 70.0, 40.0, 360.0, 20.0);
    let colours = ["#d0312d", "#2b6cb0", "#2f855a"];
    let tmax = outcomes
        .iter()
        .flat_map(|o| o.progress.iter().map(|p| p.0))
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let kmax = outcomes
        .iter()
        .flat_map(|o| o.progress.iter().map(|p| p.1))
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let x = |t: f64| left + t / tmax * (w - left - right);
    let y = |k: f64| bottom - k / kmax * (bottom - top);
    let mut out = header(w, h, left, title);
    if let Some(first) = outcomes.first() {
        for &f in &first.failures_h {
            let _ = writeln!(
                out,
                r##"<line x1="{0:.1}" y1="{bottom}" x2="{0:.1}" y2="{1}" stroke="#999" stroke-width="0.5"/>"##,
                x(f),
                bottom + 6.0
            );
        }
    }
    for (i, o) in outcomes.iter().enumerate() {
        let pts: Vec<String> = o
            .progress
            .iter()
            .map(|&(t, k)| format!("{:.1},{:.1}", x(t), y(k)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="1.2"><title>{}</title></polyline>"#,
            pts.join(" "),
            colours[i % colours.len()],
            o.policy.name()
        );
    }
    let _ = writeln!(
        out,
        r##"<rect x="{left}" y="{top}" width="{}" height="{}" fill="none" stroke="#999"/><text x="{}" y="{}">{kmax:.3e} tokens</text><text x="{}" y="{}" text-anchor="end">{tmax:.1} h</text>"##,
        w - left - right,
        bottom - top,
        left + 4.0,
        top + 14.0,
        w - right,
        bottom + 18.0
    );
    let _ = writeln!(
        out,
        r##"<text x="{}" y="{}" text-anchor="end">tokens kept against wall time: whole-job restart (red), actor restart (blue), peer restore (green); ticks: failures</text></svg>"##,
        w - right,
        h - 10.0
    );
    out
}
