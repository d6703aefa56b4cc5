// Test-only: just enough of CUDA to run the kernels (nca_step.cu, nca_step_v2.cu) on the host,
// one std::thread per CUDA thread, so that CI exercises the kernels' scheduling (warp ballot
// compaction, grid-stride loop, batch/plane index arithmetic, shared-memory tiles) and not only
// the per-cell code. Blocks run one at a time; warp intrinsics synchronise the 32 lanes of a
// warp with a barrier, __syncthreads the whole block. mma.sync m16n8k16 (bf16 inputs, float32
// accumulation) is emulated from the PTX ISA's fragment layouts, written here independently of
// the kernel, so a kernel that puts a value in the wrong fragment slot computes a wrong result.
// Slow, for small tests only.
#pragma once
#define NCA_HOST_EMULATION 1
#include <barrier>
#include <cstring>
#include <thread>
#include <vector>

struct nca_dim3 {
    unsigned x, y, z;
};
inline thread_local nca_dim3 threadIdx{0, 0, 0};
inline thread_local nca_dim3 blockIdx{0, 0, 0};
inline nca_dim3 gridDim{1, 1, 1};
inline nca_dim3 blockDim{1, 1, 1};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __constant__
#define __grid_constant__
// One block runs at a time, so a function-static array is exactly the block's shared memory.
#define __shared__ static

struct nca_emu_warp {
    std::barrier<> bar{32};
    unsigned votes[32];
    unsigned mma_a[32][4], mma_b[32][2];
    float mma_c[32][4];
};
inline thread_local nca_emu_warp* nca_emu_this_warp = nullptr;
inline thread_local std::barrier<>* nca_emu_this_block = nullptr;

inline void __syncthreads() { nca_emu_this_block->arrive_and_wait(); }

inline unsigned __ballot_sync(unsigned, bool p) {
    const unsigned lane = threadIdx.x & 31u;
    nca_emu_this_warp->votes[lane] = p ? 1u : 0u;
    nca_emu_this_warp->bar.arrive_and_wait();
    unsigned m = 0;
    for (unsigned i = 0; i < 32; ++i) m |= nca_emu_this_warp->votes[i] << i;
    nca_emu_this_warp->bar.arrive_and_wait();  // nobody votes again before all have read
    return m;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline void __syncwarp() { nca_emu_this_warp->bar.arrive_and_wait(); }

// bf16 half (0: bits 0-15, 1: bits 16-31) of a fragment register, as a float.
inline float nca_emu_bf16(unsigned reg, int half) {
    const unsigned bits = (half ? reg >> 16 : reg & 0xFFFFu) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 d, a, b, c for the calling lane, with the
// fragment layouts of the PTX ISA (groupID = lane >> 2, threadID_in_group = lane % 4):
//   A (16x16): element i of a0..a7 (register i / 2, half i % 2) is at row groupID + 8 * (i in {2,3,6,7}),
//              column 2 * threadID_in_group + i % 2 + 8 * (i >= 4);
//   B (16x8):  element i of b0..b3 is at row (k) 2 * threadID_in_group + i % 2 + 8 * (i >= 2), column groupID;
//   C, D (16x8): element i of c0..c3 is at row groupID + 8 * (i >= 2), column 2 * threadID_in_group + i % 2.
// Products of bf16 values are exact in float32; the sum is float32, in k order.
inline void nca_emu_mma_16816(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
    nca_emu_warp* w = nca_emu_this_warp;
    const unsigned lane = threadIdx.x & 31u;
    for (int i = 0; i < 4; ++i) w->mma_a[lane][i] = a[i];
    for (int i = 0; i < 2; ++i) w->mma_b[lane][i] = b[i];
    for (int i = 0; i < 4; ++i) w->mma_c[lane][i] = c[i];
    w->bar.arrive_and_wait();
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
        const int gid = l >> 2, tig = l & 3;
        for (int i = 0; i < 8; ++i) {
            const int row = gid + ((i == 2 || i == 3 || i == 6 || i == 7) ? 8 : 0);
            const int col = 2 * tig + (i & 1) + (i >= 4 ? 8 : 0);
            A[row][col] = nca_emu_bf16(w->mma_a[l][i / 2], i % 2);
        }
        for (int i = 0; i < 4; ++i) B[2 * tig + (i & 1) + (i >= 2 ? 8 : 0)][gid] = nca_emu_bf16(w->mma_b[l][i / 2], i % 2);
        for (int i = 0; i < 4; ++i) C[gid + (i >= 2 ? 8 : 0)][2 * tig + (i & 1)] = w->mma_c[l][i];
    }
    w->bar.arrive_and_wait();  // every lane has read the fragments before any lane writes new ones
    const int gid = lane >> 2, tig = lane & 3;
    for (int i = 0; i < 4; ++i) {
        const int row = gid + (i >= 2 ? 8 : 0), col = 2 * tig + (i & 1);
        float acc = C[row][col];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        d[i] = acc;
    }
}

// Run kernel(args...) on grid x block threads (block a multiple of 32).
template <typename F>
void nca_emu_launch(unsigned grid, unsigned block, F kernel) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned b = 0; b < grid; ++b) {
        std::vector<nca_emu_warp> warps(block / 32);
        std::barrier<> block_barrier((std::ptrdiff_t)block);
        std::vector<std::thread> threads;
        threads.reserve(block);
        for (unsigned t = 0; t < block; ++t) {
            threads.emplace_back([&, t, b] {
                threadIdx = {t, 0, 0};
                blockIdx = {b, 0, 0};
                nca_emu_this_warp = &warps[t / 32];
                nca_emu_this_block = &block_barrier;
                kernel();
            });
        }
        for (auto& th : threads) th.join();
    }
}
