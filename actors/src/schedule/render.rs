//! Rendering of schedules for people: a plain-text report (programs in paper notation, bubbles,
//! activations, messages) and a hand-written SVG Gantt chart of a timeline.

use std::fmt::Write;

use super::{CheckReport, Instr, Schedule, Timeline, step_names};

/// A text report: placement, each rank's program (paper notation and with micro-batch ids),
/// per-rank bubble, peak in-flight activations and messages, and messages per step.
pub fn report(schedule: &Schedule, check: &CheckReport, timeline: &Timeline) -> String {
    let s = schedule;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "schedule {}: {} ranks, {} micro-batches, {} model stages, {} stage copies",
        s.kind,
        s.ranks,
        s.microbatches,
        s.kind.model_stages(s.ranks),
        s.stages.len()
    );
    for (i, lane) in s.lanes.iter().enumerate() {
        let path: Vec<String> = lane
            .stages
            .iter()
            .map(|&v| format!("s{v}@r{}", s.stages[v].rank))
            .collect();
        let _ = writeln!(
            out,
            "lane {i}: micro-batches {}..{} flow {}",
            lane.microbatches.start,
            lane.microbatches.end,
            path.join(" -> ")
        );
    }
    let _ = writeln!(out, "makespan {}", num(timeline.makespan));
    let names = step_names(s.kind);
    for r in 0..s.ranks {
        let held: Vec<String> = s
            .stages_on(r)
            .iter()
            .map(|&v| {
                let st = &s.stages[v];
                format!("s{v}=model stage {} phase {}", st.model_stage, st.phase)
            })
            .collect();
        let _ = writeln!(out, "rank {r} ({})", held.join(", "));
        let _ = writeln!(out, "  program: {}", s.compact_program(r));
        let detail: Vec<String> = s.programs[r].iter().map(|i| micro(s, i)).collect();
        let _ = writeln!(out, "  micro-batches: {}", detail.join(" "));
        if let Some(counts) = &s.step_counts {
            let c: Vec<String> = counts[r].iter().map(|x| x.to_string()).collect();
            let _ = writeln!(out, "  step counts: {}", c.join(","));
        }
        if let Some(rc) = check.ranks.get(r) {
            let _ = writeln!(
                out,
                "  F {} B {} (B* {}) W {} F&B {}; peak activations {} (with W stash {}); sent {} activations, {} gradients; received {}",
                rc.forwards,
                rc.backwards,
                rc.split_backwards,
                rc.weight_passes,
                rc.overlapped_pairs,
                rc.peak_activations,
                rc.peak_stash,
                rc.sent_activations,
                rc.sent_gradients,
                rc.received
            );
        }
        if let (Some(busy), Some(bubble)) = (timeline.busy.get(r), timeline.bubble.get(r)) {
            let _ = writeln!(
                out,
                "  busy {}, bubble {} (idle between first start and last end {})",
                num(*busy),
                num(*bubble),
                num(timeline.inner_bubble(r))
            );
        }
    }
    let _ = writeln!(out, "messages per step:");
    for (k, m) in check.messages_per_step.iter().enumerate() {
        let name = names.get(k).copied().unwrap_or("?");
        let _ = writeln!(out, "  step {} ({name}): {m}", k + 1);
    }
    let _ = writeln!(
        out,
        "messages per training step: {} (local hand-offs {})",
        check.messages, check.local_handoffs
    );
    let _ = writeln!(
        out,
        "bubble: max over ranks {}, rank 0 {}",
        num(timeline.max_bubble()),
        num(timeline.bubble.first().copied().unwrap_or(0.0))
    );
    out
}

/// `F0:3` style: paper notation with the micro-batch id after a colon.
fn micro(s: &Schedule, i: &Instr) -> String {
    let c = s.compact(i);
    match *i {
        Instr::F { mb, .. } | Instr::B { mb, .. } | Instr::BInput { mb, .. } => {
            format!("{c}:{mb}")
        }
        Instr::W { mb, .. } => format!("W:{mb}"),
        Instr::FB { f, b } => {
            let ph = |st: usize| s.stages[st].phase;
            format!("(F{}:{}&B{}:{})", ph(f.0), f.1, ph(b.0), b.1)
        }
    }
}

/// Integers without a trailing `.0`, other values with up to 3 decimals.
fn num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x:.3}")
    }
}

const ROW: f64 = 30.0;
const LEFT: f64 = 70.0;
const TOP: f64 = 40.0;

/// Fill colour of a box: forward blue, full backward green, B* light green, W orange, F&B
/// purple; chunk 1 (DualPipe reverse direction, DualPipeV way back) in a lighter shade.
fn colour(i: &Instr, chunk: usize) -> &'static str {
    let second = chunk == 1;
    match (i, second) {
        (Instr::F { .. }, false) => "#4e79a7",
        (Instr::F { .. }, true) => "#86b4d9",
        (Instr::B { .. }, false) => "#3b8c3a",
        (Instr::B { .. }, true) => "#73c06f",
        (Instr::BInput { .. }, false) => "#9cd08f",
        (Instr::BInput { .. }, true) => "#c6e8bd",
        (Instr::W { .. }, _) => "#f28e2b",
        (Instr::FB { .. }, false) => "#8e5b9a",
        (Instr::FB { .. }, true) => "#c49bd0",
    }
}

