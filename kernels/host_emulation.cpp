// Test-only: nca_step.cu's kernels run on the host through cuda_host_shim.h (see there).
//
//   g++ -std=c++20 -O1 -pthread -shared -fPIC -DNCA_C=16 -DNCA_IN=3 -DNCA_H=64 host_emulation.cpp
#include "cuda_host_shim.h"
#include "nca_step.cu"

extern "C" int nca_emu_weights_size(int dims) {
    return dims == 2 ? (int)(sizeof(nca_weights<2>) / sizeof(float)) : (int)(sizeof(nca_weights<3>) / sizeof(float));
}

// Explicit arguments; the weights (a flat float array) become the by-value struct.
#define EMU_ENTRY(NAME, DIMS, T)                                                                            \
    extern "C" void emu_##NAME(unsigned grid, const T* img, const T* state, T* out, nca_i64 batch, nca_i64 nz, \
                               nca_i64 ny, nca_i64 nx, nca_i64 oz, nca_i64 oy, nca_i64 ox, nca_u32 key,        \
                               nca_u32 thresh, const float* w) {                                            \
        nca_weights<DIMS> weights;                                                                          \
        std::memcpy(weights.w, w, sizeof(weights));                                                         \
        nca_emu_launch(grid, NCA_BLOCK,                                                                     \
                       [=] { NAME(img, state, out, batch, nz, ny, nx, oz, oy, ox, key, thresh, weights); }); \
    }

EMU_ENTRY(nca_step_2d_f32, 2, float)
EMU_ENTRY(nca_step_2d_bf16, 2, nca_bf16)
EMU_ENTRY(nca_step_3d_f32, 3, float)
EMU_ENTRY(nca_step_3d_bf16, 3, nca_bf16)

// The driver's view: `args` is cuLaunchKernel's kernelParams (one pointer per parameter, each
// read with the parameter's own type), so the backend's argument packing is tested against the
// kernel signature itself.
template <int DIMS, typename T>
static void emu_from_params(unsigned grid, void** a) {
    const T* img = *(const T* const*)a[0];
    const T* state = *(const T* const*)a[1];
    T* out = *(T* const*)a[2];
    nca_i64 v[7];
    for (int i = 0; i < 7; ++i) v[i] = *(const nca_i64*)a[3 + i];
    const nca_u32 key = *(const nca_u32*)a[10], thresh = *(const nca_u32*)a[11];
    const nca_weights<DIMS> weights = *(const nca_weights<DIMS>*)a[12];
    void (*kernel)(const T*, const T*, T*, nca_i64, nca_i64, nca_i64, nca_i64, nca_i64, nca_i64, nca_i64, nca_u32,
                   nca_u32, nca_weights<DIMS>);
    if constexpr (DIMS == 2) {
        if constexpr (sizeof(T) == 4) kernel = nca_step_2d_f32; else kernel = nca_step_2d_bf16;
    } else {
        if constexpr (sizeof(T) == 4) kernel = nca_step_3d_f32; else kernel = nca_step_3d_bf16;
    }
    nca_emu_launch(grid, NCA_BLOCK, [=] { kernel(img, state, out, v[0], v[1], v[2], v[3], v[4], v[5], v[6], key, thresh, weights); });
}

// entry: 0 = 2d_f32, 1 = 2d_bf16, 2 = 3d_f32, 3 = 3d_bf16 (the order of nvrtc.ENTRY_POINTS).
extern "C" void emu_launch_params(int entry, unsigned grid, void** args) {
    switch (entry) {
        case 0: emu_from_params<2, float>(grid, args); break;
        case 1: emu_from_params<2, nca_bf16>(grid, args); break;
        case 2: emu_from_params<3, float>(grid, args); break;
        default: emu_from_params<3, nca_bf16>(grid, args); break;
    }
}
