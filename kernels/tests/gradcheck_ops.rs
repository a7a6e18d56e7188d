//! Finite-difference checks of every op's backward_input and backward_weight. Each op's output y
//! is reduced to L = Σ r⊙y with a fixed random r, so dL/dy = r.

mod common;

use common::{check_directional, check_directional_piecewise, dot, random};
use kernels::ops::moe_dispatch::{self, DispatchPlan};
use kernels::ops::moe_gate::{self, RouteRule};
use kernels::ops::rope::RopeTable;
use kernels::ops::{attention, balance, cross_entropy, embedding, linear, rmsnorm, rope, swiglu};
use kernels::rng::Rng;

const EPS: f32 = 1e-2;
const TOL: f64 = 1e-2;

#[test]
fn linear_input_and_weight() {
    let mut rng = Rng::new(1);
    let (n, i, o) = (5, 7, 3);
    let x = random(n * i, 1.0, &mut rng);
    let w = random(o * i, 0.5, &mut rng);
    let r = random(n * o, 1.0, &mut rng);
    let fwd = |x: &[f32], w: &[f32]| {
        let mut y = vec![0.0; n * o];
        linear::forward(&mut y, x, w, n, i, o);
        dot(&y, &r)
    };
    let mut dx = vec![0.0; n * i];
    linear::backward_input(&mut dx, &r, &w, n, i, o, false);
    check_directional(
        "linear.backward_input",
        &x,
        &dx,
        |v| fwd(v, &w),
        EPS,
        TOL,
        1,
    );
    let mut dw = vec![0.0; o * i];
    linear::backward_weight(&mut dw, &r, &x, n, i, o);
    check_directional(
        "linear.backward_weight",
        &w,
        &dw,
        |v| fwd(&x, v),
        EPS,
        TOL,
        2,
    );
}

#[test]
fn embedding_weight() {
    let mut rng = Rng::new(2);
    let (v, d) = (6, 4);
    let ids = [1u32, 3, 1, 5, 0];
    let table = random(v * d, 1.0, &mut rng);
    let r = random(ids.len() * d, 1.0, &mut rng);
    let mut dt = vec![0.0; v * d];
    embedding::backward_weight(&mut dt, &ids, &r, d);
    let f = |t: &[f32]| {
        let mut out = vec![0.0; ids.len() * d];
        embedding::forward(&mut out, &ids, t, d);
        dot(&out, &r)
    };
    check_directional("embedding.backward_weight", &table, &dt, f, EPS, TOL, 3);
}

#[test]
fn rmsnorm_input_and_weight() {
    let mut rng = Rng::new(3);
    let (n, d) = (4, 9);
    let x = random(n * d, 1.0, &mut rng);
    let w: Vec<f32> = (0..d).map(|_| 1.0 + 0.3 * rng.normal()).collect();
    let r = random(n * d, 1.0, &mut rng);
    let fwd = |x: &[f32], w: &[f32]| {
        let mut y = vec![0.0; n * d];
        let mut rs = vec![0.0; n];
        rmsnorm::forward(&mut y, &mut rs, x, w, d, 1e-6);
        dot(&y, &r)
    };
    let mut y = vec![0.0; n * d];
    let mut rstd = vec![0.0; n];
    rmsnorm::forward(&mut y, &mut rstd, &x, &w, d, 1e-6);
    let mut dx = vec![0.0; n * d];
    rmsnorm::backward_input(&mut dx, &r, &x, &rstd, &w, d, false);
    check_directional(
        "rmsnorm.backward_input",
        &x,
        &dx,
        |v| fwd(v, &w),
        EPS,
        TOL,
        4,
    );
    let mut dw = vec![0.0; d];
    rmsnorm::backward_weight(&mut dw, &r, &x, &rstd, d);
    check_directional(
        "rmsnorm.backward_weight",
        &w,
        &dw,
        |v| fwd(&x, v),
        EPS,
        TOL,
        5,
    );
}

