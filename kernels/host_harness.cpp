// Host build of the fused NCA step for tests: runs nca_update (nca_common.cuh), the same code
// the CUDA kernels run per cell, over every cell of a block. Not used at run time.
//
//   g++ -O1 -shared -fPIC -DNCA_C=16 -DNCA_IN=3 -DNCA_H=64 host_harness.cpp -o harness.so
#include "nca_common.cuh"


template <int DIMS, typename T>
static long long host_step(const T* img, const T* state, T* out, const float* w, nca_i64 batch, nca_i64 nz,
                           nca_i64 ny, nca_i64 nx, nca_i64 oz, nca_i64 oy, nca_i64 ox, nca_u32 key,
                           nca_u32 thresh) {
    const nca_i64 plane = nz * ny * nx;
    const int cu = NCA_C - NCA_IN;
    long long fired = 0;
    for (nca_i64 b = 0; b < batch; ++b)
        for (nca_i64 z = 0; z < nz; ++z)
            for (nca_i64 y = 0; y < ny; ++y)
                for (nca_i64 x = 0; x < nx; ++x)
                    fired += nca_update<DIMS, NCA_C, NCA_IN, NCA_H, T>(
                        img + b * NCA_IN * plane, state + b * cu * plane, out + b * cu * plane, w, nz, ny, nx, z, y,
                        x, oz, oy, ox, key, thresh);
    return fired;
}

#define HOST_ENTRY(NAME, DIMS, T)                                                                         \
    extern "C" long long NAME(const T* img, const T* state, T* out, const float* w, nca_i64 batch,      \
                              nca_i64 nz, nca_i64 ny, nca_i64 nx, nca_i64 oz, nca_i64 oy, nca_i64 ox,   \
                              nca_u32 key, nca_u32 thresh) {                                             \
        return host_step<DIMS, T>(img, state, out, w, batch, nz, ny, nx, oz, oy, ox, key, thresh);       \
    }

HOST_ENTRY(nca_host_step_2d_f32, 2, float)
HOST_ENTRY(nca_host_step_2d_bf16, 2, nca_bf16)
HOST_ENTRY(nca_host_step_3d_f32, 3, float)
HOST_ENTRY(nca_host_step_3d_bf16, 3, nca_bf16)

extern "C" int nca_host_layout_size(int dims) {
    return dims == 2 ? nca_layout<2, NCA_C, NCA_IN, NCA_H>::size : nca_layout<3, NCA_C, NCA_IN, NCA_H>::size;
}
extern "C" nca_u32 nca_host_mix32(nca_u32 h) { return nca_mix32(h); }
extern "C" int nca_host_fires(int dims, nca_u32 key, nca_u32 thresh, nca_i64 gz, nca_i64 gy, nca_i64 gx) {
    return dims == 3 ? nca_fires_3d(key, thresh, gz, gy, gx) : nca_fires_2d(key, thresh, gy, gx);
}
