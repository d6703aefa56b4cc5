"""Fused CPU backend: one multi-threaded pass per NCA step, two state buffers, no compiler needed.

numba compiles the loop at first use (and caches it). Per step, the rows are cut into fixed
chunks (the same for any thread count, so results are bitwise the same for any number of threads
and any tile layout); each thread allocates its scratch once and takes every n-th chunk. Rows go
in blocks of 8 y with z inside a block (a 3D step reuses the rows it reads while they are in
cache). Per run of consecutive rows of one plane it tests the counter-based fire mask of every
cell (the engine's hash), copies the unchanged cells, computes the run's perception channel by
channel straight from the state and image rows (reflect at every border, nothing copied) and
collects the firing cells into tiles of ``_TILE`` cells shared by consecutive rows; fc0 -> ReLU
-> fc1 run per tile (cells innermost, blocked 8 outputs x 4 inputs) and the update is added to
the firing cells only. No intermediate tensor larger than a few rows ever exists, so the level
needs the state, one output buffer and the compact image. ``backends/cpu_train.py`` reuses
these pieces for training.

bfloat16 state is accepted: values are read into float32, computed in float32 and rounded once
(nearest even, like PyTorch) when stored.
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
import torch

from ..nca.errors import InputError
from ..nca.packing import check_fusable
from ..nca.weights import BackboneNCA
from .base import Backend, LevelRun, StepCallback, fire_params

log = logging.getLogger(__name__)

try:
    import numba
    from numba import njit, prange

    _NUMBA_ERROR = ""
except ImportError as exc:  # numba is a dependency, but keep the torch path usable without it
    numba = None
    _NUMBA_ERROR = f"numba is not installed ({exc}); pip install numba"

#: numba's workqueue threading layer aborts on concurrent parallel calls: serialise steps.
_STEP_LOCK = threading.Lock()

_M32 = np.uint64(0xFFFFFFFF)
_M1 = np.uint64(0x21F0AAAD)
_M2 = np.uint64(0x735A2D97)
_S16 = np.uint64(16)
_S15 = np.uint64(15)
_S8 = np.uint64(8)
# Reassociation lets LLVM vectorise the dot products; results stay within ~1e-6 of torch.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
# Element-wise loops need no reassociation to vectorise, and without it LLVM keeps the written
# sum trees instead of chaining every product of a cell into one dependent FMA sequence.
_NO_REASSOC = {"contract", "nsz", "arcp"}
# The leaf kernels (no allocation) are compiled with numba's ``_nrt=False`` target option: every
# row view made inside them otherwise costs an atomic reference count increment and decrement
# (the perception's row ends take 9 views per row and channel): 10-18 % of a forward step.
#: Firing cells per fc0/fc1 tile (64 hidden x 256 cells x 4 bytes = 64 KiB, in L2).
_TILE = 256
#: Row chunks per step (fixed, so results never depend on the thread count).
_CHUNKS = 256
#: Rows of y per block of the kernels' row order (see ``_row_zy``).
_YBLOCK = 8
#: Cells a chunk of rows holds at least: a chunk ends with a partial fc0/fc1 tile, and chunks of
#: 2 short rows (16^3 patches, batch 2: 256 chunks of 2 rows of 16) ran the MLP on tiles of ~16
#: cells, 2.5x the time per cell of full tiles.
_MIN_CHUNK_CELLS = 1024


def chunk_rows(rows: int, nx: int, max_chunks: int) -> int:
    """Rows per chunk of a step's ``rows`` rows of ``nx`` cells: at most ``max_chunks`` chunks and
    at least ``_MIN_CHUNK_CELLS`` cells a chunk. A function of the shape alone, so results never
    depend on the thread count."""
    per = -(-rows // max_chunks)
    return max(1, min(rows, max(per, -(-_MIN_CHUNK_CELLS // nx))))


if numba is not None:
    _chunk_rows = njit(inline="always", cache=True)(chunk_rows)

    @njit(inline="always", cache=True)
    def _mix(h):  # h: uint64 holding a 32-bit value
        h ^= h >> _S16
        h = (h * _M1) & _M32
        h ^= h >> _S15
        h = (h * _M2) & _M32
        h ^= h >> _S15
        return h

    @njit(inline="always", cache=True)
    def _reflect(i, n):
        if n == 1:
            return 0
        if i < 0:
            i = -i
        if i >= n:
            i = 2 * n - 2 - i
        return i

    @njit(inline="always", cache=True)
    def _widen_row(src, dst):
        """dst = the bf16 words of src as float32."""
        bits = dst.view(np.uint32)
        for i in range(src.shape[0]):
            bits[i] = np.uint32(np.uint16(src[i])) << np.uint32(16)

    @njit(inline="always", cache=True)
    def _store_row(src, dst, bf16):
        """dst = src (float32), rounded to bf16 words (nearest even) when ``bf16``."""
        n = src.shape[0]
        if bf16:
            bits = src.view(np.uint32)
            for i in range(n):
                b = bits[i]
                if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                    w = np.uint32(0x7FC0)
                else:
                    w = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
                dst[i] = w
        else:
            for i in range(n):
                dst[i] = src[i]

    @njit(fastmath=_NO_REASSOC, cache=True, nogil=True, _nrt=False)
    def _acc_rows8(out, w, x, kn, r):
        """out[r:r+8, :kn] += w[r:r+8] @ x[:, :kn] (see _accumulate)."""
        n_in = x.shape[0]
        o0, o1, o2, o3 = out[r], out[r + 1], out[r + 2], out[r + 3]
        o4, o5, o6, o7 = out[r + 4], out[r + 5], out[r + 6], out[r + 7]
        i = 0
        while i + 4 <= n_in:
            x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
            a0, a1, a2, a3 = w[r, i], w[r, i + 1], w[r, i + 2], w[r, i + 3]
            b0, b1, b2, b3 = w[r + 1, i], w[r + 1, i + 1], w[r + 1, i + 2], w[r + 1, i + 3]
            c0, c1, c2, c3 = w[r + 2, i], w[r + 2, i + 1], w[r + 2, i + 2], w[r + 2, i + 3]
            d0, d1, d2, d3 = w[r + 3, i], w[r + 3, i + 1], w[r + 3, i + 2], w[r + 3, i + 3]
            e0, e1, e2, e3 = w[r + 4, i], w[r + 4, i + 1], w[r + 4, i + 2], w[r + 4, i + 3]
            f0, f1, f2, f3 = w[r + 5, i], w[r + 5, i + 1], w[r + 5, i + 2], w[r + 5, i + 3]
            g0, g1, g2, g3 = w[r + 6, i], w[r + 6, i + 1], w[r + 6, i + 2], w[r + 6, i + 3]
            h0, h1, h2, h3 = w[r + 7, i], w[r + 7, i + 1], w[r + 7, i + 2], w[r + 7, i + 3]
            for k in range(kn):
                v0, v1, v2, v3 = x0[k], x1[k], x2[k], x3[k]
                o0[k] = o0[k] + a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3
                o1[k] = o1[k] + b0 * v0 + b1 * v1 + b2 * v2 + b3 * v3
                o2[k] = o2[k] + c0 * v0 + c1 * v1 + c2 * v2 + c3 * v3
                o3[k] = o3[k] + d0 * v0 + d1 * v1 + d2 * v2 + d3 * v3
                o4[k] = o4[k] + e0 * v0 + e1 * v1 + e2 * v2 + e3 * v3
                o5[k] = o5[k] + f0 * v0 + f1 * v1 + f2 * v2 + f3 * v3
                o6[k] = o6[k] + g0 * v0 + g1 * v1 + g2 * v2 + g3 * v3
                o7[k] = o7[k] + h0 * v0 + h1 * v1 + h2 * v2 + h3 * v3
            i += 4
        while i < n_in:
            x0 = x[i]
            a0, b0, c0, d0 = w[r, i], w[r + 1, i], w[r + 2, i], w[r + 3, i]
            e0, f0, g0, h0 = w[r + 4, i], w[r + 5, i], w[r + 6, i], w[r + 7, i]
            for k in range(kn):
                v0 = x0[k]
                o0[k] += a0 * v0
                o1[k] += b0 * v0
                o2[k] += c0 * v0
                o3[k] += d0 * v0
                o4[k] += e0 * v0
                o5[k] += f0 * v0
                o6[k] += g0 * v0
                o7[k] += h0 * v0
            i += 1

    @njit(fastmath=_NO_REASSOC, cache=True, nogil=True, _nrt=False)
    def _acc_rows4(out, w, x, kn, r):
        """out[r:r+4, :kn] += w[r:r+4] @ x[:, :kn] (see _accumulate): _acc_rows8 with four rows,
        written out because the blocking needs each row and weight as its own variable; it takes
        four of the rows left over by the 13-15 and 29-31-row products."""
        n_in = x.shape[0]
        o0, o1, o2, o3 = out[r], out[r + 1], out[r + 2], out[r + 3]
        i = 0
        while i + 4 <= n_in:
            x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
            a0, a1, a2, a3 = w[r, i], w[r, i + 1], w[r, i + 2], w[r, i + 3]
            b0, b1, b2, b3 = w[r + 1, i], w[r + 1, i + 1], w[r + 1, i + 2], w[r + 1, i + 3]
            c0, c1, c2, c3 = w[r + 2, i], w[r + 2, i + 1], w[r + 2, i + 2], w[r + 2, i + 3]
            d0, d1, d2, d3 = w[r + 3, i], w[r + 3, i + 1], w[r + 3, i + 2], w[r + 3, i + 3]
            for k in range(kn):
                v0, v1, v2, v3 = x0[k], x1[k], x2[k], x3[k]
                o0[k] = o0[k] + a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3
                o1[k] = o1[k] + b0 * v0 + b1 * v1 + b2 * v2 + b3 * v3
                o2[k] = o2[k] + c0 * v0 + c1 * v1 + c2 * v2 + c3 * v3
                o3[k] = o3[k] + d0 * v0 + d1 * v1 + d2 * v2 + d3 * v3
            i += 4
        while i < n_in:
            x0 = x[i]
            a0, b0, c0, d0 = w[r, i], w[r + 1, i], w[r + 2, i], w[r + 3, i]
            for k in range(kn):
                v0 = x0[k]
                o0[k] += a0 * v0
                o1[k] += b0 * v0
                o2[k] += c0 * v0
                o3[k] += d0 * v0
            i += 1

    @njit(fastmath=_NO_REASSOC, cache=True, nogil=True, _nrt=False)
    def _acc_row(out, w, x, kn, r):
        """out[r, :kn] += w[r] @ x[:, :kn] (see _accumulate)."""
        n_in = x.shape[0]
        o0 = out[r]
        i = 0
        while i + 4 <= n_in:
            x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
            a0, a1, a2, a3 = w[r, i], w[r, i + 1], w[r, i + 2], w[r, i + 3]
            for k in range(kn):
                o0[k] = o0[k] + a0 * x0[k] + a1 * x1[k] + a2 * x2[k] + a3 * x3[k]
            i += 4
        while i < n_in:
            a0 = w[r, i]
            x0 = x[i]
            for k in range(kn):
                o0[k] += a0 * x0[k]
            i += 1

    @njit(cache=True, nogil=True, _nrt=False)
    def _accumulate(out, w, x, kn):
        """out[r, :kn] += sum_i w[r, i] * x[i, :kn] for every row r (out and x cells innermost).

        Blocked 8 output rows x 4 inputs: 32 FMAs per 4 loaded and 8 stored cell vectors, the
        32 weights in registers. Compiled without reassociation, so the sums keep the written
        order: each output adds its four products one after another, four FMAs a cell (the
        tree (a0 v0 + a1 v1) + (a2 v2 + a3 v3) took six instructions: inference 3-6 % slower on
        an AVX-512 Xeon); eight rows and the vector's cells are independent chains, so the FMA
        units do not wait on each other. With reassociation LLVM chained all of a 2 x 8 block's
        products and the loop waited on FMA latency (36-46 GFMA/s a core against 65-74; tried:
        2 x 8, 4 x 4, 4 x 8, 6 x 4, 8 x 2). Rows left over go by 4, then one at a time.
        """
        rows = out.shape[0]
        r = 0
        while r + 8 <= rows:
            _acc_rows8(out, w, x, kn, r)
            r += 8
        while r + 4 <= rows:
            _acc_rows4(out, w, x, kn, r)
            r += 4
        while r < rows:
            _acc_row(out, w, x, kn, r)
            r += 1

    @njit(inline="always", cache=True)
    def _firing(idx, key, dims, gz, gy, ox, thresh):
        """Fill idx with the x of the row's cells that fire (the engine's hash); returns how many."""
        if dims == 3:
            hrow = _mix(_mix(key ^ (np.uint64(gz) & _M32)) ^ (np.uint64(gy) & _M32))
        else:
            hrow = _mix(key ^ (np.uint64(gy) & _M32))
        nf = 0
        for x in range(idx.shape[0]):
            h = _mix(hrow ^ (np.uint64(ox + x) & _M32))
            if (h >> _S8) < thresh:
                idx[nf] = x
                nf += 1
        return nf

    @njit(fastmath=_FASTMATH, cache=True, nogil=True, _nrt=False)
    def _hidden_tile(xt, w0, b0, ht, kn):
        """ht[:, :kn] = relu(fc0 @ xt[:, :kn] + b0): the 64-wide hidden layer (the training backward
        recomputes it with this same function instead of storing it)."""
        hidden = w0.shape[0]
        for j in range(hidden):
            hj = ht[j]
            for k in range(kn):
                hj[k] = b0[j]
        _accumulate(ht, w0, xt, kn)
        for j in range(hidden):
            hj = ht[j]
            for k in range(kn):
                if hj[k] < 0:
                    hj[k] = 0.0

    @njit(fastmath=_FASTMATH, cache=True, nogil=True, _nrt=False)
    def _mlp_tile(xt, w0, b0, w1, ht, dt, kn):
        """dt[:, :kn] = fc1 @ relu(fc0 @ xt[:, :kn] + b0) for kn cells (cells innermost)."""
        cu = w1.shape[0]
        _hidden_tile(xt, w0, b0, ht, kn)
        for c in range(cu):
            dc = dt[c]
            for k in range(kn):
                dc[k] = 0.0
        _accumulate(dt, w1, ht, kn)

    @njit(cache=True, nogil=True)
    def _tile_view(buf, kn, keep=True):
        """The first kn cells of each row of tile buffer buf (rows, width) as one contiguous
        (rows, kn) array in buf's memory, the layout BLAS takes; with ``keep`` the values are
        moved there (row r from r * width to r * kn; nothing moves for a full tile)."""
        rows, width = buf.shape
        flat = buf.reshape(buf.size)
        if keep and kn < width:
            for r in range(1, rows):
                for k in range(kn):  # forward copy: the destination never passes the source
                    flat[r * kn + k] = flat[r * width + k]
        return flat[: rows * kn].reshape((rows, kn))

    @njit(fastmath=_FASTMATH, cache=True, nogil=True)
    def _mlp_tile_blas(xv, w0, b0, w1, hv, dv):
        """dv = fc1 @ relu(fc0 @ xv + b0) for the tile's cells with BLAS (numba's np.dot calls the
        sgemm of scipy's BLAS: 90-106 GFMA/s a core on an AVX-512 Xeon on these shapes, 2-3x
        _accumulate). Its sums are ordered by the library's kernels and differ with the tile
        width, so only training uses it (inference keeps bitwise tile-layout invariance); the
        BLAS must be single-threaded (``blas_threads.single_threaded``) inside numba's workers."""
        np.dot(w0, xv, hv)
        for j in range(hv.shape[0]):
            hj = hv[j]
            bj = b0[j]
            for k in range(hv.shape[1]):
                v = hj[k] + bj
                hj[k] = v if v > 0 else 0.0
        np.dot(w1, hv, dv)

    @njit(inline="always", cache=True)
    def _row_zy(rem, nz, ny):
        """(z, y) of a sample's rem-th row in the kernels' row order: blocks of _YBLOCK rows of y,
        z inside a block, y innermost. A 3D step then reuses the rows it reads while they are in
        cache (3 planes x _YBLOCK + 2 rows), not one whole plane later; 2D (nz == 1) is plain y order."""
        yb = rem // (_YBLOCK * nz)
        h = min(_YBLOCK, ny - yb * _YBLOCK)
        inner = rem - yb * _YBLOCK * nz
        z = inner // h
        return z, yb * _YBLOCK + inner - z * h

    @njit(inline="always", cache=True)
    def _tap_rows(ridx, cin, cu, nz, ny, b, z, y, dims):
        """ridx[t, c] = the row that tap-row t of channel c reads (z and y reflected), as an index
        into the image's rows (c < cin, shape (B*IN*nz*ny, nx)) or the state's (B*CU*nz*ny, nx)."""
        zt = 3 if dims == 3 else 1
        for a in range(zt):
            zz = _reflect(z + a - 1, nz) if dims == 3 else z
            for d in range(3):
                yy = _reflect(y + d - 1, ny)
                for c in range(ridx.shape[1]):
                    if c < cin:
                        ridx[a * 3 + d, c] = ((b * cin + c) * nz + zz) * ny + yy
                    else:
                        ridx[a * 3 + d, c] = ((b * cu + c - cin) * nz + zz) * ny + yy

    @njit(inline="always", cache=True)
    def _load_run(img, state, buf, ridx, b, z, y0, nrun, dims):
        """bf16 state: widen the rows a run reads (3 planes in 3D x the run's y +- 1, every
        channel) into buf once each, and point ridx[j, t, c] at them."""
        cin = img.shape[1]
        nz, ny = img.shape[2], img.shape[3]
        c_all = ridx.shape[2]
        zt = 3 if dims == 3 else 1
        for a in range(zt):
            zz = _reflect(z + a - 1, nz) if dims == 3 else z
            for q in range(nrun + 2):
                yy = _reflect(y0 + q - 1, ny)
                for c in range(c_all):
                    slot = (a * c_all + c) * (_YBLOCK + 2) + q
                    if c < cin:
                        _widen_row(img[b, c, zz, yy], buf[slot])
                    else:
                        _widen_row(state[b, c - cin, zz, yy], buf[slot])
            for j in range(nrun):
                for d in range(3):
                    for c in range(c_all):
                        ridx[j, a * 3 + d, c] = (a * c_all + c) * (_YBLOCK + 2) + j + d

    @njit(inline="always", cache=True)
    def _steps_down(ridx, c, j):
        """Whether every tap-row of channel c at run row j + 1 is the one below that of row j."""
        for t in range(ridx.shape[1]):
            if ridx[j + 1, t, c] != ridx[j, t, c] + 1:
                return False
        return True

    @njit(inline="always", cache=True)
    def _flat_rows(ridx, c, nrows, nx):
        """The run rows [j0, j1) of channel c that one flat loop can take: all of them but a
        y-border row at either end (its reflected tap-row breaks the step), or (0, 0) when fewer
        than two rows step down together or the rows are too short for the loop (nx <= 2)."""
        j0, j1 = 0, nrows
        if nx <= 2:
            return 0, 0
        if j1 - j0 > 1 and not _steps_down(ridx, c, j0):
            j0 += 1
        if j1 - j0 > 1 and not _steps_down(ridx, c, j1 - 2):
            j1 -= 1
        if j1 - j0 < 2:
            return 0, 0
        for j in range(j0, j1 - 1):
            if not _steps_down(ridx, c, j):
                return 0, 0
        return j0, j1

    @njit(fastmath=_FASTMATH, cache=True, nogil=True, _nrt=False)
    def _perceive_rows_flat(src, ridx, c, j0, j1, cw, cb, pc):
        """pc[j0:j1] = channel c's perception of run rows j0..j1-1 whose tap-rows step down one
        row per run row: one flat loop over (j1 - j0) * nx cells, then the row ends redone (the
        flat loop read the neighbouring row there, not the reflection)."""
        nx = pc.shape[1]
        m = nx - 1
        taps = ridx.shape[1]
        n = (j1 - j0) * nx
        pf = pc.reshape(pc.size)[j0 * nx : j0 * nx + n]
        sf = src.reshape(src.size)
        for p in range(n):
            pf[p] = cb[c]
        for t in range(0, taps, 3):
            o0 = ridx[j0, t, c] * nx
            o1 = ridx[j0, t + 1, c] * nx
            o2 = ridx[j0, t + 2, c] * nx
            r0 = sf[o0 : o0 + n]
            r1 = sf[o1 : o1 + n]
            r2 = sf[o2 : o2 + n]
            a0, b0, c0 = cw[c, 3 * t], cw[c, 3 * t + 1], cw[c, 3 * t + 2]
            a1, b1, c1 = cw[c, 3 * t + 3], cw[c, 3 * t + 4], cw[c, 3 * t + 5]
            a2, b2, c2 = cw[c, 3 * t + 6], cw[c, 3 * t + 7], cw[c, 3 * t + 8]
            for x in range(n - 2):
                pf[x + 1] += (a0 * r0[x] + b0 * r0[x + 1] + c0 * r0[x + 2]) + (
                    (a1 * r1[x] + b1 * r1[x + 1] + c1 * r1[x + 2]) + (a2 * r2[x] + b2 * r2[x + 1] + c2 * r2[x + 2])
                )
        for j in range(j0, j1):
            pc[j, 0] = cb[c]
            pc[j, m] = cb[c]
        for t in range(0, taps, 3):
            a0, b0, c0 = cw[c, 3 * t], cw[c, 3 * t + 1], cw[c, 3 * t + 2]
            a1, b1, c1 = cw[c, 3 * t + 3], cw[c, 3 * t + 4], cw[c, 3 * t + 5]
            a2, b2, c2 = cw[c, 3 * t + 6], cw[c, 3 * t + 7], cw[c, 3 * t + 8]
            for j in range(j0, j1):
                r0 = src[ridx[j, t, c]]
                r1 = src[ridx[j, t + 1, c]]
                r2 = src[ridx[j, t + 2, c]]
                pc[j, 0] += (a0 * r0[1] + b0 * r0[0] + c0 * r0[1]) + (
                    (a1 * r1[1] + b1 * r1[0] + c1 * r1[1]) + (a2 * r2[1] + b2 * r2[0] + c2 * r2[1])
                )
                pc[j, m] += (a0 * r0[m - 1] + b0 * r0[m] + c0 * r0[m - 1]) + (
                    (a1 * r1[m - 1] + b1 * r1[m] + c1 * r1[m - 1]) + (a2 * r2[m - 1] + b2 * r2[m] + c2 * r2[m - 1])
                )

    @njit(fastmath=_FASTMATH, cache=True, nogil=True, _nrt=False)
    def _perceive_row(src, ridx, c, j, cw, cb, pc):
        """pc[j] = channel c's perception of run row j alone (x ends reflected)."""
        nx = pc.shape[1]
        m = nx - 1
        xl = 1 if nx > 1 else 0  # reflected neighbours of the two end cells
        xr = nx - 2 if nx > 1 else 0
        pr = pc[j]
        for x in range(nx):
            pr[x] = cb[c]
        for t in range(0, ridx.shape[1], 3):
            r0 = src[ridx[j, t, c]]
            r1 = src[ridx[j, t + 1, c]]
            r2 = src[ridx[j, t + 2, c]]
            a0, b0, c0 = cw[c, 3 * t], cw[c, 3 * t + 1], cw[c, 3 * t + 2]
            a1, b1, c1 = cw[c, 3 * t + 3], cw[c, 3 * t + 4], cw[c, 3 * t + 5]
            a2, b2, c2 = cw[c, 3 * t + 6], cw[c, 3 * t + 7], cw[c, 3 * t + 8]
            pr[0] += (a0 * r0[xl] + b0 * r0[0] + c0 * r0[xl]) + (
                (a1 * r1[xl] + b1 * r1[0] + c1 * r1[xl]) + (a2 * r2[xl] + b2 * r2[0] + c2 * r2[xl])
            )
            # x + 1 for the cell (never x - 1: a possibly negative index stops vectorisation).
            for x in range(nx - 2):
                pr[x + 1] += (a0 * r0[x] + b0 * r0[x + 1] + c0 * r0[x + 2]) + (
                    (a1 * r1[x] + b1 * r1[x + 1] + c1 * r1[x + 2]) + (a2 * r2[x] + b2 * r2[x + 1] + c2 * r2[x + 2])
                )
            if nx > 1:
                pr[m] += (a0 * r0[xr] + b0 * r0[m] + c0 * r0[xr]) + (
                    (a1 * r1[xr] + b1 * r1[m] + c1 * r1[xr]) + (a2 * r2[xr] + b2 * r2[m] + c2 * r2[xr])
                )

    @njit(cache=True, nogil=True, _nrt=False)
    def _perceive(src_in, src_st, cin, ridx, cw, cb, prow, nrows):
        """prow[c, j] = depthwise 3-wide conv of the tap-rows ridx[j, :, c] (rows of src_in for
        c < cin, else of src_st), reflected at both x ends, for the run's rows j < nrows.

        Rows are read in place, never copied. Channel by channel over the whole run: a run is
        consecutive y of one plane, so each channel's tap-rows are short contiguous stretches of
        memory (the prefetcher follows them; row by row, the 16 channels' 9 rows each were 144
        separate streams and the step waited on memory). Three tap-rows per pass: 9 FMAs per
        load and store of the result, 1.3x faster than one. The rows whose tap-rows step down
        one row per run row (all but a row at a y border, whose y - 1 or y + 1 is reflected) go
        as one flat loop, so short rows (16-32 cells on the coarse 3D levels and patches) do not
        run in the loop's scalar remainder; a border row goes alone. Each cell's sum is the same
        expression either way, so results do not depend on where a run starts.
        """
        for c in range(prow.shape[0]):
            src = src_in if c < cin else src_st
            pc = prow[c]
            j0, j1 = _flat_rows(ridx, c, nrows, prow.shape[2])
            if j1 > j0:
                _perceive_rows_flat(src, ridx, c, j0, j1, cw, cb, pc)
            for j in range(nrows):
                if not j0 <= j < j1:
                    _perceive_row(src, ridx, c, j, cw, cb, pc)

    @njit(inline="always", cache=True)
    def _run_at(row, end, nz, ny):
        """The run of rows that starts at ``row`` (before ``end``): (length, sample b, z, first y).
        A run is rows of one sample and plane with consecutive y, at most _YBLOCK long."""
        b = row // (nz * ny)
        z, y = _row_zy(row - b * nz * ny, nz, ny)
        n = 1
        while n < _YBLOCK and row + n < end:
            r = row + n
            b2 = r // (nz * ny)
            z2, y2 = _row_zy(r - b2 * nz * ny, nz, ny)
            if b2 != b or z2 != z or y2 != y + n:
                break
            n += 1
        return n, b, z, y

    @njit(cache=True, nogil=True, _nrt=False)
    def _gather_tile(src_in, src_st, cin, crow, prow, j, idx, k0, kn, xt, d0=0):
        """xt[:C, d0:d0+kn] = centre values (rows crow), xt[C:, ...] = perception of cells idx[k0:k0+kn]."""
        c_all = prow.shape[0]
        for c in range(c_all):
            src = src_in[crow[c]] if c < cin else src_st[crow[c]]
            pr = prow[c, j]
            xc_ = xt[c]
            pc_ = xt[c_all + c]
            for k in range(kn):
                xk = idx[k0 + k]
                xc_[d0 + k] = src[xk]
                pc_[d0 + k] = pr[xk]

    @njit(cache=True, nogil=True, _nrt=False)
    def _copy_centre(st2, out2, ridx, j, centre, cin, row0, stride):
        """out2[row0 + c * stride] = the state row tap-row ``centre`` of run row j reads, every
        state channel c (the step's unchanged cells; the firing ones get their update added)."""
        for c in range(ridx.shape[2] - cin):
            src = st2[ridx[j, centre, cin + c]]
            dst = out2[row0 + c * stride]
            for x in range(dst.shape[0]):
                dst[x] = src[x]

    @njit(cache=True, nogil=True, _nrt=False)
    def _add_tile(dt, kn, pos_b, pos_s, out_flat, cu, plane):
        """out[b, c, cell] += dt[c, k] for the tile's cells (float32 state, flat (B*CU*plane) view)."""
        for c in range(cu):
            dc = dt[c]
            for k in range(kn):
                out_flat[(pos_b[k] * cu + c) * plane + pos_s[k]] += dc[k]

    @njit(cache=True, nogil=True, _nrt=False)
    def _add_res(dt, kn, pos_r, res):
        """res[j, c, x] += dt[c, k] for the tile's cells (bfloat16 state: res holds the run's rows
        in float32, (_YBLOCK, CU, nx); pos_r[k] = (j * CU) * nx + x of cell k)."""
        res_flat = res.reshape(res.size)
        nx = res.shape[2]
        for c in range(res.shape[1]):
            dc = dt[c]
            for k in range(kn):
                res_flat[pos_r[k] + c * nx] += dc[k]

    @njit(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)
    def _fused_step(img, state, out, cw, cb, w0, b0, w1, dims, oz, oy, ox, keys, thresh, bf16, threads, blas=False):
        """One NCA step. img (B, IN, nz, ny, nx), state/out (B, CU, nz, ny, nx); 2D has nz == 1.

        w0 is fc0 (H, 2C), w1 is fc1 (CU, H); ``keys[b]`` is sample b's fire-mask key (training
        gives every sample its own seed); ``threads`` is numba's thread count (the workers; asking
        numba for it inside would keep the kernel out of the cache). Returns the number of cells
        that fired.

        Rows go in fixed chunks (the same for any thread count, so results are bitwise the same);
        each thread allocates its scratch once and takes every nw-th chunk. float32 rows are read
        in place; firing cells of consecutive rows of a chunk share the fc0/fc1 tiles (short rows
        of coarse levels and 3D blocks fill them too) and the update is added to ``out`` when a
        tile is full. bfloat16: the rows a run reads are widened once into a small buffer, the
        run's rows share tiles too (a tile per row made 128^3 bf16 runs 1.3x as long),
        and a row is rounded and stored once all its cells' updates are in. ``blas`` (float32
        only; training's forward) runs the tiles' fc0/fc1 through :func:`_mlp_tile_blas`.
        """
        nb, cin, nz, ny, nx = img.shape
        cu = state.shape[1]
        c_all = cin + cu
        hidden = b0.shape[0]
        rows = nb * nz * ny
        plane = nz * ny * nx
        taps = 9 if dims == 3 else 3
        centre = taps // 2
        per = _chunk_rows(rows, nx, _CHUNKS)
        nchunks = (rows + per - 1) // per
        img2 = img.reshape((nb * cin * nz * ny, nx))
        st2 = state.reshape((nb * cu * nz * ny, nx))
        out2 = out.reshape((nb * cu * nz * ny, nx))
        out_flat = out.reshape(nb * cu * plane)
        nw = max(1, min(threads, nchunks))
        fired = np.zeros(nchunks, np.int64)
        for w in prange(nw):
            zt = 3 if dims == 3 else 1
            buf = np.empty((zt * (_YBLOCK + 2) * c_all if bf16 else 1, nx), np.float32)
            ridx = np.empty((_YBLOCK, taps, c_all), np.int64)
            idx = np.empty((_YBLOCK, nx), np.int64)
            nfs = np.zeros(_YBLOCK, np.int64)
            res = np.empty((_YBLOCK if bf16 else 1, cu, nx), np.float32)
            prow = np.empty((c_all, _YBLOCK, nx), np.float32)
            xt = np.empty((2 * c_all, _TILE), np.float32)
            ht = np.empty((hidden, _TILE), np.float32)
            dt = np.empty((cu, _TILE), np.float32)
            pos_b = np.empty(_TILE, np.int64)
            pos_s = np.empty(_TILE, np.int64)
            pos_r = np.empty(_TILE, np.int64)
            for ch in range(w, nchunks, nw):
                fill = 0
                row = ch * per
                end = min(rows, (ch + 1) * per)
                while row < end:
                    # A run of rows (consecutive y of one plane): fire masks, unchanged cells, then
                    # the run's perception at once, then each row's firing cells through the MLP.
                    nrun, b, z, y0 = _run_at(row, end, nz, ny)
                    if bf16:
                        _load_run(img, state, buf, ridx, b, z, y0, nrun, dims)
                    any_fired = 0
                    for j in range(nrun):
                        y = y0 + j
                        nfs[j] = _firing(idx[j], keys[b], dims, oz + z, oy + y, ox, thresh)
                        any_fired += nfs[j]
                        if bf16:
                            for c in range(cu):
                                src = buf[ridx[j, centre, cin + c]]
                                rc = res[j, c]
                                for x in range(nx):
                                    rc[x] = src[x]
                        else:
                            _tap_rows(ridx[j], cin, cu, nz, ny, b, z, y, dims)
                            _copy_centre(st2, out2, ridx, j, centre, cin, ((b * cu) * nz + z) * ny + y, nz * ny)
                    fired[ch] += any_fired
                    if any_fired:
                        if bf16:
                            _perceive(buf, buf, 0, ridx, cw, cb, prow, nrun)
                        else:
                            _perceive(img2, st2, cin, ridx, cw, cb, prow, nrun)
                    stored = 0  # bf16: rows of the run rounded and stored so far
                    pending = 0  # bf16: the run row of the current tile's first cell
                    for j in range(nrun):
                        nf = nfs[j]
                        zy = z * ny + y0 + j
                        # fc0 -> ReLU -> fc1 on tiles of firing cells, cells innermost (contiguous tiles).
                        k0 = 0
                        while k0 < nf:
                            kn = min(nf - k0, _TILE - fill)
                            if fill == 0:
                                pending = j
                            if bf16:
                                _gather_tile(buf, buf, 0, ridx[j, centre], prow, j, idx[j], k0, kn, xt, fill)
                            else:
                                _gather_tile(img2, st2, cin, ridx[j, centre], prow, j, idx[j], k0, kn, xt, fill)
                            for k in range(kn):
                                pos_b[fill + k] = b
                                pos_s[fill + k] = zy * nx + idx[j, k0 + k]
                            if bf16:
                                for k in range(kn):
                                    pos_r[fill + k] = j * cu * nx + idx[j, k0 + k]
                            fill += kn
                            k0 += kn
                            if fill == _TILE:
                                if blas and not bf16:
                                    _mlp_tile_blas(xt, w0, b0, w1, ht, dt)
                                else:
                                    _mlp_tile(xt, w0, b0, w1, ht, dt, fill)
                                if bf16:
                                    _add_res(dt, fill, pos_r, res)
                                else:
                                    _add_tile(dt, fill, pos_b, pos_s, out_flat, cu, plane)
                                fill = 0
                        if bf16:
                            # Rows whose cells are all in go out now, rounded (while still in
                            # cache); the tile a row ends in may hold the next rows' cells too.
                            if j == nrun - 1 and fill:
                                _mlp_tile(xt, w0, b0, w1, ht, dt, fill)
                                _add_res(dt, fill, pos_r, res)
                                fill = 0
                            done = j + 1 if fill == 0 else pending
                            for jj in range(stored, done):
                                for c in range(cu):
                                    _store_row(res[jj, c], out[b, c, z, y0 + jj], bf16)
                            stored = max(stored, done)
                    row += nrun
                if fill and blas:
                    dv = _tile_view(dt, fill, False)
                    _mlp_tile_blas(_tile_view(xt, fill), w0, b0, w1, _tile_view(ht, fill, False), dv)
                    _add_tile(dv, fill, pos_b, pos_s, out_flat, cu, plane)
                elif fill:
                    _mlp_tile(xt, w0, b0, w1, ht, dt, fill)
                    _add_tile(dt, fill, pos_b, pos_s, out_flat, cu, plane)
        return fired.sum()


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor (bfloat16 as its raw 16-bit words)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