#[test]
fn rope_input() {
    let mut rng = Rng::new(4);
    let (rows, stride, off, dim) = (6, 10, 2, 6);
    let table = RopeTable::new(dim, 10000.0, 8, None);
    let pos: Vec<usize> = (0..rows).map(|i| (i * 3) % 8).collect();
    let x = random(rows * stride, 1.0, &mut rng);
    let r = random(rows * stride, 1.0, &mut rng);
    let f = |x: &[f32]| {
        let mut y = x.to_vec();
        rope::forward(&mut y, stride, off, &pos, &table);
        dot(&y, &r)
    };
    let mut dx = r.clone();
    rope::backward_input(&mut dx, stride, off, &pos, &table);
    check_directional("rope.backward_input", &x, &dx, f, EPS, TOL, 6);
    // interleaved pairs: position 1 rotates (x0, x1) by θ0 = 1 rad
    let mut v = vec![1.0, 0.0];
    rope::forward(&mut v, 2, 0, &[1], &RopeTable::new(2, 10000.0, 2, None));
    assert!((v[0] - 1f32.cos()).abs() < 1e-6 && (v[1] - 1f32.sin()).abs() < 1e-6);
}

#[test]
fn attention_inputs() {
    let mut rng = Rng::new(5);
    let (bh, t, dqk, dv) = (2, 5, 4, 3);
    let q = random(bh * t * dqk, 1.0, &mut rng);
    let k = random(bh * t * dqk, 1.0, &mut rng);
    let v = random(bh * t * dv, 1.0, &mut rng);
    let r = random(bh * t * dv, 1.0, &mut rng);
    let scale = 0.5;
    let fwd = |q: &[f32], k: &[f32], v: &[f32]| {
        let mut o = vec![0.0; bh * t * dv];
        let mut p = vec![0.0; bh * t * t];
        attention::forward(&mut o, &mut p, q, k, v, t, dqk, dv, scale);
        dot(&o, &r)
    };
    let mut o = vec![0.0; bh * t * dv];
    let mut p = vec![0.0; bh * t * t];
    attention::forward(&mut o, &mut p, &q, &k, &v, t, dqk, dv, scale);
    // causality: the first token's output is exactly its own value
    assert_eq!(&o[..dv], &v[..dv]);
    let (mut dq, mut dk, mut dvv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    attention::backward_input(
        &mut dq, &mut dk, &mut dvv, &r, &p, &q, &k, &v, t, dqk, dv, scale,
    );
    check_directional("attention.dq", &q, &dq, |x| fwd(x, &k, &v), EPS, TOL, 7);
    check_directional("attention.dk", &k, &dk, |x| fwd(&q, x, &v), EPS, TOL, 8);
    check_directional("attention.dv", &v, &dvv, |x| fwd(&q, &k, x), EPS, TOL, 9);
}

#[test]
fn swiglu_inputs() {
    let mut rng = Rng::new(6);
    let n = 20;
    let a = random(n, 2.0, &mut rng);
    let b = random(n, 1.0, &mut rng);
    let r = random(n, 1.0, &mut rng);
    let fwd = |a: &[f32], b: &[f32]| {
        let mut h = vec![0.0; n];
        swiglu::forward(&mut h, a, b);
        dot(&h, &r)
    };
    let (mut da, mut db) = (vec![0.0; n], vec![0.0; n]);
    swiglu::backward_input(&mut da, &mut db, &r, &a, &b);
    check_directional("swiglu.da", &a, &da, |x| fwd(x, &b), EPS, TOL, 10);
    check_directional("swiglu.db", &b, &db, |x| fwd(&a, x), EPS, TOL, 11);
}

#[test]
fn cross_entropy_logits() {
    let mut rng = Rng::new(7);
    let (n, v) = (4, 11);
    let logits = random(n * v, 2.0, &mut rng);
    let targets = [3u32, 0, 10, 3];
    let mut d = vec![0.0; n * v];
    cross_entropy::backward_input(&mut d, &logits, &targets, v, 0.25);
    check_directional(
        "cross_entropy",
        &logits,
        &d,
        |x| cross_entropy::forward(x, &targets, v) * 0.25,
        EPS,
        TOL,
        12,
    );
    // uniform logits cost ln V per token
    let l = cross_entropy::forward(&vec![0.0; v], &[2], v);
    assert!((l - (v as f64).ln()).abs() < 1e-6);
}

#[test]
fn router_and_sigmoid() {
    let mut rng = Rng::new(8);
    let (n, e) = (6, 8);
    let rule = RouteRule {
        n_group: 4,
        topk_group: 2,
        k: 3,
        scale: 2.5,
        normalize: true,
    };
    let logits = random(n * e, 1.0, &mut rng);
    let bias = random(e, 0.1, &mut rng);
    let mut s = vec![0.0; n * e];
    moe_gate::sigmoid_forward(&mut s, &logits);
    let base = moe_gate::forward(&s, &bias, &rule);
    let r = random(n * rule.k, 1.0, &mut rng);
    let f = |lg: &[f32]| {
        let mut s = vec![0.0; n * e];
        moe_gate::sigmoid_forward(&mut s, lg);
        let routing = moe_gate::forward(&s, &bias, &rule);
        (routing.experts == base.experts).then(|| dot(&routing.weights, &r))
    };
    let mut ds = vec![0.0; n * e];
    moe_gate::backward_input(&mut ds, &r, &s, &base, &rule);
    let mut dl = vec![0.0; n * e];
    moe_gate::sigmoid_backward_input(&mut dl, &ds, &s);
    check_directional_piecewise("moe_gate.backward_input", &logits, &dl, f, EPS, TOL, 13);
}

#[test]
fn dispatch_and_combine() {
    let mut rng = Rng::new(9);
    let (n, e, k, d) = (5, 4, 2, 3);
    let routing = moe_gate::Routing {
        k,
        experts: vec![0, 2, 1, 2, 3, 0, 2, 1, 0, 3],
        weights: random(n * k, 1.0, &mut rng),
    };
    let plan = DispatchPlan::new(&routing, e);
    assert_eq!(plan.loads(), vec![3, 2, 3, 2]);
    let x = random(n * d, 1.0, &mut rng);
    let r = random(plan.rows() * d, 1.0, &mut rng);
    let f = |x: &[f32]| {
        let mut xe = vec![0.0; plan.rows() * d];
        moe_dispatch::dispatch_forward(&mut xe, x, &plan, d);
        dot(&xe, &r)
    };
    let mut dx = vec![0.0; n * d];
    moe_dispatch::dispatch_backward_input(&mut dx, &r, &plan, d);
    check_directional("dispatch.backward_input", &x, &dx, f, EPS, TOL, 14);
    let ye = random(plan.rows() * d, 1.0, &mut rng);
    let ro = random(n * d, 1.0, &mut rng);
    let fwd = |ye: &[f32], w: &[f32]| {
        let mut out = vec![0.0; n * d];
        moe_dispatch::combine_forward(&mut out, ye, w, k, &plan, d);
        dot(&out, &ro)
    };
    let mut dye = vec![0.0; ye.len()];
    let mut dw = vec![0.0; n * k];
    moe_dispatch::combine_backward_input(
        &mut dye,
        &mut dw,
        &ro,
        &ye,
        &routing.weights,
        k,
        &plan,
        d,
    );
    check_directional(
        "combine.d_expert_out",
        &ye,
        &dye,
        |v| fwd(v, &routing.weights),
        EPS,
        TOL,
        15,
    );
    check_directional(
        "combine.d_weights",
        &routing.weights,
        &dw,
        |v| fwd(&ye, v),
        EPS,
        TOL,
        16,
    );
}

#[test]
fn sequence_balance_loss() {
    let mut rng = Rng::new(10);
    let (t, e, k) = (6, 8, 2);
    let s: Vec<f32> = (0..t * e).map(|_| 0.1 + 0.8 * rng.uniform()).collect();
    let experts: Vec<u32> = (0..t * k).map(|i| ((i * 3) % e) as u32).collect();
    let mut ds = vec![0.0; t * e];
    balance::sequence_loss_backward_input(&mut ds, &s, &experts, k, e, 0.5);
    check_directional(
        "balance.backward_input",
        &s,
        &ds,
        |x| balance::sequence_loss_forward(x, &experts, k, e, 0.5),
        EPS,
        TOL,
        17,
    );
}
