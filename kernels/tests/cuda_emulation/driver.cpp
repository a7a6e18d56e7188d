// Runs one CUDA C kernel family of kernels/src/device/cuda on the CPU through shim.h, with the
// grid and block of the Rust launch wrappers (kernels/src/device/cuda/launch/*.rs: 256 threads a
// block; one block per row, per column tile, grid-stride or attention tiles). Called by
// kernels/tests/cuda_emulation.rs as `driver <op> <dir> <args…>`: inputs are raw little-endian
// files <dir>/<name>.bin written by the test, outputs are written the same way; float arguments
// come as their IEEE bits (decimal u32) so that they cross exactly. The FP8 quantisers include
// cuda_fp8.h, which here is include/cuda_fp8.h: a host stand-in for its one conversion.
#include "shim.h"

#include <cstdio>
#include <cstdlib>
#include <string>

#include "../../src/device/cuda/common.cuh"
#include "../../src/device/cuda/adamw.cu"
#include "../../src/device/cuda/attention.cu"
#include "../../src/device/cuda/attention_gemm.cu"
#include "../../src/device/cuda/cross_entropy.cu"
#include "../../src/device/cuda/embedding.cu"
#include "../../src/device/cuda/grad_norm.cu"
#include "../../src/device/cuda/rmsnorm.cu"
#include "../../src/device/cuda/rope.cu"
#include "../../src/device/cuda/swiglu.cu"
#include "../../src/device/cuda/tensor.cu"
#include "../../src/device/cuda/moe.cu"
#include "../../src/device/cuda/fp8_gemm.cu"
#include "../../src/device/cuda/fp8_pack.cu"
#include "../../src/device/cuda/fp8_grouped.cu"
// fp8_quant.cu's TILE (128) is not attention.cu's (64): each source is compiled on its own by
// NVRTC, so here the quantisers get theirs and the driver keeps attention's
#pragma push_macro("TILE")
#undef TILE
#include "../../src/device/cuda/fp8_quant.cu"
#undef TILE
#pragma pop_macro("TILE")
#include "../../src/device/cuda/router.cu"

static const unsigned BLOCK = 256;
static std::string dir;
static char** args;

template <class T>
static std::vector<T> load(const char* name) {
    std::string p = dir + "/" + name + ".bin";
    FILE* f = fopen(p.c_str(), "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", p.c_str());
        exit(2);
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    std::vector<T> v(n / sizeof(T));
    if (fread(v.data(), 1, n, f) != (size_t)n) exit(2);
    fclose(f);
    return v;
}

template <class T>
static void save(const char* name, const std::vector<T>& v) {
    std::string p = dir + "/" + name + ".bin";
    FILE* f = fopen(p.c_str(), "wb");
    if (!f || fwrite(v.data(), sizeof(T), v.size(), f) != v.size()) exit(2);
    fclose(f);
}

static long long arg(int i) { return strtoll(args[i], nullptr, 10); }
static float farg(int i) {
    unsigned u = (unsigned)strtoul(args[i], nullptr, 10);
    return __uint_as_float(u);
}
static unsigned cdiv(long long a, long long b) { return (unsigned)((a + b - 1) / b); }
// launch/mod.rs: grid_stride — one thread per element up to 2^20 blocks, never an empty grid.
static dim3 grid_stride(long long n) {
    long long b = (n + BLOCK - 1) / BLOCK;
    return {(unsigned)(b < 1 ? 1 : b > (1 << 20) ? (1 << 20) : b), 1, 1};
}

