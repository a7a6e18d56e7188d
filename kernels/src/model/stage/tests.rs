//! Tests of pipeline stages: the partition, which stage holds which tensor, and staged steps
//! against the whole-model reference, bit for bit.
use super::*;
use crate::model::config::RunConfig;
use crate::rng::Rng;

use crate::model::experts::LocalExpertGroups;

fn micro() -> DeepSeekV3 {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/micro.toml");
    let cfg = RunConfig::load(std::path::Path::new(path)).expect("micro config");
    DeepSeekV3::new(&cfg.model, 0.02, 7)
}

fn batch(model: &DeepSeekV3, b: usize, t: usize, seed: u64) -> Batch {
    let mut rng = Rng::stream(seed, "stage-test-batch");
    let v = model.cfg.vocab_size as u64;
    let w: Vec<u32> = (0..b * (t + 1))
        .map(|_| (rng.next_u64() % v) as u32)
        .collect();
    Batch::from_windows(&w, b, t)
}

#[test]
fn partition_is_contiguous_and_covers() {
    assert_eq!(partition(4, 2), vec![0..2, 2..4]);
    assert_eq!(partition(5, 3), vec![0..2, 2..4, 4..5]);
    assert_eq!(partition(2, 4), vec![0..1, 1..2, 2..2, 2..2]);
    assert_eq!(partition(3, 1), vec![0..3]);
}

#[test]
fn stages_hold_each_tensor_once_except_the_shared_embedding() {
    let model = micro();
    for s in 1..=4 {
        let stages = Stage::split(&model, s);
        let mut count = vec![0; model.params.len()];
        for st in &stages {
            for g in &st.global {
                count[g.0] += 1;
            }
        }
        for (i, c) in count.iter().enumerate() {
            let want = if ParamId(i) == model.embed && s > 1 {
                2
            } else {
                1
            };
            assert_eq!(*c, want, "{} with {s} stages", model.params.names[i]);
        }
    }
}

#[test]
fn owners_cover_every_tensor_once() {
    let model = micro();
    for s in 1..=4 {
        let owners = owners(&model, s);
        assert_eq!(owners.len(), s);
        let mut all: Vec<usize> = owners.concat();
        all.sort_unstable();
        assert_eq!(
            all,
            (0..model.params.len()).collect::<Vec<_>>(),
            "{s} stages"
        );
        // the embedding belongs to the first stage; the head to the last
        assert!(owners[0].contains(&model.embed.0));
        let head = model
            .params
            .names
            .iter()
            .position(|n| n == "lm_head.weight");
        assert!(owners[s - 1].contains(&head.unwrap()));
    }
}

/// Pipelined by hand (stage by stage, W deferred and out of micro-batch order) equals the
/// reference bit for bit.
#[test]
fn staged_step_matches_reference_bitwise() {
    let model = micro();
    let full = batch(&model, 4, 8, 3);
    let mbs = split_batch(&full, 4).unwrap();
    let mut want = model.params.zeros_like();
    let ref_stats = forward_backward_microbatches(&model, &mbs, 0.3, &mut want);
    for (s, ep) in [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2)] {
        let mut runners: Vec<StageRunner> = Stage::split(&model, s)
            .into_iter()
            .map(|st| {
                let layers = st.layers.clone();
                let mut r = StageRunner::new(st, 0.3, mbs.len());
                if ep > 1 {
                    r.set_experts(Box::new(LocalExpertGroups::new(&model, layers, ep)));
                }
                r
            })
            .collect();
        let mut stats = vec![vec![StageStats::default(); s]; mbs.len()];
        // forwards of all micro-batches, then backwards in reverse micro-batch order, W last
        let mut acts: Vec<Option<Vec<f32>>> = vec![None; mbs.len()];
        for (i, b) in mbs.iter().enumerate() {
            let mut x = None;
            for (k, r) in runners.iter_mut().enumerate() {
                let (y, st) = r.forward(i, b, x);
                stats[i][k] = st;
                x = y;
            }
            acts[i] = x;
        }
        for i in (0..mbs.len()).rev() {
            let mut dy = None;
            for r in runners.iter_mut().rev() {
                dy = r.backward_input(i, dy);
            }
        }
        for i in (0..mbs.len()).rev() {
            for r in runners.iter_mut() {
                r.backward_weight(i);
            }
        }
        let taken: Vec<GradSums> = runners.iter_mut().map(|r| r.take_grads()).collect();
        let parts = runners
            .iter()
            .zip(taken)
            .map(|(r, sums)| StageGrads {
                stage: &r.stage,
                sums,
            })
            .collect();
        let got = reduce(&model.params, parts, mbs.len()).unwrap();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                a.data == b.data,
                "{} differs with {s} stages, ep {ep}",
                model.params.names[i]
            );
        }
        for (i, st) in stats.iter().enumerate() {
            let c = StageStats::combine(st);
            assert_eq!(c.loss.to_bits(), ref_stats[i].loss.to_bits());
            assert_eq!(c.objective.to_bits(), ref_stats[i].objective.to_bits());
            assert_eq!(c.loads, ref_stats[i].loads);
        }
    }
}

