// Host shim for executing the CUDA C kernels of kernels/src/device/cuda on the CPU (issue 12):
// every CUDA thread of a block is a std::thread, __syncthreads is a std::barrier over the block,
// and the warp shuffles exchange values through a per-warp barrier. Used by driver.cpp, which
// kernels/tests/cuda_emulation.rs compiles with g++ -std=c++20 -O2 -pthread -ffp-contract=off.
// It checks indexing, masking, synchronisation and numerics, not speed and not the GPU's memory
// model or warp scheduling (lanes of a warp are not in lockstep here: only the shuffles meet).
//
// `__shared__` is `static`: one copy shared by every emulated thread, so blocks must run one
// after another (launch does). Threads that return early drop out of their block's and warp's
// barriers, as exited threads do on the GPU.
//
// Intrinsics map to exact IEEE host equivalents: expf, logf, sqrtf, fmaxf are the host libm's
// (CUDA's expf is within 2 ulp of it, so kernels that claim only rounding-level agreement may
// differ from a GPU run in the last bits; none of the kernels uses a fast-math intrinsic such as
// __expf). The bit casts are memcpy.
#pragma once
#include <math.h>
#include <string.h>

#include <barrier>
#include <cstdint>
#include <thread>
#include <type_traits>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static

namespace emu {
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::barrier<>*> warp_barriers;
// One slot per thread of a block (≤ 1024) for the shuffles' exchange.
inline unsigned long long shuffle_slots[1024];

inline int lane_id() { return threadIdx.x & 31; }
inline std::barrier<>& my_warp() { return *warp_barriers[threadIdx.x >> 5]; }

// Every lane publishes v, reads lane `src` of its warp's values, and waits until all have read.
template <class T>
T exchange(T v, int src) {
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
    unsigned long long bits = 0;
    memcpy(&bits, &v, sizeof(T));
    shuffle_slots[threadIdx.x] = bits;
    my_warp().arrive_and_wait();
    const unsigned long long got = shuffle_slots[(threadIdx.x & ~31u) + (src & 31)];
    my_warp().arrive_and_wait();
    T r;
    memcpy(&r, &got, sizeof(T));
    return r;
}

// Runs `kernel` on a grid of `grid` blocks of `block` threads (1-D blocks, a multiple of 32
// threads, as every launch wrapper uses), one block after another. The `block` OS threads are
// made once per launch and run every block in turn: before each block the launching thread makes
// its block and warp barriers fresh (a thread that returned early dropped out of the last ones),
// and two barriers that no thread drops out of start and end each block.
template <class F>
void launch(dim3 grid, unsigned block, F kernel) {
    gridDim = grid;
    blockDim = {block, 1, 1};
    const unsigned warps = (block + 31) / 32;
    const unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
    std::barrier<> start(block + 1), end(block + 1);
    dim3 next{};
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; t++)
        threads.emplace_back([&, t] {
            for (unsigned long long b = 0; b < blocks; b++) {
                start.arrive_and_wait();
                threadIdx = {t, 0, 0};
                blockIdx = next;
                kernel();
                // an exited thread no longer takes part in its block's barriers
                my_warp().arrive_and_drop();
                block_barrier->arrive_and_drop();
                end.arrive_and_wait();
            }
        });
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                std::barrier<> bb(block);
                block_barrier = &bb;
                std::vector<std::barrier<>*> ws;
                for (unsigned w = 0; w < warps; w++)
                    ws.push_back(new std::barrier<>(w + 1 < warps || block % 32 == 0 ? 32 : block % 32));
                warp_barriers = ws;
                next = {bx, by, bz};
                start.arrive_and_wait();
                end.arrive_and_wait();
                for (auto* w : ws) delete w;
            }
    for (auto& th : threads) th.join();
}
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