int main(int argc, char** argv) {
    if (argc < 3) return 2;
    const std::string op = argv[1];
    dir = argv[2];
    args = argv;
    using emu::launch;
    if (op == "rmsnorm") {  // rows d eps_bits accumulate
        int rows = arg(3), d = arg(4), acc = arg(6);
        float eps = farg(5);
        auto x = load<float>("x"), w = load<float>("w"), dy = load<float>("dy");
        auto dx = load<float>("dx"), dw = load<float>("dw");
        std::vector<float> y(x.size()), rstd(rows), rs = load<float>("rstd");
        launch({(unsigned)rows, 1, 1}, BLOCK, [&] { rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), d, eps); });
        launch({(unsigned)rows, 1, 1}, BLOCK,
               [&] { rmsnorm_backward_input(dx.data(), dy.data(), x.data(), rs.data(), w.data(), d, acc); });
        launch({cdiv(d, RBW_COLS), 1, 1}, RBW_THREADS,
               [&] { rmsnorm_backward_weight(dw.data(), dy.data(), x.data(), rs.data(), rows, d); });
        save("y", y), save("rstd_out", rstd), save("dx", dx), save("dw", dw);
    } else if (op == "swiglu") {
        auto a = load<float>("a"), b = load<float>("b"), dh = load<float>("dh");
        long long n = a.size();
        std::vector<float> h(n), da(n), db(n);
        launch(grid_stride(n), BLOCK, [&] { swiglu_forward(h.data(), a.data(), b.data(), n); });
        launch(grid_stride(n), BLOCK,
               [&] { swiglu_backward_input(da.data(), db.data(), dh.data(), a.data(), b.data(), n); });
        save("h", h), save("da", da), save("db", db);
    } else if (op == "rope") {  // stride offset half backward
        int stride = arg(3), offset = arg(4), half = arg(5), backward = arg(6);
        auto x = load<float>("x"), c = load<float>("cos"), s = load<float>("sin");
        auto pos = load<u32>("pos");
        int rows = pos.size();
        launch(grid_stride((long long)rows * half), BLOCK, [&] {
            if (backward)
                rope_backward_input(x.data(), stride, offset, pos.data(), c.data(), s.data(), half, rows);
            else
                rope_forward(x.data(), stride, offset, pos.data(), c.data(), s.data(), half, rows);
        });
        save("x_out", x);
    } else if (op == "cross_entropy") {  // v scale_bits
        int v = arg(3);
        float scale = farg(4);
        auto logits = load<float>("logits");
        auto targets = load<u32>("targets");
        long long rows = targets.size();
        std::vector<float> loss(rows), d(logits.size());
        std::vector<double> total(1);
        launch({(unsigned)rows, 1, 1}, BLOCK,
               [&] { cross_entropy_forward_rows(loss.data(), logits.data(), targets.data(), v); });
        launch({1, 1, 1}, CE_SUM_THREADS, [&] { cross_entropy_sum(total.data(), loss.data(), rows); });
        launch({(unsigned)rows, 1, 1}, BLOCK,
               [&] { cross_entropy_backward_input(d.data(), logits.data(), targets.data(), v, scale); });
        save("loss", loss), save("total", total), save("dlogits", d);
    } else if (op == "ce_sum") {  // the cross-entropy total alone, over many rows
        auto loss = load<float>("loss");
        std::vector<double> total(1);
        launch({1, 1, 1}, CE_SUM_THREADS,
               [&] { cross_entropy_sum(total.data(), loss.data(), (long long)loss.size()); });
        save("total", total);
    } else if (op == "embedding") {  // d
        int d = arg(3);
        auto table = load<float>("table"), dout = load<float>("dout"), dtable = load<float>("dtable");
        auto ids = load<u32>("ids");
        // the rows sorted by id, as the Rust wrapper makes them (ops::embedding::rows_by_id)
        auto order = load<u32>("order"), starts = load<u32>("starts"), seg_ids = load<u32>("seg_ids");
        long long n = ids.size();
        std::vector<float> out(n * d);
        launch(grid_stride(n * d), BLOCK, [&] { embedding_forward(out.data(), ids.data(), table.data(), n, d); });
        launch({(unsigned)seg_ids.size(), cdiv(d, BLOCK), 1}, BLOCK, [&] {
            embedding_backward_weight(dtable.data(), order.data(), starts.data(), seg_ids.data(), dout.data(), d);
        });
        save("out", out), save("dtable_out", dtable);
    } else if (op == "adamw") {  // bf16 grad_scale b1 b2 bc1 bc2 eps lr wd (float bits)
        int bf16 = arg(3);
        float gs = farg(4);
        StepConsts c{farg(5), farg(6), farg(7), farg(8), farg(9), farg(10), farg(11)};
        auto p = load<float>("p"), g = load<float>("g");
        long long n = p.size();
        if (bf16) {
            auto m = load<u16>("m"), v = load<u16>("v");
            launch(grid_stride(n), BLOCK,
                   [&] { adamw_step_bf16(p.data(), g.data(), m.data(), v.data(), n, gs, c); });
            save("m_out", m), save("v_out", v);
        } else {
            auto m = load<float>("m"), v = load<float>("v");
            launch(grid_stride(n), BLOCK,
                   [&] { adamw_step_f32(p.data(), g.data(), m.data(), v.data(), n, gs, c); });
            save("m_out", m), save("v_out", v);
        }
        save("p_out", p), save("g_out", g);
    } else if (op == "adamw_many") {  // bf16 grad_scale_bits tensors (p0 g0 m0 v0 …, consts)
        int bf16 = arg(3);
        float gs = farg(4);
        int tensors = arg(5);
        auto consts = load<float>("consts");
        std::vector<std::vector<float>> ps, gs_;
        std::vector<std::vector<float>> mf, vf;
        std::vector<std::vector<u16>> mb, vb;
        std::vector<unsigned long long> pp, gp, mp, vp;
        std::vector<long long> lens, firsts;
        long long chunks = 0;
        auto name = [](const char* what, int i) { return what + std::to_string(i); };
        for (int i = 0; i < tensors; i++) {
            ps.push_back(load<float>(name("p", i).c_str()));
            gs_.push_back(load<float>(name("g", i).c_str()));
            if (bf16) {
                mb.push_back(load<u16>(name("m", i).c_str()));
                vb.push_back(load<u16>(name("v", i).c_str()));
            } else {
                mf.push_back(load<float>(name("m", i).c_str()));
                vf.push_back(load<float>(name("v", i).c_str()));
            }
        }
        for (int i = 0; i < tensors; i++) {  // as launch/optim.rs: adamw_many_dev
            pp.push_back((unsigned long long)ps[i].data());
            gp.push_back((unsigned long long)gs_[i].data());
            mp.push_back(bf16 ? (unsigned long long)mb[i].data() : (unsigned long long)mf[i].data());
            vp.push_back(bf16 ? (unsigned long long)vb[i].data() : (unsigned long long)vf[i].data());
            lens.push_back((long long)ps[i].size());
            firsts.push_back(chunks);
            chunks += ((long long)ps[i].size() + ADAM_CHUNK - 1) / ADAM_CHUNK;
        }
        launch({(unsigned)chunks, 1, 1}, BLOCK, [&] {
            if (bf16)
                adamw_many_bf16(pp.data(), gp.data(), mp.data(), vp.data(), lens.data(), firsts.data(), tensors,
                                consts.data(), gs);
            else
                adamw_many_f32(pp.data(), gp.data(), mp.data(), vp.data(), lens.data(), firsts.data(), tensors,
                               consts.data(), gs);
        });
        for (int i = 0; i < tensors; i++) {
            save(name("p_out", i).c_str(), ps[i]), save(name("g_out", i).c_str(), gs_[i]);
            if (bf16)
                save(name("m_out", i).c_str(), mb[i]), save(name("v_out", i).c_str(), vb[i]);
            else
                save(name("m_out", i).c_str(), mf[i]), save(name("v_out", i).c_str(), vf[i]);
        }
    } else if (op == "grad_norm") {  // tensors (x0.bin …), as launch/optim.rs: grad_norm_dev
        int tensors = arg(3);
        std::vector<std::vector<float>> xs;
        std::vector<unsigned long long> ptrs;
        std::vector<long long> lens, firsts;
        long long chunks = 0;
        for (int i = 0; i < tensors; i++) {
            xs.push_back(load<float>(("x" + std::to_string(i)).c_str()));
        }
        for (int i = 0; i < tensors; i++) {
            long long n = xs[i].size();
            ptrs.push_back((unsigned long long)xs[i].data());
            lens.push_back(n);
            firsts.push_back(chunks);
            chunks += (n + NORM_CHUNK - 1) / NORM_CHUNK;
        }
        std::vector<double> sums(chunks);
        if (!sums.empty())
            launch({(unsigned)sums.size(), 1, 1}, NORM_THREADS, [&] {
                grad_norm_chunks(sums.data(), ptrs.data(), lens.data(), firsts.data(), tensors);
            });
        save("chunk_sums", sums);
    } else if (op == "attention") {  // bh t dqk dv scale_bits
        int bh = arg(3), t = arg(4), dqk = arg(5), dv = arg(6);
        float scale = farg(7);
        auto q = load<float>("q"), k = load<float>("k"), v = load<float>("v"), d_o = load<float>("do");
        std::vector<float> o((size_t)bh * t * dv), lse((size_t)bh * t), delta((size_t)bh * t);
        std::vector<float> dq(q.size()), dk(k.size()), dvo(v.size());
        const dim3 by_query{cdiv(t, TILE), (unsigned)bh, 1}, by_key{cdiv(t, KEY_TILE_DKV), (unsigned)bh, 1};
        launch(by_query, BLOCK,
               [&] { attention_forward(o.data(), lse.data(), q.data(), k.data(), v.data(), t, dqk, dv, scale); });
        // launch/attention.rs: a warp per row, ⌈bh·t / 8⌉ blocks clamped to [1, 2^20]
        long long rows = (long long)bh * t;
        launch(grid_stride(rows * 32), BLOCK,
               [&] { attention_backward_dot(delta.data(), d_o.data(), o.data(), rows, dv); });
        launch(by_key, BLOCK, [&] {
            attention_backward_dkdv(dk.data(), dvo.data(), d_o.data(), lse.data(), delta.data(), q.data(),
                                    k.data(), v.data(), t, dqk, dv, scale);
        });
        launch(by_query, BLOCK, [&] {
            attention_backward_dq(dq.data(), d_o.data(), lse.data(), delta.data(), q.data(), k.data(), v.data(),
                                  t, dqk, dv, scale);
        });
        save("o", o), save("lse", lse), save("dq", dq), save("dk", dk), save("dv", dvo);
    } else if (op == "attention_rows") {  // bh t scale_bits (launch/attention.rs: a block per row)
        int bh = arg(3), t = arg(4);
        float scale = farg(5);
        auto p = load<float>("s"), dp = load<float>("dp");
        const long long rows = (long long)bh * t;
        std::vector<u16> p16(p.size()), ds16(p.size());
        launch({(unsigned)rows, 1, 1}, BLOCK,
               [&] { attention_softmax_rows(p.data(), p16.data(), rows, t, scale); });
        launch({(unsigned)rows, 1, 1}, BLOCK,
               [&] { attention_softmax_backward_rows(ds16.data(), dp.data(), p.data(), rows, t, scale); });
        save("p", p), save("p16", p16), save("ds16", ds16);
    } else if (op == "heads") {  // b t nh w (launch/tensor.rs: grid-stride over the output)
        int b = arg(3), t = arg(4), nh = arg(5), w = arg(6);
        auto x = load<float>("x"), xt = load<float>("xt");
        long long full = (long long)b * t * nh * w, part = (long long)b * t * w;
        std::vector<float> fwd(full), inv(full), bc(full), sum(part);
        launch(grid_stride(full), BLOCK, [&] { tensor_heads(fwd.data(), x.data(), b, t, nh, w, 0); });
        launch(grid_stride(full), BLOCK, [&] { tensor_heads(inv.data(), x.data(), b, t, nh, w, 1); });
        launch(grid_stride(full), BLOCK, [&] { tensor_broadcast_heads(bc.data(), xt.data(), b, t, nh, w); });
        launch(grid_stride(part), BLOCK, [&] { tensor_sum_heads(sum.data(), x.data(), b, t, nh, w); });
        save("fwd", fwd), save("inv", inv), save("bcast", bc), save("sum", sum);
    } else if (op == "copy_cols") {  // dst_w dst_off src_w src_off width acc
        int dw = arg(3), doff = arg(4), sw = arg(5), soff = arg(6), width = arg(7), acc = arg(8);
        auto dst = load<float>("dst"), src = load<float>("src");
        long long rows = dst.size() / dw;
        launch(grid_stride(rows * width), BLOCK, [&] {
            tensor_copy_cols(dst.data(), dw, doff, src.data(), sw, soff, width, rows, acc);
        });
        save("dst", dst);
    } else if (op == "elementwise") {  // dst_off src_off n acc (tensor_copy of b into a)
        long long doff = arg(3), soff = arg(4), n = arg(5);
        int acc = arg(6);
        auto a = load<float>("a"), b = load<float>("b"), s = load<float>("s");
        long long m = a.size();
        std::vector<float> sum(m), sig(m), dsig(m);
        launch(grid_stride(m), BLOCK, [&] { tensor_add(sum.data(), a.data(), b.data(), m); });
        launch(grid_stride(m), BLOCK, [&] { sigmoid_forward(sig.data(), a.data(), m); });
        launch(grid_stride(m), BLOCK, [&] { sigmoid_backward_input(dsig.data(), b.data(), s.data(), m); });
        std::vector<float> scaled(a);
        launch(grid_stride(m), BLOCK, [&] { tensor_scale(scaled.data(), 0.37f, m); });
        save("scaled", scaled);
        std::vector<u16> b16(m);
        launch(grid_stride(m), BLOCK, [&] { tensor_to_bf16(b16.data(), a.data(), m); });
        // launch/tensor.rs: tensor_to_bf16_batched, a's two halves read through their addresses
        // in reverse order (one z slice each)
        const long long half = m / 2;
        std::vector<u64> halves = {(u64)(a.data() + half), (u64)a.data()};
        std::vector<u16> b16b(2 * half);
        dim3 by_half = grid_stride(half);
        by_half.y = 2;
        launch(by_half, BLOCK, [&] { tensor_to_bf16_batched(b16b.data(), halves.data(), half); });
        save("bf16_batched", b16b);
        launch(grid_stride(n), BLOCK, [&] { tensor_copy(a.data(), doff, b.data(), soff, n, acc); });
        save("sum", sum), save("sig", sig), save("dsig", dsig), save("copy", a), save("bf16", b16);
    } else if (op == "moe") {  // k d (launch/tensor.rs: grid-stride; combine backward a block per row)
        int k = arg(3), d = arg(4);
        auto x = load<float>("x"), ye = load<float>("ye"), dout = load<float>("dout");
        auto dx = load<float>("dx"), dxe = load<float>("dxe"), out = load<float>("out");
        auto w = load<float>("weights");
        auto token = load<u32>("token"), slot = load<u32>("slot"), rot = load<u32>("rows_of_token");
        long long rows = token.size(), tokens = rot.size() / k;
        std::vector<float> xe(rows * d), dye(rows * d), dweights(tokens * k);
        launch(grid_stride(rows * d), BLOCK,
               [&] { moe_dispatch_forward(xe.data(), x.data(), token.data(), rows, d); });
        launch(grid_stride(tokens * d), BLOCK,
               [&] { moe_dispatch_backward_input(dx.data(), dxe.data(), rot.data(), tokens, k, d); });
        launch(grid_stride(tokens * d), BLOCK, [&] {
            moe_combine_forward(out.data(), ye.data(), w.data(), slot.data(), rot.data(), tokens, k, d);
        });
        launch({(unsigned)rows, 1, 1}, BLOCK, [&] {
            moe_combine_backward_input(dye.data(), dweights.data(), dout.data(), ye.data(), w.data(),
                                       token.data(), slot.data(), k, d);
        });
        save("xe", xe), save("dx", dx), save("out", out), save("dye", dye), save("dweights", dweights);
    } else if (op == "fp8_gemm") {  // m n k a_i a_k sa_kb sa_i sa_div b_j b_k sb_kb sb_j sb_div
        int m = arg(3), n = arg(4), k = arg(5);
        long long a_i = arg(6), a_k = arg(7), sa_kb = arg(8), sa_i = arg(9);
        int sa_div = arg(10);
        long long b_j = arg(11), b_k = arg(12), sb_kb = arg(13), sb_j = arg(14);
        int sb_div = arg(15);
        auto ac = load<u8>("a"), bc = load<u8>("b");
        auto as = load<float>("sa"), bs = load<float>("sb");
        std::vector<float> out((size_t)m * n);
        launch(grid_stride((long long)m * n), BLOCK, [&] {
            fp8_gemm_promoted(out.data(), m, n, k, ac.data(), a_i, a_k, as.data(), sa_kb, sa_i, sa_div,
                              bc.data(), b_j, b_k, bs.data(), sb_kb, sb_j, sb_div);
        });
        save("out", out);
    } else if (op == "fp8_grouped") {  // (problems with byte positions: fp8/grouped.rs)
        // launch/fp8_grouped.rs: one block of 128 threads per (problem, row0, col0) tile; the
        // positions become addresses in the loaded buffers
        auto problems = load<long long>("problems");
        auto tiles = load<int>("tiles");
        auto ac = load<u8>("a"), bc = load<u8>("b");
        auto as = load<float>("sa"), bs = load<float>("sb");
        auto out = load<float>("out");
        for (size_t p = 0; p < problems.size(); p += FG_FIELDS) {
            problems[p + 3] += (long long)ac.data();
            problems[p + 6] += (long long)as.data();
            problems[p + 10] += (long long)bc.data();
            problems[p + 13] += (long long)bs.data();
            problems[p + 17] += (long long)out.data();
        }
        launch({(unsigned)(tiles.size() / 3), 1, 1}, 128,
               [&] { fp8_grouped_gemm(problems.data(), tiles.data()); });
        save("out", out);
    } else if (op == "fp8_pack") {  // rows cols rs cs ld (the same gather of codes and scales)
        long long rows = arg(3), cols = arg(4), rs = arg(5), cs = arg(6), ld = arg(7);
        auto codes = load<u8>("codes");
        auto scales = load<float>("scales");
        std::vector<u8> pc((size_t)(rows * ld));
        std::vector<float> ps((size_t)(rows * ld));
        launch(grid_stride(rows * ld), BLOCK,
               [&] { fp8_pack_codes(pc.data(), codes.data(), rows, cols, rs, cs, ld); });
        launch(grid_stride(rows * ld), BLOCK,
               [&] { fp8_pack_scales(ps.data(), scales.data(), rows, cols, rs, cs, ld); });
        save("packed_codes", pc), save("packed_scales", ps);
    } else if (op == "fp8_quant") {  // rows cols layout (0: 1×128, 1: 128×1, 2: 128×128) ue8m0
        // launch/fp8.rs: fp8_quantize_dev's grids, then fp8_dequantize (grid-stride) on the codes
        int rows = arg(3), cols = arg(4), layout = arg(5), ue8m0 = arg(6);
        auto x = load<float>("x");
        const long long tr = cdiv(rows, 128), tc = cdiv(cols, 128);
        const long long ns = layout == 0 ? rows * tc : layout == 1 ? tr * cols : tr * tc;
        std::vector<u8> codes((size_t)rows * cols);
        std::vector<float> scales((size_t)ns), y((size_t)rows * cols);
        if (layout == 0) {
            launch({cdiv(rows * tc, BLOCK / 32), 1, 1}, BLOCK, [&] {
                fp8_quantize_1x128(x.data(), codes.data(), scales.data(), rows, cols, ue8m0);
            });
        } else if (layout == 1) {
            launch({cdiv(cols, BLOCK), (unsigned)tr, 1}, BLOCK, [&] {
                fp8_quantize_128x1(x.data(), codes.data(), scales.data(), rows, cols, ue8m0);
            });
        } else {
            launch({(unsigned)tc, (unsigned)tr, 1}, BLOCK, [&] {
                fp8_quantize_128x128(x.data(), codes.data(), scales.data(), rows, cols, ue8m0);
            });
        }
        const int gr = layout == 0 ? 1 : 128, gc = layout == 1 ? 1 : 128;
        launch(grid_stride((long long)rows * cols), BLOCK, [&] {
            fp8_dequantize(codes.data(), scales.data(), y.data(), rows, cols, gr, gc);
        });
        save("codes", codes), save("scales", scales), save("y", y);
    } else if (op == "fp8_quant_segmented") {  // cols ue8m0 (128×1 bands from the file "bands")
        // launch/fp8.rs: fp8_quantize_128x1_segmented, one thread per column of each band
        int cols = arg(3), ue8m0 = arg(4);
        auto x = load<float>("x");
        auto bands = load<int>("bands");
        const long long nb = bands.size() / 2;
        std::vector<u8> codes(x.size());
        std::vector<float> scales((size_t)(nb * cols));
        launch({cdiv(cols, BLOCK), (unsigned)nb, 1}, BLOCK, [&] {
            fp8_quantize_128x1_segmented(x.data(), codes.data(), scales.data(), bands.data(), cols,
                                         ue8m0);
        });
        save("codes", codes), save("scales", scales);
    } else if (op == "fp8_quant_batched") {  // rows cols matrices ue8m0 (128×128 blocks)
        // launch/fp8.rs: fp8_quantize_128x128_batched, one z slice per matrix, each read
        // through its own address
        int rows = arg(3), cols = arg(4), mats = arg(5), ue8m0 = arg(6);
        auto x = load<float>("x");
        const long long tr = cdiv(rows, 128), tc = cdiv(cols, 128), per = (long long)rows * cols;
        std::vector<u64> xs(mats);
        for (int z = 0; z < mats; z++) xs[z] = (u64)(x.data() + z * per);
        std::vector<u8> codes((size_t)(mats * per));
        std::vector<float> scales((size_t)(mats * tr * tc));
        launch({(unsigned)tc, (unsigned)tr, (unsigned)mats}, BLOCK, [&] {
            fp8_quantize_128x128_batched(xs.data(), codes.data(), scales.data(), rows, cols, ue8m0);
        });
        save("codes", codes), save("scales", scales);
    } else if (op == "route") {  // n e n_group topk_group k scale_bits normalize seq alpha_bits alpha_seq_bits
        int n = arg(3), e = arg(4), ng = arg(5), tg = arg(6), k = arg(7), norm = arg(9), seq = arg(10);
        float scale = farg(8), alpha = farg(11), alpha_seq = farg(12);
        int batch = n / seq;
        auto s = load<float>("s"), bias = load<float>("bias"), dw = load<float>("dweights");
        long long total = (long long)n * k;
        std::vector<u32> experts(total), counts(e), offsets(e + 1), token(total), slot(total), row_of(total),
            rows(total);
        std::vector<float> weights(total), ds((size_t)n * e);
        std::vector<double> loss(batch), tok_sum((size_t)n);
        // launch/router.rs: one warp per token, then one block per expert, then per token
        launch({cdiv(n, BLOCK / 32), 1, 1}, BLOCK, [&] {
            moe_route(experts.data(), weights.data(), s.data(), bias.data(), n, e, ng, tg, k, scale, norm);
        });
        launch({(unsigned)e, 1, 1}, BLOCK, [&] { moe_plan_count(counts.data(), experts.data(), total); });
        launch({(unsigned)e, 1, 1}, BLOCK, [&] {
            moe_plan_fill(offsets.data(), token.data(), slot.data(), row_of.data(), counts.data(), experts.data(),
                          total, k, e);
        });
        launch(grid_stride(n), BLOCK, [&] { moe_plan_rows(rows.data(), row_of.data(), n, k); });
        launch(grid_stride(n), BLOCK, [&] {
            moe_route_backward(ds.data(), dw.data(), s.data(), experts.data(), n, e, k, scale, norm);
        });
        launch({(unsigned)batch, 1, 1}, BLOCK, [&] {
            moe_balance_forward(loss.data(), tok_sum.data(), s.data(), experts.data(), seq, e, k, alpha);
        });
        launch({(unsigned)batch, 1, 1}, BLOCK,
               [&] { moe_balance_backward(ds.data(), s.data(), experts.data(), seq, e, k, alpha_seq); });
        save("experts", experts), save("weights", weights), save("offsets", offsets), save("token", token);
        save("slot", slot), save("rows_of_token", rows), save("ds", ds), save("loss", loss);
    } else {
        fprintf(stderr, "unknown op %s\n", op.c_str());
        return 2;
    }
    return 0;
}