fn label(i: &Instr) -> String {
    match *i {
        Instr::F { mb, .. }
        | Instr::B { mb, .. }
        | Instr::BInput { mb, .. }
        | Instr::W { mb, .. } => mb.to_string(),
        Instr::FB { f, b } => format!("{}/{}", f.1, b.1),
    }
}

/// A Gantt chart: one row per rank, one box per instruction (colour by type, micro-batch id
/// inside, F&B boxes labelled `f/b`), a time axis and a legend. Hover titles give details.
pub fn svg(timeline: &Timeline) -> String {
    let t = timeline;
    let span = if t.makespan > 0.0 { t.makespan } else { 1.0 };
    // about 1,400 px wide, the shortest box between 2 and 40 px (costs may be in chunk units
    // or in seconds)
    let shortest = t
        .ranks
        .iter()
        .flatten()
        .map(|sp| sp.end - sp.start)
        .filter(|&d| d > 0.0)
        .fold(f64::INFINITY, f64::min);
    let shortest = if shortest.is_finite() { shortest } else { 1.0 };
    let scale = (1400.0 / span).clamp(2.0 / shortest, 40.0 / shortest);
    let width = LEFT + span * scale + 20.0;
    let rows = t.ranks.len() as f64;
    let height = TOP + rows * ROW + 70.0;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}" font-family="monospace" font-size="11">"##,
        w = width,
        h = height
    );
    let _ = writeln!(o, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        o,
        r##"<text x="{LEFT}" y="20" font-size="14">{} · {} ranks · {} micro-batches · makespan {} · max bubble {}</text>"##,
        t.kind,
        t.ranks.len(),
        t.microbatches,
        num(t.makespan),
        num(t.max_bubble())
    );
    for (r, spans) in t.ranks.iter().enumerate() {
        let y = TOP + r as f64 * ROW;
        let _ = writeln!(
            o,
            r##"<text x="4" y="{:.1}">rank {r}</text>"##,
            y + ROW / 2.0 + 4.0
        );
        let _ = writeln!(
            o,
            r##"<rect x="{LEFT}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="#f2f2f2"/>"##,
            span * scale,
            ROW - 4.0
        );
        for sp in spans {
            let x = LEFT + sp.start * scale;
            let w = (sp.end - sp.start) * scale;
            let _ = writeln!(
                o,
                r##"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{:.1}" fill="{}" stroke="black" stroke-width="0.5"><title>rank {r} step {}: {} [{}, {}]</title></rect>"##,
                ROW - 4.0,
                colour(&sp.instr, sp.chunk),
                sp.step,
                esc(&sp.instr.to_string()),
                num(sp.start),
                num(sp.end)
            );
            let text = esc(&label(&sp.instr));
            if w >= 7.0 * text.len() as f64 {
                let _ = writeln!(
                    o,
                    r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="white">{text}</text>"##,
                    x + w / 2.0,
                    y + ROW / 2.0 + 2.0
                );
            }
        }
    }
    // Time axis: about 10 ticks at round values.
    let axis_y = TOP + rows * ROW + 4.0;
    let raw = span / 10.0;
    let mag = 10f64.powf(raw.log10().floor());
    let tick = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(raw);
    let mut tv = 0.0;
    while tv <= span + 1e-9 {
        let x = LEFT + tv * scale;
        let _ = writeln!(
            o,
            r##"<line x1="{x:.1}" y1="{axis_y:.1}" x2="{x:.1}" y2="{:.1}" stroke="black"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            axis_y + 5.0,
            axis_y + 17.0,
            num(tv)
        );
        tv += tick;
    }
    let legend_y = axis_y + 32.0;
    let items = [
        (Instr::F { stage: 0, mb: 0 }, "F"),
        (Instr::B { stage: 0, mb: 0 }, "B (full)"),
        (Instr::BInput { stage: 0, mb: 0 }, "B* (input grad)"),
        (Instr::W { stage: 0, mb: 0 }, "W (weight grad)"),
        (
            Instr::FB {
                f: (0, 0),
                b: (0, 0),
            },
            "F&B (f/b micro-batches)",
        ),
    ];
    let mut x = LEFT;
    for (i, name) in items {
        let _ = writeln!(
            o,
            r##"<rect x="{x:.1}" y="{legend_y:.1}" width="14" height="14" fill="{}" stroke="black" stroke-width="0.5"/><text x="{:.1}" y="{:.1}">{}</text>"##,
            colour(&i, 0),
            x + 18.0,
            legend_y + 11.0,
            esc(name)
        );
        x += 30.0 + 7.0 * name.len() as f64;
    }
    let _ = writeln!(
        o,
        r##"<text x="{x:.1}" y="{:.1}">lighter: chunk 1 ({})</text>"##,
        legend_y + 11.0,
        kind_hint(t)
    );
    o.push_str("</svg>\n");
    o
}

/// Escapes text for SVG (XML) content and attributes.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn kind_hint(t: &Timeline) -> &'static str {
    match t.kind {
        super::ScheduleKind::DualPipe => "reverse direction",
        super::ScheduleKind::DualPipeV => "stages R..2R, way back to rank 0",
        _ => "unused by this kind",
    }
}
