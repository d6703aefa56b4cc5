// One fused NCA step per cell: the code shared by the CUDA kernels (nca_step.cu) and the host
// test harness (host_harness.cpp), so that CI can run the exact per-cell logic on a CPU.
//
// Update of one cell (equal to backends/torch_backend.py: nca_delta + fire mask + residual):
//   x    = [image | state] at the cell (C channels)
//   p[c] = conv_b[c] + sum_taps conv_w[c][tap] * x_c(neighbour)   (depthwise 3x3 / 3x3x3, reflect)
//   h    = relu(fc0_w @ [x | p] + fc0_b)                          (H hidden)
//   dx   = fc1_w @ h                                               (CU = C - IN channels)
//   out  = state + dx if the cell fires, else state
// Everything is accumulated in float32; the state may be stored as float32 or bfloat16.
//
// Weights are one flat float array (see nca_layout): conv_w (C*K), conv_b (C), fc0_w (H*2C),
// fc0_b (H), fc1_w (CU*H), K = 3^DIMS, in PyTorch's row-major parameter order.
//
// Written without any header so that NVRTC needs no include path, and so that g++ compiles it.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define NCA_HD __host__ __device__ __forceinline__
#define NCA_RESTRICT __restrict__
#else
#define NCA_HD static inline
#define NCA_RESTRICT __restrict__
#endif

// Channel counts of the model being compiled for (the presets by default); every build
// passes -DNCA_C=.. -DNCA_IN=.. -DNCA_H=.. for the model at hand.
#ifndef NCA_C
#define NCA_C 16
#endif
#ifndef NCA_IN
#define NCA_IN 3
#endif
#ifndef NCA_H
#define NCA_H 64
#endif

typedef unsigned int nca_u32;
typedef unsigned short nca_bf16;  // bfloat16 storage (upper half of a float32)
typedef long long nca_i64;        // 64-bit indexing everywhere: 184 MP x 12 channels > 2^31

// ---------------------------------------------------------------------------------------------
// Counter-based fire mask (engine/firemask.py). The host computes base_key(seed, level, step);
// each cell chains mix32 over its global coordinates, slowest axis first.
NCA_HD nca_u32 nca_mix32(nca_u32 h) {
    h ^= h >> 16;
    h *= 0x21F0AAADu;
    h ^= h >> 15;
    h *= 0x735A2D97u;
    h ^= h >> 15;
    return h;
}

// thresh = round(fire_rate * 2^24); the cell fires when the top 24 bits are below it.
NCA_HD bool nca_fires_2d(nca_u32 key, nca_u32 thresh, nca_i64 gy, nca_i64 gx) {
    nca_u32 h = nca_mix32(key ^ (nca_u32)gy);
    h = nca_mix32(h ^ (nca_u32)gx);
    return (h >> 8) < thresh;
}

NCA_HD bool nca_fires_3d(nca_u32 key, nca_u32 thresh, nca_i64 gz, nca_i64 gy, nca_i64 gx) {
    nca_u32 h = nca_mix32(key ^ (nca_u32)gz);
    h = nca_mix32(h ^ (nca_u32)gy);
    h = nca_mix32(h ^ (nca_u32)gx);
    return (h >> 8) < thresh;
}

// ---------------------------------------------------------------------------------------------
// Storage conversions. bfloat16 is handled as raw 16-bit words: no cuda_bf16.h is needed, and
// the rounding (nearest even, NaN kept quiet) is the one PyTorch uses.
NCA_HD float nca_bits_to_float(nca_u32 b) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(b);
#else
    union { nca_u32 u; float f; } v;
    v.u = b;
    return v.f;
#endif
}

NCA_HD nca_u32 nca_float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    union { nca_u32 u; float f; } v;
    v.f = f;
    return v.u;
#endif
}

NCA_HD float nca_load(const float* p, nca_i64 i) { return p[i]; }
NCA_HD float nca_load(const nca_bf16* p, nca_i64 i) { return nca_bits_to_float(((nca_u32)p[i]) << 16); }
NCA_HD void nca_store(float* p, nca_i64 i, float v) { p[i] = v; }
NCA_HD void nca_store(nca_bf16* p, nca_i64 i, float v) {
    nca_u32 b = nca_float_to_bits(v);
    if ((b & 0x7FFFFFFFu) > 0x7F800000u) {
        p[i] = (nca_bf16)0x7FC0u;  // NaN
        return;
    }
    b += 0x7FFFu + ((b >> 16) & 1u);
    p[i] = (nca_bf16)(b >> 16);
}

// Reflect without edge repeat (torch_backend.reflect_index): -1 -> 1, n -> n - 2; n == 1 -> 0.
NCA_HD nca_i64 nca_reflect(nca_i64 i, nca_i64 n) {
    if (n == 1) return 0;
    if (i < 0) i = -i;
    if (i >= n) i = 2 * n - 2 - i;
    return i;
}

// ---------------------------------------------------------------------------------------------
// Weight layout inside the flat array.
template <int DIMS, int C, int IN, int H>
struct nca_layout {
    static const int K = DIMS == 2 ? 9 : 27;
    static const int CU = C - IN;
    static const int conv_w = 0;
    static const int conv_b = conv_w + C * K;
    static const int fc0_w = conv_b + C;
    static const int fc0_b = fc0_w + H * 2 * C;
    static const int fc1_w = fc0_b + H;
    static const int size = fc1_w + CU * H;
};