template <class T>
T __shfl_sync(unsigned, T v, int src) {
    return emu::exchange(v, src);
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int mask) {
    return emu::exchange(v, emu::lane_id() ^ mask);
}
namespace emu {
template <class To, class From>
inline To bit_cast(From f) {
    static_assert(sizeof(To) == sizeof(From));
    To t;
    memcpy(&t, &f, sizeof(To));
    return t;
}
}  // namespace emu
inline float __int_as_float(int i) { return emu::bit_cast<float>(i); }
inline int __float_as_int(float f) { return emu::bit_cast<int>(f); }
inline float __uint_as_float(unsigned u) { return emu::bit_cast<float>(u); }
inline unsigned __float_as_uint(float f) { return emu::bit_cast<unsigned>(f); }
// A product rounded on its own (never contracted into an FMA; the driver builds with
// -ffp-contract=off).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
// PTX prmt: byte i of the result is byte (selector nibble i) of the 8 bytes y:x (x the low 4).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const unsigned long long xy = ((unsigned long long)y << 32) | x;
    unsigned out = 0;
    for (int i = 0; i < 4; i++) out |= (unsigned)((xy >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return out;
}
// A warp's lanes meet (the router's shared picks between lanes).
inline void __syncwarp(unsigned = 0xffffffffu) { emu::my_warp().arrive_and_wait(); }

// CUDA's integer max/min overloads (mixed operands promote as in C++ arithmetic).
template <class A, class B>
inline std::common_type_t<A, B> max(A a, B b) {
    return a > b ? a : b;
}
template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) {
    return a < b ? a : b;
}

// cp.async (fp8_grouped.cu): a thread's copies are held until it waits for their group and land
// then, the latest moment the PTX memory model allows, so a kernel that reads a buffer before its
// wait (or before the barrier after it) reads the bytes that were there before.
namespace emu {
struct AsyncCopy {
    void* dst;
    const void* src;
    size_t n;
};
inline thread_local std::vector<AsyncCopy> async_open;
inline thread_local std::vector<std::vector<AsyncCopy>> async_groups;
}  // namespace emu
inline void emu_cp_async(void* dst, const void* src, size_t n) {
    emu::async_open.push_back({dst, src, n});
}
inline void emu_cp_async_commit() {
    emu::async_groups.push_back(std::move(emu::async_open));
    emu::async_open.clear();
}
// cp.async.wait_group `pending`: every group but the newest `pending` lands.
inline void emu_cp_async_wait(int pending) {
    while ((int)emu::async_groups.size() > pending) {
        for (const auto& c : emu::async_groups.front()) memcpy(c.dst, c.src, c.n);
        emu::async_groups.erase(emu::async_groups.begin());
    }
}

// The tensor cores' mma.sync.m16n8k32 with E4M3 operands and f32 accumulators (fp8_grouped.cu):
// every lane publishes its fragments, then computes its four outputs from the warp's, in the PTX
// ISA's layout for 8-bit operands (lane = 4·g + t: A rows g and g + 8, K 4t..4t+3 and 16 further;
// B column g, the same K; D rows g and g + 8, columns 2t and 2t + 1; the lowest K in a register's
// lowest byte). Products are exact in f32; each output adds its 32 products in K order to an f32
// sum, then that sum to the accumulator (the hardware's order inside an mma is its own).
namespace emu {
inline unsigned mma_a[1024][4];
inline unsigned mma_b[1024][2];
inline float e4m3(unsigned code) {
    const int e = (code >> 3) & 15, m = code & 7;
    const float mag = e == 0 ? ldexpf((float)m, -9) : ldexpf((float)(8 + m), e - 10);
    return (code & 0x80) ? -mag : mag;
}
}  // namespace emu
inline void emu_mma_e4m3_m16n8k32(float* d, const unsigned* a, const unsigned* b) {
    const unsigned me = threadIdx.x, base = me & ~31u, lane = me & 31;
    for (int r = 0; r < 4; r++) emu::mma_a[me][r] = a[r];
    for (int r = 0; r < 2; r++) emu::mma_b[me][r] = b[r];
    emu::my_warp().arrive_and_wait();
    const int g = lane >> 2, t = lane & 3;
    auto a_at = [&](int row, int k) {  // A(row, k) of the warp's 16×32 tile
        const unsigned src = base + (row & 7) * 4 + (k & 15) / 4;
        const int reg = (row >= 8 ? 1 : 0) + (k >= 16 ? 2 : 0);
        return emu::e4m3((emu::mma_a[src][reg] >> (8 * (k & 3))) & 0xff);
    };
    auto b_at = [&](int k, int col) {  // B(k, col) of the 32×8 tile
        const unsigned src = base + col * 4 + (k & 15) / 4;
        return emu::e4m3((emu::mma_b[src][k >= 16 ? 1 : 0] >> (8 * (k & 3))) & 0xff);
    };
    for (int c = 0; c < 4; c++) {
        const int row = g + (c >= 2 ? 8 : 0), col = 2 * t + (c & 1);
        float sum = 0.0f;
        for (int k = 0; k < 32; k++) sum = sum + a_at(row, k) * b_at(k, col);
        d[c] = d[c] + sum;
    }
    emu::my_warp().arrive_and_wait();
}
