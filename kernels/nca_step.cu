// Fused NCA step kernels: 2D/3D x float32/bfloat16 state (float32 accumulation).
//
// Compiled at run time by NVRTC (napari_octreenca/backends/nvrtc_compile.py) once per model
// shape (NCA_C channels, NCA_IN image channels, NCA_H hidden units) and GPU architecture.
// The per-cell logic lives in nca_common.cuh, which CI also compiles and runs as host C++.
//
// Launch: blockDim.x = NCA_BLOCK, any gridDim.x (grid-stride loop). The level's weights are the
// last kernel argument, passed by value (layout: nca_layout in nca_common.cuh): the driver copies
// them with each launch into that launch's own parameter bank, so two runs on two streams or
// threads can never see each other's weights (a shared __constant__ array could be overwritten
// between another run's copy and its launch). __grid_constant__ lets the kernel read them in
// place from the constant bank, as fast as __constant__ memory. Kernel parameters above 4 KiB
// need CUDA 12.1+ and sm_70+ (both required anyway). Each warp takes a run of 32 * NCA_CANDIDATES consecutive
// cells, copies the ones that do not fire and compacts the firing ones onto its lanes, so at
// fire rate 0.5 a warp computes about half as many cells as a plain one-thread-per-cell kernel.
#include "nca_common.cuh"

#ifndef NCA_BLOCK
#define NCA_BLOCK 128
#endif
#ifndef NCA_CANDIDATES
#define NCA_CANDIDATES 4
#endif

#define NCA_WARPS (NCA_BLOCK / 32)
#define NCA_CHUNK (32 * NCA_CANDIDATES)

// One level's packed weights, passed by value as a kernel argument.
template <int DIMS>
struct nca_weights {
    float w[nca_layout<DIMS, NCA_C, NCA_IN, NCA_H>::size];
};

template <int DIMS, typename T>
__device__ __forceinline__ void nca_step_impl(const T* __restrict__ img, const T* __restrict__ state,
                                              T* __restrict__ out, nca_i64 batch, nca_i64 nz, nca_i64 ny,
                                              nca_i64 nx, nca_i64 oz, nca_i64 oy, nca_i64 ox, nca_u32 key,
                                              nca_u32 thresh, const float* __restrict__ weights) {
    __shared__ short slots[NCA_WARPS][NCA_CHUNK];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const nca_i64 plane = nz * ny * nx;
    const nca_i64 total = batch * plane;
    const nca_i64 stride = (nca_i64)gridDim.x * NCA_WARPS * NCA_CHUNK;
    const nca_u32 below = (1u << lane) - 1u;
    const int cu = NCA_C - NCA_IN;

    for (nca_i64 base = ((nca_i64)blockIdx.x * NCA_WARPS + warp) * NCA_CHUNK; base < total; base += stride) {
        int count = 0;
#pragma unroll
        for (int r = 0; r < NCA_CANDIDATES; ++r) {
            const nca_i64 idx = base + r * 32 + lane;
            bool fire = false;
            if (idx < total) {
                const nca_i64 b = idx / plane;
                const nca_i64 cell = idx - b * plane;
                const nca_i64 x = cell % nx;
                const nca_i64 zy = cell / nx;
                const nca_i64 y = zy % ny;
                const nca_i64 z = zy / ny;
                fire = nca_fires<DIMS>(key, thresh, oz + z, oy + y, ox + x);
                if (!fire) nca_copy_cell<NCA_C, NCA_IN, T>(state + b * cu * plane, out + b * cu * plane, cell, plane);
            }
            const nca_u32 m = __ballot_sync(0xFFFFFFFFu, fire);
            if (fire) slots[warp][count + __popc(m & below)] = (short)(r * 32 + lane);
            count += __popc(m);
        }
        __syncwarp();
        for (int k = lane; k < count; k += 32) {
            const nca_i64 idx = base + slots[warp][k];
            const nca_i64 b = idx / plane;
            const nca_i64 cell = idx - b * plane;
            const nca_i64 x = cell % nx;
            const nca_i64 zy = cell / nx;
            const nca_i64 y = zy % ny;
            const nca_i64 z = zy / ny;
            nca_cell<DIMS, NCA_C, NCA_IN, NCA_H, T>(img + b * NCA_IN * plane, state + b * cu * plane,
                                                    out + b * cu * plane, weights, nz, ny, nx, z, y, x);
        }
        __syncwarp();
    }
}

#define NCA_ENTRY(NAME, DIMS, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(NCA_BLOCK)                                               \
        NAME(const T* img, const T* state, T* out, nca_i64 batch, nca_i64 nz, nca_i64 ny, nca_i64 nx,     \
             nca_i64 oz, nca_i64 oy, nca_i64 ox, nca_u32 key, nca_u32 thresh,                             \
             const __grid_constant__ nca_weights<DIMS> weights) {                                         \
        nca_step_impl<DIMS, T>(img, state, out, batch, nz, ny, nx, oz, oy, ox, key, thresh, weights.w);   \
    }

NCA_ENTRY(nca_step_2d_f32, 2, float)
NCA_ENTRY(nca_step_2d_bf16, 2, nca_bf16)
NCA_ENTRY(nca_step_3d_f32, 3, float)
NCA_ENTRY(nca_step_3d_bf16, 3, nca_bf16)