// Copy the old state of a cell that does not fire.
template <int C, int IN, typename T>
NCA_HD void nca_copy_cell(const T* NCA_RESTRICT state, T* NCA_RESTRICT out, nca_i64 cell, nca_i64 plane) {
#pragma unroll
    for (int c = 0; c < C - IN; ++c) out[cell + c * plane] = state[cell + c * plane];
}

// The fused update of one cell (z, y, x) of one batch item. img (IN, nz, ny, nx) and state /
// out (C - IN, nz, ny, nx) point at the batch item; for DIMS == 2, nz == 1 and z == 0.
// Every face, edge and corner reflects on each axis independently, like pad_reflect does.
template <int DIMS, int C, int IN, int H, typename T>
NCA_HD void nca_cell(const T* NCA_RESTRICT img, const T* NCA_RESTRICT state, T* NCA_RESTRICT out,
                     const float* NCA_RESTRICT w, nca_i64 nz, nca_i64 ny, nca_i64 nx, nca_i64 z, nca_i64 y,
                     nca_i64 x) {
    typedef nca_layout<DIMS, C, IN, H> L;
    const nca_i64 plane = nz * ny * nx;
    const nca_i64 cell = (z * ny + y) * nx + x;

    // Neighbour offsets inside one channel plane, reflected per axis.
    nca_i64 offz[3], offy[3], offx[3];
#pragma unroll
    for (int d = 0; d < 3; ++d) {
        offz[d] = (DIMS == 3 ? nca_reflect(z + d - 1, nz) : z) * ny * nx;
        offy[d] = nca_reflect(y + d - 1, ny) * nx;
        offx[d] = nca_reflect(x + d - 1, nx);
    }

    float xc[C];  // centre values [image | state]
    float pc[C];  // perception
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const T* src = c < IN ? img + (nca_i64)c * plane : state + (nca_i64)(c - IN) * plane;
        float acc = w[L::conv_b + c];
#pragma unroll
        for (int dz = 0; dz < (DIMS == 3 ? 3 : 1); ++dz) {
#pragma unroll
            for (int dy = 0; dy < 3; ++dy) {
#pragma unroll
                for (int dx = 0; dx < 3; ++dx) {
                    const int tap = (dz * 3 + dy) * 3 + dx;
                    const nca_i64 off = (DIMS == 3 ? offz[dz] : offz[1]) + offy[dy] + offx[dx];
                    acc += w[L::conv_w + c * L::K + tap] * nca_load(src, off);
                }
            }
        }
        pc[c] = acc;
        xc[c] = nca_load(src, cell);
    }

    float dxv[L::CU];
#pragma unroll
    for (int c = 0; c < L::CU; ++c) dxv[c] = 0.0f;

    // fc0 -> ReLU -> fc1, one hidden unit at a time: the hidden vector never exists in memory.
#pragma unroll 4
    for (int j = 0; j < H; ++j) {
        const float* wj = w + L::fc0_w + j * 2 * C;
        float h = w[L::fc0_b + j];
#pragma unroll
        for (int i = 0; i < C; ++i) h += wj[i] * xc[i];
#pragma unroll
        for (int i = 0; i < C; ++i) h += wj[C + i] * pc[i];
        h = h > 0.0f ? h : 0.0f;
#pragma unroll
        for (int c = 0; c < L::CU; ++c) dxv[c] += w[L::fc1_w + c * H + j] * h;
    }

#pragma unroll
    for (int c = 0; c < L::CU; ++c) {
        const nca_i64 i = cell + (nca_i64)c * plane;
        nca_store(out, i, xc[IN + c] + dxv[c]);
    }
}

// Fire test and update of one cell at global coordinate origin + (z, y, x); returns whether
// it fired. The host harness runs exactly this for every cell; the CUDA kernel splits the two
// halves so that a warp computes only its firing cells.
template <int DIMS>
NCA_HD bool nca_fires(nca_u32 key, nca_u32 thresh, nca_i64 gz, nca_i64 gy, nca_i64 gx) {
    return DIMS == 3 ? nca_fires_3d(key, thresh, gz, gy, gx) : nca_fires_2d(key, thresh, gy, gx);
}

template <int DIMS, int C, int IN, int H, typename T>
NCA_HD bool nca_update(const T* NCA_RESTRICT img, const T* NCA_RESTRICT state, T* NCA_RESTRICT out,
                       const float* NCA_RESTRICT w, nca_i64 nz, nca_i64 ny, nca_i64 nx, nca_i64 z, nca_i64 y,
                       nca_i64 x, nca_i64 oz, nca_i64 oy, nca_i64 ox, nca_u32 key, nca_u32 thresh) {
    if (nca_fires<DIMS>(key, thresh, oz + z, oy + y, ox + x)) {
        nca_cell<DIMS, C, IN, H, T>(img, state, out, w, nz, ny, nx, z, y, x);
        return true;
    }
    nca_copy_cell<C, IN, T>(state, out, (z * ny + y) * nx + x, nz * ny * nx);
    return false;
}