/// DualPipe's split: one copy of each stage runs the first half of the micro-batches, a
/// second copy the other half, each copy's W in order. Their sums reduce to the reference's
/// bits; a copy that skipped a micro-batch's W is refused by name.
#[test]
fn two_copies_per_stage_reduce_to_the_reference() {
    let model = micro();
    let full = batch(&model, 4, 8, 5);
    let mbs = split_batch(&full, 4).unwrap();
    let mut want = model.params.zeros_like();
    forward_backward_microbatches(&model, &mbs, 0.3, &mut want);
    let s = 2;
    // copies[lane][stage]
    let mut lanes: Vec<Vec<StageRunner>> = (0..2)
        .map(|_| {
            Stage::split(&model, s)
                .into_iter()
                .map(|st| StageRunner::new(st, 0.3, mbs.len()))
                .collect()
        })
        .collect();
    for (lane, runners) in lanes.iter_mut().enumerate() {
        for i in half_range(lane, mbs.len()) {
            let mut x = None;
            for r in runners.iter_mut() {
                x = r.forward(i, &mbs[i], x).0;
            }
            let mut dy = None;
            for r in runners.iter_mut().rev() {
                dy = r.backward(i, dy);
            }
        }
    }
    let parts: Vec<StageGrads> = lanes
        .iter_mut()
        .flat_map(|rs| rs.iter_mut())
        .map(|r| StageGrads {
            sums: r.take_grads(),
            stage: &r.stage,
        })
        .collect();
    let got = reduce(&model.params, parts, mbs.len()).unwrap();
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(a.data == b.data, "{} differs", model.params.names[i]);
    }
    // the reverse lane without micro-batch 3's W: refused, nothing summed
    let mut runners: Vec<StageRunner> = Stage::split(&model, 1)
        .into_iter()
        .map(|st| StageRunner::new(st, 0.3, mbs.len()))
        .collect();
    for (i, b) in mbs.iter().enumerate().take(3) {
        runners[0].forward(i, b, None);
        runners[0].backward(i, None);
    }
    let parts = vec![StageGrads {
        sums: runners[0].take_grads(),
        stage: &runners[0].stage,
    }];
    let err = reduce(&model.params, parts, mbs.len()).unwrap_err();
    assert!(err.contains("only up to 3"), "{err}");
}

/// W's order within a step: per half in micro-batch order, an early W waits and runs with its
/// predecessor; a second W and a micro-batch out of range are refused.
#[test]
fn half_order_releases_each_half_in_micro_batch_order() {
    // 5 micro-batches: halves 0..3 and 3..5
    let mut o = HalfOrder::new(5);
    assert_eq!(o.arrive(2, 'c').unwrap(), vec![]);
    assert_eq!(o.arrive(4, 'e').unwrap(), vec![]);
    assert_eq!(o.waiting().collect::<Vec<_>>(), vec![2, 4]);
    assert_eq!(o.arrive(0, 'a').unwrap(), vec![(0, 'a')]);
    assert_eq!(o.arrive(3, 'd').unwrap(), vec![(3, 'd'), (4, 'e')]);
    assert_eq!(o.arrive(1, 'b').unwrap(), vec![(1, 'b'), (2, 'c')]);
    assert_eq!((o.next(0), o.next(1)), (3, 5));
    assert!(o.arrive(1, 'x').unwrap_err().contains("ran twice"));
    assert!(o.arrive(5, 'x').unwrap_err().contains("micro-batch 5 of 5"));
    let mut o = HalfOrder::new(4);
    o.arrive(3, ()).unwrap();
    assert!(o.arrive(3, ()).unwrap_err().contains("ran twice"));
}