class CpuFusedBackend(Backend):
    """Fused per-cell NCA steps on the CPU with numba (float32 maths; float32 or bfloat16 state)."""

    name = "cpu-fused"

    def __init__(self, num_threads: int | None = None):
        self.num_threads = num_threads

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if numba is None:
            return False, _NUMBA_ERROR
        return True, ""

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16)

    @torch.no_grad()
    def run_level(
        self,
        nca: BackboneNCA,
        image: torch.Tensor,
        state: torch.Tensor,
        run: LevelRun,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        ok, why = check_fusable(nca)
        if not ok:
            raise InputError(f"the cpu-fused backend cannot run this model: {why}; use backend='torch'")
        if not self.supports(state.device, state.dtype):
            raise InputError(f"cpu-fused runs float32/bfloat16 CPU tensors, got {state.dtype} on {state.device}")
        dims = nca.spatial_dims
        dtype = state.dtype
        bf16 = dtype == torch.bfloat16
        # Same numerics as the torch path: the image is used in the state's dtype.
        image = image.to(dtype).contiguous()
        state = state.contiguous()
        out = torch.empty_like(state)
        spatial = tuple(state.shape[2:])
        origin = tuple(run.origin) or (0,) * dims
        if dims == 2:
            view = lambda t: _as_numpy(t).reshape(t.shape[:2] + (1,) + spatial)  # noqa: E731
            oz, (oy, ox) = 0, origin
        else:
            view = _as_numpy
            oz, oy, ox = origin
        c, h = nca.channels, nca.fc0.out_channels
        cw = nca.conv.weight.detach().float().reshape(c, -1).contiguous().numpy()
        cb = nca.conv_bias.detach().float().contiguous().numpy()
        w0 = nca.fc0.weight.detach().float().reshape(h, 2 * c).contiguous().numpy()
        b0 = nca.fc0_bias.detach().float().contiguous().numpy()
        w1 = nca.fc1.weight.detach().float().reshape(c - nca.input_channels, h).contiguous().numpy()
        img_np = view(image)
        previous = numba.get_num_threads()
        if self.num_threads:
            numba.set_num_threads(min(self.num_threads, numba.config.NUMBA_NUM_THREADS))
        try:
            for step in range(run.steps):
                key, thresh = fire_params(run, step)
                with _STEP_LOCK:
                    _fused_step(
                        img_np,
                        view(state),
                        view(out),
                        cw,
                        cb,
                        w0,
                        b0,
                        w1,
                        dims,
                        oz,
                        oy,
                        ox,
                        np.full(state.shape[0], key, np.uint64),
                        np.uint64(thresh),
                        bf16,
                        numba.get_num_threads(),
                    )
                state, out = out, state
                if callback is not None:
                    callback(step, state)
        finally:
            numba.set_num_threads(previous)
        return state


def default_threads() -> int:
    """Threads numba uses (NUMBA_NUM_THREADS, else the CPU count)."""
    return int(os.environ.get("NUMBA_NUM_THREADS", 0)) or (os.cpu_count() or 1)


#: Registered by ``backends/__init__.py`` (the package imports this module, never the reverse).
BACKEND = CpuFusedBackend
