// Test-only: just enough of CUDA to run nca_step.cu's kernels on the host, one std::thread per
// CUDA thread, so that CI exercises the kernels' scheduling (warp ballot compaction, grid-stride
// loop, batch/plane index arithmetic) and not only the per-cell code. Blocks run one at a time;
// warp intrinsics synchronise the 32 lanes of a warp with a barrier. Slow, for small tests only.
#pragma once
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
#define __launch_bounds__(x)
#define __constant__
#define __grid_constant__
// One block runs at a time, so a function-static array is exactly the block's shared memory.
#define __shared__ static

struct nca_emu_warp {
    std::barrier<> bar{32};
    unsigned votes[32];
};
inline thread_local nca_emu_warp* nca_emu_this_warp = nullptr;

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

// Run kernel(args...) on grid x block threads (block a multiple of 32).
template <typename F>
void nca_emu_launch(unsigned grid, unsigned block, F kernel) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned b = 0; b < grid; ++b) {
        std::vector<nca_emu_warp> warps(block / 32);
        std::vector<std::thread> threads;
        threads.reserve(block);
        for (unsigned t = 0; t < block; ++t) {
            threads.emplace_back([&, t, b] {
                threadIdx = {t, 0, 0};
                blockIdx = {b, 0, 0};
                nca_emu_this_warp = &warps[t / 32];
                kernel();
            });
        }
        for (auto& th : threads) th.join();
    }
}
