//! Pipelined training equals single-process training bit for bit (f32 wire): every schedule
//! kind, run by the thread executor, against the micro-batched single-process loop.

mod common;

use actors::formation::{self, Layout, Wire};
use actors::schedule::ScheduleKind;
use actors::trainer;

fn check(kind: ScheduleKind, pp: usize, microbatches: usize) {
    let name = format!("{kind}-{pp}-{microbatches}");
    let opts = common::micro_options(&format!("ref-{name}"), 4, 8, 3);
    let want = trainer::train_microbatched(&opts, microbatches, |_, _| {}).expect("reference run");
    let opts = common::micro_options(&format!("pipe-{name}"), 4, 8, 3);
    let layout = Layout {
        pp,
        ep: 1,
        schedule: kind,
        microbatches,
        wire: Wire::F32,
        compute: Default::default(),
    };
    let got = formation::train_threads(&opts, &layout, |_, _| {}).expect("pipelined run");
    println!(
        "{kind} pp={pp} microbatches={microbatches}: loss {} vs {}, sha {} vs {}",
        got.final_loss, want.final_loss, got.params_sha256, want.params_sha256
    );
    assert_eq!(
        got.final_loss.to_bits(),
        want.final_loss.to_bits(),
        "{name}: loss"
    );
    assert_eq!(
        got.params_sha256, want.params_sha256,
        "{name}: parameters after 3 steps"
    );
}

#[test]
fn one_f_one_b_matches_single_process_bitwise() {
    check(ScheduleKind::OneFOneB, 2, 4);
    check(ScheduleKind::OneFOneB, 4, 8);
}

#[test]
fn zb1p_matches_single_process_bitwise() {
    check(ScheduleKind::Zb1p, 2, 4);
    check(ScheduleKind::Zb1p, 3, 8);
}

#[test]
fn dualpipe_matches_single_process_bitwise() {
    check(ScheduleKind::DualPipe, 2, 4);
    check(ScheduleKind::DualPipe, 4, 8);
}

#[test]
fn dualpipev_matches_single_process_bitwise() {
    check(ScheduleKind::DualPipeV, 1, 2);
    check(ScheduleKind::DualPipeV, 2, 8);
}

#[test]
fn one_microbatch_on_one_rank_is_the_plain_trainer() {
    let opts = common::micro_options("plain", 2, 4, 3);
    let want = trainer::train(&opts, |_, _| {}).expect("plain run");
    let opts = common::micro_options("plain-formation", 2, 4, 3);
    let got = formation::train(&opts, &Layout::default(), None, |_, _| {}).expect("formation");
    assert_eq!(got.params_sha256, want.params_sha256);
}

#[test]
fn lossy_wires_train_close_to_the_f32_wire() {
    let opts = common::micro_options("wire-ref", 4, 8, 3);
    let want = trainer::train_microbatched(&opts, 4, |_, _| {}).expect("reference run");
    for wire in [Wire::Bf16, Wire::Fp8] {
        let opts = common::micro_options(&format!("wire-{wire}"), 4, 8, 3);
        let layout = Layout {
            pp: 2,
            ep: 1,
            schedule: ScheduleKind::DualPipe,
            microbatches: 4,
            wire,
            compute: Default::default(),
        };
        let got = formation::train_threads(&opts, &layout, |_, _| {}).expect("lossy-wire run");
        println!("{wire}: loss {} vs f32 {}", got.final_loss, want.final_loss);
        assert!((got.final_loss - want.final_loss).abs() < 1e-2, "{wire}");
        assert_ne!(
            got.params_sha256, want.params_sha256,
            "{wire} rounds something"
        );
    }
}
